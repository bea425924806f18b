"""Figures for the shape, background and context bias probes, drawn from long-format result tables.

Each function takes rows as the probes' ``to_rows()`` write them (columns ``variant``, ``metric``,
``value`` and, for several models, ``model``) and returns a matplotlib Figure (Agg backend, never
shown), so reports can draw from saved results without live objects.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from synclone.errors import UserError  # noqa: E402
from synclone.probes.background import IN9_VARIANTS  # noqa: E402

_MARKERS = "oDs^v<>Ph*X"


def _select(df: pd.DataFrame, metric: str, probe: str | None, what: str) -> pd.DataFrame:
    need = {"variant", "metric", "value"}
    if not need <= set(df.columns):
        raise UserError(f"{what} plot needs columns {sorted(need)}, got {sorted(df.columns)}")
    d = df[df["metric"] == metric]
    if probe is not None and "probe" in d.columns:
        d = d[d["probe"] == probe]
    if d.empty:
        raise UserError(f"no '{metric}' rows to plot for the {what} plot")
    d = d.copy()
    if "model" not in d.columns:
        d["model"] = "model"
    return d


def plot_shape_bias(df: pd.DataFrame, probe: str | None = None, title: str | None = None) -> Figure:
    """model-vs-human's shape-bias plot: per shape category, the fraction of texture (bottom) / shape (top) decisions.

    One marker per model and category, a vertical line at each model's overall value; categories are
    ordered by the first model's shape bias. Categories where a model named neither cue are left out.
    """
    d = _select(df, "shape_bias", probe, "shape-bias")
    models = list(dict.fromkeys(d["model"]))
    per_cat = d[d["variant"] != "all"]
    cats = list(dict.fromkeys(per_cat["variant"]))
    first = per_cat[per_cat["model"] == models[0]].set_index("variant")["value"]
    cats.sort(key=lambda c: -first.get(c, np.nan) if not np.isnan(first.get(c, np.nan)) else np.inf)
    fig, ax = plt.subplots(figsize=(6.5, 0.38 * max(len(cats), 4) + 1.8))
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.5, len(cats) - 0.5)
    for i in range(len(cats) - 1):
        ax.axhline(i + 0.5, color="gray", linestyle=":", alpha=0.4, linewidth=0.8)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, m in enumerate(models):
        rows = d[d["model"] == m]
        color = colors[k % len(colors)]
        overall = rows[rows["variant"] == "all"]["value"]
        if len(overall) and not np.isnan(overall.iloc[0]):
            ax.axvline(1 - overall.iloc[0], color=color, linewidth=1.2)
        vals = rows.set_index("variant")["value"]
        ys = [i for i, c in enumerate(cats) if c in vals.index and not np.isnan(vals[c])]
        xs = [1 - vals[cats[i]] for i in ys]
        label = m if not len(overall) else f"{m} (shape bias {overall.iloc[0]:.2f})"
        ax.scatter(xs, ys, color=color, marker=_MARKERS[k % len(_MARKERS)], s=55, zorder=3, label=label,
                   edgecolors=(0.3, 0.3, 0.3, 0.3), clip_on=False)
    ax.set_yticks(range(len(cats)), cats)
    ax.set_ylabel("Shape categories")
    ax.set_xlabel("Fraction of 'texture' decisions")
    top = ax.secondary_xaxis("top", functions=(lambda x: 1 - x, lambda x: 1 - x))
    top.set_xlabel("Fraction of 'shape' decisions")
    # Below the x label, in figure space, so the gap does not grow with the number of categories.
    fig.legend(loc="lower center", ncol=min(len(models), 2), frameon=False, fontsize="small")
    fig.subplots_adjust(bottom=0.2)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.05 + 0.03 * ((len(models) + 1) // 2), 1, 1))
    return fig


def _grouped_bars(ax, table: pd.DataFrame, ylabel: str) -> None:
    """Bars of ``table`` (index: x groups, columns: models)."""
    n_models = len(table.columns)
    width = 0.8 / n_models
    x = np.arange(len(table.index))
    for k, m in enumerate(table.columns):
        ax.bar(x + (k - (n_models - 1) / 2) * width, table[m].to_numpy(), width, label=str(m))
    ax.set_xticks(x, table.index, rotation=30, ha="right")
    ax.set_ylabel(ylabel)


def plot_background(df: pd.DataFrame, probe: str | None = None, title: str | None = None) -> Figure:
    """Accuracy per ImageNet-9 variant (grouped by model) and the BG-gap per model."""
    acc = _select(df, "accuracy", probe, "background")
    acc = acc[acc["variant"].isin(IN9_VARIANTS)]
    order = [v for v in IN9_VARIANTS if v in set(acc["variant"])]
    table = acc.pivot_table(index="variant", columns="model", values="value", sort=False).reindex(order)
    table = table[list(dict.fromkeys(acc["model"]))]
    gap = df[df["metric"] == "bg_gap"]
    if probe is not None and "probe" in gap.columns:
        gap = gap[gap["probe"] == probe]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 1]})
    _grouped_bars(ax1, table, "accuracy")
    ax1.set_ylim(0, 1)
    ax1.legend(fontsize="small", frameon=False)
    ax1.set_title("accuracy by variant")
    if not gap.empty:
        models = list(gap["model"]) if "model" in gap.columns else ["model"]
        values = gap["value"].to_numpy()
        colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        ax2.bar(range(len(values)), values, color=[colors[i % len(colors)] for i in range(len(values))])
        ax2.axhline(0, color="black", linewidth=0.8)
        ax2.set_xticks(range(len(values)), models, rotation=30, ha="right")
        for i, v in enumerate(values):
            ax2.annotate(f"{v:+.3f}", (i, v), ha="center", va="bottom" if v >= 0 else "top", fontsize="small")
    ax2.set_ylabel("mixed_same - mixed_rand")
    ax2.set_title("BG-gap")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_context(df: pd.DataFrame, probe: str | None = None, title: str | None = None) -> Figure:
    """P_k bars (accuracy with k uncommon attributes) per model, each labelled with P_k / P0."""
    acc = _select(df, "accuracy", probe, "context")
    acc = acc[acc["variant"].astype(str).str.fullmatch(r"P\d")]
    if acc.empty:
        raise UserError("no P_k accuracy rows (variants 'P0', 'P1', ...) to plot")
    order = sorted(set(acc["variant"]))
    table = acc.pivot_table(index="variant", columns="model", values="value").reindex(order)
    table = table[list(dict.fromkeys(acc["model"]))]
    fig, ax = plt.subplots(figsize=(2 + 1.3 * len(order) * max(1, len(table.columns)) ** 0.5, 4))
    _grouped_bars(ax, table, "accuracy")
    ax.set_ylim(0, 1.08)
    ax.set_xticks(range(len(order)), [f"{v}\n({v[1:]} uncommon)" for v in order], rotation=0, ha="center")
    n_models = len(table.columns)
    width = 0.8 / n_models
    for k, m in enumerate(table.columns):
        p0 = table[m].get("P0", np.nan)
        for i, v in enumerate(table[m]):
            if np.isnan(v):
                continue
            ratio = v / p0 if p0 and not np.isnan(p0) else np.nan
            label = f"{v:.2f}" if np.isnan(ratio) else f"{v:.2f}\n×{ratio:.2f}"
            ax.annotate(label, (i + (k - (n_models - 1) / 2) * width, v), ha="center", va="bottom", fontsize="x-small")
    ax.legend(fontsize="small", frameon=False)
    ax.set_title(title or "accuracy by number of uncommon context attributes")
    fig.tight_layout()
    return fig
