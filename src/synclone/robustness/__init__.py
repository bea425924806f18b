"""Robustness probes. The plain-array metrics live in :mod:`.calibration`, :mod:`.ood` and :mod:`.shift`.

Only those light, numpy-only metric modules are re-exported here, so ``import synclone.robustness``
stays cheap; the probes that need models or datasets are imported from their own modules.
"""

from synclone.robustness.calibration import (
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
from synclone.robustness.ood import (
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
from synclone.robustness.shift import (
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
