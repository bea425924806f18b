"""Context bias: accuracy on objects in common vs uncommon settings (FOCUS, Kattakinda & Feizi, ICML 2022).

Every image carries its class and three context attributes (time of day, weather, location), each
flagged common or uncommon for that class. P_k is the accuracy on the images with exactly k uncommon
attributes; the ratios P_k / P0 say how much accuracy survives unusual contexts (1 = none lost).

FOCUS's released ``annotations.db`` (SQLite) is read as it is. Other annotated tables (CSV, JSON lines or
parquet; a dataset folder's ``metadata.jsonl`` works) need, per
image, ``file_name`` (relative to the table's folder) or ``path``; ``class_name`` or ``label``; and one
of: ``n_uncommon``; the flags ``time_uncommon``, ``weather_uncommon``, ``location_uncommon``; or FOCUS's
raw attributes ``time``, ``weather``, ``location`` (or ``locations``, comma-separated) for the 10
FOCUS categories, judged with FOCUS's own table of uncommon settings.

Generated probes: :func:`synclone.prompts.contexts.context_prompts` places a class in common and uncommon
settings and returns the attributes to store next to each generated image, so the table above comes out of
``synclone generate`` (prompt strategy ``contexts``) directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from synclone.config import StrictModel
from synclone.errors import UserError
from synclone.labels import LabelSpace, class_lookup, read_data_file, slugify
from synclone.probes.base import EvalContext, Row, register_probe, seeded_indices
from synclone.probes.built import check_folder, class_index, read_images
from synclone.prompts.contexts import ATTRIBUTES, contexts_table

FLAG_COLUMNS = tuple(f"{a}_uncommon" for a in ATTRIBUTES)
TABLE_NAMES = ("metadata.jsonl", "metadata.csv", "metadata.parquet", "annotations.csv", "annotations.jsonl",
               "annotations.db")  # the last: FOCUS's released SQLite file (synclone.probes.context_focus)


# --- the metric ---------------------------------------------------------------------------------------


@dataclass
class ContextResult:
    """P_k (accuracy with k uncommon attributes), image counts and P_k / P0 for every k present."""

    accuracy: dict[int, float]
    n: dict[int, int]
    ratio_to_p0: dict[int, float]
    overall: float

    def to_rows(self, probe: str = "context", **columns) -> pd.DataFrame:
        """Long-format rows: variant 'P<k>' with metrics accuracy and ratio_to_P0, plus variant 'all' accuracy."""
        rows = []
        for k in sorted(self.accuracy):
            rows.append({"probe": probe, "variant": f"P{k}", "metric": "accuracy", "value": self.accuracy[k],
                         "n": self.n[k]})
            rows.append({"probe": probe, "variant": f"P{k}", "metric": "ratio_to_P0", "value": self.ratio_to_p0[k],
                         "n": self.n[k]})
        rows.append({"probe": probe, "variant": "all", "metric": "accuracy", "value": self.overall,
                     "n": sum(self.n.values())})
        df = pd.DataFrame(rows)
        for k, v in columns.items():
            df.insert(0, k, v)
        return df


def context_accuracy(correct, n_uncommon) -> ContextResult:
    """P_k and P_k / P0 from per-image correctness and number of uncommon attributes (ratios NaN without P0)."""
    c = np.asarray(correct, dtype=bool)
    try:
        k = np.asarray(n_uncommon, dtype=np.float64)
    except (TypeError, ValueError):
        raise UserError("n_uncommon must be numbers (0..3)") from None
    if c.shape != k.shape or c.ndim != 1:
        raise UserError(f"correct and n_uncommon must be 1-D of one length, got {c.shape} and {k.shape}")
    if c.size == 0:
        raise UserError("no images: context bias needs at least one annotated image")
    if not np.all(np.isfinite(k)) or not np.all(np.mod(k, 1) == 0):
        raise UserError("n_uncommon must be whole numbers (0..3) for every image")
    k = k.astype(np.int64)
    if k.min() < 0 or k.max() > len(ATTRIBUTES):
        raise UserError(f"n_uncommon must lie in 0..{len(ATTRIBUTES)}, got values in {k.min()}..{k.max()}")
    acc = {int(v): float(c[k == v].mean()) for v in np.unique(k)}
    n = {int(v): int((k == v).sum()) for v in np.unique(k)}
    p0 = acc.get(0)
    ratio = {v: (a / p0 if p0 else float("nan")) for v, a in acc.items()}
    return ContextResult(acc, n, ratio, float(c.mean()))


# --- annotated tables ---------------------------------------------------------------------------------


def _find_table(path: Path) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        for sub in (path, path / "test", path / "train", path / "val"):
            for name in TABLE_NAMES:
                if (sub / name).is_file():
                    return sub / name
        raise UserError(f"no annotation table in '{path}': expected one of {TABLE_NAMES} (or in test/, train/)")
    raise UserError(f"context probe '{path}' does not exist")


def _truthy(series: pd.Series, column: str, table: Path) -> np.ndarray:
    if series.dtype == bool:
        return series.to_numpy()
    mapped = series.map(lambda v: str(v).strip().lower()).map(
        {"true": True, "1": True, "yes": True, "uncommon": True, "false": False, "0": False, "no": False,
         "common": False, "1.0": True, "0.0": False})
    if mapped.isna().any():
        bad = series[mapped.isna()].iloc[0]
        raise UserError(f"column '{column}' of '{table}' must be true/false (or common/uncommon), found '{bad}'")
    return mapped.to_numpy(dtype=bool)


def _focus_n_uncommon(df: pd.DataFrame, classes: Sequence[str], table: Path) -> np.ndarray:
    focus = contexts_table()["focus"]
    loc_col = "locations" if "locations" in df.columns else "location"
    out = []
    for cls, time, weather, locs in zip(classes, df["time"], df["weather"], df[loc_col], strict=True):
        key = contexts_table()["aliases"].get(slugify(cls), slugify(cls))
        if key not in focus["uncommon"]:
            raise UserError(f"'{table}': class '{cls}' is not a FOCUS category {focus['categories']}, so its raw "
                            "time/weather/location cannot be judged; add time_uncommon/weather_uncommon/"
                            "location_uncommon columns or n_uncommon")
        unc = focus["uncommon"][key]
        loc_set = {s.strip() for s in str(locs).split(",")}
        out.append(int(str(time) in unc["time"]) + int(str(weather) in unc["weather"])
                   + int(bool(loc_set & set(unc["locations"]))))
    return np.array(out)


def read_context_table(path: str | Path) -> pd.DataFrame:
    """An annotated context probe as a table with columns ``path``, ``class_name`` / ``label`` and ``n_uncommon``."""
    table = _find_table(Path(path))
    try:
        if table.suffix in (".db", ".sqlite", ".sqlite3"):
            from synclone.probes.context_focus import read_focus_db

            df = read_focus_db(table)
        elif table.suffix == ".jsonl":
            df = pd.read_json(table, lines=True)
        elif table.suffix == ".parquet":
            df = pd.read_parquet(table)
        else:
            df = pd.read_csv(table)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read context annotations '{table}': {err}") from None
    if df.empty:
        raise UserError(f"context annotations '{table}' have no rows")
    if "attributes" in df.columns:
        # `synclone generate` (contexts strategy) nests each image's context under 'attributes'.
        nested = pd.json_normalize([a if isinstance(a, dict) else {} for a in df["attributes"]])
        for col in nested.columns:
            if col not in df.columns:
                df[col] = nested[col].to_numpy()
    if "path" not in df.columns:
        if "file_name" not in df.columns:
            raise UserError(f"'{table}' needs a 'file_name' (relative to its folder) or 'path' column")
        df["path"] = [str(table.parent / f) for f in df["file_name"]]
    if "class_name" not in df.columns and "label" not in df.columns:
        raise UserError(f"'{table}' needs a 'class_name' or 'label' column")
    if "n_uncommon" not in df.columns:
        if all(c in df.columns for c in FLAG_COLUMNS):
            df["n_uncommon"] = sum(_truthy(df[c], c, table).astype(int) for c in FLAG_COLUMNS)
        elif {"time", "weather"} <= set(df.columns) and ({"location", "locations"} & set(df.columns)):
            if "class_name" not in df.columns:
                raise UserError(f"'{table}': raw FOCUS attributes need a 'class_name' column")
            df["n_uncommon"] = _focus_n_uncommon(df, list(df["class_name"]), table)
        else:
            raise UserError(f"'{table}' says nothing about context: add 'n_uncommon', or the flags {FLAG_COLUMNS}, "
                            "or FOCUS's raw 'time', 'weather', 'location' columns")
    df.attrs["table"] = str(table)
    return df


def _labels(df: pd.DataFrame, space: LabelSpace, table: str) -> np.ndarray:
    if "class_name" in df.columns:
        lookup = class_lookup(space)
        missing = sorted({c for c in df["class_name"] if c not in lookup and slugify(c) not in lookup})
        if missing:
            raise UserError(f"classes {missing[:5]} of '{table}' are not in the model's label space '{space.name}' "
                            f"({space.describe()})")
        return np.array([lookup.get(c, lookup.get(slugify(c))) for c in df["class_name"]])
    labels = df["label"].to_numpy()
    if labels.min() < 0 or labels.max() >= len(space):
        raise UserError(f"labels of '{table}' fall outside the model's {len(space)} classes; add a class_name column")
    return labels.astype(np.int64)


# ----------------------------------------------------------------------------------------------------------------------
# context
# ----------------------------------------------------------------------------------------------------------------------


class ContextSettings(StrictModel):
    """Settings of the ``context`` probe.

    ``folder``: a FOCUS-style annotated probe (a table per :func:`synclone.probes.context.read_context_table`)
    or a dataset folder made by ``synclone generate`` with the ``contexts`` prompt strategy, whose
    ``train/metadata.jsonl`` records each image's context under ``attributes`` (``n_uncommon`` and the
    ``*_uncommon`` flags). ``max_images`` caps the images (seeded). ``decision``: ``direct`` (the model's
    own classes, by class name or label), ``focus`` (a 1000-class ImageNet model on the FOCUS categories),
    or ``auto``.
    """

    folder: str
    max_images: int | None = Field(default=None, ge=1)
    decision: Literal["auto", "direct", "focus"] = "auto"
    seed: int = 0


def _generated_table(root: Path) -> Path | None:
    """The metadata.jsonl of a generated dataset folder, if ``root`` is (or is inside) one."""
    for cand in (root / "train" / "metadata.jsonl", root / "metadata.jsonl"):
        if cand.is_file():
            return cand
    return root if root.is_file() and root.name.endswith(".jsonl") else None


def read_context_probe(folder: str | Path) -> pd.DataFrame:
    """A context probe as a table with ``path``, ``class_name`` and/or ``label``, and ``n_uncommon``.

    Reads FOCUS-style tables with :func:`synclone.probes.context.read_context_table`; a generated dataset
    folder nests the context of each image under ``attributes``, which is lifted to columns first.
    """
    root = Path(folder)
    table = _generated_table(root)
    if table is not None:
        try:
            df = pd.read_json(table, lines=True)
        except ValueError as err:
            raise UserError(f"cannot read '{table}': {err}") from None
        if "attributes" in df.columns:
            attrs = pd.json_normalize([a if isinstance(a, dict) else {} for a in df["attributes"]])
            for col in attrs.columns:
                if col not in df.columns:
                    df[col] = attrs[col].to_numpy()
            if "n_uncommon" not in df.columns and all(c in df.columns for c in FLAG_COLUMNS):
                df["n_uncommon"] = sum(df[c].astype(bool).astype(int) for c in FLAG_COLUMNS)
            if "n_uncommon" not in df.columns or df["n_uncommon"].isna().any():
                raise UserError(f"'{table}' records no context per image (attributes.n_uncommon): generate the probe "
                                "with the contexts prompt strategy (prompts.strategy: contexts)")
            if "path" not in df.columns:
                df["path"] = [str(table.parent / f) for f in df["file_name"]]
            df.attrs["table"] = str(table)
            return df
    return read_context_table(root)


@register_probe("context", ContextSettings)
def context_probe(ctx: EvalContext, s: ContextSettings) -> list[Row]:
    """Top-1 accuracy P_k on images with k uncommon context attributes (time, weather, location) and P_k / P0."""
    root = check_folder(s.folder, "context probe")
    df = read_context_probe(root)
    table = df.attrs.get("table", str(root))
    df = df.iloc[seeded_indices(len(df), s.max_images, s.seed).numpy()].reset_index(drop=True)
    missing = [p for p in df["path"] if not Path(p).is_file()]
    if missing:
        raise UserError(f"{len(missing)} image(s) listed in '{table}' do not exist, e.g. '{missing[0]}'")
    dataset = f"context:{root.name}"
    where = Path(table).relative_to(root.parent) if Path(table).is_relative_to(root.parent) else Path(table).name
    data = read_images([Path(p) for p in df["path"]], ctx, dataset)
    n_uncommon = df["n_uncommon"].to_numpy()
    contexts = read_data_file("contexts.json")
    rows: list[Row] = []
    for m, entry in ctx.models.items():
        logits = ctx.logits(m, data, "context")
        correct, how = _context_correct(df, logits, entry.module, s.decision, contexts, table)
        result = context_accuracy(correct, n_uncommon)
        convention = f"decision={how}; k = number of uncommon attributes among time, weather, location; {where}"
        for k in sorted(result.accuracy):
            rows.append(Row(m, "context", dataset, f"P{k}", "top1", result.accuracy[k], result.n[k], convention))
            if k > 0:
                rows.append(Row(m, "context", dataset, f"P{k}", "ratio_to_P0", result.ratio_to_p0[k], result.n[k],
                                convention))
        rows.append(Row(m, "context", dataset, "all", "top1", result.overall, len(df), convention))
        ctx.add_artifact(m, "context", dataset, "context",
                         {"P": {f"P{k}": v for k, v in result.accuracy.items()},
                          "n": {f"P{k}": v for k, v in result.n.items()},
                          "ratio_to_P0": {f"P{k}": v for k, v in result.ratio_to_p0.items()}})
    return rows


def _context_correct(df: pd.DataFrame, logits: torch.Tensor, module, decision: str, contexts: dict,
                     table: str) -> tuple[np.ndarray, str]:
    space = getattr(module, "label_space", None)
    pred = logits.argmax(1).numpy()
    names = list(df["class_name"]) if "class_name" in df.columns else None
    if decision == "auto":
        known = space is not None and (names is None or all(n in class_index(space) for n in names))
        decision = "direct" if known or logits.shape[1] != 1000 else "focus"
    if decision == "direct":
        if space is None:
            raise UserError("decision direct needs a model with a label space")
        lookup = class_index(space)
        if names is not None:
            unknown = sorted({n for n in names if n not in lookup})
            if unknown:
                raise UserError(f"classes {unknown[:5]} of '{table}' are not in the model's label space "
                                f"'{space.name}' ({space.describe()})")
            labels = np.array([lookup[n] for n in names])
        else:
            labels = df["label"].to_numpy().astype(np.int64)
            if labels.min() < 0 or labels.max() >= len(space):
                raise UserError(f"labels of '{table}' fall outside the model's {len(space)} classes")
        return pred == labels, "direct argmax"
    if decision != "focus":
        raise UserError(f"unknown decision '{decision}'")
    if names is None:
        raise UserError(f"decision focus needs a class_name column in '{table}'")
    focus, aliases = contexts["focus"], contexts["aliases"]
    keys = [aliases.get(slugify(n), slugify(n)) for n in names]
    unknown = sorted({n for n, k in zip(names, keys, strict=True) if k not in focus["imagenet1k_indices"]})
    if unknown:
        raise UserError(f"classes {unknown[:5]} of '{table}' are not FOCUS categories {focus['categories']}")
    ok = np.array([int(p) in set(focus["imagenet1k_indices"][k]) for p, k in zip(pred, keys, strict=True)])
    return ok, "focus (1000-way argmax within the category's ImageNet classes)"
