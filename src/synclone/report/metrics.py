"""How each metric reads: which direction is better and how its number is printed. One table for the report.

Units: ``frac`` is a fraction in [0, 1] printed as a percentage (accuracies, ECE, AUROC); ``pct`` is
already in % (mCE, CE); ``pp`` is already in percentage points (effective robustness); ``frac_pp``
is a difference of fractions printed in percentage points (BG-gap); ``ratio`` and ``float`` are
printed as they are. Directions: ``higher``, ``lower``, ``abs_lower`` (closest to 0 is best) or
``None`` (no best is marked).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class MetricInfo:
    better: str | None
    unit: str


# Keyed by metric name; (probe, metric) entries override where one name means two things
# ("mce" is the calibration's maximum bin gap, a fraction, and the corruption probe's mean CE, in %).
METRICS: dict[str | tuple[str, str], MetricInfo] = {
    "top1": MetricInfo("higher", "frac"),
    "top5": MetricInfo("higher", "frac"),
    "accuracy": MetricInfo("higher", "frac"),
    "clean_top1": MetricInfo("higher", "frac"),
    "robust_top1": MetricInfo("higher", "frac"),
    "attack_success_rate": MetricInfo("lower", "frac"),
    "effective_robustness": MetricInfo("higher", "pp"),
    "relative_robustness": MetricInfo("higher", "pp"),
    "ece": MetricInfo("lower", "frac"),
    "mce": MetricInfo("lower", "frac"),
    "adaptive_ece": MetricInfo("lower", "frac"),
    "classwise_ece": MetricInfo("lower", "frac"),
    "nll": MetricInfo("lower", "float"),
    "brier": MetricInfo("lower", "float"),
    "mean_confidence": MetricInfo(None, "frac"),
    "auroc": MetricInfo("higher", "frac"),
    "aupr_in": MetricInfo("higher", "frac"),
    "aupr_out": MetricInfo("higher", "frac"),
    "fpr95": MetricInfo("lower", "frac"),
    "ce": MetricInfo("lower", "pct"),
    "relative_mce": MetricInfo("lower", "pct"),
    ("corruptions", "mce"): MetricInfo("lower", "pct"),
    ("corruption", "mce"): MetricInfo("lower", "pct"),
    # Human observers score about 0.96 (Geirhos et al., 2019); a higher shape bias is closer to them.
    "shape_bias": MetricInfo("higher", "ratio"),
    "shape_fraction": MetricInfo("higher", "frac"),
    "texture_fraction": MetricInfo("lower", "frac"),
    "bg_gap": MetricInfo("abs_lower", "frac_pp"),
    "ratio_to_P0": MetricInfo("higher", "ratio"),
    # Dataset diagnostics (synclone inspect), as a sweep's report draws them.
    ("inspect", "frechet_distance"): MetricInfo("lower", "float"),
    ("inspect", "kid"): MetricInfo("lower", "float"),
    ("inspect", "precision"): MetricInfo("higher", "float"),
    ("inspect", "recall"): MetricInfo("higher", "float"),
    ("inspect", "density"): MetricInfo("higher", "float"),
    ("inspect", "coverage"): MetricInfo("higher", "float"),
    ("inspect", "classifiability"): MetricInfo("higher", "frac"),
    ("inspect", "near_duplicate_rate"): MetricInfo("lower", "frac"),
    ("inspect", "diversity_ratio"): MetricInfo(None, "ratio"),
}

_UNKNOWN = MetricInfo(None, "float")


def metric_info(probe: str, metric: str) -> MetricInfo:
    """The direction and unit of ``metric`` as ``probe`` writes it (no direction for unknown metrics)."""
    return METRICS.get((probe, metric)) or METRICS.get(metric) or _UNKNOWN


def fmt(value: float | None, unit: str) -> str:
    """A number for a table: fractions as % with 1 decimal, points signed, others with 3 significant digits."""
    if value is None or not math.isfinite(value):
        return "–"
    if unit == "frac":
        return f"{100 * value:.1f}%"
    if unit == "pct":
        return f"{value:.1f}%"
    if unit == "pp":
        return f"{value:+.1f} pp"
    if unit == "frac_pp":
        return f"{100 * value:+.1f} pp"
    if unit == "ratio":
        return f"{value:.2f}"
    if unit == "int":
        return f"{int(value)}"
    return f"{value:.3f}" if abs(value) < 1000 else f"{value:.4g}"


def best_flags(values: list[float], better: str | None) -> list[bool]:
    """Which entries are the best under ``better`` (ties all marked); nothing is marked with fewer than 2 values."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if better is None or len(finite) < 2:
        return [False] * len(values)
    key = abs if better == "abs_lower" else (lambda v: v)
    target = max(finite) if better == "higher" else min(finite, key=key)
    return [v is not None and math.isfinite(v) and math.isclose(key(v), key(target), rel_tol=1e-9, abs_tol=1e-12)
            for v in values]


def direction_text(better: str | None) -> str:
    return {"higher": "higher is better", "lower": "lower is better",
            "abs_lower": "closer to 0 is better"}.get(better or "", "")


def format_eps(eps: float) -> str:
    """An attack budget the way papers write it: k/255 when it is one, else the plain number."""
    k = eps * 255
    if 0 < eps < 1 and abs(k - round(k)) < 1e-3:
        return f"{round(k)}/255"
    return f"{eps:g}"
