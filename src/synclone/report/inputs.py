"""The optional inputs of a report: a curation folder, generated dataset folders and training run folders.

Each reader returns plain data (tables, PNG bytes of sample grids, histories) for the report's
sections. Sample grids come from :func:`synclone.curate.stats.example_grid`, so the report shows the
same thumbnails as the curation statistics.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from synclone.config import read_json
from synclone.curate.stats import example_grid
from synclone.data.folder import load_curated, read_dataset_folder, read_dataset_json
from synclone.errors import UserError


@dataclass
class Grid:
    png: bytes
    caption: str


@dataclass
class CurationInfo:
    path: Path
    per_class: pd.DataFrame  # class_name, images, kept, dropped, dropped_<reason>...
    grids: list[Grid]
    scorer: str = ""


@dataclass
class DatasetInfo:
    path: Path
    name: str
    images: int
    classes: int
    grid: Grid | None
    details: dict = field(default_factory=dict)


@dataclass
class TrainRun:
    model: str
    path: Path
    metrics: dict
    seed: object = None


def _grid_png(records, space, mask, examples: int, thumb: int, captions: bool, reasons=None) -> bytes | None:
    """PNG bytes of a per-class sample grid of ``records[mask]`` (None when the mask is empty)."""
    table = pd.DataFrame({"label": [r.label for r in records], "path": [str(r.path) for r in records],
                          "drop_reason": reasons if reasons is not None else [None] * len(records)})
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "grid.png"
        if not example_grid(table, np.asarray(mask, dtype=bool), space, out, examples, thumb, captions=captions):
            return None
        return out.read_bytes()


def read_curation(path: str | Path, examples: int = 8, thumb: int = 48) -> CurationInfo:
    """Counts per class and sample grids of kept and dropped images of a curated dataset folder."""
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"curation folder '{folder}' does not exist; pass the output folder of synclone curate")
    records, space = load_curated(folder, include_dropped=True)
    if not records:
        raise UserError(f"curation folder '{folder}' lists no images in curation.jsonl")
    kept = [bool(r.meta.get("kept")) for r in records]
    reasons = [r.meta.get("drop_reason") for r in records]
    df = pd.DataFrame({"class_name": [r.class_name for r in records], "kept": kept,
                       "reason": [x if not k else None for x, k in zip(reasons, kept, strict=True)]})
    per_class = df.groupby("class_name", sort=False).agg(images=("kept", "size"), kept=("kept", "sum"))
    per_class["dropped"] = per_class["images"] - per_class["kept"]
    by_reason = df.dropna(subset=["reason"]).pivot_table(index="class_name", columns="reason", values="kept",
                                                          aggfunc="size", fill_value=0)
    per_class = per_class.join(by_reason.add_prefix("dropped: "), how="left").fillna(0)
    per_class = per_class.reindex([c for c in space.classes if c in per_class.index]).reset_index()
    grids = []
    for which, mask in (("kept", kept), ("dropped", [not k for k in kept])):
        data = _grid_png(records, space, mask, examples, thumb, captions=which == "dropped", reasons=reasons)
        if data:
            grids.append(Grid(data, f"Curation: up to {examples} {which} images per class"
                                    + (" (with the reason each was dropped)" if which == "dropped" else "") + "."))
    info = read_dataset_json(folder).get("curation", {})
    scorer = info.get("scorer_id") or ""
    return CurationInfo(folder, per_class, grids, str(scorer))


def read_dataset(path: str | Path, examples: int = 8, thumb: int = 48) -> DatasetInfo:
    """Image and class counts and a per-class sample grid of a (generated) dataset folder."""
    folder = Path(path)
    records, space = read_dataset_folder(folder)  # raises UserError for a missing or empty folder
    png = _grid_png(records, space, [True] * len(records), examples, thumb, captions=False)
    info = read_dataset_json(folder)
    details = {}
    gen = info.get("generator")
    if isinstance(gen, dict):
        details = {k: gen[k] for k in ("backend", "model", "name", "steps", "guidance_scale", "seed") if k in gen}
    for k in ("seed", "kind"):
        if k in info and not isinstance(info[k], (dict, list)):
            details[k] = info[k]
    grid = Grid(png, f"{folder.name}: up to {examples} images per class.") if png else None
    return DatasetInfo(folder, folder.name, len(records), len(space), grid, details)


def read_train_run(model: str, path: str | Path) -> TrainRun:
    """A training run folder's ``metrics.json`` (best_val_acc, selected_by, validation, history)."""
    folder = Path(path)
    f = folder / "metrics.json"
    if not f.is_file():
        raise UserError(f"training run '{folder}' (model '{model}') has no metrics.json; pass the output folder of "
                        "synclone train")
    metrics = read_json(f)
    seed = None
    if (folder / "config.yaml").is_file():
        try:
            cfg = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8"))
            seed = cfg.get("seed") if isinstance(cfg, dict) else None
        except yaml.YAMLError:
            seed = None
    return TrainRun(model, folder, metrics, seed)
