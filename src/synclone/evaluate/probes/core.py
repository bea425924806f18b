"""Probes that need only the model's outputs on fixed data: clean accuracy, calibration, shift, OOD.

All four read :meth:`EvalContext.logits`, so the clean test set goes through each model once
however many of them run.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from pydantic import Field

from synclone.config import StrictModel
from synclone.errors import UserError
from synclone.evaluate.base import EvalContext, Row, register_probe
from synclone.robustness import calibration_metrics, ood_metrics, ood_score, reliability_diagram, roc_curve_points
from synclone.robustness.shift import (
    MIN_BASELINES,
    accuracy,
    effective_robustness,
    fit_baseline,
    read_baselines_csv,
)


def _conv(d: dict) -> str:
    return "; ".join(f"{k}={v}" for k, v in d.items())


def _top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean()) if len(labels) else float("nan")


class CleanSettings(StrictModel):
    topk: list[int] = Field(default_factory=lambda: [1], description="accuracies to report, e.g. [1, 5]")


@register_probe("clean", CleanSettings)
def clean_probe(ctx: EvalContext, s: CleanSettings) -> list[Row]:
    """Top-k accuracy on the clean in-distribution test set."""
    rows = []
    data = ctx.clean
    for name in ctx.models:
        logits = ctx.logits(name, data)
        for k in s.topk:
            if not 1 <= k <= logits.shape[1]:
                raise UserError(f"probes.clean.topk: k={k} must be between 1 and the {logits.shape[1]} classes")
            hit = (logits.topk(k, dim=1).indices == data.labels[:, None]).any(1).float().mean()
            rows.append(Row(name, "clean", data.name, "clean", f"top{k}", float(hit), len(data),
                            f"all {len(data)} images of {data.name}; selection never used this split"))
    return rows


class CalibrationSettings(StrictModel):
    n_bins: int = Field(15, ge=1)


@register_probe("calibration", CalibrationSettings)
def calibration_probe(ctx: EvalContext, s: CalibrationSettings) -> list[Row]:
    """ECE, MCE, adaptive and classwise ECE, NLL and Brier on the clean test set, plus reliability data."""
    rows = []
    data = ctx.clean
    for name in ctx.models:
        logits = ctx.logits(name, data).double().numpy()
        m = calibration_metrics(logits, data.labels.numpy(), n_bins=s.n_bins, from_logits=True)
        conv = _conv({"bins": m["conventions"]["n_bins"], "binning": "equal-width", "temperature": 1.0,
                      "confidence": "max softmax"})
        for key in ("ece", "mce", "adaptive_ece", "classwise_ece", "nll", "brier"):
            rows.append(Row(name, "calibration", data.name, "clean", key, m[key], m["n"], conv))
        d = reliability_diagram(logits, data.labels.numpy(), s.n_bins, from_logits=True)
        ctx.add_artifact(name, "calibration", data.name, "reliability",
                         {"edges": d.edges, "conf": [None if np.isnan(v) else float(v) for v in d.conf],
                          "acc": [None if np.isnan(v) else float(v) for v in d.acc], "count": d.count})
    return rows


class ShiftSettings(StrictModel):
    datasets: list[str] = Field(default_factory=list, description="shifted test sets: folders or built-ins")
    baseline_models: list[str] | None = Field(
        None, description="models of this run that form the baseline trend (default: all models)")
    baselines_csv: str | None = Field(None, description="CSV of acc_id,acc_shift rows (one shifted set)")


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
    rows = []
    clean_acc = {m: _top1(ctx.logits(m, ctx.clean), ctx.clean.labels) for m in ctx.models}
    for spec in s.datasets:
        data = ctx.dataset(spec, "test")
        subset = (getattr(data, "extra", None) or {}).get("class_subset")
        # ER compares like with like: the ID accuracy restricted to the shifted set's classes (metrics.md).
        id_acc = clean_acc if subset is None else _restricted_accuracy(ctx, subset, data.name)
        acc = {}
        for name, entry in ctx.models.items():
            entry.module.label_space.check_aligned(data.label_space, f"model '{name}'", f"shifted set '{spec}'")
            acc[name] = _top1(ctx.logits(name, data), data.labels)
            conv = f"shifted={data.name}; id={ctx.clean.name}"
            if getattr(data, "convention", ""):
                conv += f"; {data.convention}"
            if subset is not None:
                conv += f"; id accuracy restricted to the {len(subset)} shifted classes"
            rows.append(Row(name, "shift", data.name, "shifted", "top1", acc[name], len(data), conv))
            rows.append(Row(name, "shift", data.name, "shifted", "top1_drop", id_acc[name] - acc[name],
                            len(data), conv + "; drop = clean top1 - shifted top1"))
        if not any(np.isnan(v) for v in id_acc.values()):
            rows += _effective_robustness(ctx, s, data.name, id_acc, acc)
    return rows


def _restricted_accuracy(ctx: EvalContext, subset: list[int], dataset: str) -> dict[str, float]:
    try:
        return {m: accuracy(ctx.logits(m, ctx.clean), ctx.clean.labels, subset, drop_outside=True) for m in ctx.models}
    except UserError:
        warnings.warn(f"the clean set has no images of the {len(subset)} classes of '{dataset}': no top1_drop or "
                      "effective robustness for it", stacklevel=2)
        return {m: float("nan") for m in ctx.models}


def _effective_robustness(ctx: EvalContext, s: ShiftSettings, dataset: str, clean_acc: dict, acc: dict) -> list[Row]:
    explicit = s.baselines_csv is not None or s.baseline_models is not None
    if s.baselines_csv is not None:
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
    conv = _conv({"fit": "logit-linear OLS", "baselines": f"{fit.n} ({source})", "slope": f"{fit.a:.4g}",
                  "intercept": f"{fit.b:.4g}", "r2": f"{fit.r2:.4g}", "unit": "percentage points"})
    rows = [Row(m, "shift", dataset, "shifted", "effective_robustness",
                effective_robustness(fit, clean_acc[m], acc[m]), None, conv) for m in ctx.models]
    points = [{"model": m, "acc_id": clean_acc[m], "acc_shift": acc[m], "baseline": m in names} for m in ctx.models]
    if s.baselines_csv is not None:
        points += [{"model": n, "acc_id": float(a), "acc_shift": float(b_), "baseline": True}
                   for n, a, b_ in zip(names, x, y, strict=True)]
    ctx.add_artifact("*", "shift", dataset, "er_fit", {"dataset": dataset, "slope": fit.a, "intercept": fit.b,
                                                       "r2": fit.r2, "n": fit.n, "scale": "logit",
                                                       "points": points})
    return rows


SCORES = ("msp", "max_logit", "energy", "entropy")


class OODSettings(StrictModel):
    datasets: list[str] = Field(default_factory=lambda: ["digits", "animal_shapes", "uniform_noise", "gaussian_noise"])
    scores: list[str] = Field(default_factory=lambda: list(SCORES))
    max_images: int | None = Field(2000, ge=1, description="cap per OOD set (seeded subset)")
    tpr: float = Field(0.95, gt=0, lt=1)


@register_probe("ood", OODSettings)
def ood_probe(ctx: EvalContext, s: OODSettings) -> list[Row]:
    """OOD detection: the clean test set is in-distribution, each listed set is OOD; one row per score x metric."""
    bad = [x for x in s.scores if x not in SCORES]
    if bad:
        raise UserError(f"probes.ood.scores: unknown score(s) {', '.join(bad)}; choose from {', '.join(SCORES)}")
    rows = []
    for spec in s.datasets:
        ood = ctx.cap(ctx.dataset(spec, "test"), s.max_images)
        for name in ctx.models:
            lid, lood = ctx.logits(name, ctx.clean).double(), ctx.logits(name, ood).double()
            for score in s.scores:
                method = "neg_entropy" if score == "entropy" else score
                sid, sood = ood_score(lid, method), ood_score(lood, method)
                m = ood_metrics(sid, sood, tpr=s.tpr)
                conv = _conv({"id": ctx.clean.name, "positive": "ood", "score": f"{score} (higher = ID)",
                              "aupr": "average precision", "n_id": m["n_id"], "n_ood": m["n_ood"]})
                fpr_key = f"fpr{s.tpr * 100:g}"
                for key in ("auroc", "aupr_in", "aupr_out", fpr_key):
                    rows.append(Row(name, "ood", ood.name, score, key, m[key], m["n_ood"], conv))
                fpr, tpr, _ = roc_curve_points(sid, sood)
                keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), 200)).round().astype(int))
                ctx.add_artifact(name, "ood", ood.name, "roc", {"score": score, "fpr": fpr[keep], "tpr": tpr[keep],
                                                                "auroc": m["auroc"]})
    return rows
