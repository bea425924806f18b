"""OOD scores and metrics against scikit-learn and pytorch-ood on the same random inputs, in float64."""

import numpy as np
import pytest
import torch
from pytorch_ood.detector import EnergyBased, Entropy, MaxLogit, MaxSoftmax
from pytorch_ood.metrics import OODMetrics
from pytorch_ood.metrics import functional as pood
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from synclone.errors import UserError
from synclone.probes import ood

TOL = 1e-9


def make_scores(kind, seed=0):
    """ID scores higher on average than OOD scores; ``kind`` controls how many ties there are."""
    rng = np.random.default_rng(seed)
    sid, sood = rng.normal(1.0, 1.0, 400), rng.normal(0.0, 1.2, 250)
    if kind == "ties":
        sid, sood = np.round(sid, 1), np.round(sood, 1)
    elif kind == "heavy_ties":
        sid, sood = np.clip(np.round(sid), -1, 2), np.clip(np.round(sood), -1, 2)
    return sid, sood


KINDS = ["continuous", "ties", "heavy_ties"]


def sk_inputs(sid, sood, positive):
    """Labels (1 = positive) and scores (higher = more positive) for scikit-learn."""
    if positive == "ood":
        return np.r_[np.zeros(len(sid)), np.ones(len(sood))], -np.r_[sid, sood]
    return np.r_[np.ones(len(sid)), np.zeros(len(sood))], np.r_[sid, sood]


def pood_inputs(sid, sood, positive):
    """pytorch-ood's inputs: outlier scores (higher = more positive) and labels < 0 for the positive class.

    pytorch-ood always takes OOD as positive; the ODIN convention is obtained by handing it the ID
    samples as its "OOD" class and the raw scores as outlier scores.
    """
    labels_pos = -np.ones(len(sood) if positive == "ood" else len(sid))
    if positive == "ood":
        scores, labels = -np.r_[sid, sood], np.r_[np.zeros(len(sid)), labels_pos]
    else:
        scores, labels = np.r_[sid, sood], np.r_[labels_pos, np.zeros(len(sood))]
    return torch.tensor(scores, dtype=torch.float64), torch.tensor(labels, dtype=torch.long)


def sk_fpr_at(y, s, tpr):
    fpr, tpr_curve, _ = roc_curve(y, s, drop_intermediate=False)
    return fpr[np.argmax(tpr_curve >= tpr)]


@pytest.mark.parametrize("positive", ["ood", "id"])
@pytest.mark.parametrize("kind", KINDS)
def test_metrics_match_sklearn(kind, positive):
    sid, sood = make_scores(kind)
    y, s = sk_inputs(sid, sood, positive)
    out = ood.ood_metrics(sid, sood, positive=positive)
    assert out["auroc"] == pytest.approx(roc_auc_score(y, s), abs=TOL)
    assert out["fpr95"] == pytest.approx(sk_fpr_at(y, s, 0.95), abs=TOL)
    # AUPR-In / -Out do not depend on the FPR convention.
    y_in, s_in = sk_inputs(sid, sood, "id")
    assert out["aupr_in"] == pytest.approx(average_precision_score(y_in, s_in), abs=TOL)
    assert out["aupr_out"] == pytest.approx(average_precision_score(1 - y_in, -s_in), abs=TOL)
    assert ood.fpr_at_tpr(sid, sood, 0.8, positive=positive) == pytest.approx(sk_fpr_at(y, s, 0.8), abs=TOL)
    assert out["conventions"]["positive"] == positive


@pytest.mark.parametrize("positive", ["ood", "id"])
@pytest.mark.parametrize("kind", KINDS)
def test_metrics_match_pytorch_ood(kind, positive):
    sid, sood = make_scores(kind, seed=1)
    scores, labels = pood_inputs(sid, sood, positive)
    ours = ood.ood_metrics(sid, sood, positive=positive, aupr="trapezoid")
    assert ours["auroc"] == pytest.approx(pood.auroc(scores, labels).item(), abs=TOL)
    assert ours["fpr95"] == pytest.approx(pood.fpr_at_tpr(scores, labels, 0.95).item(), abs=TOL)
    # pytorch-ood integrates the precision-recall curve by the trapezoidal rule.
    pos, neg = ("aupr_out", "aupr_in") if positive == "ood" else ("aupr_in", "aupr_out")
    assert ours[pos] == pytest.approx(pood.aupr(scores, labels, positive="ood").item(), abs=TOL)
    assert ours[neg] == pytest.approx(pood.aupr(scores, labels, positive="id").item(), abs=TOL)
    if positive == "ood":
        ref = OODMetrics().update(scores, labels).compute()
        for key, ref_key in [
            ("auroc", "AUROC"),
            ("aupr_in", "AUPR-IN"),
            ("aupr_out", "AUPR-OUT"),
            ("fpr95", "FPR95TPR"),
        ]:
            assert ours[key] == pytest.approx(ref[ref_key], abs=TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_trapezoid_aupr_matches_openood_style_sklearn(kind):
    # OpenOOD: sklearn.metrics.auc(recall, precision) over precision_recall_curve.
    sid, sood = make_scores(kind, seed=2)
    y, s = sk_inputs(sid, sood, "id")
    precision, recall, _ = precision_recall_curve(y, s)
    assert ood.aupr_in(sid, sood, aupr="trapezoid") == pytest.approx(auc(recall, precision), abs=TOL)
    precision, recall, _ = precision_recall_curve(1 - y, -s)
    assert ood.aupr_out(sid, sood, aupr="trapezoid") == pytest.approx(auc(recall, precision), abs=TOL)


@pytest.mark.parametrize("positive", ["ood", "id"])
@pytest.mark.parametrize("kind", KINDS)
def test_roc_curve_points_match_sklearn(kind, positive):
    sid, sood = make_scores(kind, seed=3)
    y, s = sk_inputs(sid, sood, positive)
    fpr, tpr, thr = ood.roc_curve_points(sid, sood, positive=positive)
    ref_fpr, ref_tpr, ref_thr = roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr, atol=TOL)
    np.testing.assert_allclose(tpr, ref_tpr, atol=TOL)
    # Thresholds are in score units: negated for the OOD-positive convention.
    np.testing.assert_array_equal(thr, -ref_thr if positive == "ood" else ref_thr)


def test_ties_count_half_in_auroc():
    # OOD sample at 1.0 ties both ID samples (half each), OOD at 0.0 is below both: (0.5 + 0.5 + 1 + 1) / 4.
    sid, sood = np.array([1.0, 1.0]), np.array([1.0, 0.0])
    assert ood.auroc(sid, sood) == pytest.approx(0.75, abs=1e-15)
    assert ood.auroc(sid, sood, positive="id") == pytest.approx(0.75, abs=1e-15)
    assert ood.auroc(np.zeros(5), np.zeros(7)) == pytest.approx(0.5, abs=1e-15)


def test_fpr_conventions_count_different_sets():
    sid, sood = make_scores("continuous", seed=4)
    fpr_ood = ood.fpr_at_tpr(sid, sood, positive="ood")
    fpr_id = ood.fpr_at_tpr(sid, sood, positive="id")
    # OOD positive: a fraction of the ID samples; ID positive (ODIN): a fraction of the OOD samples.
    assert fpr_ood * len(sid) == pytest.approx(round(fpr_ood * len(sid)), abs=1e-9)
    assert fpr_id * len(sood) == pytest.approx(round(fpr_id * len(sood)), abs=1e-9)
    assert fpr_ood != pytest.approx(fpr_id)


def test_infinite_scores_are_ranked():
    sid, sood = np.array([np.inf, 2.0, 1.0]), np.array([-np.inf, 1.5, 0.0])
    y, s = sk_inputs(sid, sood, "ood")
    assert ood.auroc(sid, sood) == pytest.approx(roc_auc_score(y, np.clip(s, -1e300, 1e300)), abs=TOL)


# --- scores from logits ----------------------------------------------------------------------------


def test_scores_match_pytorch_ood_detectors():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(64, 12)) * 4
    t = torch.tensor(logits)
    # pytorch-ood returns outlier scores (higher = more OOD); ours are the negation.
    np.testing.assert_allclose(ood.msp(logits), -MaxSoftmax.score(t).numpy(), atol=1e-12)
    np.testing.assert_allclose(ood.max_logit(logits), -MaxLogit.score(t).numpy(), atol=1e-12)
    np.testing.assert_allclose(ood.energy(logits), -EnergyBased.score(t).numpy(), atol=1e-12)
    np.testing.assert_allclose(ood.energy(logits, T=2.5), -EnergyBased.score(t, t=2.5).numpy(), atol=1e-12)
    # pytorch-ood clips probabilities to >= 1e-7 before the log; away from that clip the entropies agree.
    soft = logits / 4
    assert torch.softmax(torch.tensor(soft), dim=1).min() > 1e-7
    np.testing.assert_allclose(ood.neg_entropy(soft), -Entropy.score(torch.tensor(soft)).numpy(), atol=1e-12)
    for name, fn in ood.SCORES.items():
        np.testing.assert_array_equal(ood.ood_score(t, name), fn(logits))


def test_scores_are_stable_for_large_logits():
    logits = np.array([[1e4, 0.0, -1e4], [5e3, 5e3, 0.0]])
    assert np.allclose(ood.msp(logits), [1.0, 0.5])
    assert np.allclose(ood.energy(logits), [1e4, 5e3 + np.log(2)])
    assert np.all(np.isfinite(ood.neg_entropy(logits)))
    assert ood.neg_entropy(logits)[1] == pytest.approx(-np.log(2))


def test_float32_tensor_scores():
    t = torch.randn(32, 5, generator=torch.Generator().manual_seed(0))
    expected = torch.logsumexp(t.double(), dim=1).numpy()
    np.testing.assert_allclose(ood.energy(t), expected, atol=1e-12)


# --- bad input -----------------------------------------------------------------------------------


def test_nan_scores_are_refused():
    sid, sood = make_scores("continuous")
    sood[3] = np.nan
    with pytest.raises(UserError, match="scores_ood contains 1 NaN"):
        ood.ood_metrics(sid, sood)


def test_empty_sets_are_refused():
    sid, _ = make_scores("continuous")
    with pytest.raises(UserError, match="scores_ood is empty"):
        ood.auroc(sid, [])
    with pytest.raises(UserError, match="scores_id is empty"):
        ood.fpr_at_tpr(np.array([]), sid)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf])
def test_non_finite_logits_are_refused(bad_value):
    logits = np.zeros((4, 3))
    logits[1, 1] = bad_value
    for name in ood.SCORES:
        with pytest.raises(UserError, match="NaN|infinite"):
            ood.ood_score(logits, name)


def test_bad_options_are_refused():
    sid, sood = make_scores("continuous")
    with pytest.raises(UserError, match="positive"):
        ood.ood_metrics(sid, sood, positive="in")
    with pytest.raises(UserError, match="tpr"):
        ood.fpr_at_tpr(sid, sood, tpr=95)
    with pytest.raises(UserError, match="aupr"):
        ood.aupr_in(sid, sood, aupr="auc")
    with pytest.raises(UserError, match="unknown OOD score"):
        ood.ood_score(np.zeros((2, 3)), "odin")
    with pytest.raises(UserError, match="1-D"):
        ood.auroc(np.zeros((3, 2)), sood)
