"""The suite runner: load models and the clean set, run every probe, write long-format results."""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from synclone.config import write_run_info
from synclone.data.eval_sets import load_eval_dataset
from synclone.data.readable import SKIPPED_LIST
from synclone.errors import UserError
from synclone.evaluate.config import EvaluateConfig
from synclone.models import load_model
from synclone.models.io import CONFIG, WEIGHTS
from synclone.probes.base import COLUMNS, EvalContext, ModelEntry, NonFiniteOutputs, Row, get_probe
from synclone.util.disk import expect_output
from synclone.util.files import atomic_path, file_sha256, write_text_atomic

RESULTS = "results.parquet"
ARTIFACTS = "artifacts.json"


def load_entry(name: str, folder: str | Path, device: str = "cpu") -> ModelEntry:
    """Load a model folder for evaluation; the fingerprint hashes its weights and config."""
    folder = Path(folder)
    module = load_model(folder, device=device)
    fp = file_sha256(folder / WEIGHTS)[:16] + file_sha256(folder / CONFIG)[:8]
    return ModelEntry(name, folder, module, fp)


def model_names(paths: list[str]) -> dict[str, str]:
    """Display names for model folders given on the command line (``name=path`` or a path).

    A plain path is named after its folder, or after the run folder when the folder is the run's
    ``model`` sub-folder (``runs/real/model`` -> ``real``).
    """
    out: dict[str, str] = {}
    for item in paths:
        name, sep, path = item.partition("=")
        if not sep:
            p = Path(item.rstrip("/"))
            name, path = (p.parent.name if p.name in ("model", "model_last") else p.name), item
        if name in out:
            raise UserError(f"two models are named '{name}'; name them explicitly as NAME=PATH")
        out[name] = path
    return out


def evaluate(cfg: EvaluateConfig, progress: bool = True) -> pd.DataFrame:
    """Run the probes of ``cfg`` on its models; writes ``results.parquet``/``.csv`` and ``artifacts.json``.

    Returns the results as a DataFrame with the columns of :data:`synclone.probes.base.COLUMNS`.
    """
    if not cfg.models:
        raise UserError("no models to evaluate: pass model folders (synclone evaluate runs/real/model ...) "
                        "or set 'models' in the config")
    from synclone.util.executor import preflight

    preflight(cfg.executor)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    probes = cfg.probe_settings()  # validate every probe's settings before any work

    clean = load_eval_dataset(cfg.data, "test", cfg.data_root, image_size=cfg.image_size)
    models = {name: load_entry(name, path) for name, path in cfg.models.items()}
    for name, entry in models.items():
        entry.module.label_space.check_aligned(clean.label_space, f"model '{name}'", f"dataset '{clean.name}'")
    out = Path(cfg.output)
    if (out / RESULTS).is_file() and not (out / ARTIFACTS).is_file():
        # Written by a version that wrote the table first and was stopped before its artefacts: this run completes
        # the folder (the logits come from the cache, so no model runs again).
        print(f"note: '{out}' holds {RESULTS} without {ARTIFACTS} (an evaluation stopped before it finished); "
              "completing it", file=sys.stderr, flush=True)
    ctx = EvalContext(models, clean, out, cache_dir=Path(cfg.cache_dir) if cfg.cache_dir else None,
                      batch_size=cfg.batch_size, data_root=cfg.data_root, max_images=cfg.max_images,
                      seed=cfg.seed, progress=progress, image_size=cfg.image_size, executor=cfg.executor,
                      max_unreadable=cfg.max_unreadable)
    # Before the run records are written: too many unreadable images stop the run with the earlier files intact.
    ctx.clean = ctx.readable(clean)
    write_run_info(out, cfg)
    # Cached float32 logits of every model on the clean set, about once per probe (variants, perturbed sets), and
    # 10 MB of tables and records: a rough bound, quoted if the disk fills up.
    expect_output(out, len(models) * len(ctx.clean) * len(ctx.clean.label_space) * 4 * (1 + len(probes)) + 10e6,
                  "this evaluation")
    # Probes that also report on the shifted sets (calibration under shift) read them from here.
    ctx.shift_datasets = [d for n, st in probes if n == "shift" for d in st.datasets]
    rows: list[Row] = []
    timings = {}
    bar = tqdm(probes, desc="evaluate", disable=not progress, unit="probe")
    for name, settings in bar:
        bar.set_postfix_str(f"{name} ({len(models)} models)")

        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rows += _run_isolated(ctx, models, name, settings)
        for msg in dict.fromkeys(str(w.message) for w in caught):  # each distinct note once
            tqdm.write(f"note: {msg}")
        timings[name] = round(time.perf_counter() - t0, 2)
    ctx.models = models
    if len(ctx.unreadable):
        print(f"note: {len(ctx.unreadable)} unreadable image(s) skipped; listed in '{out / SKIPPED_LIST}'",
              file=sys.stderr, flush=True)
    else:
        (out / SKIPPED_LIST).unlink(missing_ok=True)  # an earlier run's list; this run skipped nothing
    df = pd.DataFrame([r.as_dict() for r in rows], columns=list(COLUMNS))
    df["n"] = df["n"].astype("Int64")
    _write_outputs(df, ctx, timings, out)
    return df


def _write_outputs(df: pd.DataFrame, ctx: EvalContext, timings: dict, out: Path) -> None:
    """Write the results so that ``results.parquet`` (what ``report`` and a finished folder are known by) is last.

    A kill anywhere before it leaves no new table beside an earlier run's artefacts: the old table is removed
    first, so the folder is either finished (table, CSV, artefacts and timings of one run) or visibly not
    (no ``results.parquet``); re-running the same command finishes it from the logits cache.
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS).unlink(missing_ok=True)
    write_text_atomic(out / ARTIFACTS, json.dumps(ctx.artifacts) + "\n")
    write_text_atomic(out / "timings.json", json.dumps({"probes_s": timings, "forward_passes": ctx.forward_passes,
                                                        "skipped_images": len(ctx.unreadable)}, indent=2) + "\n")
    with atomic_path(out / "results.csv") as tmp:
        df.to_csv(tmp, index=False)
    with atomic_path(out / RESULTS) as tmp:
        df.to_parquet(tmp, index=False)


NON_FINITE_METRIC = "non_finite_outputs"
NON_FINITE_STATUS = "status: non-finite outputs"


def _run_isolated(ctx: EvalContext, models: dict[str, ModelEntry], probe: str, settings) -> list[Row]:  # noqa: ANN001
    """Run ``probe`` on every model; a model with non-finite outputs gets a status row instead of metrics and
    the probe runs again on the others, so one broken model never sinks the evaluation of the rest."""
    ctx.models = dict(models)
    marked: list[Row] = []
    while ctx.models:
        try:
            return marked + get_probe(probe).run(ctx, settings)
        except NonFiniteOutputs as err:
            if err.model not in ctx.models:
                raise
            print(f"warning: {err}; its {probe} rows are marked '{NON_FINITE_STATUS}' and the other models are "
                  "scored", file=sys.stderr, flush=True)
            marked.append(Row(err.model, probe, err.dataset, "clean", NON_FINITE_METRIC, float(err.count),
                              err.total, NON_FINITE_STATUS))
            del ctx.models[err.model]
    return marked


def read_results(folder: str | Path) -> pd.DataFrame:
    """The results table of an evaluation folder."""
    p = Path(folder) / RESULTS
    if not p.is_file():
        stopped = " (an evaluation there was stopped before it finished; re-run it to complete it)" \
            if (Path(folder) / "run.json").is_file() else ""
        raise UserError(f"'{folder}' holds no {RESULTS}{stopped}; run `synclone evaluate` with --output {folder} "
                        "first")
    return pd.read_parquet(p)
