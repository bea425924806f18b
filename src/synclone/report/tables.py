"""Report tables: cells that know their text and whether they are the best of their column, and their Markdown."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from synclone.report.metrics import best_flags, direction_text, fmt, metric_info

# A metric with more variants than this is summarised (its 'all'/'mean' row, or the mean) instead of
# spread over one column per variant, so tables stay readable at laptop width.
MAX_VARIANT_COLUMNS = 8
MAX_COLUMNS = 24
SUMMARY_VARIANTS = ("all", "mean", "overall", "average")


@dataclass
class Cell:
    text: str
    best: bool = False
    value: float = float("nan")


@dataclass
class Table:
    """A header row and body rows of cells; ``notes`` are printed under the table."""

    columns: list[str]
    rows: list[list[Cell]]
    caption: str = ""
    notes: list[str] = field(default_factory=list)
    column_notes: list[str] = field(default_factory=list)  # one per column (hover text in HTML), "" for none

    def to_markdown(self) -> str:
        """A GitHub-flavoured Markdown table; best cells in bold."""

        def esc(s: str) -> str:
            return s.replace("|", "\\|").replace("\n", " ")

        lines = []
        if self.caption:
            lines += [f"*{esc(self.caption)}*", ""]
        lines.append("| " + " | ".join(esc(c) for c in self.columns) + " |")
        lines.append("|" + "|".join([":---"] + ["---:"] * (len(self.columns) - 1)) + "|")
        for row in self.rows:
            lines.append("| " + " | ".join(f"**{esc(c.text)}**" if c.best else esc(c.text) for c in row) + " |")
        if self.notes:
            lines.append("")
            lines += [f"- {esc(n)}" for n in self.notes]
        return "\n".join(lines)


def text_table(columns: list[str], rows: list[list[object]], caption: str = "",
               notes: list[str] | None = None) -> Table:
    """A table of plain values (no best marking)."""
    return Table(columns, [[Cell(str(v)) for v in r] for r in rows], caption, notes or [])


def _summary(rows: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The rows that summarise a metric with many variants: its 'all'/'mean' row, else the mean per model."""
    summary = rows[rows["variant"].isin(SUMMARY_VARIANTS)]
    if not summary.empty:
        v = summary["variant"].iloc[0]
        return summary[summary["variant"] == v], v
    n = rows["variant"].nunique()
    mean = rows.groupby("model", sort=False, as_index=False)["value"].mean()
    return mean, f"mean of {n} variants"


def probe_table(rows: pd.DataFrame, models: list[str], caption: str = "") -> Table | None:
    """A compact model x (dataset, metric, variant) table of one probe's rows, best per column marked.

    Metrics with at most :data:`MAX_VARIANT_COLUMNS` variants get one column per variant; others one
    summary column. The dataset is named in the header only when the probe ran on several.
    """
    if rows.empty:
        return None
    probe = rows["probe"].iloc[0]
    several = rows["dataset"].nunique() > 1
    columns: list[tuple[str, str, pd.Series]] = []  # (header, metric, values by model)
    for (dataset, metric), g in rows.groupby(["dataset", "metric"], sort=False):
        variants = list(dict.fromkeys(g["variant"]))
        prefix = f"{dataset} · " if several else ""
        if len(variants) <= MAX_VARIANT_COLUMNS:
            for v in variants:
                s = g[g["variant"] == v].groupby("model", sort=False)["value"].mean()
                label = metric if len(variants) == 1 or not v else f"{metric} · {v}"
                columns.append((prefix + label, metric, s))
        else:
            summ, how = _summary(g)
            s = summ.groupby("model", sort=False)["value"].mean()
            columns.append((f"{prefix}{metric} ({how})", metric, s))
    notes = []
    if len(columns) > MAX_COLUMNS:
        notes.append(f"{len(columns) - MAX_COLUMNS} more columns are in results.csv.")
        columns = columns[:MAX_COLUMNS]
    present = [m for m in models if m in set(rows["model"])]
    body = [[Cell(m)] for m in present]
    col_notes = [""]
    for _header, metric, s in columns:
        info = metric_info(probe, metric)
        values = [float(s.get(m, math.nan)) for m in present]
        for row, v, b in zip(body, values, best_flags(values, info.better), strict=True):
            row.append(Cell(fmt(v, info.unit), b, v))
        col_notes.append(direction_text(info.better))
    conventions = sorted({c for c in rows["convention"] if c})
    if conventions:
        notes.append("Conventions: " + "; ".join(conventions))
    return Table(["model"] + [c[0] for c in columns], body, caption, notes, col_notes)
