"""Out-of-distribution detection on plain arrays: scores from logits, and AUROC / AUPR / FPR@TPR.

Scores (one forward pass, higher = more in-distribution):

- ``msp``: maximum softmax probability (Hendrycks & Gimpel, 2017);
- ``max_logit``: the largest logit (Hendrycks et al., 2022);
- ``energy``: T * logsumexp(logits / T), i.e. the negative free energy (Liu et al., 2020), T = 1;
- ``neg_entropy``: sum_k p_k log p_k, the negative entropy of the softmax.

Metrics take the scores of the ID and of the OOD samples separately. Conventions:

- ``positive="ood"`` (default; OpenOOD v1.5, pytorch-ood): OOD is the positive class and a sample
  is flagged OOD when its score is low. FPR@95 is the fraction of ID samples flagged OOD at the
  first threshold that flags at least 95% of the OOD samples.
- ``positive="id"`` (ODIN, Liang et al., 2018): ID is the positive class; FPR@95 is the fraction of
  OOD samples accepted as ID at the first threshold that accepts at least 95% of the ID samples.
- AUROC is the same under both conventions; ties between an ID and an OOD score count half.
- AUPR-In takes ID as positive and the score as is; AUPR-Out takes OOD as positive and the
  negated score. Both are the same under either ``positive``. By default they are average
  precision, the step-wise sum sum_j (R_j - R_{j-1}) P_j over the distinct thresholds (as
  scikit-learn's ``average_precision_score``); ``aupr="trapezoid"`` gives the trapezoidal area
  under the precision-recall curve ending at (recall 0, precision 1), as OpenOOD
  (``sklearn.metrics.auc(recall, precision)``) and pytorch-ood compute it. The trapezoid
  interpolates linearly between points, which is optimistic, so it runs a little higher.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from synclone.config import StrictModel
from synclone.errors import UserError
from synclone.probes.arrays import as_float, logsumexp
from synclone.probes.base import EvalContext, Row, convention, register_probe

POSITIVES = ("ood", "id")
AUPR_METHODS = ("step", "trapezoid")


def _logits(logits) -> np.ndarray:
    arr = as_float(logits, "logits", ndim=2)
    if arr.shape[1] < 2:
        raise UserError(f"logits must have one column per class (at least 2), got shape {arr.shape}.")
    return arr


def msp(logits) -> np.ndarray:
    """Maximum softmax probability per sample; higher = more in-distribution."""
    z = _logits(logits)
    return np.exp(z.max(axis=1) - logsumexp(z))


def max_logit(logits) -> np.ndarray:
    """Largest logit per sample; higher = more in-distribution."""
    return _logits(logits).max(axis=1)


def energy(logits, T: float = 1.0) -> np.ndarray:
    """Negative free energy T * logsumexp(logits / T) per sample; higher = more in-distribution."""
    if not T > 0:
        raise UserError(f"energy temperature T must be > 0, got {T!r}.")
    return T * logsumexp(_logits(logits) / T)


def neg_entropy(logits) -> np.ndarray:
    """Negative softmax entropy sum_k p_k log p_k per sample (<= 0); higher = more in-distribution."""
    z = _logits(logits)
    shifted = z - z.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    total = e.sum(axis=1)
    # sum_k p_k log p_k with p_k = e_k / total and log p_k = shifted_k - log(total).
    return np.einsum("ij,ij->i", e, shifted) / total - np.log(total)


SCORES = {"msp": msp, "max_logit": max_logit, "energy": energy, "neg_entropy": neg_entropy}


def ood_score(logits, method: str = "msp", **kwargs) -> np.ndarray:
    """The OOD score ``method`` (one of :data:`SCORES`) of each row of ``logits``."""
    if method not in SCORES:
        raise UserError(f"unknown OOD score {method!r}; choose one of {', '.join(SCORES)}.")
    return SCORES[method](logits, **kwargs)


# --- metrics -------------------------------------------------------------------------------------


def _scores(scores_id, scores_ood) -> tuple[np.ndarray, np.ndarray]:
    # +-inf scores are ordered like any others, so only NaN (which has no order) is refused.
    sid = as_float(scores_id, "scores_id", ndim=1, allow_inf=True)
    sood = as_float(scores_ood, "scores_ood", ndim=1, allow_inf=True)
    return sid, sood


def _check_positive(positive: str) -> None:
    if positive not in POSITIVES:
        raise UserError(f"positive must be 'ood' (OpenOOD/pytorch-ood) or 'id' (ODIN), got {positive!r}.")


def _pos_neg(sid: np.ndarray, sood: np.ndarray, positive: str) -> tuple[np.ndarray, np.ndarray]:
    """(positive, negative) scores where higher = more positive: OOD samples get the negated score."""
    _check_positive(positive)
    return (-sood, -sid) if positive == "ood" else (sid, sood)


def _counts(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thresholds (the distinct scores, descending) and the positives/negatives with score >= each."""
    scores = np.concatenate([pos, neg])
    is_pos = np.concatenate([np.ones(len(pos), bool), np.zeros(len(neg), bool)])
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    # The last position of each run of equal scores: tied samples enter at the same threshold.
    last = np.append(s[1:] != s[:-1], True)
    idx = np.flatnonzero(last)
    tps = np.cumsum(is_pos[order])[idx]
    fps = idx + 1 - tps
    return s[idx], tps, fps


def _auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    # Mann-Whitney U with mid-ranks, so a tie between a positive and a negative counts half.
    _, inverse, counts = np.unique(np.concatenate([pos, neg]), return_inverse=True, return_counts=True)
    mid = np.cumsum(counts) - (counts - 1) / 2.0
    rank_sum = mid[inverse[: len(pos)]].sum()
    n_pos, n_neg = len(pos), len(neg)
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _aupr(pos: np.ndarray, neg: np.ndarray, method: str) -> float:
    if method not in AUPR_METHODS:
        raise UserError(f"aupr must be 'step' (average precision) or 'trapezoid' (OpenOOD), got {method!r}.")
    _, tps, fps = _counts(pos, neg)
    precision = tps / (tps + fps)
    recall = tps / len(pos)
    if method == "step":
        return float(np.sum(np.diff(recall, prepend=0.0) * precision))
    # Trapezoid from the point (recall 0, precision 1), as sklearn.metrics.precision_recall_curve ends.
    r = np.concatenate([[0.0], recall])
    p = np.concatenate([[1.0], precision])
    return float(np.sum(np.diff(r) * (p[1:] + p[:-1]) / 2.0))


def _roc(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    thresholds, tps, fps = _counts(pos, neg)
    fpr = np.concatenate([[0.0], fps / len(neg)])
    tpr = np.concatenate([[0.0], tps / len(pos)])
    return fpr, tpr, np.concatenate([[np.inf], thresholds])


def _fpr_at(pos: np.ndarray, neg: np.ndarray, tpr: float) -> float:
    fpr_curve, tpr_curve, _ = _roc(pos, neg)
    # The first threshold whose TPR reaches the target; the curve ends at TPR 1, so one exists.
    return float(fpr_curve[np.searchsorted(tpr_curve, tpr, side="left")])


def _check_tpr(tpr: float) -> float:
    if not 0.0 < tpr <= 1.0:
        raise UserError(f"tpr must be a fraction in (0, 1], e.g. 0.95, got {tpr!r}.")
    return float(tpr)


def auroc(scores_id, scores_ood, positive: str = "ood") -> float:
    """Area under the ROC curve: P(a random positive outranks a random negative), ties count half.

    Scores are higher = more in-distribution. The value is the same for ``positive="ood"`` and
    ``"id"``; the argument exists so callers can pass one convention everywhere.
    """
    return _auroc(*_pos_neg(*_scores(scores_id, scores_ood), positive))


def aupr_in(scores_id, scores_ood, aupr: str = "step") -> float:
    """Area under the precision-recall curve with ID as the positive class (see module conventions)."""
    sid, sood = _scores(scores_id, scores_ood)
    return _aupr(sid, sood, aupr)


def aupr_out(scores_id, scores_ood, aupr: str = "step") -> float:
    """Area under the precision-recall curve with OOD as the positive class (negated scores)."""
    sid, sood = _scores(scores_id, scores_ood)
    return _aupr(-sood, -sid, aupr)


def fpr_at_tpr(scores_id, scores_ood, tpr: float = 0.95, positive: str = "ood") -> float:
    """False positive rate at the first threshold whose true positive rate reaches ``tpr``.

    ``positive="ood"``: the fraction of ID samples flagged OOD when >= ``tpr`` of OOD is flagged.
    ``positive="id"`` (ODIN): the fraction of OOD samples accepted when >= ``tpr`` of ID is accepted.
    """
    tpr = _check_tpr(tpr)
    return _fpr_at(*_pos_neg(*_scores(scores_id, scores_ood), positive), tpr)


def roc_curve_points(scores_id, scores_ood, positive: str = "ood") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points (fpr, tpr, thresholds) from (0, 0) to (1, 1), one point per distinct score.

    Thresholds are in the units of the scores: with ``positive="ood"`` point j flags as OOD the
    samples with ``score <= thresholds[j]``; with ``"id"`` it accepts those with
    ``score >= thresholds[j]``. The first point, which flags nothing, has threshold -inf
    (``"ood"``) or +inf (``"id"``). The same points as ``sklearn.metrics.roc_curve(...,
    drop_intermediate=False)`` on the corresponding labels.
    """
    fpr, tpr, thresholds = _roc(*_pos_neg(*_scores(scores_id, scores_ood), positive))
    return fpr, tpr, (-thresholds if positive == "ood" else thresholds)


def ood_metrics(scores_id, scores_ood, *, positive: str = "ood", tpr: float = 0.95, aupr: str = "step") -> dict:
    """AUROC, AUPR-In, AUPR-Out and FPR@``tpr`` at once, with the conventions used.

    Returns ``{"auroc", "aupr_in", "aupr_out", "fpr95": float, "n_id", "n_ood": int,
    "conventions": {...}}``; the FPR key follows ``tpr`` (``fpr90`` for 0.9).
    """
    sid, sood = _scores(scores_id, scores_ood)
    tpr = _check_tpr(tpr)
    pos, neg = _pos_neg(sid, sood, positive)
    if aupr not in AUPR_METHODS:
        raise UserError(f"aupr must be 'step' (average precision) or 'trapezoid' (OpenOOD), got {aupr!r}.")
    return {
        "auroc": _auroc(pos, neg),
        "aupr_in": _aupr(sid, sood, aupr),
        "aupr_out": _aupr(-sood, -sid, aupr),
        f"fpr{tpr * 100:g}": _fpr_at(pos, neg, tpr),
        "n_id": int(len(sid)),
        "n_ood": int(len(sood)),
        "conventions": {
            "positive": positive,
            "tpr": tpr,
            "score_direction": "higher = more in-distribution",
            "aupr": "average precision (step-wise)" if aupr == "step" else "trapezoidal (OpenOOD)",
            "ties": "count half in AUROC",
        },
    }


# The probe's score names ("entropy" is the negative entropy of :func:`neg_entropy`).
PROBE_SCORES = ("msp", "max_logit", "energy", "entropy")


class OODSettings(StrictModel):
    datasets: list[str] = Field(default_factory=lambda: ["digits", "animal_shapes", "uniform_noise", "gaussian_noise"])
    scores: list[str] = Field(default_factory=lambda: list(PROBE_SCORES))
    max_images: int | None = Field(2000, ge=1, description="cap per OOD set (seeded subset)")
    tpr: float = Field(0.95, gt=0, lt=1)


@register_probe("ood", OODSettings)
def ood_probe(ctx: EvalContext, s: OODSettings) -> list[Row]:
    """OOD detection: the clean test set is in-distribution, each listed set is OOD; one row per score x metric."""
    bad = [x for x in s.scores if x not in PROBE_SCORES]
    if bad:
        raise UserError(f"probes.ood.scores: unknown score(s) {', '.join(bad)}; choose from {', '.join(PROBE_SCORES)}")
    rows = []
    for spec in s.datasets:
        ood = ctx.cap(ctx.dataset(spec, "test"), s.max_images)
        for name in ctx.models:
            lid, lood = ctx.logits(name, ctx.clean).double(), ctx.logits(name, ood).double()
            for score in s.scores:
                method = "neg_entropy" if score == "entropy" else score
                sid, sood = ood_score(lid, method), ood_score(lood, method)
                m = ood_metrics(sid, sood, tpr=s.tpr)
                conv = convention({"id": ctx.clean.name, "positive": "ood", "score": f"{score} (higher = ID)",
                              "aupr": "average precision", "n_id": m["n_id"], "n_ood": m["n_ood"]})
                fpr_key = f"fpr{s.tpr * 100:g}"
                for key in ("auroc", "aupr_in", "aupr_out", fpr_key):
                    rows.append(Row(name, "ood", ood.name, score, key, m[key], m["n_ood"], conv))
                fpr, tpr, _ = roc_curve_points(sid, sood)
                keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), 200)).round().astype(int))
                ctx.add_artifact(name, "ood", ood.name, "roc", {"score": score, "fpr": fpr[keep], "tpr": tpr[keep],
                                                                "auroc": m["auroc"]})
    return rows
