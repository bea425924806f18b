"""Effective robustness against scipy.stats.linregress, CSV baselines, and class-subset accuracy."""

import numpy as np
import pytest
import torch
from scipy.special import expit
from scipy.special import logit as sp_logit
from scipy.stats import linregress

from synclone.errors import UserError
from synclone.probes import shift


def baseline_accuracies(n=12, seed=0):
    """Accuracies of a family of models on a linear trend in logit space, plus noise."""
    rng = np.random.default_rng(seed)
    acc_id = rng.uniform(0.55, 0.9, n)
    acc_shift = expit(0.8 * sp_logit(acc_id) - 0.9 + rng.normal(0, 0.15, n))
    return acc_id, acc_shift


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_matches_linregress_on_logits(seed):
    acc_id, acc_shift = baseline_accuracies(seed=seed)
    fit = shift.fit_baseline(acc_id, acc_shift)
    ref = linregress(sp_logit(acc_id), sp_logit(acc_shift))
    assert fit.a == pytest.approx(ref.slope, abs=1e-12)
    assert fit.b == pytest.approx(ref.intercept, abs=1e-12)
    assert fit.r2 == pytest.approx(ref.rvalue**2, abs=1e-12)
    assert fit.n == len(acc_id)
    assert fit.as_dict()["n_baselines"] == len(acc_id)


def test_effective_robustness_against_the_fitted_line():
    acc_id, acc_shift = baseline_accuracies(seed=3)
    fit = shift.fit_baseline(acc_id, acc_shift)
    ref = linregress(sp_logit(acc_id), sp_logit(acc_shift))
    model_id, model_shift = 0.8, 0.62
    expected = 100 * (model_shift - expit(ref.slope * sp_logit(model_id) + ref.intercept))
    assert shift.effective_robustness(fit, model_id, model_shift) == pytest.approx(expected, abs=1e-10)
    # A model exactly on the trend has ER 0; one 3 points above it has ER +3.
    on_line = fit.predict(0.7)
    assert shift.effective_robustness(fit, 0.7, on_line) == pytest.approx(0.0, abs=1e-10)
    assert shift.effective_robustness(fit, 0.7, on_line + 0.03) == pytest.approx(3.0, abs=1e-10)
    # Arrays in, arrays out.
    er = shift.effective_robustness(fit, acc_id, acc_shift)
    assert er.shape == acc_id.shape
    assert shift.relative_robustness(0.61, 0.55) == pytest.approx(6.0)


def test_exact_trend_is_recovered():
    acc_id = np.array([0.6, 0.7, 0.8, 0.9])
    acc_shift = expit(1.3 * sp_logit(acc_id) - 1.1)
    fit = shift.fit_baseline(acc_id, acc_shift)
    assert (fit.a, fit.b, fit.r2) == pytest.approx((1.3, -1.1, 1.0), abs=1e-12)


def test_accuracies_of_zero_and_one_are_clipped_by_eps():
    acc_id = np.array([0.0, 0.5, 0.9, 1.0])
    acc_shift = np.array([0.0, 0.3, 0.7, 0.95])
    fit = shift.fit_baseline(acc_id, acc_shift)
    clip = lambda a: np.clip(a, shift.EPS, 1 - shift.EPS)  # noqa: E731
    ref = linregress(sp_logit(clip(acc_id)), sp_logit(clip(acc_shift)))
    assert fit.a == pytest.approx(ref.slope, abs=1e-12) and fit.eps == shift.EPS
    assert np.isfinite(fit.predict(1.0))
    other = shift.fit_baseline(acc_id, acc_shift, eps=1e-3)
    assert other.eps == 1e-3 and other.a != pytest.approx(fit.a)


@pytest.mark.parametrize("n", [0, 1, 2])
def test_fewer_than_three_baselines_are_refused(n):
    acc_id, acc_shift = baseline_accuracies(n=max(n, 1))
    with pytest.raises(UserError, match=f"at least 3 baseline models, got {n}"):
        shift.fit_baseline(acc_id[:n], acc_shift[:n])


def test_bad_accuracies_are_refused():
    acc_id, acc_shift = baseline_accuracies()
    with pytest.raises(UserError, match="percentages"):
        shift.fit_baseline(acc_id * 100, acc_shift * 100)
    with pytest.raises(UserError, match="NaN"):
        shift.fit_baseline(np.r_[acc_id[:-1], np.nan], acc_shift)
    with pytest.raises(UserError, match="1-D"):
        shift.fit_baseline(acc_id, acc_shift[:-1])
    with pytest.raises(UserError, match="same in-distribution accuracy"):
        shift.fit_baseline(np.full(4, 0.7), acc_shift[:4])


# --- CSV baselines ---------------------------------------------------------------------------------


def write_csv(path, acc_id, acc_shift, header="model,acc_id,acc_shift"):
    rows = [header] + [f"m{i},{a},{b}" for i, (a, b) in enumerate(zip(acc_id, acc_shift, strict=True))]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_csv_fractions(tmp_path):
    acc_id, acc_shift = baseline_accuracies()
    base = shift.read_baselines_csv(write_csv(tmp_path / "b.csv", acc_id, acc_shift))
    assert base.scale == "fraction" and base.models[0] == "m0"
    np.testing.assert_allclose(base.acc_id, acc_id, atol=1e-15)
    assert base.fit().a == pytest.approx(shift.fit_baseline(acc_id, acc_shift).a, abs=1e-12)


def test_csv_percentages_are_converted_with_a_warning(tmp_path):
    acc_id, acc_shift = baseline_accuracies()
    path = write_csv(tmp_path / "b.csv", acc_id * 100, acc_shift * 100)
    with pytest.warns(UserWarning, match="read as percentages"):
        base = shift.read_baselines_csv(path)
    assert base.scale == "percent"
    np.testing.assert_allclose(base.acc_shift, acc_shift, atol=1e-12)
    # Stated explicitly, no warning and the same numbers.
    explicit = shift.read_baselines_csv(path, scale="percent")
    np.testing.assert_array_equal(explicit.acc_id, base.acc_id)
    with pytest.raises(UserError, match="scale='fraction'"):
        shift.read_baselines_csv(path, scale="fraction")


def test_csv_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        shift.read_baselines_csv(tmp_path / "missing.csv")
    path = write_csv(tmp_path / "cols.csv", [0.5, 0.6, 0.7], [0.4, 0.5, 0.6], header="model,top1,acc_shift")
    with pytest.raises(UserError, match="lacks column.*acc_id"):
        shift.read_baselines_csv(path)
    path = tmp_path / "text.csv"
    path.write_text("acc_id,acc_shift\n0.5,0.4\nabc,0.5\n0.7,0.6\n")
    with pytest.raises(UserError, match="non-numeric value on line 3"):
        shift.read_baselines_csv(path)
    few = shift.read_baselines_csv(write_csv(tmp_path / "two.csv", [0.5, 0.6], [0.4, 0.5]))
    with pytest.raises(UserError, match="got 2"):
        few.fit()


# --- class subsets ---------------------------------------------------------------------------------


def test_masked_argmax_masks_instead_of_remapping():
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(200, 30))
    subset = np.sort(rng.choice(30, size=8, replace=False))
    masked = torch.tensor(logits).clone()
    keep = torch.zeros(30, dtype=torch.bool)
    keep[torch.tensor(subset)] = True
    masked[:, ~keep] = -torch.inf
    expected = masked.argmax(dim=1).numpy()
    pred = shift.masked_argmax(logits, subset)
    np.testing.assert_array_equal(pred, expected)
    assert np.isin(pred, subset).all()  # indices of the full label space


def test_accuracy_with_class_subset():
    rng = np.random.default_rng(8)
    n, k = 300, 20
    subset = np.arange(0, k, 2)
    labels = rng.choice(subset, size=n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), labels] += 1.5  # right class usually wins
    logits[:, 1] += 3.0  # a class outside the subset that would steal the unmasked argmax
    acc = shift.accuracy(logits, labels, class_subset=subset)
    assert acc == pytest.approx(float(np.mean(shift.masked_argmax(logits, subset) == labels)))
    assert acc > shift.accuracy(logits, labels) + 0.3
    # Labels outside the subset: refused, or dropped on request.
    mixed = labels.copy()
    mixed[:50] = 1
    with pytest.raises(UserError, match="50 label"):
        shift.accuracy(logits, mixed, class_subset=subset)
    kept = shift.accuracy(logits, mixed, class_subset=subset, drop_outside=True)
    assert kept == pytest.approx(shift.accuracy(logits[50:], labels[50:], class_subset=subset))


def test_subset_errors():
    logits = np.zeros((4, 5))
    with pytest.raises(UserError, match=r"\[0, 5\)"):
        shift.masked_argmax(logits, [1, 7])
    with pytest.raises(UserError, match="duplicates"):
        shift.masked_argmax(logits, [1, 1])
    with pytest.raises(UserError, match="non-empty"):
        shift.masked_argmax(logits, [])
    with pytest.raises(UserError, match="infinite"):
        shift.accuracy(np.full((2, 3), np.inf), [0, 1])
