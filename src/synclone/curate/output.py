"""Write a curated dataset folder: the kept images as a synclone dataset, every image's outcome beside it.

Layout::

    dataset.json            label_space, source (path + the source's dataset.json), curation (scorer,
                            filters, per-filter log, counts)
    train/metadata.jsonl    the kept images: file_name (relative to train/, pointing back into the source
                            unless materialised), label, class_name, the source's metadata, the scores
    curation.jsonl          every image, kept or dropped, with kept / drop_reason / dup_of and the scores
    curation.parquet        the same as a table (scores and outcome columns, no free-form metadata)
    stats/                  tables and plots (see synclone.curate.stats)
    config.yaml, run.json   the resolved config and the run snapshot

With ``materialize: hardlink`` or ``copy`` the kept files are placed under ``train/<slug>/`` (a hardlink
that crosses file systems falls back to a copy, counted in dataset.json).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pandas as pd

from synclone.curate.config import CurateConfig, FiltersConfig
from synclone.data.folder import ALL_ROWS, DATASET_JSON, METADATA, ImageRecord, read_dataset_json
from synclone.data.readable import SKIPPED_LIST
from synclone.errors import UserError
from synclone.labels import LabelSpace
from synclone.util.files import atomic_path, write_text_atomic
from synclone.util.lock import LOCK_NAME

FORMAT = "synclone-dataset/1"
SCORE_COLUMNS = ("p_label", "top1", "margin", "class_sim", "prompt_sim")
# The refill rounds' folder and its record (synclone.curate.refill); never removed by a re-run.
REFILL_DIR, REFILL_STATE = "refill", "refill.json"
# Files and folders a curate run owns in its output folder (removed before a re-run writes new ones).
_OWNED = ("train", "stats", ALL_ROWS, "curation.parquet", DATASET_JSON, "config.yaml", "run.json", SKIPPED_LIST)


def prepare_output(out: Path, source: Path, overwrite: bool) -> None:
    """Make ``out`` ready: refuse the source itself or a folder inside it; clear an earlier curate output."""
    out_r, src_r = out.resolve(), source.resolve()
    if out_r == src_r or src_r in out_r.parents:
        raise UserError(f"output '{out}' is the input folder or inside it; write the curated dataset to a sibling "
                        "folder (e.g. output: data/curated)")
    if out.exists() and not out.is_dir():
        raise UserError(f"output '{out}' exists and is not a folder")
    if out.is_dir() and any(p.name != LOCK_NAME for p in out.iterdir()):
        earlier = "curation" in (read_dataset_json(out) if (out / DATASET_JSON).is_file() else {})
        # A refill interrupted before the first dataset.json leaves only refill/ (kept: it holds the rounds).
        earlier = earlier or (out / REFILL_DIR / REFILL_STATE).is_file()
        # A run killed after its metadata but before dataset.json: only files a curate run writes, and records
        # that only curate writes.
        earlier = earlier or _interrupted_curate(out)
        if not earlier and not overwrite:
            raise UserError(f"output folder '{out}' is not empty and is not an earlier curate output; choose another "
                            "folder or set overwrite=true")
        for name in _OWNED:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _interrupted_curate(out: Path) -> bool:
    """True when ``out`` holds only what a curate run writes before ``dataset.json``, with curate's records."""
    if any(p.name not in (*_OWNED, REFILL_DIR, LOCK_NAME) for p in out.iterdir()):
        return False
    if {p.name for p in out.iterdir()} - {LOCK_NAME} == {SKIPPED_LIST}:  # stopped by max_unreadable, nothing else
        try:
            with open(out / SKIPPED_LIST, encoding="utf-8") as f:
                return f.readline().startswith("curate\t")
        except (OSError, UnicodeDecodeError):
            return False
    for rows in (out / ALL_ROWS, out / "train" / METADATA):
        try:
            with open(rows, encoding="utf-8") as f:
                first = json.loads(f.readline() or "{}")
        except (OSError, ValueError):
            continue
        if isinstance(first, dict) and {"source_file_name", "kept", "drop_reason"} <= first.keys():
            return True
    return False


def _clean(v):
    """JSON-safe value: NaN becomes null, numpy scalars become Python ones."""
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _place(src: Path, dest: Path, mode: str) -> bool:
    """Hardlink or copy ``src`` to ``dest``; returns True if a hardlink had to fall back to a copy."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if mode == "hardlink":
        try:
            os.link(src, dest)
            return False
        except OSError:
            shutil.copy2(src, dest)
            return True
    shutil.copy2(src, dest)
    return False


def write_curated(out: Path, cfg: CurateConfig, records: list[ImageRecord], table: pd.DataFrame, space: LabelSpace,
                  scorer_id: str, classes: tuple[str, ...], log: list[dict], counts: dict,
                  filters: FiltersConfig | None = None, extra: dict | None = None) -> dict:
    """Write metadata, the all-images table and dataset.json into ``out``; returns the dataset.json dict.

    ``filters``: the settings that ran, when they differ from ``cfg.filters`` (refill sets the top-k);
    ``extra``: more sections for ``curation`` (e.g. ``refill``).
    """
    train = out / "train"
    train.mkdir(parents=True, exist_ok=True)
    source = Path(cfg.input)
    used_names: set[str] = set()
    fallbacks = 0
    kept_rows, all_rows = [], []
    for r, row in zip(records, table.to_dict("records"), strict=True):
        kept = bool(row["kept"])
        if kept and cfg.materialize != "none":
            name = f"{space.slugs[r.label]}/{r.path.name}"
            if name in used_names:  # two source folders can hold the same file name
                name = f"{space.slugs[r.label]}/{r.id.replace('/', '__')}{r.path.suffix}"
            used_names.add(name)
            fallbacks += _place(r.path, train / name, cfg.materialize)
            file_name = name
        elif cfg.paths == "absolute":
            file_name = str(r.path)
        else:
            file_name = Path(os.path.relpath(r.path, train.resolve())).as_posix()
        entry = {"file_name": file_name, "id": r.id, "label": r.label, "class_name": r.class_name,
                 **{k: _clean(v) for k, v in r.meta.items() if k not in ("kept", "drop_reason", "dup_of")},
                 "source_file_name": r.file_name,
                 **{k: _clean(row[k]) for k in SCORE_COLUMNS},
                 "kept": kept, "drop_reason": _clean(row["drop_reason"]), "dup_of": _clean(row["dup_of"])}
        if isinstance(row["error"], str):
            entry["error"] = row["error"]
        all_rows.append(entry)
        if kept:
            kept_rows.append(entry)
    _write_jsonl(train / METADATA, kept_rows)
    _write_jsonl(out / ALL_ROWS, all_rows)
    table.drop(columns=["content_key"]).to_parquet(out / "curation.parquet", index=False)

    reasons = table.loc[~table["kept"], "drop_reason"].value_counts().to_dict()
    info = {
        "format": FORMAT,
        "kind": "curated",
        "label_space": space.to_dict(),
        "source": {"path": str(source.resolve()), "images": len(records), "dataset": read_dataset_json(source)},
        "curation": {
            "scorer": cfg.scorer.model_dump(mode="json"),
            "scorer_id": scorer_id,
            "scoring_classes": list(classes),
            "filters": (filters or cfg.filters).model_dump(mode="json"),
            "log": log,
            "counts": {"images": len(records), "kept": len(kept_rows), "dropped": len(records) - len(kept_rows),
                       "by_reason": {str(k): int(v) for k, v in reasons.items()}},
            "scoring": counts,
            "materialize": cfg.materialize,
            "paths": cfg.paths if cfg.materialize == "none" else "relative",
            "hardlink_fallback_copies": fallbacks,
            **(extra or {}),
        },
    }
    write_text_atomic(out / DATASET_JSON, json.dumps(info, indent=2) + "\n")
    return info


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
