"""Figures of the report, one function per artefact kind, drawn with matplotlib's Agg backend.

Every function takes the artefacts of its kind (dicts ``{model, probe, dataset, kind, data}`` as
``synclone evaluate`` writes them) and a :class:`Style` that gives each model the same colour in every
figure, and returns a list of ``(figure, caption)``. :func:`png` turns a figure into PNG bytes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterable
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # files only; never opens a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from cycler import cycler  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator  # noqa: E402

from synclone.report.metrics import format_eps  # noqa: E402

RC = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8, "xtick.labelsize": 8,
      "ytick.labelsize": 8, "axes.spines.top": False, "axes.spines.right": False, "figure.dpi": 100}
DPI = 110


@dataclass
class Style:
    """One colour per model, fixed by the model order of the report."""

    models: list[str]

    def color(self, model: str):
        cycle = plt.get_cmap("tab10").colors
        i = self.models.index(model) if model in self.models else len(self.models)
        return cycle[i % len(cycle)]

    def rank(self, model: str) -> int:
        return self.models.index(model) if model in self.models else len(self.models)

    def sort(self, artifacts: Iterable[dict]) -> list[dict]:
        """Artefacts in the report's model order (stable for models it does not know)."""
        return sorted(artifacts, key=lambda a: self.rank(a["model"]))


def png(fig: Figure) -> bytes:
    """The figure as PNG bytes (and closed, so long reports do not pile up open figures)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return buf.getvalue()


def _f(x) -> float:
    return float("nan") if x is None else float(x)


def _grid(n: int, max_cols: int = 3, w: float = 3.4, h: float = 3.0, **kw) -> tuple[Figure, list]:
    cols = min(n, max_cols)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols, h * rows), squeeze=False, **kw)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _by(artifacts: list[dict], key: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for a in artifacts:
        out.setdefault(a[key], []).append(a)
    return out


# --- calibration ---------------------------------------------------------------------------------------

def reliability(artifacts: list[dict], style: Style, ece: dict[tuple[str, str], float] | None = None):
    """Reliability diagrams (Guo et al., 2017): per-bin accuracy vs confidence, gaps shaded, counts below."""
    out = []
    for dataset, arts in _by(artifacts, "dataset").items():
        arts = style.sort(arts)
        with plt.rc_context(RC):
            n = len(arts)
            cols = min(n, 3)
            rows = math.ceil(n / cols)
            fig = plt.figure(figsize=(3.3 * cols, 4.1 * rows))
            outer = fig.add_gridspec(rows, cols, hspace=0.35, wspace=0.32)
            for i, a in enumerate(arts):
                r, c = divmod(i, cols)
                inner = outer[r, c].subgridspec(2, 1, height_ratios=[3, 1], hspace=0.12)
                ax = fig.add_subplot(inner[0])
                axc = fig.add_subplot(inner[1], sharex=ax)
                d = a["data"]
                edges = np.asarray(d["edges"], dtype=float)
                acc = np.array([_f(v) for v in d["acc"]])
                conf = np.array([_f(v) for v in d["conf"]])
                count = np.array([_f(v) for v in d["count"]])
                width = np.diff(edges)
                centers = edges[:-1] + width / 2
                filled = count > 0
                color = style.color(a["model"])
                ax.bar(centers[filled], acc[filled], width[filled], color=color, alpha=0.85, edgecolor="white",
                       linewidth=0.5, label="accuracy")
                gap_lo = np.minimum(acc, conf)
                ax.bar(centers[filled], np.abs(conf - acc)[filled], width[filled], bottom=gap_lo[filled],
                       color="tab:red", alpha=0.25, hatch="//", edgecolor="tab:red", linewidth=0.3, label="gap")
                ax.plot([0, 1], [0, 1], "--", color="0.4", linewidth=0.8)
                ax.set_xlim(0, 1)
                ax.set_ylim(0, 1)
                ax.set_ylabel("accuracy")
                title = a["model"]
                if ece and (a["model"], dataset) in ece:
                    title += f"  (ECE {100 * ece[(a['model'], dataset)]:.1f}%)"
                ax.set_title(title)
                ax.tick_params(labelbottom=False)
                if i == 0:
                    ax.legend(loc="upper left", frameon=False)
                axc.bar(centers, np.nan_to_num(count), width, color="0.55")
                axc.set_yscale("log" if np.nanmax(count) > 50 * max(1.0, np.nanmin(count[filled])) else "linear")
                axc.set_xlabel("confidence")
                axc.set_ylabel("count")
            out.append((fig, f"Reliability diagrams on {dataset}: per-bin accuracy against mean confidence (the "
                             "diagonal is perfect calibration; red hatching = gap), bin counts below."))
    return out


# --- OOD -----------------------------------------------------------------------------------------------

def roc(artifacts: list[dict], style: Style):
    """ROC curves per OOD set (OOD is the positive class), one line per model; MSP first when present."""
    panels: dict[tuple[str, str], list[dict]] = {}
    for a in artifacts:
        panels.setdefault((a["dataset"], str(a["data"].get("score", ""))), []).append(a)
    order = sorted(panels, key=lambda k: (k[1] != "msp", k[1], k[0]))
    with plt.rc_context(RC):
        fig, axes = _grid(len(order), 3, 3.3, 3.2)
        for ax, key in zip(axes, order, strict=True):
            for a in style.sort(panels[key]):
                d = a["data"]
                label = f"{a['model']} ({100 * _f(d.get('auroc')):.1f}%)" if d.get("auroc") is not None else a["model"]
                ax.plot(d["fpr"], d["tpr"], color=style.color(a["model"]), linewidth=1.4, label=label,
                        drawstyle="default")
            ax.plot([0, 1], [0, 1], ":", color="0.5", linewidth=0.8)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1.01)
            ax.set_aspect("equal")
            ax.set_title(f"{key[0]} · {key[1]}" if key[1] else key[0])
            ax.set_xlabel("false positive rate")
            ax.set_ylabel("true positive rate")
            ax.legend(loc="lower right", frameon=False, title="AUROC", title_fontsize=8)
        fig.tight_layout()
    return [(fig, "ROC curves of out-of-distribution detection, one panel per OOD set and score (OOD = positive "
                  "class); AUROC in the legend.")]


# --- effective robustness ----------------------------------------------------------------------------------

_ACC_TICKS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)


def _logit(p):
    p = np.clip(np.asarray(p, dtype=float), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def _sigmoid(x):
    return 1 / (1 + np.exp(-np.asarray(x, dtype=float)))


def _pct_axis(axis, lo: float, hi: float) -> None:
    ticks = [t for t in _ACC_TICKS if lo <= t <= hi] or [lo, hi]
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(FuncFormatter(lambda v, _p: f"{100 * v:g}"))
    axis.set_minor_locator(NullLocator())
    axis.set_minor_formatter(NullFormatter())


def er_fit(artifacts: list[dict], style: Style):
    """Shifted vs in-distribution accuracy on logit axes, with the baseline fit and y = x (Taori et al., 2020).

    As imagenet-testbed draws it: both axes logit-scaled with ticks labelled in accuracy %, so the
    fit logit(y) = a logit(x) + b is a straight line; baselines in grey, other models coloured and named.
    """
    # One fit per shifted set; several folders may repeat it, the last wins.
    fits: dict[str, dict] = {}
    for a in artifacts:
        if a["data"].get("points"):
            fits[a["data"].get("dataset") or a["dataset"]] = a["data"]
    if not fits:
        return []
    out = []
    with plt.rc_context(RC):
        fig, axes = _grid(len(fits), 2, 4.4, 4.0)
        for ax, (dataset, d) in zip(axes, fits.items(), strict=True):
            pts = pd.DataFrame(d["points"])
            pts["baseline"] = pts.get("baseline", False)
            pts["baseline"] = pts["baseline"].fillna(False).astype(bool)
            xs = pts["acc_id"].astype(float).to_numpy()
            ys = pts["acc_shift"].astype(float).to_numpy()
            lo = max(1e-3, min(xs.min(), ys.min()) * 0.8)
            hi = min(1 - 1e-3, 1 - (1 - max(xs.max(), ys.max())) * 0.6)
            logit_axes = str(d.get("scale", "logit")) == "logit"
            if logit_axes:
                ax.set_xscale("logit")
                ax.set_yscale("logit")
            grid = _sigmoid(np.linspace(_logit(lo), _logit(hi), 100))
            ax.plot(grid, grid, "--", color="0.6", linewidth=0.8, label="y = x")
            slope, intercept = d.get("slope"), d.get("intercept")
            if slope is not None and intercept is not None:
                fit_y = _sigmoid(float(slope) * _logit(grid) + float(intercept))
                label = f"baseline fit (slope {float(slope):.2f}"
                label += f", R² {float(d['r2']):.2f}" if d.get("r2") is not None else ""
                label += f", n={int(d['n'])})" if d.get("n") is not None else ")"
                ax.plot(grid, fit_y, color="0.2", linewidth=1.2, label=label)
            base = pts[pts["baseline"]]
            ax.scatter(base["acc_id"], base["acc_shift"], s=26, color="0.55", edgecolors="0.3", linewidths=0.5,
                       label="baselines (real data)", zorder=3)
            for r in pts[~pts["baseline"]].itertuples(index=False):
                ax.scatter([r.acc_id], [r.acc_shift], s=60, marker="D", color=style.color(r.model),
                           edgecolors="black", linewidths=0.6, zorder=4, label=r.model)
            if logit_axes:
                _pct_axis(ax.xaxis, lo, hi)
                _pct_axis(ax.yaxis, lo, hi)
            ax.set_xlim(lo, hi)
            ax.set_ylim(lo, hi)
            ax.set_xlabel("in-distribution accuracy (%)")
            ax.set_ylabel(f"{dataset} accuracy (%)")
            ax.set_title(f"{dataset}" + (" (logit axes)" if logit_axes else ""))
            ax.grid(True, linewidth=0.3, alpha=0.5)
            ax.legend(loc="upper left", frameon=False, fontsize=7)
        fig.tight_layout()
    out.append((fig, "Effective robustness: accuracy on the shifted set against in-distribution accuracy. The line "
                     "is the least-squares fit over the baseline models in logit space; a model above it is more "
                     "robust than its accuracy predicts."))
    return out


# --- corruptions ---------------------------------------------------------------------------------------

def corruption_curves(artifacts: list[dict], style: Style, clean: dict[tuple[str, str], float] | None = None):
    """Top-1 error by severity, averaged over corruptions, one line per model (severity 0 = clean, if known)."""
    out = []
    for dataset, arts in _by(artifacts, "dataset").items():
        with plt.rc_context(RC):
            fig, ax = plt.subplots(figsize=(5.2, 3.4))
            for a in style.sort(arts):
                table = pd.DataFrame(a["data"]).apply(pd.to_numeric, errors="coerce")  # rows severity, cols corr.
                table.index = table.index.astype(int)
                mean = table.sort_index().mean(axis=1)
                xs, ys = list(mean.index), list(100 * (1 - mean.to_numpy()))
                if clean and (a["model"], dataset) in clean:
                    xs, ys = [0] + xs, [100 * (1 - clean[(a["model"], dataset)])] + ys
                ax.plot(xs, ys, marker="o", markersize=4, color=style.color(a["model"]), label=a["model"])
            ax.set_xlabel("severity" + (" (0 = clean)" if clean else ""))
            ax.set_ylabel("top-1 error (%), mean over corruptions")
            ax.set_ylim(bottom=0)
            ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
            ax.legend(frameon=False, loc="upper left")
            ax.set_title(f"corruption error by severity · {dataset}")
            fig.tight_layout()
        out.append((fig, f"Common corruptions on {dataset}: top-1 error at each severity, averaged over the "
                         f"{len(arts[0]['data'])} corruptions, one line per model."))
    return out


# --- adversarial ---------------------------------------------------------------------------------------

def robust_curves(artifacts: list[dict], style: Style):
    """Accuracy against the attack budget, one panel per attack (and dataset), eps 0 = clean accuracy."""
    panels: dict[tuple[str, str], list[dict]] = {}
    for a in artifacts:
        panels.setdefault((str(a["data"].get("attack", "")), a["dataset"]), []).append(a)
    with plt.rc_context(RC):
        fig, axes = _grid(len(panels), 2, 4.4, 3.2)
        for ax, ((attack, dataset), arts) in zip(axes, panels.items(), strict=True):
            all_eps = set()
            for a in style.sort(arts):
                d = a["data"]
                eps = [float(e) for e in d["eps"]]
                acc = [_f(v) for v in d["robust_top1"]]
                if d.get("clean_top1") is not None and 0.0 not in eps:
                    eps, acc = [0.0] + eps, [float(d["clean_top1"])] + acc
                all_eps |= set(eps)
                ax.plot(eps, 100 * np.asarray(acc), marker="o", markersize=4, color=style.color(a["model"]),
                        label=a["model"])
            ticks = sorted(all_eps)
            ax.set_xticks(ticks, [format_eps(t) if t else "0" for t in ticks], rotation=30 if len(ticks) > 4 else 0)
            ax.set_ylim(0, 100)
            ax.set_xlabel("ε (L∞ budget on [0, 1] pixels)" if "l2" not in attack.lower() else "ε (L2 budget)")
            ax.set_ylabel("top-1 under attack (%)")
            ax.set_title(" · ".join(x for x in (attack, dataset) if x))
            ax.legend(frameon=False)
        fig.tight_layout()
    return [(fig, "Adversarial robustness: top-1 accuracy against the attack budget ε (ε = 0 is the clean "
                  "accuracy).")]


# --- shape and background bias -----------------------------------------------------------------------------

def shape_bias(artifacts: list[dict], style: Style, overall: dict[str, float] | None = None):
    """model-vs-human's shape-bias plot (per category, texture vs shape decisions)."""
    rows = []
    for a in style.sort(artifacts):
        d = a["data"]
        for cat, v in zip(d.get("categories", []), d.get("shape_bias", []), strict=False):
            rows.append({"model": a["model"], "variant": str(cat), "metric": "shape_bias", "value": _f(v)})
        if overall and a["model"] in overall:
            rows.append({"model": a["model"], "variant": "all", "metric": "shape_bias", "value": overall[a["model"]]})
    if not rows:
        return []
    df = pd.DataFrame(rows)
    # The figure colours models by the colour cycle in order; give it each model's report colour.
    colors = cycler(color=[style.color(m) for m in dict.fromkeys(df["model"])])
    with plt.rc_context({**RC, "axes.prop_cycle": colors}):
        fig = _shape_bias_figure(df)
    return [(fig, "Shape bias per category on cue-conflict images (model-vs-human style): the fraction of shape vs "
                  "texture decisions; vertical lines are each model's overall shape bias.")]


_MARKERS = "oDs^v<>Ph*X"


def _shape_bias_figure(d: pd.DataFrame) -> Figure:
    """model-vs-human's shape-bias plot: per shape category, the fraction of texture (bottom) / shape (top) decisions.

    One marker per model and category, a vertical line at each model's overall value; categories are
    ordered by the first model's shape bias. Categories where a model named neither cue are left out.
    """
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
    fig.tight_layout(rect=(0, 0.05 + 0.03 * ((len(models) + 1) // 2), 1, 1))
    return fig


def background(artifacts: list[dict], style: Style, gaps: dict[str, float] | None = None):
    """Accuracy per background variant, grouped by model, and the BG-gap (mixed_same - mixed_rand) per model."""
    arts = style.sort(artifacts)
    variants = list(dict.fromkeys(v for a in arts for v in a["data"]))
    models = [a["model"] for a in arts]
    gaps = {m: v for m, v in (gaps or {}).items() if m in models}
    with plt.rc_context(RC):
        if gaps:
            fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9.5, 3.6), gridspec_kw={"width_ratios": [3, 1]})
        else:
            fig, ax = plt.subplots(figsize=(7.5, 3.6))
        width = 0.8 / len(arts)
        x = np.arange(len(variants))
        for k, a in enumerate(arts):
            vals = [100 * _f(a["data"].get(v)) for v in variants]
            ax.bar(x + (k - (len(arts) - 1) / 2) * width, vals, width, color=style.color(a["model"]),
                   label=a["model"])
        ax.set_xticks(x, variants, rotation=30, ha="right")
        ax.set_ylim(0, 100)
        ax.set_ylabel("top-1 (%)")
        ax.set_title("accuracy by background variant")
        ax.legend(frameon=False, fontsize=7, ncol=2)
        if gaps:
            names = list(gaps)
            vals = [100 * gaps[m] for m in names]
            ax2.bar(range(len(names)), vals, color=[style.color(m) for m in names])
            ax2.axhline(0, color="black", linewidth=0.8)
            ax2.set_xticks(range(len(names)), names, rotation=30, ha="right")
            ax2.set_ylabel("mixed_same − mixed_rand (pp)")
            ax2.set_title("BG-gap")
            for i, v in enumerate(vals):
                ax2.annotate(f"{v:+.1f}", (i, v), ha="center", va="bottom" if v >= 0 else "top", fontsize=7)
        fig.tight_layout()
    return [(fig, "Background bias: accuracy on each background variant" + (" and the BG-gap per model (closer to 0 "
                                                                            "= less reliant on the background)."
                                                                            if gaps else "."))]


# --- training ------------------------------------------------------------------------------------------

def training_curves(histories: dict[str, list[dict]], style: Style):
    """Validation accuracy (and training loss when logged) against step, one line per model."""
    histories = {m: h for m, h in histories.items() if h}
    if not histories:
        return []
    has_loss = any("loss" in r for h in histories.values() for r in h)
    with plt.rc_context(RC):
        fig, axes = plt.subplots(1, 2 if has_loss else 1, figsize=(9 if has_loss else 5, 3.2), squeeze=False)
        ax = axes[0][0]
        for m, h in histories.items():
            steps = [r.get("step", i) for i, r in enumerate(h)]
            ax.plot(steps, [100 * _f(r.get("val_acc")) for r in h], marker=".", color=style.color(m), label=m)
        ax.set_xlabel("step")
        ax.set_ylabel("validation top-1 (%)")
        ax.legend(frameon=False)
        ax.set_title("validation accuracy")
        if has_loss:
            ax2 = axes[0][1]
            for m, h in histories.items():
                steps = [r.get("step", i) for i, r in enumerate(h)]
                ax2.plot(steps, [_f(r.get("loss")) for r in h], color=style.color(m), label=m)
            ax2.set_xlabel("step")
            ax2.set_ylabel("training loss")
            ax2.set_title("training loss (last batch)")
        fig.tight_layout()
    return [(fig, "Training curves: validation top-1 at each evaluation and the training loss.")]
