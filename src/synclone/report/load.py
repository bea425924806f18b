"""Read evaluation folders (the output of ``synclone evaluate``) into one results table and artefact list.

An evaluation folder holds ``results.parquet`` (long format: model, probe, dataset, variant, metric,
value, n, convention), ``artifacts.json`` (curves and tables for plots), ``run.json`` and
``config.yaml``. Several folders merge into one table; a row measured twice (same model, probe,
dataset, variant, metric and convention) keeps the value from the folder given last, and the report
says how many rows that replaced.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from synclone.config import read_json
from synclone.errors import UserError

REQUIRED = ("model", "probe", "dataset", "variant", "metric", "value")
KEY = ("model", "probe", "dataset", "variant", "metric", "convention")


@dataclass
class EvalFolder:
    """One evaluation folder: its rows, artefacts and provenance files (empty when absent)."""

    path: Path
    results: pd.DataFrame
    artifacts: list[dict]
    run: dict = field(default_factory=dict)
    config_text: str = ""
    config: dict = field(default_factory=dict)


@dataclass
class Evaluations:
    """Every folder, and their rows merged (column ``source`` = the folder's index in ``folders``)."""

    folders: list[EvalFolder]
    results: pd.DataFrame
    artifacts: list[dict]
    replaced_rows: int = 0

    @property
    def models(self) -> list[str]:
        """Model names in the order they first appear."""
        return list(dict.fromkeys(self.results["model"]))


def _read_results(folder: Path) -> pd.DataFrame:
    path = folder / "results.parquet"
    if not path.is_file():
        if (folder / "run.json").is_file() and (folder / "config.yaml").is_file():
            raise UserError(f"'{folder}' has no results.parquet: the evaluation there was stopped before it finished; "
                            "re-run the same synclone evaluate command to complete it (cached outputs are reused)")
        raise UserError(f"'{folder}' has no results.parquet; pass the output folder of synclone evaluate")
    try:
        df = pd.read_parquet(path)
    except Exception as err:  # pyarrow raises several unrelated types for a damaged file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot read '{path}' ({first}); re-run synclone evaluate to rewrite it") from None
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise UserError(f"'{path}' lacks the column(s) {', '.join(missing)}; it was not written by synclone evaluate")
    if df.empty:
        raise UserError(f"'{path}' holds no result rows; run synclone evaluate with at least one probe")
    df = df.copy()
    if "n" not in df.columns:
        df["n"] = pd.NA
    if "convention" not in df.columns:
        df["convention"] = ""
    for c in ("model", "probe", "dataset", "variant", "metric"):
        df[c] = df[c].fillna("").astype(str)
    df["convention"] = df["convention"].fillna("").astype(str)
    df["value"] = pd.to_numeric(df["value"], errors="coerce").astype(float)
    return df


def _read_artifacts(folder: Path) -> list[dict]:
    path = folder / "artifacts.json"
    if not path.is_file():
        return []
    data = read_json(path, list)
    for i, a in enumerate(data):
        if not isinstance(a, dict) or not isinstance(a.get("kind"), str) or not isinstance(a.get("data"), dict):
            raise UserError(f"'{path}' entry {i} needs a 'kind' string and a 'data' object")
        for k in ("model", "probe", "dataset"):
            a[k] = "" if a.get(k) is None else str(a[k])
    return data


def _read_provenance(folder: Path) -> tuple[dict, str, dict]:
    run: dict = {}
    if (folder / "run.json").is_file():
        try:
            run = json.loads((folder / "run.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            run = {}  # provenance is shown when readable; a damaged run.json must not hide the results
    text, cfg = "", {}
    if (folder / "config.yaml").is_file():
        text = (folder / "config.yaml").read_text(encoding="utf-8", errors="replace")
        try:
            loaded = yaml.safe_load(text)
            cfg = loaded if isinstance(loaded, dict) else {}
        except yaml.YAMLError:
            cfg = {}
    return (run if isinstance(run, dict) else {}), text, cfg


def load_eval_folder(path: str | Path) -> EvalFolder:
    """One evaluation folder; a missing folder or an unreadable results.parquet raises :class:`UserError`."""
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"evaluation folder '{folder}' does not exist; pass the output folder of synclone evaluate")
    results = _read_results(folder)
    run, text, cfg = _read_provenance(folder)
    return EvalFolder(folder, results, _read_artifacts(folder), run, text, cfg)


def load_evaluations(paths: list[str | Path] | str | Path) -> Evaluations:
    """Read and merge evaluation folders; later folders win on rows measured twice."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = list(paths)
    if not paths:
        raise UserError("no evaluation folder given; pass at least one output folder of synclone evaluate")
    folders = [load_eval_folder(p) for p in paths]
    frames = [f.results.assign(source=i) for i, f in enumerate(folders)]
    merged = pd.concat(frames, ignore_index=True)
    before = len(merged)
    merged = merged.drop_duplicates(subset=list(KEY), keep="last").reset_index(drop=True)
    # The same curve from two folders: keep the later one, as for rows.
    artifacts: dict[tuple, dict] = {}
    for i, f in enumerate(folders):
        for a in f.artifacts:
            key = (a["model"], a["probe"], a["dataset"], a["kind"], str(a["data"].get("score", "")),
                   str(a["data"].get("attack", "")))
            artifacts.pop(key, None)
            artifacts[key] = dict(a, source=i)
    return Evaluations(folders, merged, list(artifacts.values()), before - len(merged))
