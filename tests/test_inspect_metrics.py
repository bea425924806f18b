"""Dataset-diagnostic metrics against torchmetrics, the authors' prdc package, and hand-computed point clouds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from synclone.inspect.metrics import (
    frechet_distance,
    kernel_inception_distance,
    mean_pairwise_distance,
    nearest_neighbour_distances,
    prdc,
)


class _Identity(torch.nn.Module):
    """torchmetrics' custom feature extractor hook, fed features directly: its 'images' are our feature rows."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _clouds(seed: int, n_r: int = 120, n_f: int = 90, d: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    real = rng.normal(size=(n_r, d))
    fake = rng.normal(size=(n_f, d)) * 1.3 + 0.4  # wider and shifted: every metric away from its ideal
    return real, fake


@pytest.mark.parametrize("seed", [0, 1])
def test_frechet_distance_equals_torchmetrics_fid_on_the_same_features(seed):
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = _clouds(seed)
    fid = FrechetInceptionDistance(feature=_Identity(real.shape[1]), normalize=True)
    fid.update(torch.from_numpy(real), real=True)
    fid.update(torch.from_numpy(fake), real=False)
    expected = float(fid.compute())
    assert expected > 1.0
    assert frechet_distance(real, fake) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_a_shifted_copy_is_the_squared_shift():
    real, _ = _clouds(3)
    shift = np.array([3.0, -1.0, 0, 0, 0, 0, 0, 2.0])  # same covariance: only ||mu_r - mu_f||^2 = 14 remains
    assert frechet_distance(real, real + shift) == pytest.approx(14.0, abs=1e-6)
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-6)
    assert math.isnan(frechet_distance(real[:1], real))


@pytest.mark.parametrize(("subset_size", "whole"), [(40, True), (90, True), (40, False)])
def test_kid_equals_torchmetrics_kid_with_the_same_seed(subset_size, whole, monkeypatch):
    from torchmetrics.image.kid import KernelInceptionDistance

    import synclone.inspect.metrics as M

    if not whole:  # the large-set path: kernels per subset instead of gathered from the full matrices
        monkeypatch.setattr(M, "_KID_WHOLE", 0)
    real, fake = _clouds(2)
    kid = KernelInceptionDistance(feature=_Identity(real.shape[1]), subsets=7, subset_size=subset_size,
                                  normalize=True)
    kid.update(torch.from_numpy(real), real=True)
    kid.update(torch.from_numpy(fake), real=False)
    torch.manual_seed(11)  # torchmetrics draws its subsets from the global generator
    mean, std = (float(v) for v in kid.compute())
    ours = kernel_inception_distance(real, fake, subsets=7, subset_size=subset_size, seed=11)
    assert ours[0] == pytest.approx(mean, rel=1e-9)
    assert ours[1] == pytest.approx(std, rel=1e-9)
    assert ours[2] == subset_size
    assert mean > 0.05  # the shifted, wider cloud is clearly apart


def test_kid_caps_the_subset_at_the_smaller_set():
    real, fake = _clouds(4, n_f=30)
    assert kernel_inception_distance(real, fake, subsets=3, subset_size=1000)[2] == 30
    assert math.isnan(kernel_inception_distance(real, fake[:1])[0])


@pytest.mark.parametrize("k", [1, 3, 5])
def test_prdc_equals_the_authors_package(k):
    from prdc import compute_prdc

    real, fake = _clouds(5, n_r=150, n_f=110)
    expected = compute_prdc(real, fake, nearest_k=k)
    got = prdc(real, fake, k)
    for name in ("precision", "recall", "density", "coverage"):
        assert getattr(got, name) == pytest.approx(float(expected[name]), abs=1e-12), name
    assert 0.1 < got.precision < 0.95 and 0.1 < got.coverage < 0.95


def test_prdc_on_a_hand_made_cloud():
    # Real points 0..9 on a line: with k = 1 every real ball has radius 1 (strict: distance 1 is outside).
    real = np.stack([np.arange(10.0), np.zeros(10)], 1)
    fake = np.array([[0.5, 0.0], [0.0, 0.5], [20.0, 0.0], [4.0, 0.0]])
    p = prdc(real, fake, k=1)
    assert p.precision == 0.75  # all but (20, 0) fall in a real ball
    assert p.density == 1.0  # balls holding each fake: 2 + 1 + 0 + 1 (reals 3 and 5 are at exactly 1)
    assert p.coverage == 0.3  # reals 0, 1 and 4 have a fake closer than 1
    # Fake radii: 0.707, 0.707, 16 (to (4,0)), 3.5: together they hold every real point.
    assert p.recall == 1.0
    np.testing.assert_allclose(p.real_gap[[0, 4, 9]], [0.5, 0.0, 5.0])
    assert p.nearest_fake[9] == 3 and p.nearest_fake[1] == 0


def test_prdc_of_identical_sets_is_ideal_and_of_distant_sets_zero():
    real, _ = _clouds(6)
    same = prdc(real, real.copy(), k=5)
    assert (same.precision, same.recall, same.density, same.coverage) == (1.0, 1.0, 1.0, 1.0)
    far = prdc(real, real + 100.0, k=5)
    assert (far.precision, far.recall, far.density, far.coverage) == (0.0, 0.0, 0.0, 0.0)
    assert (far.real_gap > 10).all()
    assert math.isnan(prdc(real[:5], real, k=5).precision)  # needs more than k points


def test_prdc_blocks_give_the_same_answer(monkeypatch):
    import synclone.inspect.metrics as M

    real, fake = _clouds(7, n_r=70, n_f=50)
    whole = prdc(real, fake, 3)
    div = mean_pairwise_distance(real)
    monkeypatch.setattr(M, "_BLOCK", 16)
    blocked = prdc(real, fake, 3)
    assert (whole.precision, whole.recall, whole.density, whole.coverage) == \
        (blocked.precision, blocked.recall, blocked.density, blocked.coverage)
    np.testing.assert_allclose(whole.real_gap, blocked.real_gap, rtol=1e-12)
    assert mean_pairwise_distance(real) == pytest.approx(div, rel=1e-12)


def test_mean_pairwise_and_nearest_neighbour_distances_by_hand():
    tri = np.array([[0.0, 0.0], [3.0, 4.0], [6.0, 0.0]])  # sides 5, 5, 6
    assert mean_pairwise_distance(tri) == pytest.approx(16.0 / 3.0)
    np.testing.assert_allclose(nearest_neighbour_distances(tri), [5.0, 5.0, 5.0])
    dup = np.array([[1.0, 1.0], [1.0, 1.0], [9.0, 1.0]])
    np.testing.assert_array_equal(nearest_neighbour_distances(dup), [0.0, 0.0, 8.0])
    assert math.isnan(mean_pairwise_distance(tri[:1]))
