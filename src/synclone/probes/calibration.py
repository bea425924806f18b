"""Calibration metrics on plain arrays: ECE, MCE, adaptive ECE, classwise ECE, NLL, Brier, reliability diagrams.

Every function takes ``probs`` of shape (n, K) (numpy array, torch tensor or list) and integer
``labels`` of shape (n,), computes in float64, and stops with a :class:`~synclone.errors.UserError`
on bad input. Pass logits with ``from_logits=True``; rows that do not sum to 1 are refused rather
than guessed at.

Conventions (see docs/metrics-api.md and shared reference/metrics.md):

- Confidence = max probability, prediction = argmax (the first index on ties, as numpy and torch).
- Equal-width bins over [0, 1], 15 by default. Bin ``i`` holds ``edges[i] <= conf < edges[i+1]``;
  the last bin is closed, so confidence exactly 1.0 falls in it (netcal and numpy.histogram agree;
  torchmetrics puts conf == 1.0 in an extra, 16th bin).
- ECE = sum_b |B_b|/n * |acc_b - conf_b|; MCE = max over non-empty bins.
- Adaptive ECE: equal-mass bins whose inner edges are the confidence quantiles
  ``np.quantile(conf, i / n_bins)`` (linear interpolation) and whose outer edges are 0 and 1, as
  netcal's ``ECE(equal_intervals=False)``. Equal confidences always share a bin.
- Classwise ECE (Kull et al., 2019): for each class k, the equal-width ECE of p_k against the
  indicator y == k; the mean over classes.
- NLL: mean of -log p_y, natural log. From logits it is computed by log-softmax; from
  probabilities p_y is clipped to >= float64 eps (as scikit-learn's ``log_loss``), so one
  confidently wrong sample costs at most ~36 nats instead of infinity.
- Brier: mean over samples of sum over classes (p_k - [y == k])^2, range [0, 2] (as
  scikit-learn's multiclass ``brier_score_loss``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import Field

from synclone.config import StrictModel
from synclone.errors import UserError
from synclone.probes.arrays import as_float, as_labels, check_probs, softmax_lse
from synclone.probes.base import EvalContext, Row, convention, register_probe

DEFAULT_BINS = 15
NLL_EPS = float(np.finfo(np.float64).eps)
BINNING = "equal-width over [0,1], bins [lo,hi), conf==1.0 in the last bin"
ADAPTIVE_BINNING = "equal-mass, inner edges at confidence quantiles, outer edges 0 and 1"
BRIER = "sum over classes, mean over samples (range 0-2)"

# Classwise ECE bins all n x K probabilities; work through the rows in chunks of about this many
# entries so 50k x 1000 ImageNet outputs do not need several extra copies of the matrix at once.
_CHUNK_ENTRIES = 4_000_000


@dataclass(frozen=True)
class ReliabilityDiagram:
    """Per-bin statistics of a reliability diagram.

    ``edges`` has ``n_bins + 1`` entries; ``conf`` and ``acc`` are the mean confidence and the
    accuracy of each bin (NaN where the bin is empty); ``count`` is the number of samples per bin.
    """

    edges: np.ndarray
    conf: np.ndarray
    acc: np.ndarray
    count: np.ndarray

    @property
    def n(self) -> int:
        """Total number of samples."""
        return int(self.count.sum())

    @property
    def gap(self) -> np.ndarray:
        """|acc - conf| per bin (NaN where empty)."""
        return np.abs(self.acc - self.conf)

    def ece(self) -> float:
        """Expected calibration error of these bins: the count-weighted mean gap."""
        filled = self.count > 0
        return float(np.sum(self.count[filled] * self.gap[filled]) / self.n)

    def mce(self) -> float:
        """Maximum calibration error: the largest gap over non-empty bins."""
        return float(np.max(self.gap[self.count > 0]))


def _check_bins(n_bins) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise UserError(f"n_bins must be a positive integer, got {n_bins!r}.")
    return int(n_bins)


def _prepare(probs, labels, from_logits: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated (probabilities, log-probability of the true class, labels); float64 except the labels."""
    name = "logits" if from_logits else "probs"
    arr = as_float(probs, name, ndim=2)
    if arr.shape[1] < 2:
        raise UserError(f"{name} must have one column per class (at least 2), got shape {arr.shape}.")
    y = as_labels(labels, arr.shape[0], arr.shape[1])
    rows = np.arange(len(y))
    if from_logits:
        # Only the true class's log-probability is needed, so the n x K log-softmax is never kept.
        p, lse = softmax_lse(arr)
        true_logp = arr[rows, y] - lse
    else:
        check_probs(arr, name)
        p = np.clip(arr, 0.0, 1.0)
        true_logp = np.log(np.maximum(p[rows, y], NLL_EPS))
    return p, true_logp, y


def _bin_index(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bin of each value: ``edges[i] <= v < edges[i+1]``, the last bin closed at the top.

    Comparing against the edges (rather than ``floor(v * n_bins)``) keeps a value that sits on an
    edge in the same bin as torchmetrics, netcal and numpy.histogram put it.
    """
    idx = np.searchsorted(edges, values, side="right") - 1
    return np.clip(idx, 0, len(edges) - 2)


def _diagram(conf: np.ndarray, hits: np.ndarray, edges: np.ndarray) -> ReliabilityDiagram:
    n_bins = len(edges) - 1
    idx = _bin_index(conf, edges)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
        acc = np.bincount(idx, weights=hits.astype(np.float64), minlength=n_bins) / count
    return ReliabilityDiagram(edges=edges, conf=mean_conf, acc=acc, count=count.astype(np.int64))


def _conf_hits(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = p.argmax(axis=1)
    return p[np.arange(len(y)), pred], pred == y


def _equal_width(n_bins: int) -> np.ndarray:
    return np.linspace(0.0, 1.0, n_bins + 1)


def _equal_mass(conf: np.ndarray, n_bins: int) -> np.ndarray:
    edges = np.quantile(conf, np.linspace(0.0, 1.0, n_bins + 1))
    edges[0], edges[-1] = 0.0, 1.0
    return edges


def reliability_diagram(probs, labels, n_bins: int = DEFAULT_BINS, *, from_logits: bool = False) -> ReliabilityDiagram:
    """Per-bin mean confidence, accuracy and count over equal-width bins (see module conventions)."""
    n_bins = _check_bins(n_bins)
    p, _, y = _prepare(probs, labels, from_logits)
    conf, hits = _conf_hits(p, y)
    return _diagram(conf, hits, _equal_width(n_bins))


def ece(probs, labels, n_bins: int = DEFAULT_BINS, *, from_logits: bool = False) -> float:
    """Expected calibration error over ``n_bins`` equal-width confidence bins (0 = calibrated, max 1)."""
    return reliability_diagram(probs, labels, n_bins, from_logits=from_logits).ece()


def mce(probs, labels, n_bins: int = DEFAULT_BINS, *, from_logits: bool = False) -> float:
    """Maximum calibration error: the largest |acc - conf| over non-empty equal-width bins."""
    return reliability_diagram(probs, labels, n_bins, from_logits=from_logits).mce()


def adaptive_ece(probs, labels, n_bins: int = DEFAULT_BINS, *, from_logits: bool = False) -> float:
    """ECE over ``n_bins`` equal-mass bins (edges at the confidence quantiles; see module conventions)."""
    n_bins = _check_bins(n_bins)
    p, _, y = _prepare(probs, labels, from_logits)
    conf, hits = _conf_hits(p, y)
    return _diagram(conf, hits, _equal_mass(conf, n_bins)).ece()


def _classwise(p: np.ndarray, y: np.ndarray, n_bins: int) -> float:
    n, k = p.shape
    edges = _equal_width(n_bins)
    # conf_sum[k, b]: sum of p_k over the samples whose p_k falls in bin b. One bincount over
    # (class, bin) pairs per chunk of rows bins every class at once.
    conf_sum = np.zeros(k * n_bins)
    offsets = n_bins * np.arange(k)
    step = max(1, _CHUNK_ENTRIES // k)
    for start in range(0, n, step):
        block = p[start : start + step]
        flat = (_bin_index(block, edges) + offsets).ravel()
        conf_sum += np.bincount(flat, weights=block.ravel(), minlength=k * n_bins)
    # hits[k, b]: samples of class k whose p_k falls in bin b; only the true class of a row is a hit.
    true_bins = _bin_index(p[np.arange(n), y], edges)
    hits = np.bincount(y * n_bins + true_bins, minlength=k * n_bins)
    # sum_b |B_b|/n * |acc_b - conf_b| == sum_b |hits_b - conf_sum_b| / n, per class; then the mean.
    per_class = np.abs(hits - conf_sum).reshape(k, n_bins).sum(axis=1) / n
    return float(per_class.mean())


def classwise_ece(probs, labels, n_bins: int = DEFAULT_BINS, *, from_logits: bool = False) -> float:
    """Classwise ECE: mean over classes k of the equal-width ECE of p_k against [y == k]."""
    n_bins = _check_bins(n_bins)
    p, _, y = _prepare(probs, labels, from_logits)
    return _classwise(p, y, n_bins)


def nll(probs, labels, *, from_logits: bool = False) -> float:
    """Mean negative log-likelihood of the true class, in nats (see module conventions for clipping)."""
    _, true_logp, _ = _prepare(probs, labels, from_logits)
    return float(-np.mean(true_logp))


def _brier(p: np.ndarray, y: np.ndarray) -> float:
    sq = np.square(p).sum(axis=1)
    p_true = p[np.arange(len(y)), y]
    # sum_k (p_k - onehot_k)^2 = sum_k p_k^2 - 2 p_y + 1, without building the one-hot matrix.
    return float(np.mean(sq - 2.0 * p_true + 1.0))


def brier(probs, labels, *, from_logits: bool = False) -> float:
    """Multiclass Brier score: mean over samples of sum_k (p_k - [y == k])^2, in [0, 2]."""
    p, _, y = _prepare(probs, labels, from_logits)
    return _brier(p, y)


def calibration_metrics(probs_or_logits, labels, *, n_bins: int = DEFAULT_BINS, from_logits: bool = False) -> dict:
    """All calibration metrics at once, validating and converting the input once.

    Returns ``{"ece", "mce", "adaptive_ece", "classwise_ece", "nll", "brier", "accuracy",
    "mean_confidence": float, "n": int, "n_classes": int, "conventions": {...}}``; ``conventions``
    names the binning, bin count, input kind and Brier normalisation, to be written next to every
    result row.
    """
    n_bins = _check_bins(n_bins)
    p, true_logp, y = _prepare(probs_or_logits, labels, from_logits)
    conf, hits = _conf_hits(p, y)
    diagram = _diagram(conf, hits, _equal_width(n_bins))
    return {
        "ece": diagram.ece(),
        "mce": diagram.mce(),
        "adaptive_ece": _diagram(conf, hits, _equal_mass(conf, n_bins)).ece(),
        "classwise_ece": _classwise(p, y, n_bins),
        "nll": float(-np.mean(true_logp)),
        "brier": _brier(p, y),
        "accuracy": float(hits.mean()),
        "mean_confidence": float(conf.mean()),
        "n": int(len(y)),
        "n_classes": int(p.shape[1]),
        "conventions": {
            "n_bins": n_bins,
            "binning": BINNING,
            "adaptive_binning": ADAPTIVE_BINNING,
            "confidence": "max softmax probability",
            "input": "logits" if from_logits else "probabilities",
            "nll": "natural log" + ("" if from_logits else f", p_y clipped to >= {NLL_EPS:.3g}"),
            "brier": BRIER,
        },
    }


class CalibrationSettings(StrictModel):
    n_bins: int = Field(15, ge=1)
    # Calibration under shift (Singh et al.'s headline finding is on ImageNet-R and -A): also every shifted set
    # the shift probe of this run scores, and any sets listed here.
    shifted: bool = True
    datasets: list[str] = Field(default_factory=list, description="more test sets to measure calibration on")


@register_probe("calibration", CalibrationSettings)
def calibration_probe(ctx: EvalContext, s: CalibrationSettings) -> list[Row]:
    """ECE, MCE, adaptive and classwise ECE, NLL and Brier on the clean test set and on every shifted set the
    run scores (variant 'shifted'), plus reliability data per set."""
    rows = []
    specs = list(dict.fromkeys([*(ctx.shift_datasets if s.shifted else []), *s.datasets]))
    sets = [(ctx.clean, "clean")] + [(ctx.dataset(spec, "test"), "shifted") for spec in specs]
    for data, variant in sets:
        subset = (getattr(data, "extra", None) or {}).get("class_subset")
        labels = data.labels.numpy()
        for name in ctx.models:
            logits = ctx.logits(name, data).double().numpy()
            extra = {}
            if subset is not None:
                # ImageNet-R/A style: the model answers among the set's classes, so its confidence is the softmax
                # over those logits (the same mask the shift probe's accuracy uses).
                idx = np.asarray(subset)
                pos = {int(c): i for i, c in enumerate(idx)}
                logits, labels_used = logits[:, idx], np.array([pos[int(y)] for y in labels])
                extra = {"classes": f"softmax over the {len(idx)} classes of {data.name}"}
            else:
                labels_used = labels
            m = calibration_metrics(logits, labels_used, n_bins=s.n_bins, from_logits=True)
            conv = convention({"bins": m["conventions"]["n_bins"], "binning": "equal-width", "temperature": 1.0,
                               "confidence": "max softmax", **extra})
            for key in ("ece", "mce", "adaptive_ece", "classwise_ece", "nll", "brier"):
                rows.append(Row(name, "calibration", data.name, variant, key, m[key], m["n"], conv))
            d = reliability_diagram(logits, labels_used, s.n_bins, from_logits=True)
            ctx.add_artifact(name, "calibration", data.name, "reliability",
                             {"edges": d.edges, "conf": [None if np.isnan(v) else float(v) for v in d.conf],
                              "acc": [None if np.isnan(v) else float(v) for v in d.acc], "count": d.count})
    return rows
