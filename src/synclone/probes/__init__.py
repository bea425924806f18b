"""Robustness probes: one module per family, each holding its metric functions, settings and registered probe.

Every metric's public function is importable from here (``docs/metrics-api.md`` lists them with their
conventions); importing the package also registers every built-in probe with
:func:`synclone.probes.base.register_probe`. ``mce`` is the maximum calibration error; the mean corruption
error of Hendrycks & Dietterich is ``mean_corruption_error`` (``synclone.probes.corruptions.metrics.mce``).
"""

from synclone.probes.adversarial import autoattack, fgsm, pgd, pgd_l2, pgd_linf, robust_accuracy
from synclone.probes.background import background_bias, bg_gap, in9_decision
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
from synclone.probes.context import context_accuracy
from synclone.probes.corruptions.metrics import corruption_error, relative_corruption_error, relative_mce
from synclone.probes.corruptions.metrics import mce as mean_corruption_error
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
from synclone.probes.shape_bias import imagenet16_decision, shape_bias
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
    "accuracy",
    "adaptive_ece",
    "aupr_in",
    "aupr_out",
    "auroc",
    "autoattack",
    "background_bias",
    "BaselineFit",
    "bg_gap",
    "brier",
    "calibration_metrics",
    "classwise_ece",
    "context_accuracy",
    "corruption_error",
    "ece",
    "effective_robustness",
    "energy",
    "fgsm",
    "fit_baseline",
    "fpr_at_tpr",
    "imagenet16_decision",
    "in9_decision",
    "masked_argmax",
    "max_logit",
    "mce",
    "mean_corruption_error",
    "msp",
    "neg_entropy",
    "nll",
    "ood_metrics",
    "ood_score",
    "pgd",
    "pgd_l2",
    "pgd_linf",
    "read_baselines_csv",
    "relative_corruption_error",
    "relative_mce",
    "relative_robustness",
    "reliability_diagram",
    "ReliabilityDiagram",
    "robust_accuracy",
    "roc_curve_points",
    "shape_bias",
]

# Registration: each family module registers its probe when imported; the imports above brought in all but two.
# (`synclone.probes.shape_bias` is the metric function here; the module stays importable by its full name.)
from synclone.probes import clean as _clean  # noqa: E402,F401
from synclone.probes.corruptions import probe as _corruptions  # noqa: E402,F401
