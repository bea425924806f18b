"""The "Sweep" report: scaling curves and the best grid point per metric, drawn from a sweep's collected tables.

``synclone sweep`` writes, into its folder, ``results.parquet`` (every point's evaluation rows, long format, with one
column per swept variable and ``seed``), ``diagnostics.parquet`` (every point's ``synclone inspect`` rows, the same
extra columns) and ``sweep.json`` (the variables, their values, the seeds and the metrics to draw). Everything here
is read from those files.

A metric is named in one of three ways:

- a headline of the report's verdict table (:data:`synclone.report.verdict.HEADLINES`: ``clean_top1``, ``ece``,
  ``mce``, ``ood_auroc`` ...), taken per model exactly as the verdict table takes it;
- ``probe/metric`` (``calibration/nll``), a probe's row, summarised over variants and datasets the same way;
- ``inspect/metric`` (``inspect/frechet_distance``, ``inspect/coverage``), a dataset diagnostic over all classes,
  one line per inspected dataset instead of per model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from synclone.config import read_json
from synclone.errors import UserError
from synclone.report.metrics import best_flags, direction_text, fmt, metric_info
from synclone.report.tables import Cell, Table
from synclone.report.verdict import HEADLINES, Headline, headline_column

INSPECT = "inspect"
HEADLINE_KEYS = tuple(h.key for h in HEADLINES)


@dataclass(frozen=True)
class MetricSpec:
    """One metric to draw: its name as the user wrote it, how to read it, and its label."""

    name: str
    headline: Headline | None  # None: a dataset diagnostic
    metric: str
    label: str


def parse_metric(name: str) -> MetricSpec:
    """A metric name (headline key, ``probe/metric`` or ``inspect/metric``) as a :class:`MetricSpec`."""
    text = name.strip()
    probe, sep, metric = text.partition("/")
    if sep:
        if not probe or not metric:
            raise UserError(f"metric '{name}': write PROBE/METRIC (e.g. calibration/nll) or inspect/METRIC")
        if probe == INSPECT:
            return MetricSpec(text, None, metric, f"{metric.replace('_', ' ')} (diagnostics)")
        return MetricSpec(text, Headline(text, text, (probe,), (metric,)), metric, text)
    for h in HEADLINES:
        if h.key == text:
            return MetricSpec(text, h, h.metrics[0], h.label)
    raise UserError(f"unknown metric '{name}'; use a headline ({', '.join(HEADLINE_KEYS)}), PROBE/METRIC "
                    "(e.g. calibration/nll) or inspect/METRIC (e.g. inspect/coverage)")


def read_sweep(folder: str | Path) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """``sweep.json``, the results table and the diagnostics table (empty when the sweep inspected nothing)."""
    folder = Path(folder)
    if not (folder / "sweep.json").is_file() or not (folder / "results.parquet").is_file():
        raise UserError(f"'{folder}' holds no sweep.json and results.parquet; pass the folder of synclone sweep")
    info = read_json(folder / "sweep.json")
    results = pd.read_parquet(folder / "results.parquet")
    diag = folder / "diagnostics.parquet"
    return info, results, (pd.read_parquet(diag) if diag.is_file() else pd.DataFrame())


def point_values(results: pd.DataFrame, diagnostics: pd.DataFrame, specs: list[MetricSpec],
                 keys: list[str]) -> pd.DataFrame:
    """One row per (point, metric, line): the value of each metric at each point, for each model (or dataset).

    ``keys``: the point's columns (swept variables and ``seed``). Columns: ``point``, the keys, ``metric``
    (the spec's name), ``line``, ``value``, ``probe`` and ``name`` (what :func:`metric_info` reads).
    """
    rows = []
    for point, g in results.groupby("point", sort=False):
        at = {k: g[k].iloc[0] for k in keys}
        for spec in specs:
            if spec.headline is None:
                continue
            col = headline_column(g, spec.headline)
            if col is None:
                continue
            rows += [{"point": point, **at, "metric": spec.name, "line": m, "value": v, "probe": col.probe,
                      "name": col.metric} for m, v in col.values.items()]
    if not diagnostics.empty:
        pooled = diagnostics[diagnostics["class"] == "all"]
        if "stage" in pooled.columns:  # an inspection shared by several points (seeds) is one measurement
            pooled = pooled.drop_duplicates(subset=["stage", "metric"])
        for spec in specs:
            if spec.headline is not None:
                continue
            sel = pooled[pooled["metric"] == spec.metric]
            rows += [{"point": r["point"], **{k: r[k] for k in keys}, "metric": spec.name, "line": r["inspected"],
                      "value": float(r["value"]), "probe": INSPECT, "name": spec.metric}
                     for _, r in sel.iterrows()]
    cols = ["point", *keys, "metric", "line", "value", "probe", "name"]
    return pd.DataFrame(rows, columns=cols)


def over_seeds(values: pd.DataFrame, variables: list[str]) -> pd.DataFrame:
    """Mean, standard deviation (ddof 1; 0 for one seed) and count over seeds per grid point, metric and line."""
    by = [*variables, "metric", "line", "probe", "name"]
    if values.empty:
        return pd.DataFrame(columns=[*by, "mean", "std", "n"])
    agg = values.groupby(by, sort=False, dropna=False)["value"].agg(["mean", "std", "count"]).reset_index()
    agg["std"] = agg["std"].fillna(0.0)
    return agg.rename(columns={"count": "n"})


def _numeric(values: list) -> bool:
    return all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in values)


def _label(v) -> str:
    return f"{v:g}" if isinstance(v, (float, np.floating)) else str(v)


def curve_figures(agg: pd.DataFrame, spec: MetricSpec, grid: dict[str, list], lines: list[str]):
    """(figure, caption) per swept variable: the metric against it, one line per model, error bars over seeds;
    one panel per combination of the other swept variables."""
    from synclone.report import figures as F

    plt = F.plt
    data = agg[agg["metric"] == spec.name]
    if data.empty:
        return []
    style = F.Style(lines)
    swept = [v for v, vals in grid.items() if len(vals) > 1] or list(grid)[:1]
    info = metric_info(data["probe"].iloc[0], data["name"].iloc[0])
    scale = 100.0 if info.unit in ("frac", "frac_pp") else 1.0
    unit = " (%)" if info.unit in ("frac", "pct") else " (pp)" if info.unit in ("frac_pp", "pp") else ""
    out = []
    for x in swept:
        others = [v for v in swept if v != x]
        combos = [dict(zip(others, c, strict=True)) for c in _product([grid[o] for o in others])]
        xs = list(grid[x])
        numeric = _numeric(xs)
        log = numeric and min(xs) > 0 and max(xs) / min(xs) >= 8
        with plt.rc_context(F.RC):
            fig, axes = F._grid(len(combos), max_cols=4, w=3.3, h=2.9, sharey=True)
            for ax, combo in zip(axes, combos, strict=True):
                sel = data
                for k, v in combo.items():
                    sel = sel[sel[k] == v]
                for line in lines:
                    ls = sel[sel["line"] == line]
                    pts = [(xv, ls[ls[x] == xv]) for xv in xs]
                    pts = [(xv, r) for xv, r in pts if not r.empty]
                    if not pts:
                        continue
                    pos = [float(xv) if numeric else xs.index(xv) for xv, _ in pts]
                    mean = [float(r["mean"].iloc[0]) * scale for _, r in pts]
                    std = [float(r["std"].iloc[0]) * scale for _, r in pts]
                    ax.errorbar(pos, mean, yerr=std, marker="o", markersize=3.5, capsize=3, linewidth=1.4,
                                color=style.color(line), label=line)
                if log:
                    ax.set_xscale("log")
                ax.set_xticks([float(v) for v in xs] if numeric else list(range(len(xs))))
                ax.set_xticklabels([_label(v) for v in xs])
                ax.xaxis.set_minor_locator(F.NullLocator())
                ax.set_xlabel(x.replace("_", " "))
                ax.set_ylabel(spec.label + unit)
                ax.set_title(", ".join(f"{k.replace('_', ' ')} = {_label(v)}" for k, v in combo.items()) or spec.label)
                ax.grid(alpha=0.3)
            handles, labels = axes[0].get_legend_handles_labels()
            if handles:
                fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 6), frameon=False,
                           bbox_to_anchor=(0.5, 1.06 if len(combos) <= 4 else 1.03))
            fig.tight_layout()
        seeds = int(data["n"].max())
        direction = direction_text(info.better)
        out.append((fig, f"{spec.label} vs {x.replace('_', ' ')}"
                    + (f", one panel per {', '.join(o.replace('_', ' ') for o in others)}" if others else "")
                    + (f"; mean over {seeds} seeds, bars ± 1 standard deviation" if seeds > 1 else
                       "; one value per point (measured once: it does not vary with the seed)")
                    + (f" ({direction})" if direction else "") + "."))
    return out


def _product(lists: list[list]) -> list[tuple]:
    out: list[tuple] = [()]
    for values in lists:
        out = [(*t, v) for t in out for v in values]
    return out


def best_table(agg: pd.DataFrame, specs: list[MetricSpec], variables: list[str], lines: list[str]) -> Table | None:
    """Per metric and model: the grid point with the best mean over seeds (no best for metrics without a
    direction), its mean ± std, and the worst point for contrast."""
    body = []
    for spec in specs:
        data = agg[agg["metric"] == spec.name]
        for line in lines:
            d = data[data["line"] == line].reset_index(drop=True)
            if d.empty:
                continue
            info = metric_info(d["probe"].iloc[0], d["name"].iloc[0])
            means = [float(v) for v in d["mean"]]
            flags = best_flags(means, info.better)
            if not any(flags):
                best = worst = None
            else:
                best = flags.index(True)
                key = abs if info.better == "abs_lower" else (lambda v: v)
                finite = [i for i, v in enumerate(means) if math.isfinite(v)]
                pick = min if info.better == "higher" else max
                worst = pick(finite, key=lambda i: key(means[i]))

            bw, bv = _at(d, best, variables, info.unit)
            ww, wv = _at(d, worst, variables, info.unit)
            if len(means) > 1 and all(flags):  # a model the grid does not change (the real-data reference)
                bw = ww = "every point (equal)"
            n = int(d["n"].max())
            body.append([Cell(spec.label), Cell(line), Cell(bw), Cell(bv, best is not None), Cell(ww), Cell(wv),
                         Cell(str(n)),
                         Cell(direction_text(info.better) or "no direction")])
    if not body:
        return None
    return Table(["metric", "model", "best point", "best (mean ± std)", "worst point", "worst (mean ± std)",
                  "seeds", "direction"], body,
                 "The best and worst grid point per metric and model, by the mean over seeds.")


def _at(d: pd.DataFrame, i: int | None, variables: list[str], unit: str) -> tuple[str, str]:
    """(where, mean ± std) of row ``i`` of an aggregated table; dashes for none."""
    if i is None:
        return "–", "–"
    r = d.iloc[i]
    where = ", ".join(f"{v} = {_label(r[v])}" for v in variables)
    return where, f"{fmt(r['mean'], unit)} ± {fmt(r['std'], unit).lstrip('+')}"


def points_table(agg: pd.DataFrame, specs: list[MetricSpec], variables: list[str], lines: list[str]) -> Table | None:
    """Every grid point and model: each metric's mean ± std over seeds, the best of each column marked."""
    present = [s for s in specs if (agg["metric"] == s.name).any()]
    if not present:
        return None
    combos = agg[variables].drop_duplicates().to_dict("records")
    rows, values = [], []
    for combo in combos:
        for line in lines:
            sel = agg[agg["line"] == line]
            for k, v in combo.items():
                sel = sel[sel[k] == v]
            if sel.empty:
                continue
            row, vals = [Cell(_label(combo[k])) for k in variables] + [Cell(line)], []
            for s in present:
                r = sel[sel["metric"] == s.name]
                vals.append(float(r["mean"].iloc[0]) if not r.empty else math.nan)
                row.append(Cell(f"{fmt(r['mean'].iloc[0], _unit(r))} ± {fmt(r['std'].iloc[0], _unit(r)).lstrip('+')}"
                                if not r.empty else "–"))
            rows.append(row)
            values.append(vals)
    notes = []
    for j, s in enumerate(present):
        r = agg[agg["metric"] == s.name].iloc[0]
        better = metric_info(r["probe"], r["name"]).better
        col = [v[j] for v in values]
        for row, b, v in zip(rows, best_flags(col, better), col, strict=True):
            cell = row[len(variables) + 1 + j]
            cell.best, cell.value = b, v
        if direction_text(better):
            notes.append(f"{s.label}: {direction_text(better)}.")
    return Table([*(v.replace("_", " ") for v in variables), "model", *(s.label for s in present)], rows,
                 "Every grid point: mean ± standard deviation over seeds.", notes)


def _unit(rows: pd.DataFrame) -> str:
    return metric_info(rows["probe"].iloc[0], rows["name"].iloc[0]).unit


def sweep_section(info: dict, results: pd.DataFrame, diagnostics: pd.DataFrame):
    """The "Sweep" section: a curve figure per metric and swept variable, the best point per metric, every point."""
    from synclone.report import figures as F
    from synclone.report.sections import Figure, Section

    grid: dict[str, list] = info["grid"]
    variables = list(grid)
    keys = variables + (["seed"] if info.get("seeds") else [])
    specs = [parse_metric(m) for m in info.get("metrics") or ["clean_top1"]]
    values = point_values(results, diagnostics, specs, keys)
    if info.get("models"):
        keep = set(info["models"])
        values = values[values["line"].isin(keep) | (values["probe"] == INSPECT)]
    agg = over_seeds(values, variables)
    lines = list(dict.fromkeys(values["line"]))
    missing = [s.name for s in specs if not (values["metric"] == s.name).any()]
    seeds = info.get("seeds") or []
    text = (f"{len(info.get('points', []))} runs of the recipe: "
            + " x ".join(f"{v.replace('_', ' ')} {{{', '.join(_label(x) for x in grid[v])}}}" for v in variables)
            + (f" x seeds {{{', '.join(str(s) for s in seeds)}}}" if seeds else "")
            + ". Each curve is one model (or, for dataset diagnostics, one inspected dataset); points are means over "
              "seeds and bars one standard deviation.")
    if missing:
        text += f" No values for: {', '.join(missing)} (not measured by this recipe's probes)."
    sec = Section("sweep", "Sweep", text)
    for spec in specs:
        sec.figures += [Figure(F.png(fig), caption) for fig, caption in curve_figures(agg, spec, grid, lines)]
    for table in (best_table(agg, specs, variables, lines), points_table(agg, specs, variables, lines)):
        if table is not None:
            sec.tables.append(table)
    return sec


def build_sweep_report(folder: str | Path, title: str | None = None) -> Path:
    """Write ``report.html`` and ``report.md`` (and ``figures/``) of the sweep in ``folder``; returns the HTML path."""
    import datetime as _dt

    from synclone.report.build import FIGURES_DIR, _version
    from synclone.report.render import render_html, render_markdown, write_figures
    from synclone.util.files import write_text_atomic

    folder = Path(folder)
    info, results, diagnostics = read_sweep(folder)
    sec = sweep_section(info, results, diagnostics)
    title = title or info.get("title") or "synclone sweep"
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    n = len(info.get("points", []))
    meta = f"Generated {now} by synclone {_version()} · recipe {info.get('recipe', '')} · {n} runs"
    summary = f"Scaling curves of {', '.join(s for s in info.get('metrics') or ['clean_top1'])} over the grid."
    sections = [sec] if not sec.empty else []
    write_figures(sections, folder / FIGURES_DIR)
    write_text_atomic(folder / "report.md", render_markdown(title, meta, summary, sections, FIGURES_DIR))
    path = folder / "report.html"
    write_text_atomic(path, render_html(title, meta, summary, sections, _version(), n))
    return path
