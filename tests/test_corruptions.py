"""The corruption engine against the reference imagecorruptions-imaug, plus determinism, ranges and errors.

Differential tests feed the same photos to both. Where the reference draws random numbers from NumPy's legacy
global stream, a NumPy-backed random source replays those draws into our code, so even the random
corruptions must match to float precision. Glass blur draws inside numba; its offsets are recovered by a
numba function making the same draws. Shot noise (and our own streams for the other noise corruptions) are
compared in distribution.
"""

from __future__ import annotations

import math
import warnings

import cv2
import imagecorruptions as ic
import numba
import numpy as np
import pytest
import scipy.stats as scipy_stats
import skimage.data as skd
import torch
from PIL import Image

from synclone.errors import UserError
from synclone.probes.corruptions import kernels, ops
from synclone.probes.corruptions.engine import (
    ALL_CORRUPTIONS,
    CORRUPTIONS,
    GLASS_BLUR,
    HELD_OUT,
    PIXELATE,
    ImageRNG,
    corrupt,
    corrupt_with,
)
from synclone.util.seeds import corruption_seed

LEVEL = 1 / 255
RANDOM_ALIGNED = {"motion_blur", "snow", "frost", "fog", "elastic_transform", "spatter", "gaussian_noise",
                  "speckle_noise"}
# shot and impulse noise draw differently from the reference (compared in distribution), glass blur's draws
# come from numba and pixelate rounds in Pillow: each has its own test.
EXACT = [n for n in ALL_CORRUPTIONS if n not in ("shot_noise", "impulse_noise", "glass_blur", "pixelate")]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


_PHOTOS: dict[int, list[np.ndarray]] = {}


def photos(size: int) -> list[np.ndarray]:
    """Three colour photos resized to size x size, uint8 HWC."""
    if size not in _PHOTOS:
        _PHOTOS[size] = [np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR))
                         for im in (skd.astronaut(), skd.coffee(), skd.chelsea())]
    return _PHOTOS[size]


def to_tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255  # a writable copy


def from_tensor(x: torch.Tensor) -> np.ndarray:
    return x[0].permute(1, 2, 0).double().numpy()


def reference(img, name: str, severity: int, **kwargs) -> np.ndarray:
    """The reference corruption function's own output in [0, 1] (before corrupt()'s uint8 truncation)."""
    out = ic.corruption_dict[name](Image.fromarray(img), severity, **kwargs)
    return np.asarray(out, dtype=np.float64) / 255


class NumpyRNG:
    """Replays NumPy's legacy global stream (or a Generator) for a batch of one image."""

    def __init__(self, gen=None):
        self.gen = np.random if gen is None else gen

    @staticmethod
    def _chw(draw, shape):
        # The reference draws per-value noise on its (H, W, C) array; ours asks for (C, H, W).
        if len(shape) == 3 and shape[0] in (1, 3):
            return np.asarray(draw((shape[1], shape[2], shape[0]))).transpose(2, 0, 1)
        return np.asarray(draw(shape))

    def uniform(self, low, high, shape=(), dtype=torch.float32):
        draw = self._chw(lambda sh: self.gen.uniform(low, high, sh), shape)
        return torch.as_tensor(draw.astype(np.float64))[None]

    def normal(self, loc, scale, shape=()):
        return torch.as_tensor(self._chw(lambda sh: self.gen.normal(loc, scale, sh), shape).astype(np.float64))[None]

    def randint(self, low, high, shape=()):
        hi = high if isinstance(high, int) else high[0]
        draw = self.gen.integers(low, hi, shape) if hasattr(self.gen, "integers") else \
            self.gen.randint(low, hi, shape if shape else None)
        return torch.as_tensor(np.asarray(draw))[None]


def aligned(img, name: str, severity: int, seed: int, **kwargs):
    """(reference, ours) with our random draws replaying the reference's."""
    np.random.seed(seed)
    ref = reference(img, name, severity)
    np.random.seed(seed)
    ours = corrupt_with(to_tensor(img), name, severity, NumpyRNG(), **kwargs)
    return ref, from_tensor(ours)


# ----------------------------------------------------------------------------------------------------------------------
# Differential tests against the reference
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", EXACT)
def test_matches_reference_at_every_severity(name):
    """224x224 (the reference size) and 64x64 with scaling off: equal to float precision, far inside 1/255."""
    cases = [(photos(224)[0], {})] + [(img, {"reference_size": None}) for img in photos(64)[:2]]
    for severity in range(1, 6):
        for k, (img, kwargs) in enumerate(cases):
            ref, ours = aligned(img, name, severity, seed=100 * severity + k, **kwargs)
            mad = np.abs(ref - ours).mean()
            assert mad < LEVEL, (name, severity, k, mad * 255)
            # Exact up to float rounding: a stray pixel may round across an 8-bit level (frost's uint8 bicubic).
            assert mad < 1e-3 * LEVEL and np.abs(ref - ours).max() < LEVEL, (name, severity, k, mad * 255)


@pytest.fixture(scope="module")
def numba_offsets():

    @numba.njit()
    def offsets(d0, d1, delta, passes, seed):
        # the same draws, in the same order, as the reference's _shuffle_pixels_njit_glass_blur
        np.random.seed(seed)
        out = np.empty((passes, d0 - 2 * delta, d1 - 2 * delta, 2), dtype=np.int64)
        for i in range(passes):
            for a, _h in enumerate(range(d0 - delta, delta, -1)):
                for b, _w in enumerate(range(d1 - delta, delta, -1)):
                    v = np.random.randint(-delta, delta, size=(2,))
                    out[i, a, b, 0] = v[0]
                    out[i, a, b, 1] = v[1]
        return out

    return offsets


class OffsetRNG:
    def __init__(self, offsets):
        self.offsets = offsets

    def randint(self, low, high, shape=()):
        assert self.offsets.shape == shape
        return torch.from_numpy(self.offsets)[None]


def test_glass_blur_matches_reference_with_its_numba_draws(numba_offsets):
    """The reference's 'swap' loop (a copy, on RGB views) vectorised by pointer doubling, given the same offsets."""
    for size, kwargs in ((224, {}), (64, {"reference_size": None})):
        for severity in range(1, 6):
            img = photos(size)[severity % 3]
            _, delta, passes = GLASS_BLUR[severity - 1]
            ref = reference(img, "glass_blur", severity, seed=severity)
            rng = OffsetRNG(numba_offsets(size, size, delta, passes, severity))
            ours = from_tensor(corrupt_with(to_tensor(img), "glass_blur", severity, rng, **kwargs))
            assert np.abs(ref - ours).mean() < 1e-3 * LEVEL, (size, severity)
            assert np.abs(ref - ours).max() < LEVEL, (size, severity)


def test_glass_shuffle_is_the_sequential_copy_loop():
    """On small arrays, the shuffle equals the reference loop run literally (copy semantics), over several
    passes, for square and non-square images."""
    rng = np.random.default_rng(0)
    for h, w, delta, passes in ((13, 11, 3, 2), (9, 16, 1, 3), (12, 12, 2, 1), (10, 14, 4, 2)):
        x = rng.random((h, w, 3))
        off = rng.integers(-delta, delta, (passes, h - 2 * delta, w - 2 * delta, 2))
        y = x.copy()
        for i in range(passes):
            for a, hh in enumerate(range(h - delta, delta, -1)):
                for b, ww in enumerate(range(w - delta, delta, -1)):
                    dx, dy = off[i, a, b]
                    y[hh, ww], y[hh + dy, ww + dx] = y[hh + dy, ww + dx], y[hh, ww]  # the reference line
        ours = ops.glass_shuffle(torch.from_numpy(x).permute(2, 0, 1)[None], torch.from_numpy(off)[None], delta)
        np.testing.assert_array_equal(ours[0].permute(1, 2, 0).numpy(), y)


def test_defocus_matches_opencv_with_the_reference_disk():
    """Every way of applying the disk (a fused gather of its few taps on small images, the disk's runs then the
    Gaussian when the kernel factorises, FFT otherwise) equals cv2.filter2D with the reference's own disk
    kernel, border BORDER_REFLECT_101, to float rounding."""
    assert ops.disk_runs(6, 0.5) is not None and ops.disk_runs(8, 0.5) is None  # the blur reaches the grid's edge
    img = photos(64)[2]
    for size in (28, 64, 150):
        x = to_tensor(np.asarray(Image.fromarray(img).resize((size, size + 3))))
        for radius, alias in ((0.375, 0.1), (1.25, 0.5), (3, 0.5), (4, 0.1), (6, 0.5), (8, 0.5), (10, 0.5)):
            kernel = ic.corruptions.disk(radius, alias)
            ref = np.stack([cv2.filter2D(c, -1, kernel) for c in x[0].numpy()])
            ours = ops.defocus(x, radius, alias)[0].numpy()
            assert np.abs(ours - ref).max() < 1e-5, (size, radius)


def _block_sums(x: torch.Tensor, starts: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
    """Sums of contiguous runs of rows (dim -2), one run per output row: (..., len(starts), W)."""
    starts_t = torch.as_tensor(starts, device=x.device)
    out = x.index_select(-2, starts_t)
    for j in range(1, int(lengths.max())):
        rows = x.index_select(-2, torch.as_tensor(np.minimum(starts + j, x.shape[-2] - 1), device=x.device))
        if (lengths > j).all():
            out += rows
        else:
            out += rows * torch.as_tensor(lengths > j, dtype=x.dtype, device=x.device).view(-1, 1)
    return out


def _pillow_box_pass(v: torch.Tensor, starts, lengths) -> torch.Tensor:
    """One 8-bit Pillow BOX resize pass along rows: weights 1/len in 22-bit fixed point, round half up, clip."""
    kint = torch.floor(0.5 + 2.0**22 / torch.as_tensor(lengths, dtype=torch.float64)).view(-1, 1)
    return torch.floor((2.0**21 + kint * _block_sums(v, starts, lengths)) / 2.0**22).clamp(0, 255)


def test_pixelate_differs_from_reference_only_by_pillows_8bit_rounding():
    """Pillow rounds to uint8 after each resize pass; ours stays in float (MAD about half a level).

    Replaying Pillow's fixed-point rounding on our block structure reproduces the reference exactly.
    """
    for size in (224, 64, 28):
        img = photos(size)[1] if size != 28 else np.asarray(Image.fromarray(photos(64)[1]).resize((28, 28)))
        x = to_tensor(img)
        for severity in range(1, 6):
            ref = reference(img, "pixelate", severity)
            ours = from_tensor(corrupt(x, "pixelate", severity))
            assert np.abs(ref - ours).mean() < LEVEL and np.abs(ref - ours).max() < 1.5 * LEVEL
            small = int(size * PIXELATE[severity - 1])
            codes = _pillow_box_pass(torch.round(x.double() * 255).transpose(-1, -2), *ops.box_blocks(size, small))
            codes = _pillow_box_pass(codes.transpose(-1, -2), *ops.box_blocks(size, small))  # columns first
            idx = torch.from_numpy(ops.nearest_index(small, size))
            emulated = from_tensor(codes.index_select(-2, idx).index_select(-1, idx) / 255)
            np.testing.assert_array_equal(emulated, ref)


def test_jpeg_grayscale_matches_pillow_l_mode():
    img = np.asarray(Image.fromarray(photos(64)[0]).convert("L"))
    for severity in (1, 5):
        buf = __import__("io").BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=(25, 18, 15, 10, 7)[severity - 1])
        ref = np.asarray(Image.open(buf), dtype=np.float64) / 255
        ours = corrupt(torch.from_numpy(img)[None, None].float() / 255, "jpeg_compression", severity)
        np.testing.assert_allclose(ours[0, 0].double().numpy(), ref, atol=1e-6)


def _noise_stats(x: np.ndarray, out: np.ndarray) -> tuple[float, float]:
    d = out - x
    return float(d.mean()), float(d.std())


@pytest.mark.parametrize("name", ["gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"])
def test_noise_matches_reference_in_distribution(name):
    """Our own random streams: mean and std of the added noise within 2% of the reference's (224x224 photos).

    The mean of the noise is near zero for most of them, so its tolerance is 2% of the noise's std.
    """
    for severity in (1, 3, 5):
        ref_d, our_d = [], []
        for k, img in enumerate(photos(224)):
            x = img / 255.0
            np.random.seed(k)
            kwargs = {"seed": k} if name == "impulse_noise" else {}
            ref_d.append(reference(img, name, severity, **kwargs) - x)
            our_d.append(from_tensor(corrupt(to_tensor(img), name, severity, seed=k)) - x)
        ref_d, our_d = np.concatenate(ref_d), np.concatenate(our_d)
        assert abs(our_d.mean() - ref_d.mean()) <= 0.02 * ref_d.std(), (name, severity)
        assert abs(our_d.std() / ref_d.std() - 1) <= 0.02, (name, severity, our_d.std(), ref_d.std())


def test_shot_noise_general_path_matches_reference_in_distribution():
    """Images that are not 8-bit also draw the off-grid remainder of each rate; same statistics."""
    img = photos(224)[0].astype(np.float64)
    jitter = np.random.default_rng(0).uniform(0.1, 0.9, img.shape)  # off the 8-bit grid
    x = np.clip(img + jitter, 0, 255)
    for severity in (1, 3):
        np.random.seed(severity)
        ref = np.asarray(ic.corruption_dict["shot_noise"](x, severity)) / 255 - x / 255
        xt = torch.from_numpy(x / 255).permute(2, 0, 1)[None].float()
        ours = from_tensor(corrupt(xt, "shot_noise", severity, seed=severity)) - from_tensor(xt)
        assert abs(ours.mean() - ref.mean()) <= 0.02 * ref.std()
        assert abs(ours.std() / ref.std() - 1) <= 0.02


@pytest.mark.parametrize("lam", [0.3, 3.0, 9.7, 27.0, 60.0])
def test_poisson_sampler_is_poisson(lam):
    """On and off the grid, against the exact distribution: chi-square over the bulk, mean and variance."""
    n = 40000
    rng = ImageRNG([7, 8])
    grid = 60 / 255
    for rate in (round(lam / grid) * grid, lam):  # a grid rate (table only) and an off-grid one
        draws = ops.poisson(torch.full((2, n // 2), rate, dtype=torch.float64), rng, grid).numpy().ravel()
        assert np.all(draws == np.round(draws)) and draws.min() >= 0
        assert abs(draws.mean() - rate) < 5 * math.sqrt(rate / n)
        assert abs(draws.var() / rate - 1) < 0.05
        ks = np.arange(int(rate + 4 * math.sqrt(rate) + 2))
        expected = scipy_stats.poisson.pmf(ks, rate) * n
        keep = expected > 20
        observed = np.array([(draws == k).sum() for k in ks])[keep]
        chi2 = (((observed - expected[keep]) ** 2) / expected[keep]).sum()
        assert scipy_stats.chi2.sf(chi2, keep.sum() - 1) > 1e-4, (rate, chi2)


# ----------------------------------------------------------------------------------------------------------------------
# Random numbers
# ----------------------------------------------------------------------------------------------------------------------


def test_splitmix64_is_vignas_generator():
    """The vectorised streams are SplitMix64 (S. Vigna's splitmix64.c), word for word, at any offset."""
    mask = (1 << 64) - 1

    def reference(seed, count):
        x, out = seed, []
        for _ in range(count):
            x = (x + 0x9E3779B97F4A7C15) & mask
            z = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
            out.append(z ^ (z >> 31))
        return out

    seeds = [0, 1234567, (1 << 64) - 1, corruption_seed(0, "fog", 3, 17)]
    words = ops.splitmix64(np.array(seeds, dtype=np.uint64), 0, 7)
    assert [[int(v) for v in row] for row in words] == [reference(s, 7) for s in seeds]
    np.testing.assert_array_equal(ops.splitmix64(np.array(seeds, dtype=np.uint64), 4, 3), words[:, 4:])


def test_box_muller_matches_the_float64_formula():
    """The compiled Box-Muller (polynomial log, sine and cosine, for vectorisation) against NumPy's float64
    functions on the same words: cosine values first, then sine values, an odd count's last from one more word."""
    keys = np.array([3, corruption_seed(0, "snow", 2, 5)], dtype=np.uint64)
    size = 20001
    z = kernels.normals(keys, 0, np.float32(0.0), np.float32(1.0), np.empty((2, size), dtype=np.float32))
    words = ops.splitmix64(keys, 0, size // 2 + 1)
    r = np.sqrt(-2 * np.log((2.0**23 - (words & np.uint64(0xFFFFFFFF)) // 2**9) / 2.0**23))
    angle = 2 * np.pi * (words >> np.uint64(41)) / 2.0**23
    expected = np.concatenate([(r * np.cos(angle))[:, : size // 2], (r * np.sin(angle))[:, : size // 2],
                               (r * np.cos(angle))[:, size // 2 :]], axis=1)
    assert np.abs(z - expected).max() < 2e-6


class _PlainDraws:
    """An ImageRNG offering only its plain draws, so that corruptions take their generic (unfused) paths."""

    def __init__(self, rng: ImageRNG):
        self.rng = rng

    def __getattr__(self, name):
        if name in ("add_normal", "impulse", "shot"):
            raise AttributeError(name)
        return getattr(self.rng, name)


def test_fused_noise_kernels_equal_the_plain_draws():
    """Drawing, adding and clipping in one compiled pass gives exactly the images of the separate steps."""
    x = to_tensor(photos(64)[0])  # 8-bit values: shot noise takes its on-grid kernel
    x = torch.cat([x, x.flip(-1)])
    for name in ("gaussian_noise", "speckle_noise", "impulse_noise", "shot_noise"):
        for severity in (1, 5):
            fused = corrupt_with(x, name, severity, ImageRNG([11, 12]))
            plain = corrupt_with(x, name, severity, _PlainDraws(ImageRNG([11, 12])))
            assert torch.equal(fused, plain), (name, severity)


def test_image_rng_streams():
    """Per-image streams: consecutive calls continue the stream, rows are independent of the batch, and the
    uniforms, normals and integers have the right distributions."""
    stats = scipy_stats
    a, b = ImageRNG([5, 6]), ImageRNG([6])
    np.testing.assert_array_equal(np.concatenate([a.words(3), a.words(2)], axis=1)[1], b.words(5)[0])
    rng = ImageRNG([11, 12])
    n = 200_000
    for dtype in (torch.float32, torch.float64):
        u = rng.uniform(0.0, 1.0, (n,), dtype=dtype).double().numpy()
        assert u.min() >= 0 and u.max() < 1 and stats.kstest(u[0], "uniform").pvalue > 1e-4
    z = rng.normal(0.0, 1.0, (n,)).double().numpy()
    assert stats.kstest(z[1], "norm").pvalue > 1e-4 and abs(stats.kurtosis(z[1])) < 0.05
    assert abs(np.corrcoef(z[0], z[1])[0, 1]) < 0.01
    for low, high in ((-2, 2), (-3, 3), (0, 437), (0, [5, 9])):
        draws = rng.randint(low, high, (n,)).numpy().astype(np.int64)
        for row, hi in zip(draws, np.broadcast_to(high, (2,)), strict=True):
            assert row.min() == low and row.max() == hi - 1
            counts = np.bincount(row - low)
            assert stats.chisquare(counts).pvalue > 1e-4, (low, high)


# ----------------------------------------------------------------------------------------------------------------------
# Determinism, batching, shapes, grayscale, scaling
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    imgs = [np.asarray(Image.fromarray(im).resize((40, 32))) for im in photos(64)] * 3
    return torch.stack([to_tensor(im)[0] for im in imgs])  # (9, 3, 32, 40), a non-square size


@pytest.mark.parametrize("name", ALL_CORRUPTIONS)
def test_deterministic_and_independent_of_batching(name, batch):
    before = batch.clone()
    full = corrupt(batch, name, 3, seed=5)
    assert torch.equal(batch, before)  # the input is left alone
    assert full.shape == batch.shape and full.dtype == batch.dtype
    assert torch.isfinite(full).all() and full.min() >= 0 and full.max() <= 1
    assert torch.equal(full, corrupt(batch, name, 3, seed=5))
    parts = [corrupt(batch[i : i + 4], name, 3, seed=5, indices=range(i, min(i + 4, 9))) for i in range(0, 9, 4)]
    assert torch.equal(torch.cat(parts), full)
    single = corrupt(batch[6:7], name, 3, seed=5, indices=[6])
    assert torch.equal(single[0], full[6])
    if name in RANDOM_ALIGNED | {"shot_noise", "impulse_noise", "glass_blur"}:
        assert not torch.equal(corrupt(batch, name, 3, seed=6), full)
        # the same picture at two dataset positions gets different noise
        assert not torch.equal(full[0], full[3])


def test_memory_layout_does_not_matter(batch):
    """A channels-last batch and a one-channel view of an RGB batch give the contiguous input's result."""
    strided = batch.contiguous(memory_format=torch.channels_last)
    for name in ALL_CORRUPTIONS:
        out = corrupt(strided, name, 2, seed=3)
        assert out.is_contiguous()
        torch.testing.assert_close(out, corrupt(batch, name, 2, seed=3), atol=1e-6, rtol=0)
        view = batch[:, 1:2]
        assert torch.equal(corrupt(view, name, 2, seed=3), corrupt(view.contiguous(), name, 2, seed=3)), name


@pytest.mark.parametrize("size", [(28, 28), (5, 7)])
def test_every_corruption_every_severity_stays_in_range(size):
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(0))
    for name in ALL_CORRUPTIONS:
        for severity in range(1, 6):
            out = corrupt(x, name, severity, seed=1)
            assert out.shape == x.shape and torch.isfinite(out).all(), (name, severity)
            assert out.min() >= 0 and out.max() <= 1, (name, severity)


def test_dtype_and_empty_batch():
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    out = corrupt(x, "fog", 2)
    assert out.dtype == torch.float64
    assert torch.allclose(out, corrupt(x.float(), "fog", 2).double())
    assert corrupt(x[:0], "fog", 2).shape == (0, 3, 16, 16)


def test_grayscale_rule(batch):
    """C=1 behaves as three equal channels: channel-wise corruptions equal any channel of that RGB result,
    colour-dependent ones (frost, spatter, saturate) its BT.601 luma; noise is drawn for the one channel."""
    gray = ops.to_gray(batch)
    rgb = gray.expand(-1, 3, -1, -1).contiguous()
    for name in ALL_CORRUPTIONS:
        g = corrupt(gray, name, 4, seed=2)
        assert g.shape == gray.shape
        if name in ("frost", "spatter", "saturate"):
            torch.testing.assert_close(g, ops.to_gray(corrupt(rgb, name, 4, seed=2)).clamp(0, 1))
        elif name == "jpeg_compression":  # a one-channel JPEG vs an RGB JPEG with flat chroma
            torch.testing.assert_close(g, corrupt(rgb, name, 4)[:, :1], atol=1e-6, rtol=0)
        elif name not in ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"):
            torch.testing.assert_close(g, corrupt(rgb, name, 4, seed=2)[:, :1], atol=1e-6, rtol=0)
        else:
            noise = (g - gray).std() / (corrupt(rgb, name, 4, seed=2) - rgb).std()
            assert 0.9 < noise < 1.1, name


def test_reference_size_scales_lengths():
    img = photos(224)[0]
    x224 = to_tensor(img)
    for name in ("defocus_blur", "gaussian_blur", "frost", "motion_blur"):
        assert torch.equal(corrupt(x224, name, 3, seed=1), corrupt(x224, name, 3, seed=1, reference_size=None))
    # A blur at 112px with lengths halved looks like the 224px blur shrunk by 2.
    small = torch.nn.functional.avg_pool2d(x224, 2)
    blurred_then_shrunk = torch.nn.functional.avg_pool2d(corrupt(x224, "gaussian_blur", 4), 2)
    shrunk_then_blurred = corrupt(small, "gaussian_blur", 4)
    assert (blurred_then_shrunk - shrunk_then_blurred).abs().mean() < LEVEL
    unscaled = corrupt(small, "gaussian_blur", 4, reference_size=None)  # the 224px sigma on a 112px image
    assert (blurred_then_shrunk - unscaled).abs().mean() > 3 * LEVEL


def test_frost_textures_come_from_the_installed_package():
    textures = [ops.frost_texture(i) for i in range(6)]
    assert all(t.dtype == torch.uint8 and t.shape[0] == 3 for t in textures)
    # the reference enlarges the 600x900 texture by 1.1 and rounds up (float rounding included)
    assert ops.frost_resized(0, 224, 224, 1.0).shape[-2:] == (math.ceil(600 * 1.1), math.ceil(900 * 1.1))


def test_public_lists():
    assert len(CORRUPTIONS) == 15 and len(HELD_OUT) == 4 and ALL_CORRUPTIONS == CORRUPTIONS + HELD_OUT
    assert list(CORRUPTIONS) == ic.get_corruption_names("common")
    assert list(HELD_OUT) == ic.get_corruption_names("validation")


# ----------------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------------


def test_unknown_name_lists_valid_ones():
    with pytest.raises(UserError, match="unknown corruption 'gaussian'.*gaussian_noise.*saturate"):
        corrupt(torch.zeros(1, 3, 8, 8), "gaussian", 1)


@pytest.mark.parametrize("severity", [0, 6, -1, 2.5, True, "3"])
def test_bad_severity(severity):
    with pytest.raises(UserError, match="severity must be an integer from 1 to 5"):
        corrupt(torch.zeros(1, 3, 8, 8), "fog", severity)


@pytest.mark.parametrize("value", [1.5, -0.01, float("nan")])
def test_images_outside_unit_range(value):
    x = torch.full((1, 3, 8, 8), 0.5)
    x[0, 1, 2, 3] = value
    with pytest.raises(UserError, match=r"must lie in \[0, 1\]"):
        corrupt(x, "contrast", 1)


def test_range_check_edges():
    """-0.0 and exactly 1 are inside; a value just above 1 in a later chunk is caught and shown in full."""
    x = torch.zeros(2, 3, 8, 8)
    x[0, 0, 0, 0], x[1, 2, 7, 7] = -0.0, 1.0
    assert torch.equal(corrupt(x, "contrast", 1), corrupt(x.abs(), "contrast", 1))
    big = torch.full((40, 3, 224, 224), 0.5)
    big[-1, 2, 5, 5] = 1.0000001
    with pytest.raises(UserError, match=r"to 1\.0000001"):
        corrupt(big, "contrast", 1)


def test_bad_shapes_types_and_indices():
    with pytest.raises(UserError, match="shape"):
        corrupt(torch.zeros(3, 8, 8), "fog", 1)
    with pytest.raises(UserError, match="C = 1 or 3"):
        corrupt(torch.zeros(1, 2, 8, 8), "fog", 1)
    with pytest.raises(UserError, match="floating point"):
        corrupt(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "fog", 1)
    with pytest.raises(UserError, match="torch tensor"):
        corrupt(np.zeros((1, 3, 8, 8)), "fog", 1)
    with pytest.raises(UserError, match="one global index per image"):
        corrupt(torch.zeros(2, 3, 8, 8), "fog", 1, indices=[0])
    with pytest.raises(UserError, match="reference_size"):
        corrupt(torch.zeros(1, 3, 8, 8), "fog", 1, reference_size=0)
