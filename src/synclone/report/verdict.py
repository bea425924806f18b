"""The verdict table: one row per model, one column per headline metric, the best of each column marked.

Each headline names the probe(s) and metric that hold it (see :data:`HEADLINES`); a column appears
only when some model has a value for it. Per model, the value is taken per dataset (the variant
asked for, else the probe's 'all'/'mean' row, else the mean over variants) and then averaged over
datasets; the footnote of each column says exactly what it averages.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import pandas as pd

from synclone.report.metrics import best_flags, direction_text, fmt, format_eps, metric_info
from synclone.report.tables import SUMMARY_VARIANTS, Cell, Table


@dataclass(frozen=True)
class Headline:
    key: str
    label: str
    probes: tuple[str, ...]
    metrics: tuple[str, ...]  # the first name that has rows is used
    variants: tuple[str, ...] | None = None  # keep only these variants
    exclude: tuple[str, ...] = ()  # variants that are not part of the average (e.g. the clean reference)
    pick: str = "summary"  # or "max_eps": the largest attack budget, worst attack


HEADLINES: tuple[Headline, ...] = (
    Headline("clean_top1", "Clean top-1", ("clean",), ("top1", "accuracy")),
    # The shift probe may also write the in-distribution accuracy it pairs with each shifted set.
    Headline("shift_top1", "Synthetic-shift top-1", ("shift", "synthetic_shift"), ("top1", "accuracy"),
             exclude=("id", "acc_id", "in_distribution")),
    Headline("effective_robustness", "Effective robustness", ("shift", "effective_robustness"),
             ("effective_robustness",)),
    Headline("ece", "ECE", ("calibration",), ("ece",), variants=("clean",)),  # shifted sets: in the section
    Headline("ood_auroc", "OOD AUROC (MSP)", ("ood",), ("auroc",), variants=("msp",)),
    Headline("corruption_top1", "Corruption top-1", ("corruptions", "corruption"), ("top1", "accuracy"),
             exclude=("clean",)),
    Headline("mce", "mCE", ("corruptions", "corruption"), ("mce",)),
    Headline("robust_top1", "Robust top-1", ("adversarial",), ("robust_top1",), pick="max_eps"),
    Headline("shape_bias", "Shape bias", ("shape_bias",), ("shape_bias",), variants=("all",)),
    Headline("bg_gap", "BG-gap", ("background",), ("bg_gap",), variants=("all",)),
)

_EPS = re.compile(r"eps\s*[=:_-]?\s*(\d*\.?\d+(?:e-?\d+)?)(?:\s*/\s*(\d+(?:\.\d+)?))?", re.IGNORECASE)


def parse_eps(text: str) -> float | None:
    """The attack budget named in a variant or convention string ('eps=8/255', 'linf_eps0.0314'), or None."""
    m = _EPS.search(text or "")
    if not m:
        return None
    value = float(m.group(1))
    return value / float(m.group(2)) if m.group(2) else value


@dataclass
class Column:
    headline: Headline
    label: str
    metric: str
    probe: str
    values: dict[str, float]
    note: str


def _candidate_rows(results: pd.DataFrame, h: Headline) -> tuple[pd.DataFrame, str]:
    rows = results[results["probe"].isin(h.probes)]
    for metric in h.metrics:
        sel = rows[rows["metric"] == metric]
        if h.variants is not None:
            sel = sel[sel["variant"].isin(h.variants)]
        sel = sel[~sel["variant"].isin(h.exclude)]
        sel = sel[sel["value"].notna()]
        if not sel.empty:
            # Rows under different conventions are never averaged together: keep the most common one.
            if sel["convention"].nunique() > 1:
                top = sel["convention"].value_counts().index[0]
                sel = sel[sel["convention"] == top]
            return sel, metric
    return rows.iloc[0:0], ""


def _per_dataset(g: pd.DataFrame) -> tuple[float, str]:
    summary = g[g["variant"].isin(SUMMARY_VARIANTS)]
    if not summary.empty:
        return float(summary["value"].mean()), ""
    n = g["variant"].nunique()
    return float(g["value"].mean()), (f"mean of {n} variants" if n > 1 else "")


# Headlines about shifted sets: a set made by the generator of a model's own training data is in-distribution for
# that model (the shift probe writes an ``in_distribution`` row), so it is left out of that model's value.
_SHIFT_HEADLINES = ("shift_top1", "effective_robustness")


def _drop_in_distribution(results: pd.DataFrame, rows: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    flags = results[(results["metric"] == "in_distribution") & (results["value"] == 1.0)]
    if flags.empty or rows.empty:
        return rows, []
    pairs = set(zip(flags["model"], flags["dataset"], strict=True))
    hit = [(m, d) in pairs for m, d in zip(rows["model"], rows["dataset"], strict=True)]
    dropped = sorted({f"{m} on {d}" for (m, d), h in zip(zip(rows["model"], rows["dataset"], strict=True), hit,
                                                          strict=True) if h})
    return rows[[not h for h in hit]], dropped


def _column(results: pd.DataFrame, artifacts: list[dict], h: Headline) -> Column | None:
    rows, metric = _candidate_rows(results, h)
    label = h.label
    if h.pick == "max_eps":
        return _robust_column(rows, metric, artifacts, h)
    dropped: list[str] = []
    if h.key in _SHIFT_HEADLINES:
        rows, dropped = _drop_in_distribution(results, rows)
    if rows.empty:
        return None
    values: dict[str, float] = {}
    how = set()
    for model, mg in rows.groupby("model", sort=False):
        per = [_per_dataset(dg) for _, dg in mg.groupby("dataset", sort=False)]
        values[model] = sum(v for v, _ in per) / len(per)
        how |= {w for _, w in per if w}
    datasets = list(dict.fromkeys(rows["dataset"]))
    probe = rows["probe"].iloc[0]
    parts = [f"{probe}/{metric}" + (f" ({', '.join(h.variants)})" if h.variants else "")]
    parts.append(("mean over " if len(datasets) > 1 else "on ") + ", ".join(datasets))
    if how:
        parts.append(", ".join(sorted(how)))
    if dropped:
        parts.append(f"left out as in-distribution for the model (the generator of its training data made the "
                     f"set): {', '.join(dropped)}")
    return Column(h, label, metric, probe, values, "; ".join(parts))


def _robust_column(rows: pd.DataFrame, metric: str, artifacts: list[dict], h: Headline) -> Column | None:
    """Robust top-1 at the largest budget any model was attacked with; the worst attack at that budget."""
    points: list[tuple[str, str, float, float]] = []  # model, attack, eps, value
    for r in rows.itertuples(index=False):
        eps = parse_eps(r.variant) if parse_eps(r.variant) is not None else parse_eps(r.convention)
        if eps is not None:
            points.append((r.model, r.variant, eps, float(r.value)))
    source = f"{h.probes[0]}/{metric}"
    if not points:  # rows without a readable budget: take the curves
        for a in artifacts:
            if a["kind"] == "robust_curve" and a["probe"] in h.probes:
                d = a["data"]
                for eps, acc in zip(d.get("eps", []), d.get("robust_top1", []), strict=False):
                    if eps is not None and acc is not None:
                        points.append((a["model"], str(d.get("attack", "")), float(eps), float(acc)))
        source = "robust_curve artefacts"
    if not points:
        return None
    top = max(p[2] for p in points)
    values: dict[str, float] = {}
    for model, _attack, eps, v in points:
        if math.isclose(eps, top, rel_tol=1e-9):
            values[model] = min(values.get(model, math.inf), v)
    attacks = sorted({p[1] for p in points if math.isclose(p[2], top, rel_tol=1e-9)})
    note = f"{source} at ε = {format_eps(top)}, worst of: {', '.join(attacks)}"
    return Column(h, f"{h.label} (ε={format_eps(top)})", "robust_top1", h.probes[0], values, note)


def headline_column(results: pd.DataFrame, headline: Headline, artifacts: list[dict] | None = None) -> Column | None:
    """One headline's value per model, taken as the verdict table takes it (any probe/metric pair can be a
    :class:`Headline`); None when no model has a value."""
    col = _column(results, list(artifacts or []), headline)
    return col if col is not None and col.values else None


def verdict_columns(results: pd.DataFrame, artifacts: list[dict]) -> list[Column]:
    """The headline columns that have at least one value, in :data:`HEADLINES` order."""
    cols = [_column(results, artifacts, h) for h in HEADLINES]
    return [c for c in cols if c is not None and c.values]


def verdict_table(results: pd.DataFrame, artifacts: list[dict], models: list[str]) -> Table | None:
    """Models x headline metrics with the best per column marked (direction from :mod:`.metrics`)."""
    cols = verdict_columns(results, artifacts)
    if not cols:
        return None
    body = [[Cell(m)] for m in models]
    notes, col_notes = [], [""]
    for c in cols:
        info = metric_info(c.probe, c.metric)
        values = [c.values.get(m, math.nan) for m in models]
        for row, v, b in zip(body, values, best_flags(values, info.better), strict=True):
            row.append(Cell(fmt(v, info.unit), b, v))
        direction = direction_text(info.better)
        col_notes.append(direction)
        notes.append(f"{c.label}: {c.note}" + (f"; {direction}" if direction else "") + ".")
    return Table(["model"] + [c.label for c in cols], body, "", notes, col_notes)
