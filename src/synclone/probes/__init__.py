"""Robustness probes: one module per family, each holding its metric functions, settings and registered probe.

The plain-array metrics most users want are re-exported here; importing the package also registers
every built-in probe with :func:`synclone.probes.base.register_probe`.
"""

from synclone.probes.calibration import (
    ReliabilityDiagram,
    adaptive_ece,
    brier,
    calibration_metrics,
    classwise_ece,
    ece,
    mce,
    nll,
    reliability_diagram,
)
from synclone.probes.ood import (
    aupr_in,
    aupr_out,
    auroc,
    energy,
    fpr_at_tpr,
    max_logit,
    msp,
    neg_entropy,
    ood_metrics,
    ood_score,
    roc_curve_points,
)
from synclone.probes.shift import (
    BaselineFit,
    accuracy,
    effective_robustness,
    fit_baseline,
    masked_argmax,
    read_baselines_csv,
    relative_robustness,
)

__all__ = [
    "BaselineFit",
    "ReliabilityDiagram",
    "accuracy",
    "adaptive_ece",
    "aupr_in",
    "aupr_out",
    "auroc",
    "brier",
    "calibration_metrics",
    "classwise_ece",
    "ece",
    "effective_robustness",
    "energy",
    "fit_baseline",
    "fpr_at_tpr",
    "masked_argmax",
    "max_logit",
    "mce",
    "msp",
    "neg_entropy",
    "nll",
    "ood_metrics",
    "ood_score",
    "read_baselines_csv",
    "relative_robustness",
    "reliability_diagram",
    "roc_curve_points",
]

# Registration: each family module registers its probe when imported.
from synclone.probes import adversarial, background, clean, context, shape_bias  # noqa: E402,F401
from synclone.probes.corruptions import probe as _corruptions  # noqa: E402,F401
