"""Context bias: accuracy on objects in common vs uncommon settings (FOCUS, Kattakinda & Feizi, ICML 2022).

Every image carries its class and three context attributes (time of day, weather, location), each
flagged common or uncommon for that class. P_k is the accuracy on the images with exactly k uncommon
attributes; the ratios P_k / P0 say how much accuracy survives unusual contexts (1 = none lost).

Annotated tables (CSV, JSON lines or parquet; a dataset folder's ``metadata.jsonl`` works) need, per
image, ``file_name`` (relative to the table's folder) or ``path``; ``class_name`` or ``label``; and one
of: ``n_uncommon``; the flags ``time_uncommon``, ``weather_uncommon``, ``location_uncommon``; or FOCUS's
raw attributes ``time``, ``weather``, ``location`` (or ``locations``, comma-separated) for the 10
FOCUS categories, judged with FOCUS's own table of uncommon settings.

Generated probes: :func:`context_prompts` places a class in common and uncommon settings (settings
from ``data/contexts.json``, per class where known, generic otherwise) and returns the attributes to
store next to each generated image, so the table above comes out of ``synclone generate`` directly.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from synclone.errors import UserError
from synclone.labels import LabelSpace, slugify
from synclone.robustness.probe_io import class_lookup, predict_logits, read_data_file

ATTRIBUTES = ("time", "weather", "location")
FLAG_COLUMNS = tuple(f"{a}_uncommon" for a in ATTRIBUTES)
TABLE_NAMES = ("metadata.jsonl", "metadata.csv", "metadata.parquet", "annotations.csv", "annotations.jsonl")


# --- generated probes: prompts in common and uncommon contexts ---------------------------------------


@lru_cache(maxsize=1)
def _contexts() -> dict:
    return read_data_file("contexts.json")


def context_settings(class_name: str) -> dict[str, dict[str, list[str]]]:
    """Common and uncommon phrases per attribute for ``class_name`` (its own entry, an alias's, or the defaults)."""
    data = _contexts()
    key = slugify(class_name)
    key = data["aliases"].get(key, key)
    own = data["classes"].get(key, {})
    return {a: {k: list(v) for k, v in own.get(a, data["default"][a]).items()} for a in ATTRIBUTES}


def _choice(rng, seq: Sequence[str]) -> str:
    if isinstance(rng, np.random.Generator):
        return seq[int(rng.integers(len(seq)))]
    return rng.choice(list(seq))


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def context_prompts(class_name: str, rng: random.Random | np.random.Generator | int | None = None,
                    n_per_pattern: int = 1) -> list[tuple[str, dict, int]]:
    """Prompts placing ``class_name`` in every feasible mix of common/uncommon time, weather and location.

    Returns ``(prompt, attributes, n_uncommon)`` tuples: one per pattern of the 8 (common or uncommon
    for each attribute) times ``n_per_pattern``, each phrase drawn with ``rng`` (a ``random.Random``, a
    numpy Generator or a seed). ``attributes`` holds ``time``, ``weather``, ``location`` (the phrases)
    and ``time_uncommon``, ``weather_uncommon``, ``location_uncommon``: store them with the image. A
    pattern needing an uncommon value the class lacks (night is common for frogs) is skipped.
    """
    if rng is None or isinstance(rng, int):
        rng = random.Random(rng)
    if n_per_pattern < 1:
        raise UserError(f"n_per_pattern must be at least 1, got {n_per_pattern}")
    settings = context_settings(class_name)
    template = _contexts()["template"]
    out = []
    for pattern in itertools.product((False, True), repeat=len(ATTRIBUTES)):
        pools = [settings[a]["uncommon" if u else "common"] for a, u in zip(ATTRIBUTES, pattern, strict=True)]
        if not all(pools):
            continue
        for _ in range(n_per_pattern):
            phrases = {a: _choice(rng, pool) for a, pool in zip(ATTRIBUTES, pools, strict=True)}
            prompt = template.format(article=_article(class_name), cls=class_name, **phrases)
            attrs = dict(phrases, **{f"{a}_uncommon": bool(u) for a, u in zip(ATTRIBUTES, pattern, strict=True)})
            out.append((prompt, attrs, int(sum(pattern))))
    return out


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
    focus = _contexts()["focus"]
    loc_col = "locations" if "locations" in df.columns else "location"
    out = []
    for cls, time, weather, locs in zip(classes, df["time"], df["weather"], df[loc_col], strict=True):
        key = _contexts()["aliases"].get(slugify(cls), slugify(cls))
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
        if table.suffix == ".jsonl":
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


def evaluate_context(model, path: str | Path, *, decision: str = "auto", input_size: Sequence[int] | None = None,
                     batch_size: int = 64, device: str = "cpu") -> tuple[ContextResult, pd.DataFrame]:
    """P_k of ``model`` on an annotated context probe; also returns the table with predictions.

    ``decision``: ``"direct"`` (argmax over the model's classes, matched to ``class_name``),
    ``"focus"`` (a 1000-class ImageNet model on the FOCUS categories: correct when the argmax is one
    of FOCUS's ImageNet classes for the category), or ``"auto"``.
    """
    df = read_context_table(path).copy()
    table = df.attrs.get("table", str(path))
    missing = [p for p in df["path"] if not Path(p).is_file()]
    if missing:
        raise UserError(f"{len(missing)} image(s) listed in '{table}' do not exist, e.g. '{missing[0]}'")
    logits = predict_logits(model, [Path(p) for p in df["path"]], input_size, batch_size, device)
    space: LabelSpace | None = getattr(model, "label_space", None)
    focus = _contexts()["focus"]
    if decision == "auto":
        names = set(df["class_name"]) if "class_name" in df.columns else set()
        known = space is not None and all(n in class_lookup(space) or slugify(n) in class_lookup(space) for n in names)
        decision = "direct" if known or logits.shape[1] != 1000 else "focus"
    pred = np.argmax(logits, axis=1)
    if decision == "direct":
        if space is None:
            raise UserError("decision='direct' needs a model with a label_space")
        correct = pred == _labels(df, space, table)
    elif decision == "focus":
        if "class_name" not in df.columns:
            raise UserError(f"decision='focus' needs a class_name column in '{table}'")
        aliases = _contexts()["aliases"]
        keys = [aliases.get(slugify(c), slugify(c)) for c in df["class_name"]]
        known = focus["imagenet1k_indices"]
        unknown = sorted({c for c, k in zip(df["class_name"], keys, strict=True) if k not in known})
        if unknown:
            raise UserError(f"classes {unknown[:5]} of '{table}' are not FOCUS categories {focus['categories']}")
        correct = np.array([int(p) in set(focus["imagenet1k_indices"][k]) for p, k in zip(pred, keys, strict=True)])
    else:
        raise UserError(f"unknown decision '{decision}': use 'auto', 'direct' or 'focus'")
    df["prediction"] = pred
    df["correct"] = correct
    return context_accuracy(correct, df["n_uncommon"].to_numpy()), df
