"""Input checks shared by the plain-array metric modules (calibration, ood, shift).

Every metric accepts numpy arrays, torch tensors or nested lists, and computes in float64. Bad
input stops with a :class:`~synclone.errors.UserError` naming the argument and the fix, never a
silent number. torch is not imported here: tensors are recognised by their ``detach`` method, so
the metrics stay usable without it.
"""

from __future__ import annotations

import numpy as np

from synclone.errors import UserError

# Rows of a probability matrix may deviate from 1 by this much (float32 softmax outputs summed
# over 1000 classes drift by ~1e-6; anything near 1e-4 is not a softmax output).
PROB_SUM_TOL = 1e-4


def to_numpy(x, name: str) -> np.ndarray:
    """``x`` as a numpy array; torch tensors are detached and moved to the CPU first."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        t = x.detach().cpu()
        # bfloat16/float16 have no numpy twin; widen floats before converting.
        if t.is_floating_point():
            t = t.double()
        x = t.numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as err:
        raise UserError(f"{name} could not be read as an array ({err}); pass a numpy array or torch tensor.") from None


def as_float(x, name: str, ndim: int | None = None, allow_inf: bool = False) -> np.ndarray:
    """``x`` as a non-empty float64 array with ``ndim`` dimensions and no NaN (nor inf unless allowed)."""
    arr = to_numpy(x, name)
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.number)):
        raise UserError(f"{name} must be numeric, got dtype {arr.dtype}.")
    arr = arr.astype(np.float64, copy=False)
    if ndim is not None and arr.ndim != ndim:
        raise UserError(f"{name} must be {ndim}-D, got shape {arr.shape}.")
    if arr.size == 0:
        raise UserError(f"{name} is empty (shape {arr.shape}); there is nothing to score.")
    n_nan = int(np.isnan(arr).sum())
    if n_nan:
        raise UserError(
            f"{name} contains {n_nan} NaN value(s) of {arr.size}; fix or drop those samples "
            "(NaN outputs usually mean a diverged model or a corrupt input)."
        )
    if not allow_inf:
        n_inf = int(np.isinf(arr).sum())
        if n_inf:
            raise UserError(
                f"{name} contains {n_inf} infinite value(s) of {arr.size}; fix or drop those samples "
                "(infinite outputs usually mean a diverged model or an fp16 overflow)."
            )
    return arr


def as_labels(labels, n: int, n_classes: int | None, name: str = "labels") -> np.ndarray:
    """``labels`` as a 1-D int64 array of length ``n`` with values in ``[0, n_classes)``."""
    arr = to_numpy(labels, name)
    if arr.ndim != 1:
        raise UserError(f"{name} must be 1-D class indices, got shape {arr.shape}.")
    if arr.shape[0] != n:
        raise UserError(f"{name} has {arr.shape[0]} entries but the predictions have {n} rows; they must match.")
    if arr.size == 0:
        raise UserError(f"{name} is empty; there is nothing to score.")
    if np.issubdtype(arr.dtype, np.floating):
        # Labels stored as floats (e.g. read from CSV) are fine as long as they are whole numbers.
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise UserError(f"{name} must be integer class indices, got non-integer values.")
    elif not np.issubdtype(arr.dtype, np.integer):
        raise UserError(f"{name} must be integer class indices, got dtype {arr.dtype}.")
    arr = arr.astype(np.int64)
    if n_classes is not None:
        bad = (arr < 0) | (arr >= n_classes)
        if bad.any():
            raise UserError(
                f"{name} has {int(bad.sum())} value(s) outside [0, {n_classes}) (e.g. {int(arr[bad][0])}); "
                f"the predictions have {n_classes} classes. Check that labels and model use the same label space."
            )
    return arr


def softmax_lse(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise softmax and log-sum-exp in float64 from one pass of exp, shifted by the row max.

    Works in place on one n x K buffer: for 50k x 1000 ImageNet logits, every extra temporary is 400 MB.
    """
    m = logits.max(axis=1, keepdims=True)
    e = np.subtract(logits, m)
    np.exp(e, out=e)
    total = e.sum(axis=1, keepdims=True)
    e /= total
    return e, (m + np.log(total))[:, 0]


def logsumexp(x: np.ndarray) -> np.ndarray:
    """Row-wise log-sum-exp in float64, stable for large values."""
    m = x.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))[:, 0]


def check_probs(probs: np.ndarray, name: str = "probs") -> None:
    """Stop unless every row of ``probs`` lies in [0, 1] and sums to 1 within :data:`PROB_SUM_TOL`."""
    lo, hi = float(probs.min()), float(probs.max())
    dev = float(np.abs(probs.sum(axis=1) - 1.0).max())
    # Values may overshoot [0, 1] by rounding (1.0000000002 after a renormalisation), not by more.
    if lo < -1e-9 or hi > 1.0 + 1e-9 or dev > PROB_SUM_TOL:
        raise UserError(
            f"{name} are not probabilities (values in [{lo:.4g}, {hi:.4g}], rows sum to 1 +- {dev:.3g}, "
            f"tolerance {PROB_SUM_TOL:g}); if these are logits pass from_logits=True, or apply softmax first."
        )


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, shifted by the row max so large logits do not overflow."""
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)
