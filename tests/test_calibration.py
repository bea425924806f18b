"""Calibration metrics against torchmetrics, netcal and scikit-learn on the same random inputs."""

import warnings

import numpy as np
import pytest
import torch
from netcal.metrics import ECE as NetcalECE
from netcal.metrics import MCE as NetcalMCE
from sklearn.metrics import brier_score_loss, log_loss
from torchmetrics.classification import MulticlassCalibrationError

from synclone.errors import UserError
from synclone.probes import calibration as cal

N, K = 1500, 10


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def make_outputs(seed, n=N, k=K, scale=3.0):
    """Logits of an over-confident model: labels drawn from a softer softmax than the one reported."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, k)) * scale
    p_true = softmax(logits / 2.0)
    labels = (p_true.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    return logits, softmax(logits), labels


def min_edge_distance(conf, n_bins):
    # torchmetrics bins in float32 (relative rounding 6e-8); keep the differential inputs off the bin edges.
    return np.abs(conf[:, None] - np.linspace(0, 1, n_bins + 1)[None, :]).min()


def torchmetrics_ce(x, labels, n_bins, norm):
    metric = MulticlassCalibrationError(num_classes=x.shape[1], n_bins=n_bins, norm=norm)
    return metric(torch.as_tensor(x), torch.as_tensor(labels)).item()


def netcal(metric_cls, probs, labels, n_bins, **kwargs):
    # netcal switches to binary mode with <= 2 distinct labels; the reference only holds for >= 3.
    assert len(np.unique(labels)) >= 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(metric_cls(bins=n_bins, **kwargs).measure(probs, labels))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("n_bins", [5, 15, 20])
def test_ece_mce_match_torchmetrics(seed, n_bins):
    logits, probs, labels = make_outputs(seed)
    assert min_edge_distance(probs.max(axis=1), n_bins) > 2e-7
    for x, from_logits in ((probs, False), (logits, True)):
        # torchmetrics applies softmax itself when values lie outside [0, 1], as the logits do.
        assert cal.ece(x, labels, n_bins, from_logits=from_logits) == pytest.approx(
            torchmetrics_ce(x, labels, n_bins, "l1"), abs=1e-6
        )
        assert cal.mce(x, labels, n_bins, from_logits=from_logits) == pytest.approx(
            torchmetrics_ce(x, labels, n_bins, "max"), abs=1e-6
        )


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("n_bins", [5, 15, 20])
def test_ece_mce_adaptive_match_netcal(seed, n_bins):
    _, probs, labels = make_outputs(seed)
    assert cal.ece(probs, labels, n_bins) == pytest.approx(netcal(NetcalECE, probs, labels, n_bins), abs=1e-6)
    assert cal.mce(probs, labels, n_bins) == pytest.approx(netcal(NetcalMCE, probs, labels, n_bins), abs=1e-6)
    # netcal's equal_intervals=False bins at the confidence quantiles, the adaptive ECE convention here.
    assert cal.adaptive_ece(probs, labels, n_bins) == pytest.approx(
        netcal(NetcalECE, probs, labels, n_bins, equal_intervals=False), abs=1e-6
    )


def test_classwise_ece_matches_netcal_per_class():
    _, probs, labels = make_outputs(2, k=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # netcal on one probability column against a 0/1 target is the binary ECE of that class.
        per_class = [NetcalECE(bins=15).measure(probs[:, k], (labels == k).astype(int)) for k in range(6)]
    assert cal.classwise_ece(probs, labels) == pytest.approx(float(np.mean(per_class)), abs=1e-6)


def test_classwise_ece_chunking_does_not_change_result(monkeypatch):
    _, probs, labels = make_outputs(3, n=300, k=7)
    whole = cal.classwise_ece(probs, labels)
    monkeypatch.setattr(cal, "_CHUNK_ENTRIES", 7 * 32)  # 32 rows per chunk, the last chunk partial
    assert cal.classwise_ece(probs, labels) == pytest.approx(whole, abs=1e-15)


def test_confidence_exactly_one_documented_difference():
    """conf == 1.0: here and in netcal it joins the last bin; torchmetrics gives it a bin of its own."""
    _, probs, labels = make_outputs(4, n=600)
    rng = np.random.default_rng(4)
    ones = rng.random(len(labels)) < 0.2
    hot = rng.integers(0, K, len(labels))
    probs[ones] = np.eye(K)[hot[ones]]  # confidence exactly 1.0, right only by chance: over-confident
    # The other rows of the last bin are made under-confident (always right, some at confidence 0.95),
    # so merging them with the one-hot rows (here) and keeping them apart (torchmetrics) differ.
    sure = ~ones & (rng.random(len(labels)) < 0.2)
    probs[sure] = 0.05 / (K - 1)
    probs[sure, labels[sure]] = 0.95
    conf = probs.max(axis=1)
    top = ~ones & (conf >= 14 / 15)
    labels[top] = probs[top].argmax(axis=1)
    assert (conf == 1.0).sum() == ones.sum() > 50
    assert min_edge_distance(conf[~ones], 15) > 2e-7

    ours = cal.ece(probs, labels)
    diagram = cal.reliability_diagram(probs, labels)
    assert diagram.count[-1] >= ones.sum()  # the one-hot rows sit in the last of the 15 bins

    # netcal clips confidences to 1 - eps, which lands them in the last bin too: same number.
    assert ours == pytest.approx(netcal(NetcalECE, probs, labels, 15), abs=1e-6)

    # torchmetrics: an extra bin for conf == 1.0, i.e. the rest binned as usual plus |acc - 1| of the ones.
    tm = torchmetrics_ce(probs, labels, 15, "l1")
    acc_ones = float((probs[ones].argmax(axis=1) == labels[ones]).mean())
    n, n1 = len(labels), int(ones.sum())
    expected_tm = (n - n1) / n * cal.ece(probs[~ones], labels[~ones]) + n1 / n * abs(acc_ones - 1.0)
    assert tm == pytest.approx(expected_tm, abs=1e-6)
    assert abs(ours - tm) > 1e-3  # the difference is real, not rounding


def test_torchmetrics_treats_unit_interval_logits_as_probabilities():
    """The trap our explicit from_logits avoids: logits inside [0, 1] are not softmaxed by torchmetrics."""
    rng = np.random.default_rng(5)
    logits = rng.random((400, 5))
    labels = rng.integers(0, 5, 400)
    ours = cal.ece(logits, labels, from_logits=True)
    assert ours == pytest.approx(cal.ece(softmax(logits), labels), abs=1e-12)
    assert abs(torchmetrics_ce(logits, labels, 15, "l1") - ours) > 1e-2
    with pytest.raises(UserError, match="from_logits=True"):
        cal.ece(logits, labels)


def test_nll_and_brier_match_sklearn_and_torch():
    logits, probs, labels = make_outputs(6)
    ref_nll = torch.nn.functional.cross_entropy(torch.as_tensor(logits), torch.as_tensor(labels)).item()
    assert cal.nll(logits, labels, from_logits=True) == pytest.approx(ref_nll, abs=1e-9)
    assert cal.nll(probs, labels) == pytest.approx(log_loss(labels, probs, labels=range(K)), abs=1e-9)
    ref_brier = brier_score_loss(labels, probs, labels=range(K))
    assert cal.brier(probs, labels) == pytest.approx(ref_brier, abs=1e-12)
    assert cal.brier(logits, labels, from_logits=True) == pytest.approx(ref_brier, abs=1e-12)


def test_nll_clips_zero_probability_of_true_class():
    probs = np.array([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    value = cal.nll(probs, np.array([1, 2]))
    assert np.isfinite(value)
    assert value == pytest.approx((-np.log(cal.NLL_EPS) - np.log(0.5)) / 2)


def test_reliability_diagram_bins_like_numpy_histogram():
    _, probs, labels = make_outputs(7)
    d = cal.reliability_diagram(probs, labels, n_bins=10)
    conf = probs.max(axis=1)
    np.testing.assert_array_equal(d.edges, np.linspace(0, 1, 11))
    np.testing.assert_array_equal(d.count, np.histogram(conf, bins=d.edges)[0])
    correct = probs.argmax(axis=1) == labels
    filled = d.count > 0
    hist_conf = np.histogram(conf, bins=d.edges, weights=conf)[0]
    hist_acc = np.histogram(conf, bins=d.edges, weights=correct.astype(float))[0]
    np.testing.assert_allclose(d.conf[filled], hist_conf[filled] / d.count[filled], atol=1e-12)
    np.testing.assert_allclose(d.acc[filled], hist_acc[filled] / d.count[filled], atol=1e-12)
    assert np.isnan(d.conf[~filled]).all() and np.isnan(d.acc[~filled]).all()
    assert d.n == len(labels)
    assert d.ece() == pytest.approx(cal.ece(probs, labels, 10), abs=1e-15)


def test_confidence_on_a_bin_edge_goes_to_the_upper_bin():
    # Confidences exactly on the edges 0.5, 0.6, ..., 1.0 of 10 bins: [lo, hi) like numpy and netcal.
    rng = np.random.default_rng(13)
    edges = np.linspace(0, 1, 11)
    conf = np.repeat(edges[5:], 20)
    probs = np.stack([conf, (1 - conf) / 2, (1 - conf) / 2], axis=1)
    labels = rng.integers(0, 3, len(conf))
    d = cal.reliability_diagram(probs, labels, n_bins=10)
    np.testing.assert_array_equal(d.count, np.histogram(conf, bins=edges)[0])
    assert d.count[5] == 20 and d.count[9] == 40  # 0.5 opens bin 5; 0.9 and 1.0 share the last bin
    assert cal.ece(probs, labels, 10) == pytest.approx(netcal(NetcalECE, probs, labels, 10), abs=1e-6)


def test_calibration_metrics_agrees_with_single_functions():
    logits, probs, labels = make_outputs(8)
    out = cal.calibration_metrics(logits, labels, from_logits=True, n_bins=12)
    assert out["ece"] == pytest.approx(cal.ece(probs, labels, 12), abs=1e-12)
    assert out["mce"] == pytest.approx(cal.mce(probs, labels, 12), abs=1e-12)
    assert out["adaptive_ece"] == pytest.approx(cal.adaptive_ece(probs, labels, 12), abs=1e-12)
    assert out["classwise_ece"] == pytest.approx(cal.classwise_ece(probs, labels, 12), abs=1e-12)
    assert out["nll"] == pytest.approx(cal.nll(logits, labels, from_logits=True), abs=1e-12)
    assert out["brier"] == pytest.approx(cal.brier(probs, labels), abs=1e-12)
    assert out["accuracy"] == pytest.approx(float((probs.argmax(1) == labels).mean()))
    assert out["n"] == N and out["n_classes"] == K
    conv = out["conventions"]
    assert conv["n_bins"] == 12 and conv["input"] == "logits" and "last bin" in conv["binning"]


def test_torch_float32_input_matches_numpy():
    logits, _, labels = make_outputs(9)
    t = torch.as_tensor(logits, dtype=torch.float32)
    ours_t = cal.calibration_metrics(t, torch.as_tensor(labels), from_logits=True)
    ours_np = cal.calibration_metrics(t.numpy().astype(np.float64), labels, from_logits=True)
    for key in ("ece", "mce", "adaptive_ece", "classwise_ece", "nll", "brier"):
        assert ours_t[key] == ours_np[key]


def test_ece_zero_for_calibrated_bins():
    # Every sample has confidence 0.75 and three in four are right: calibrated, ECE == MCE == 0.
    probs = np.tile([0.75, 0.25], (400, 1))
    labels = np.tile([0, 0, 0, 1], 100)
    assert cal.ece(probs, labels) == pytest.approx(0.0, abs=1e-12)
    assert cal.mce(probs, labels) == pytest.approx(0.0, abs=1e-12)


# --- bad input -----------------------------------------------------------------------------------


def test_probs_not_summing_to_one_are_refused():
    logits, probs, labels = make_outputs(10, n=50)
    with pytest.raises(UserError, match="from_logits=True, or apply softmax first"):
        cal.ece(logits, labels)
    bad = probs.copy()
    bad[3] *= 1.01  # in [0, 1] but the row sums to 1.01
    with pytest.raises(UserError, match="sum to 1"):
        cal.calibration_metrics(bad, labels)
    # float32 softmax rounding is within tolerance
    cal.ece(probs.astype(np.float32), labels)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_non_finite_logits_are_refused(bad_value):
    logits, _, labels = make_outputs(11, n=50)
    logits[7, 2] = bad_value
    with pytest.raises(UserError, match="NaN|infinite"):
        cal.calibration_metrics(logits, labels, from_logits=True)


def test_empty_input_is_refused():
    with pytest.raises(UserError, match="empty"):
        cal.ece(np.zeros((0, 3)), np.zeros(0, dtype=int))


def test_label_and_shape_errors():
    _, probs, labels = make_outputs(12, n=40)
    with pytest.raises(UserError, match=r"outside \[0, 10\)"):
        cal.ece(probs, np.where(labels == 0, 10, labels))
    with pytest.raises(UserError, match="must match"):
        cal.ece(probs, labels[:-1])
    with pytest.raises(UserError, match="2-D"):
        cal.ece(probs[:, 0], labels)
    with pytest.raises(UserError, match="integer"):
        cal.ece(probs, labels + 0.5)
    with pytest.raises(UserError, match="n_bins"):
        cal.ece(probs, labels, n_bins=0)
