"""Accuracy under distribution shift, class-subset accuracy, and effective robustness, on plain arrays.

Effective robustness (Taori et al., 2020): fit an ordinary least-squares line
``logit(acc_shift) = a * logit(acc_id) + b`` over baseline models (unweighted), then
``ER(model) = acc_shift - sigmoid(a * logit(acc_id) + b)``, reported in percentage points.

Conventions:

- Accuracies are fractions in [0, 1] everywhere in this API. Percentages are refused by the array
  functions; :func:`read_baselines_csv` converts a file written in percent (see there).
- logit(0) and logit(1) are infinite, so accuracies are clipped to ``[eps, 1 - eps]`` before the
  transform, ``eps = 1e-4`` by default (one error in 10,000 test images, finer than any ImageNet
  test set resolves). Pass ``eps`` to change it; it is stored on the fit.
- At least 3 baselines are required; with fewer the fit is refused, never reported.
- ImageNet-R/A cover 200 of the 1000 classes: predictions are the argmax over the subset's logits
  (:func:`masked_argmax`, a mask; the returned indices stay in the full label space).
"""

from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from synclone.config import StrictModel
from synclone.errors import UserError
from synclone.probes.arrays import as_float, as_labels, to_numpy
from synclone.probes.base import EvalContext, Row, convention, register_probe
from synclone.util.accuracy import top1

EPS = 1e-4
MIN_BASELINES = 3


def _fractions(acc, name: str) -> np.ndarray:
    arr = as_float(acc, name)
    if arr.min() < 0.0 or arr.max() > 1.0:
        hint = " (these look like percentages; divide by 100)" if arr.max() <= 100.0 and arr.min() >= 0 else ""
        raise UserError(
            f"{name} must be accuracies as fractions in [0, 1], got values in [{arr.min():g}, {arr.max():g}]{hint}."
        )
    return arr


def logit(p, eps: float = EPS) -> np.ndarray:
    """ln(p / (1 - p)) of accuracies clipped to [eps, 1 - eps]."""
    p = np.clip(np.asarray(p, dtype=np.float64), eps, 1.0 - eps)
    return np.log(p) - np.log1p(-p)


def sigmoid(x) -> np.ndarray:
    """The inverse of :func:`logit`."""
    x = np.asarray(x, dtype=np.float64)
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # tanh form: no overflow for large |x|


@dataclass(frozen=True)
class BaselineFit:
    """OLS fit ``logit(acc_shift) = a * logit(acc_id) + b`` over ``n`` baseline models."""

    a: float
    b: float
    r2: float
    n: int
    eps: float = EPS

    def predict(self, acc_id) -> np.ndarray | float:
        """Shifted accuracy (fraction) the baseline trend predicts for in-distribution accuracy ``acc_id``."""
        acc = _fractions(acc_id, "acc_id")
        pred = sigmoid(self.a * logit(acc, self.eps) + self.b)
        return float(pred) if pred.ndim == 0 else pred

    def as_dict(self) -> dict:
        """The fit's parameters, to be reported next to every ER number."""
        return {"slope": self.a, "intercept": self.b, "r2": self.r2, "n_baselines": self.n, "logit_eps": self.eps}


def fit_baseline(acc_id, acc_shift, eps: float = EPS) -> BaselineFit:
    """Fit the baseline trend on logit-transformed accuracies (fractions) of at least 3 models."""
    n = int(np.size(to_numpy(acc_id, "acc_id")))
    if n < MIN_BASELINES:
        # Checked before anything else so that 0, 1 or 2 baselines all get this message.
        raise UserError(
            f"effective robustness needs at least {MIN_BASELINES} baseline models, got {n}; "
            "evaluate more real-data baselines in the run or supply a CSV with acc_id,acc_shift rows."
        )
    x = _fractions(acc_id, "acc_id")
    y = _fractions(acc_shift, "acc_shift")
    if x.ndim != 1 or y.shape != x.shape:
        raise UserError(f"acc_id and acc_shift must be 1-D with one entry per baseline, got {x.shape} and {y.shape}.")
    lx, ly = logit(x, eps), logit(y, eps)
    dx, dy = lx - lx.mean(), ly - ly.mean()
    sxx = float(np.dot(dx, dx))
    if sxx == 0.0:
        raise UserError(
            f"all {n} baselines have the same in-distribution accuracy (after clipping to [{eps:g}, {1 - eps:g}]); "
            "the trend line is undefined. Use baselines that differ in accuracy."
        )
    a = float(np.dot(dx, dy)) / sxx
    b = float(ly.mean() - a * lx.mean())
    ss_res = float(np.sum((ly - (a * lx + b)) ** 2))
    ss_tot = float(np.dot(dy, dy))
    # A constant shifted accuracy is fitted exactly by a flat line.
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return BaselineFit(a=a, b=b, r2=r2, n=n, eps=float(eps))


def effective_robustness(fit: BaselineFit, acc_id, acc_shift) -> np.ndarray | float:
    """ER in percentage points: 100 * (acc_shift - fit.predict(acc_id)); positive = above the baseline trend."""
    pred = fit.predict(acc_id)
    er = 100.0 * (_fractions(acc_shift, "acc_shift") - pred)
    return float(er) if np.ndim(er) == 0 else er


def relative_robustness(acc_shift, acc_shift_reference) -> np.ndarray | float:
    """Relative robustness in percentage points: 100 * (acc_shift - acc_shift of the reference model)."""
    rr = 100.0 * (_fractions(acc_shift, "acc_shift") - _fractions(acc_shift_reference, "acc_shift_reference"))
    return float(rr) if np.ndim(rr) == 0 else rr


@dataclass(frozen=True)
class Baselines:
    """Baseline accuracies read from a CSV, as fractions. ``scale`` records how the file was read."""

    acc_id: np.ndarray
    acc_shift: np.ndarray
    models: tuple[str, ...]
    scale: str
    source: str

    def fit(self, eps: float = EPS) -> BaselineFit:
        """:func:`fit_baseline` on these accuracies."""
        return fit_baseline(self.acc_id, self.acc_shift, eps)


def read_baselines_csv(path, scale: str = "auto") -> Baselines:
    """Read baseline accuracies from a CSV with columns ``acc_id`` and ``acc_shift`` (others are kept/ignored).

    An optional ``model`` (or ``name``) column names the rows. ``scale``:

    - ``"auto"`` (default): if every value is in [0, 1] the file holds fractions; if any value is
      above 1 (and none above 100), the whole file is read as percentages and divided by 100, with a
      warning saying so. A file mixing both cannot be told apart and should use an explicit scale.
    - ``"fraction"`` or ``"percent"``: read as stated; values out of range are an error.
    """
    import pandas as pd

    if scale not in ("auto", "fraction", "percent"):
        raise UserError(f"scale must be 'auto', 'fraction' or 'percent', got {scale!r}.")
    path = Path(path)
    if not path.is_file():
        raise UserError(f"baseline CSV {path} does not exist.")
    try:
        df = pd.read_csv(path, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise UserError(f"baseline CSV {path} could not be parsed: {err}") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in ("acc_id", "acc_shift") if c not in df.columns]
    if missing:
        raise UserError(
            f"baseline CSV {path} lacks column(s) {', '.join(missing)}; it has {', '.join(df.columns) or 'none'}. "
            "Write one row per baseline model with columns acc_id,acc_shift."
        )
    values = {}
    for col in ("acc_id", "acc_shift"):
        num = pd.to_numeric(df[col], errors="coerce")
        bad = num.isna()
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0]) + 2  # +1 for the header, +1 for 1-based lines
            raise UserError(f"baseline CSV {path}: column {col} has a missing or non-numeric value on line {row}.")
        values[col] = num.to_numpy(dtype=np.float64)
    both = np.concatenate([values["acc_id"], values["acc_shift"]])
    if both.size and (both.min() < 0 or both.max() > 100):
        raise UserError(
            f"baseline CSV {path}: accuracies must lie in [0, 1] or [0, 100], got [{both.min():g}, {both.max():g}]."
        )
    if scale == "auto":
        scale = "percent" if both.size and both.max() > 1.0 else "fraction"
        if scale == "percent":
            warnings.warn(
                f"baseline CSV {path}: values above 1 found, so all accuracies are read as percentages and divided "
                "by 100; pass scale='fraction' or 'percent' to state it.",
                stacklevel=2,
            )
    if scale == "percent":
        values = {k: v / 100.0 for k, v in values.items()}
    elif both.size and both.max() > 1.0:
        raise UserError(f"baseline CSV {path}: scale='fraction' but values go up to {both.max():g}.")
    name_col = next((c for c in ("model", "name") if c in df.columns), None)
    models = tuple(str(m) for m in df[name_col]) if name_col else tuple(f"row{i + 1}" for i in range(len(df)))
    return Baselines(values["acc_id"], values["acc_shift"], models, scale, str(path))


# --- published accuracy tables as baselines ---------------------------------------------------------
#
# The field's standard table (the imagenet-testbed's results: ~200 models x ~200 evaluation settings, one
# column per setting, accuracies in percent, blanks where a model was not run) holds every baseline a
# shifted set needs: its ID accuracy column (``val``, or ``val-on-imagenet-r-classes`` for ImageNet-R's 200
# classes) and its shifted column (``imagenetv2-matched-frequency-format-val``, ``imagenet-r``, ...).
# :class:`BaselineTable` names the two columns and which rows count as baselines; :func:`read_baseline_table`
# turns it into :class:`Baselines`; :func:`er_from_table` fits the trend and scores models of the same table
# (what ``synclone er`` prints).


class BaselineTable(StrictModel):
    """Which rows and columns of a published accuracy table are the baselines of one shifted set."""

    csv: str
    id_column: str = Field("acc_id", description="in-distribution accuracy column (e.g. 'val')")
    shift_column: str = Field("acc_shift", description="shifted accuracy column (e.g. 'imagenet-r')")
    model_column: str | None = Field(None, description="row names (default: a 'model' or 'name' column)")
    # Rows kept: every {column: value or [values]} must hold (e.g. the testbed's model type: {type: STANDARD}).
    filter: dict[str, Any] = Field(default_factory=dict)
    models: list[str] | None = Field(None, description="row names to keep (shell patterns), default all")
    exclude: list[str] = Field(default_factory=list, description="row names to drop (shell patterns)")
    scale: Literal["auto", "fraction", "percent"] = "auto"
    # The testbed keeps model types outside its results table: a CSV (model,type) or JSON {model: type} joined
    # as the column 'type', so that filter: {type: STANDARD} selects its standard models.
    types: str | None = None


@dataclass(frozen=True)
class TableRows:
    """Named accuracy pairs read from a table (fractions), and how they were read."""

    names: tuple[str, ...]
    acc_id: np.ndarray
    acc_shift: np.ndarray
    scale: str
    dropped_blank: int


def _columns_hint(columns: list[str]) -> str:
    shown = ", ".join(columns[:60])
    return shown + (f", ... ({len(columns)} columns)" if len(columns) > 60 else "")


def read_types(path: str | Path) -> dict[str, str]:
    """Model name -> type from a CSV with columns (model, type) or a JSON object {model: type}."""
    import json

    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise UserError(f"model-type file '{path}' does not exist")
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"model-type file '{path}' is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise UserError(f"model-type file '{path}' must be a JSON object {{model: type}}")
        return {str(k): str(v) for k, v in data.items()}
    df = pd.read_csv(path, skipinitialspace=True)
    df.columns = [str(c).strip() for c in df.columns]
    if not {"model", "type"} <= set(df.columns):
        raise UserError(f"model-type file '{path}' needs columns model,type; it has {', '.join(df.columns)}")
    return dict(zip(df["model"].astype(str), df["type"].astype(str), strict=True))


def read_table_rows(csv: str | Path, id_column: str, shift_column: str, *, model_column: str | None = None,
                    filter: dict[str, Any] | None = None, scale: str = "auto",  # noqa: A002
                    types: str | Path | None = None) -> TableRows:
    """The (model, acc_id, acc_shift) rows of ``csv``; rows blank in either column are left out and counted."""
    import pandas as pd

    path = Path(csv)
    if not path.is_file():
        raise UserError(f"accuracy table '{path}' does not exist")
    try:
        df = pd.read_csv(path, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise UserError(f"accuracy table '{path}' could not be parsed: {err}") from None
    df.columns = [str(c).strip() for c in df.columns]
    cols = list(df.columns)
    name_col = model_column or next((c for c in ("model", "name", "model_name") if c in cols), None)
    if types is not None:
        if name_col is None or name_col not in cols:
            raise UserError(f"accuracy table '{path}' has no model column to join the model types on; its columns: "
                            f"{_columns_hint(cols)}")
        kinds = read_types(types)
        df["type"] = df[name_col].astype(str).map(kinds).fillna("unknown")
        cols = list(df.columns)
    wanted = [id_column, shift_column, *([model_column] if model_column else []), *(filter or {})]
    missing = [c for c in dict.fromkeys(wanted) if c not in cols]
    if missing:
        raise UserError(f"accuracy table '{path}' has no column {', '.join(map(repr, missing))}; its columns: "
                        f"{_columns_hint(cols)}")
    for col, value in (filter or {}).items():
        values = value if isinstance(value, list) else [value]
        df = df[df[col].astype(str).isin([str(v) for v in values])]
    ids = pd.to_numeric(df[id_column], errors="coerce")
    shifts = pd.to_numeric(df[shift_column], errors="coerce")
    ok = ids.notna() & shifts.notna()
    names = (df[name_col].astype(str) if name_col else pd.Series([f"row{i + 2}" for i in df.index], index=df.index))
    x, y = ids[ok].to_numpy(np.float64), shifts[ok].to_numpy(np.float64)
    both = np.concatenate([x, y])
    if both.size and (both.min() < 0 or both.max() > 100):
        raise UserError(f"accuracy table '{path}': accuracies must lie in [0, 1] or [0, 100], got "
                        f"[{both.min():g}, {both.max():g}] in columns {id_column!r}, {shift_column!r}")
    if scale == "auto":
        scale = "percent" if both.size and both.max() > 1.0 else "fraction"
    if scale == "percent":
        x, y = x / 100.0, y / 100.0
    elif both.size and both.max() > 1.0:
        raise UserError(f"accuracy table '{path}': scale 'fraction' but values go up to {both.max():g}; "
                        "use scale: percent")
    return TableRows(tuple(names[ok]), x, y, scale, int((~ok).sum()))


def _select(names: tuple[str, ...], include: list[str] | None, exclude: list[str]) -> np.ndarray:
    keep = np.array([include is None or any(fnmatch.fnmatchcase(n, p) for p in include) for n in names], dtype=bool)
    drop = np.array([any(fnmatch.fnmatchcase(n, p) for p in exclude) for n in names], dtype=bool)
    return keep & ~drop if len(names) else np.zeros(0, dtype=bool)


def read_baseline_table(table: BaselineTable, base_dir: str | Path | None = None) -> Baselines:
    """The baseline accuracies (fractions) that ``table`` selects."""
    csv = Path(table.csv)
    if base_dir is not None and not csv.is_absolute():
        csv = Path(base_dir) / csv
    rows = read_table_rows(csv, table.id_column, table.shift_column, model_column=table.model_column,
                           filter=table.filter, scale=table.scale, types=table.types)
    sel = _select(rows.names, table.models, table.exclude)
    names = tuple(n for n, k in zip(rows.names, sel, strict=True) if k)
    return Baselines(rows.acc_id[sel], rows.acc_shift[sel], names, rows.scale,
                     f"{csv}[{table.id_column} -> {table.shift_column}]")


@dataclass(frozen=True)
class TableER:
    """A fit over a table's baseline rows and the ER of the scored rows (percentage points)."""

    fit: BaselineFit
    baselines: tuple[str, ...]
    er: dict[str, float]
    acc: dict[str, tuple[float, float]]
    dropped_blank: int
    scale: str


def er_from_table(csv: str | Path, id_column: str, shift_column: str, models: list[str] | None = None,
                  baselines: list[str] | None = None, filter: dict[str, Any] | None = None,  # noqa: A002
                  scale: str = "auto", model_column: str | None = None, types: str | None = None) -> TableER:
    """Effective robustness from accuracies alone: fit over ``baselines`` rows (patterns; default every row not
    in ``models``), then ER of the ``models`` rows (names; default every row)."""
    rows = read_table_rows(csv, id_column, shift_column, model_column=model_column, filter=filter, scale=scale,
                           types=types)
    index = {n: i for i, n in enumerate(rows.names)}
    if models:
        unknown = [m for m in models if m not in index]
        if unknown:
            raise UserError(f"no row named {', '.join(map(repr, unknown))} in '{csv}' with both {id_column!r} and "
                            f"{shift_column!r} (rows: {', '.join(list(rows.names)[:10])}"
                            f"{', ...' if len(rows.names) > 10 else ''})")
    scored = list(models) if models else list(rows.names)
    if baselines:
        base = _select(rows.names, baselines, [])
    else:
        base = np.array([not models or n not in models for n in rows.names], dtype=bool)
    fit = fit_baseline(rows.acc_id[base], rows.acc_shift[base])
    er = {m: float(effective_robustness(fit, rows.acc_id[index[m]], rows.acc_shift[index[m]])) for m in scored}
    acc = {m: (float(rows.acc_id[index[m]]), float(rows.acc_shift[index[m]])) for m in scored}
    return TableER(fit, tuple(n for n, k in zip(rows.names, base, strict=True) if k), er, acc, rows.dropped_blank,
                   rows.scale)


# --- accuracy on class subsets -------------------------------------------------------------------


def _subset(class_indices, n_classes: int) -> np.ndarray:
    idx = to_numpy(class_indices, "class_indices")
    if idx.ndim != 1 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):
        raise UserError(f"class_indices must be a non-empty 1-D list of integer class indices, got {idx!r:.80}.")
    if idx.min() < 0 or idx.max() >= n_classes:
        raise UserError(f"class_indices must lie in [0, {n_classes}) for logits with {n_classes} classes.")
    if len(np.unique(idx)) != len(idx):
        raise UserError("class_indices contains duplicates.")
    return idx.astype(np.int64)


def masked_argmax(logits, class_indices) -> np.ndarray:
    """Argmax over the columns ``class_indices`` only, returned as indices of the full label space.

    This is a mask, not a remap: for ImageNet-R the result is an ImageNet-1k index among the 200
    R classes, to compare with labels in the 1k space.
    """
    z = as_float(logits, "logits", ndim=2)
    idx = _subset(class_indices, z.shape[1])
    return idx[np.argmax(z[:, idx], axis=1)]


def accuracy(logits, labels, class_subset=None, *, drop_outside: bool = False) -> float:
    """Top-1 accuracy (fraction) of ``logits`` against ``labels``, optionally masked to ``class_subset``.

    With ``class_subset`` the prediction is :func:`masked_argmax` and labels stay in the full label
    space. A label outside the subset can never be predicted: it is an error unless
    ``drop_outside=True``, which keeps only the samples whose label is in the subset (the ID test
    set restricted to a shifted set's classes, as effective robustness needs).
    """
    z = as_float(logits, "logits", ndim=2)
    y = as_labels(labels, z.shape[0], z.shape[1])
    if class_subset is None:
        return float(np.mean(np.argmax(z, axis=1) == y))
    idx = _subset(class_subset, z.shape[1])
    inside = np.isin(y, idx)
    if not inside.all():
        if not drop_outside:
            raise UserError(
                f"{int((~inside).sum())} label(s) lie outside the {len(idx)}-class subset (e.g. {int(y[~inside][0])}); "
                "pass drop_outside=True to score only the samples of the subset's classes."
            )
        if not inside.any():
            raise UserError("no sample has a label inside class_subset; there is nothing to score.")
        z, y = z[inside], y[inside]
    return float(np.mean(idx[np.argmax(z[:, idx], axis=1)] == y))


class ShiftSettings(StrictModel):
    datasets: list[str] = Field(default_factory=list, description="shifted test sets: folders or built-ins")
    baseline_models: list[str] | None = Field(
        None, description="models of this run that form the baseline trend (default: all models)")
    baselines_csv: str | None = Field(None, description="CSV of acc_id,acc_shift rows (one shifted set)")
    # Published tables per shifted set: {dataset (its spec, name or layout): table or CSV path}. A listed
    # dataset without a table gets no ER (and a note), never another dataset's trend.
    baselines: dict[str, BaselineTable | str] | None = None


@register_probe("shift", ShiftSettings)
def shift_probe(ctx: EvalContext, s: ShiftSettings) -> list[Row]:
    """Accuracy on each shifted set, the drop from clean, and effective robustness over a baseline fit."""
    if not s.datasets:
        raise UserError("probes.shift.datasets is empty: name at least one shifted test set (e.g. a synthetic "
                        "dataset folder)")
    unknown = [m for m in (s.baseline_models or []) if m not in ctx.models]
    if unknown:
        raise UserError(f"probes.shift.baseline_models: {', '.join(unknown)} not among the evaluated models "
                        f"({', '.join(ctx.models)})")
    if s.baselines_csv is not None and len(s.datasets) > 1:
        raise UserError(f"probes.shift.baselines_csv holds one shifted set's accuracies but datasets lists "
                        f"{len(s.datasets)}; give a table per set: baselines: {{dataset: {{csv, id_column, "
                        "shift_column}}}}")
    if s.baselines_csv is not None and s.baselines is not None:
        raise UserError("probes.shift: give baselines_csv or baselines, not both")
    tables = _tables_by_dataset(s)
    rows = []
    clean_acc = {m: top1(ctx.logits(m, ctx.clean), ctx.clean.labels) for m in ctx.models}
    for spec in s.datasets:
        data = ctx.dataset(spec, "test")
        subset = (getattr(data, "extra", None) or {}).get("class_subset")
        # ER compares like with like: the ID accuracy restricted to the shifted set's classes (metrics.md).
        id_acc = clean_acc if subset is None else _restricted_accuracy(ctx, subset, data.name)
        acc = {}
        for name, entry in ctx.models.items():
            entry.module.label_space.check_aligned(data.label_space, f"model '{name}'", f"shifted set '{spec}'")
            acc[name] = top1(ctx.logits(name, data), data.labels)
            conv = f"shifted={data.name}; id={ctx.clean.name}"
            if getattr(data, "convention", ""):
                conv += f"; {data.convention}"
            if subset is not None:
                conv += f"; id accuracy restricted to the {len(subset)} shifted classes"
            rows.append(Row(name, "shift", data.name, "shifted", "top1", acc[name], len(data), conv))
            rows.append(Row(name, "shift", data.name, "shifted", "top1_drop", id_acc[name] - acc[name],
                            len(data), conv + "; drop = clean top1 - shifted top1"))
        shifted_gen = _generator_of(Path(spec))
        for name, entry in ctx.models.items():
            if shifted_gen is not None and _training_generator(entry.path) == shifted_gen:
                # The model was trained on this generator's images: for it, the "shifted" set is its own
                # training distribution (metrics.md), so the report leaves it out of its robustness headline.
                rows.append(Row(name, "shift", data.name, "shifted", "in_distribution", 1.0, len(data),
                                f"same generator as the model's training data: {shifted_gen[0]}"))
        if not any(np.isnan(v) for v in id_acc.values()):
            table = tables.get(spec) if tables is not None else None
            if tables is not None and table is None:
                table = tables.get(data.name) or tables.get(spec.partition(":")[0])
            if tables is not None and table is None:
                warnings.warn(f"no baseline table for shifted set '{data.name}' in probes.shift.baselines: no "
                              "effective robustness for it (a table of another set would score it against the "
                              "wrong trend)", stacklevel=2)
                ctx.add_artifact("*", "shift", data.name, "er_note", {"note": "no baseline table for this set"})
                continue
            rows += _effective_robustness(ctx, s, data.name, id_acc, acc, table)
    return rows


def _tables_by_dataset(s: ShiftSettings) -> dict[str, BaselineTable] | None:
    """``baselines`` as {key: table}; every key must name a listed dataset (spec, name or layout prefix)."""
    if s.baselines is None:
        return None
    out = {k: (BaselineTable(csv=v) if isinstance(v, str) else v) for k, v in s.baselines.items()}
    known = set(s.datasets) | {d.partition(":")[0] for d in s.datasets} | {Path(d.partition(":")[2] or d).name
                                                                            for d in s.datasets}
    unknown = [k for k in out if k not in known]
    if unknown:
        raise UserError(f"probes.shift.baselines names {', '.join(map(repr, unknown))}, which is not among "
                        f"probes.shift.datasets ({', '.join(s.datasets)})")
    for d in s.datasets:  # a folder's name is a key too (the dataset's name)
        name = Path(d.partition(":")[2] or d).name
        if name in out and d not in out:
            out[d] = out[name]
    return out


def _generator_of(folder: Path) -> tuple[str, str] | None:
    """(generator, label-space classes) of a generated or curated dataset folder, or None for other data."""
    import json

    try:
        info = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict):
        return None
    gen = info.get("generator")
    if not isinstance(gen, dict):  # a curated folder: the generator of its source
        src = (info.get("source") or {}).get("dataset") if isinstance(info.get("source"), dict) else None
        gen = src.get("generator") if isinstance(src, dict) else None
    if not isinstance(gen, dict):
        return None
    ident = "/".join(str(gen.get(k)) for k in ("backend", "generator", "generator_revision") if gen.get(k) is not None)
    classes = (info.get("label_space") or {}).get("classes") if isinstance(info.get("label_space"), dict) else None
    return (ident, "\n".join(map(str, classes or []))) if ident else None


def _training_generator(model_folder: Path) -> tuple[str, str] | None:
    """The generator of a model's synthetic training data (from its ``config.json``), or None."""
    import json

    try:
        cfg = json.loads((Path(model_folder) / "config.json").read_text(encoding="utf-8"))
        synthetic = cfg["training"]["data"]["synthetic"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return _generator_of(Path(synthetic)) if isinstance(synthetic, str) else None


def _restricted_accuracy(ctx: EvalContext, subset: list[int], dataset: str) -> dict[str, float]:
    try:
        return {m: accuracy(ctx.logits(m, ctx.clean), ctx.clean.labels, subset, drop_outside=True) for m in ctx.models}
    except UserError:
        warnings.warn(f"the clean set has no images of the {len(subset)} classes of '{dataset}': no top1_drop or "
                      "effective robustness for it", stacklevel=2)
        return {m: float("nan") for m in ctx.models}


def _effective_robustness(ctx: EvalContext, s: ShiftSettings, dataset: str, clean_acc: dict, acc: dict,
                          table: BaselineTable | None = None) -> list[Row]:
    explicit = s.baselines_csv is not None or s.baseline_models is not None or table is not None
    if table is not None:
        b = read_baseline_table(table)
        x, y, names, source = b.acc_id, b.acc_shift, list(b.models), f"table:{b.source}"
    elif s.baselines_csv is not None:
        b = read_baselines_csv(s.baselines_csv)
        x, y, names, source = b.acc_id, b.acc_shift, list(b.models), f"csv:{s.baselines_csv}"
    else:
        names = s.baseline_models or list(ctx.models)
        x = np.array([clean_acc[m] for m in names])
        y = np.array([acc[m] for m in names])
        source = "models in this run"
    if len(names) < MIN_BASELINES and not explicit:
        warnings.warn(f"effective robustness on '{dataset}' skipped: it needs at least {MIN_BASELINES} baseline "
                      f"models and this run has {len(names)}", stacklevel=2)
        return []
    fit = fit_baseline(x, y)  # raises the clear error when explicit baselines are too few
    conv = convention({"fit": "logit-linear OLS", "baselines": f"{fit.n} ({source})", "slope": f"{fit.a:.4g}",
                  "intercept": f"{fit.b:.4g}", "r2": f"{fit.r2:.4g}", "unit": "percentage points"})
    rows = [Row(m, "shift", dataset, "shifted", "effective_robustness",
                effective_robustness(fit, clean_acc[m], acc[m]), None, conv) for m in ctx.models]
    points = [{"model": m, "acc_id": clean_acc[m], "acc_shift": acc[m], "baseline": m in names} for m in ctx.models]
    if s.baselines_csv is not None or table is not None:
        points += [{"model": n, "acc_id": float(a), "acc_shift": float(b_), "baseline": True}
                   for n, a, b_ in zip(names, x, y, strict=True)]
    ctx.add_artifact("*", "shift", dataset, "er_fit", {"dataset": dataset, "slope": fit.a, "intercept": fit.b,
                                                       "r2": fit.r2, "n": fit.n, "scale": "logit",
                                                       "points": points})
    return rows
