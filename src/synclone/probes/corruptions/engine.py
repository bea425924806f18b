"""Common corruptions (Hendrycks & Dietterich, 2019), batched in torch, seeded, for any image size.

    >>> from synclone.probes.corruptions.engine import corrupt, CORRUPTIONS
    >>> out = corrupt(images, "fog", severity=3, seed=0)            # images: (N, C, H, W) in [0, 1]
    >>> out = corrupt(batch, "fog", 3, seed=0, indices=range(64, 128))  # the same images, any batching

The 15 ImageNet-C corruptions (:data:`CORRUPTIONS`) and the 4 held-out ones (:data:`HELD_OUT`), severities
1-5, with the per-severity parameters of the reference code, ``imagecorruptions-imaug`` 1.1.5 (Apache-2.0;
the imaug team, after E. Rusak and B. Mitzkus's ``imagecorruptions`` and D. Hendrycks's ``robustness``),
ported with its arithmetic. Inputs are float tensors (N, C, H, W) in [0, 1], C = 1 or 3, on any device;
the output has the same shape, dtype and device, in [0, 1].

Randomness: image ``i`` of a call draws from its own stream, seeded by a hash of (seed, corruption,
severity, ``indices[i]``), so corrupting a dataset in batches of 7 or of 64 gives identical images, and so
does a CPU or a GPU (random numbers are drawn on the CPU).

Image size: the reference's lengths are pixels of a 224x224 image. Lengths (blur radii and sigmas, glass
displacements, motion-blur length, snowflake size, frost texture scale) are multiplied by
``s = min(H, W) / reference_size``, so at ``reference_size`` the reference parameters are used exactly, and
a 28x28 image gets the corruption a 224x224 image would show after shrinking by 8; integer lengths are
rounded and kept at least 1. ``reference_size=None`` turns scaling off. Grayscale (C = 1) images behave as
RGB images with three equal channels; see docs/corruptions.md for both rules, and for each corruption's
agreement with the reference and the reasons where it is not exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import torch

from synclone.errors import UserError
from synclone.probes.corruptions import kernels, ops
from synclone.probes.corruptions.jpeg import jpeg_roundtrip
from synclone.probes.corruptions.ops import ImageRNG
from synclone.util.seeds import corruption_seed

__all__ = [
    "ALL_CORRUPTIONS",
    "CORRUPTIONS",
    "HELD_OUT",
    "REFERENCE_SIZE",
    "SEVERITIES",
    "ImageRNG",
    "corrupt",
    "corrupt_with",
    "size_scale",
]

CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness",
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)  # fmt: skip
HELD_OUT = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
ALL_CORRUPTIONS = CORRUPTIONS + HELD_OUT
SEVERITIES = (1, 2, 3, 4, 5)
REFERENCE_SIZE = 224
CHUNK_VALUES = 1 << 19  # float32 values per chunk of work (2 MB): many passes over a chunk stay in the cache
WIDE_CHUNK_VALUES = 1 << 22  # for the fused gathers, which want many images side by side (16 MB)

# ----------------------------------------------------------------------------------------------------------------------
# Per-severity parameters: copied from imagecorruptions-imaug 1.1.5, imagecorruptions/corruptions.py (Apache-2.0).
# ----------------------------------------------------------------------------------------------------------------------
GAUSSIAN_NOISE = (0.08, 0.12, 0.18, 0.26, 0.38)
SHOT_NOISE = (60, 25, 12, 5, 3)
IMPULSE_NOISE = (0.03, 0.06, 0.09, 0.17, 0.27)
SPECKLE_NOISE = (0.15, 0.2, 0.35, 0.45, 0.6)
GAUSSIAN_BLUR = (1, 2, 3, 4, 6)
GLASS_BLUR = ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2))  # sigma, max_delta, iterations
DEFOCUS_BLUR = ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))  # disk radius, alias blur
MOTION_BLUR = ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))  # radius, sigma
ZOOM_BLUR = (
    np.arange(1, 1.11, 0.01), np.arange(1, 1.16, 0.01), np.arange(1, 1.21, 0.02),
    np.arange(1, 1.26, 0.02), np.arange(1, 1.31, 0.03),
)  # fmt: skip
FOG = ((1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4))  # strength, wibble decay
FROST = ((1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75))  # image weight, frost weight
SNOW = (  # loc, scale, zoom, threshold, blur radius, blur sigma, blend
    (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
    (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
    (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
    (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
    (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
)
SPATTER = (  # loc, scale, sigma, threshold, intensity (mode 0) or mud sigma (mode 1), mode
    (0.65, 0.3, 4, 0.69, 0.6, 0),
    (0.65, 0.3, 3, 0.68, 0.6, 0),
    (0.65, 0.3, 2, 0.68, 0.5, 0),
    (0.65, 0.3, 1, 0.65, 1.5, 1),
    (0.67, 0.4, 1, 0.65, 1.5, 1),
)
CONTRAST = (0.4, 0.3, 0.2, 0.1, 0.05)
BRIGHTNESS = (0.1, 0.2, 0.3, 0.4, 0.5)
SATURATE = ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2))  # saturation multiplier, offset
JPEG_QUALITY = (25, 18, 15, 10, 7)
PIXELATE = (0.6, 0.5, 0.4, 0.3, 0.25)
ELASTIC_ALPHA = (250 * 0.05, 250 * 0.065, 250 * 0.085, 250 * 0.1, 250 * 0.12)


# ----------------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------------


def corrupt(
    images: torch.Tensor,
    name: str,
    severity: int,
    seed: int = 0,
    indices: Iterable[int] | torch.Tensor | None = None,
    reference_size: float | None = REFERENCE_SIZE,
) -> torch.Tensor:
    """Apply corruption ``name`` at ``severity`` (1-5) to a batch of images.

    Args:
        images: float tensor (N, C, H, W) with values in [0, 1]; C is 1 or 3; any size and device.
        name: one of :data:`ALL_CORRUPTIONS`.
        severity: 1 (mildest) to 5.
        seed: base seed; together with the corruption, severity and image index it fixes each image's noise.
        indices: the images' global indices in the dataset (default ``0..N-1``); pass them when corrupting a
            dataset in batches so the result does not depend on the batching.
        reference_size: the image side the published parameters are meant for (224); lengths scale by
            ``min(H, W) / reference_size``. ``None`` uses the published pixel values unscaled.

    Returns:
        The corrupted images: same shape, dtype and device, values in [0, 1].
    """
    spec = _spec(name, severity)
    x = _check_images(images, check_range=False)
    idx = _check_indices(indices, x.shape[0])
    seeds = [corruption_seed(seed, name, severity, i) for i in idx]
    out = torch.empty(images.shape, dtype=images.dtype, device=images.device)
    # Work in chunks: most corruptions make several passes over the pixels and run fastest when a chunk stays in
    # the CPU cache (about 2 MB); those built on one fused gather prefer wide chunks. Each chunk's range check
    # comes just before its work, which then finds it in the cache. Every image has its own random stream, so
    # chunking changes nothing else.
    step = max(1, spec[2] // (x.shape[1] * x.shape[2] * x.shape[3] or 1))
    for i in range(0, x.shape[0], step):
        rng = ImageRNG(seeds[i : i + step], x.device)
        _run(out[i : i + step], _check_range(x[i : i + step]), spec, severity, rng, reference_size)
    return out


def corrupt_with(
    images: torch.Tensor, name: str, severity: int, rng, reference_size: float | None = REFERENCE_SIZE
) -> torch.Tensor:
    """:func:`corrupt` with a caller-supplied random source.

    ``rng`` has the methods of :class:`ImageRNG` that the corruption uses (``uniform``, ``normal``,
    ``randint``; shot noise ``poisson``, impulse noise ``bits32``), one row per image. Tests pass a
    NumPy-backed source that replays the reference's own random draws.
    """
    spec = _spec(name, severity)
    x = _check_images(images)
    return _run(torch.empty(images.shape, dtype=images.dtype, device=images.device), x, spec, severity, rng,
                reference_size)


def size_scale(height: int, width: int, reference_size: float | None = REFERENCE_SIZE) -> float:
    """The factor applied to the reference's pixel lengths for an image of (height, width)."""
    if reference_size is None:
        return 1.0
    if isinstance(reference_size, bool) or not isinstance(reference_size, int | float) or reference_size <= 0:
        raise UserError(f"reference_size must be a positive number or None, got {reference_size!r}")
    return min(height, width) / float(reference_size)


# ----------------------------------------------------------------------------------------------------------------------
# Validation and dispatch
# ----------------------------------------------------------------------------------------------------------------------

# fn(x, severity, rng, scale, out=None): the corrupted batch. Given ``out`` (the caller's result), a corruption may
# write its result there, clipped to [0, 1], and return ``out`` itself, saving a pass over the images.
_Fn = Callable[..., torch.Tensor]


def _spec(name: str, severity: int) -> tuple[_Fn, bool, int]:
    if name not in _REGISTRY:
        raise UserError(f"unknown corruption {name!r}; valid names: {', '.join(ALL_CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, int | np.integer) or severity not in SEVERITIES:
        raise UserError(f"severity must be an integer from 1 to 5, got {severity!r}")
    return _REGISTRY[name]


def _check_images(images, check_range: bool = True) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise UserError(f"images must be a torch tensor (N, C, H, W) in [0, 1], got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise UserError(
            f"images must have shape (N, C, H, W) with C = 1 or 3, got {tuple(images.shape)}; "
            "for a single image pass images[None]"
        )
    if not images.is_floating_point():
        raise UserError(f"images must be floating point in [0, 1], got dtype {images.dtype}; divide uint8 by 255")
    x = images.detach().to(torch.float32)
    return _check_range(x) if check_range else x


ONE_BITS = np.uint32(0x3F800000)  # float32 1.0: non-negative floats order as their bit patterns


def _check_range(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float32) if every value lies in [0, 1], else a UserError naming the range found."""
    if x.numel() == 0:
        return x
    if x.device.type == "cpu" and x.is_contiguous() and x.numpy().view(np.uint32).max() <= ONE_BITS:
        return x  # every value is +0 .. 1 (an integer maximum: several times faster than torch.aminmax)
    lo, hi = (float(v) for v in torch.aminmax(x))  # -0.0, other devices and layouts, and the message
    if not (lo >= 0.0 and hi <= 1.0):  # also catches NaN
        raise UserError(f"images must lie in [0, 1], got values from {lo:.8g} to {hi:.8g}")
    return x


def _check_indices(indices, n: int) -> list[int]:
    if indices is None:
        return list(range(n))
    idx = [int(i) for i in (indices.tolist() if isinstance(indices, torch.Tensor | np.ndarray) else indices)]
    if len(idx) != n:
        raise UserError(f"indices has {len(idx)} entries for {n} images; give one global index per image")
    if any(i < 0 for i in idx):
        raise UserError("indices must be non-negative image indices")
    return idx


def _run(out, x, spec, severity, rng, reference_size) -> torch.Tensor:
    """Corrupt the float32 batch ``x`` into ``out`` (the caller's dtype, contiguous), clipped to [0, 1]."""
    fn, colour, _ = spec
    s = size_scale(x.shape[-2], x.shape[-1], reference_size)
    if x.shape[0] == 0:
        return out
    with torch.no_grad():
        if colour and x.shape[1] == 1:
            # Colour-dependent corruptions run on the equal-channel RGB image, then back to luma.
            y = ops.to_gray(fn(x.expand(-1, 3, -1, -1), severity, rng, s).clamp(0, 1))
        else:
            y = fn(x, severity, rng, s, out=out)
            if y is out:  # written and clipped in place
                return out
        if y.dtype != out.dtype or not y.is_contiguous():  # clamping into another layout is slow on the CPU
            return out.copy_(torch.clamp(y, 0, 1))
        return torch.clamp(y, 0, 1, out=out)


def _pixels(value: float, s: float) -> int:
    """A whole-pixel length of the reference scaled by ``s``: unchanged at s = 1, else rounded, at least 1."""
    return int(value) if s == 1 else max(1, int(math.floor(value * s + 0.5)))


# ----------------------------------------------------------------------------------------------------------------------
# Noise (drawn per value in (C, H, W) order; the reference draws in (H, W, C) order, which tests replay)
# ----------------------------------------------------------------------------------------------------------------------


def _gaussian_noise(x, severity, rng, s, out=None):
    if hasattr(rng, "add_normal"):  # our streams: drawn, added and clipped in one compiled pass
        return rng.add_normal(x, GAUSSIAN_NOISE[severity - 1], out=out)
    return x + rng.normal(0.0, GAUSSIAN_NOISE[severity - 1], tuple(x.shape[1:]))


def _shot_noise(x, severity, rng, s, out=None):
    c = SHOT_NOISE[severity - 1]
    y = rng.shot(x, c, out=out) if hasattr(rng, "shot") else None  # 8-bit images: one compiled table-lookup pass
    return y if y is not None else rng.poisson(x * c, grid=c / 255) / c


def _impulse_noise(x, severity, rng, s, out=None):
    # scikit-image random_noise(mode="s&p", amount=c): each value flips with probability c, to 1 or 0 evenly.
    # One 32-bit uniform u per value does both draws: u < c flips, and given that, u < c / 2 is a fair coin
    # (probabilities exact to 2^-32); the result is x * keep + salt.
    c = IMPULSE_NOISE[severity - 1]
    if hasattr(rng, "impulse"):  # our streams: one compiled pass
        return rng.impulse(x, c, out=out)
    u = rng.bits32(tuple(x.shape[1:]))
    keep = torch.from_numpy((u >= np.uint32(round(c * 2**32))).astype(np.float32)).to(x.device)
    salt = torch.from_numpy((u < np.uint32(round(c / 2 * 2**32))).astype(np.float32)).to(x.device)
    return torch.addcmul(salt, x, keep)


def _speckle_noise(x, severity, rng, s, out=None):
    if hasattr(rng, "add_normal"):
        return rng.add_normal(x, SPECKLE_NOISE[severity - 1], multiplicative=True, out=out)
    return x + x * rng.normal(0.0, SPECKLE_NOISE[severity - 1], tuple(x.shape[1:]))


# ----------------------------------------------------------------------------------------------------------------------
# Blur
# ----------------------------------------------------------------------------------------------------------------------


def _gaussian_blur(x, severity, rng, s, out=None):
    return ops.gaussian_filter(x, GAUSSIAN_BLUR[severity - 1] * s, "replicate", out=out)


def _glass_blur(x, severity, rng, s, out=None):
    sigma, delta, passes = GLASS_BLUR[severity - 1]
    sigma, delta = sigma * s, _pixels(delta, s)
    h, w = x.shape[-2:]
    nh, nw = max(h - 2 * delta, 0), max(w - 2 * delta, 0)
    offsets = rng.randint(-delta, delta, (passes, nh, nw, 2))
    # The reference stores the first blur as uint8 (truncating) before shuffling pixels: one pass does both.
    shuffled = ops.glass_shuffle(ops.gaussian_filter(x, sigma), offsets, delta, to_8bit=True)
    return ops.gaussian_filter(shuffled, sigma, out=out)


def _defocus_blur(x, severity, rng, s, out=None):
    radius, alias_blur = DEFOCUS_BLUR[severity - 1]
    return ops.defocus(x, radius * s, alias_blur, out=out)


def _motion_blur(x, severity, rng, s, out=None):
    radius, sigma = MOTION_BLUR[severity - 1]
    angles = rng.uniform(-45.0, 45.0, (), dtype=torch.float64)
    dy, dx, w = ops.motion_taps(_pixels(radius, s), sigma * s, angles.cpu().tolist(), *x.shape[-2:])
    return ops.shift_sum(x, dy, dx, w, out=out)


def _zoom_blur(x, severity, rng, s, out=None):
    # All zooms and the final average are one sparse operator with 4 taps per zoom: one fused gather-sum.
    index, weight = ops.zoom_blur_taps(*x.shape[-2:], tuple(float(f) for f in ZOOM_BLUR[severity - 1]))
    return ops.gather_sum(x, index, weight)


# ----------------------------------------------------------------------------------------------------------------------
# Weather
# ----------------------------------------------------------------------------------------------------------------------


def _snow(x, severity, rng, s, out=None):
    loc, scale, zoom, threshold, radius, sigma, blend = SNOW[severity - 1]
    n, _, h, w = x.shape
    layer = rng.normal(loc, scale, (h, w))[:, None]
    # zoomed, zero below the threshold (and at it: a measure-zero difference), capped at 1
    layer = ops.clipped_zoom_threshold(layer, zoom if s == 1 else max(1.0, zoom * s), threshold)
    angles = rng.uniform(-135.0, -45.0, (), dtype=torch.float64)
    dy, dx, wt = ops.motion_taps(_pixels(radius, s), sigma * s, angles.cpu().tolist(), *layer.shape[-2:])
    layer = ops.shift_sum(layer, dy, dx, wt)[:, 0].cpu().numpy()
    # the layer rounded to 8 bits and cropped, plus its 180-degree rotation; blended with the brightened image
    return ops.run_compiled(x, out, lambda src, dst: kernels.snow_blend(src, layer, blend, dst), tuple(x.shape))


def _frost(x, severity, rng, s, out=None):
    c_img, c_frost = FROST[severity - 1]
    n, _, h, w = x.shape
    which = rng.randint(0, len(ops.FROST_FILES), ()).tolist()
    textures = [ops.frost_resized(i, h, w, s) for i in which]
    tops = rng.randint(0, [t.shape[1] - h for t in textures], ()).tolist()
    lefts = rng.randint(0, [t.shape[2] - w for t in textures], ()).tolist()

    def run(src, dst):  # c_img * x + c_frost * crop / 255, image by image, reading the crop in place
        for k, (texture, top, left) in enumerate(zip(textures, tops, lefts, strict=True)):
            kernels.blend_crop(src[k], np.float32(c_img), texture.numpy(), top, left, np.float32(c_frost / 255),
                               dst[k])

    return ops.run_compiled(x, out, run, tuple(x.shape))


def _fog(x, severity, rng, s, out=None):
    strength, decay = FOG[severity - 1]
    h, w = x.shape[-2:]
    mapsize = 1 << (max(h, w, 3) - 1).bit_length()  # the reference's next power of two of the longest side
    u = rng.uniform(0.0, 1.0, (ops.plasma_count(mapsize),)).cpu().numpy()
    plasma = kernels.plasma_fractal(u, mapsize, decay, np.empty((len(u), mapsize, mapsize), dtype=np.float32))
    low = plasma.min(axis=(1, 2))  # NumPy's reductions are vectorised; compiled ones would not be
    spread = plasma.max(axis=(1, 2)) - low

    def run(src, dst):
        top = src.reshape(len(src), -1).max(axis=1)
        kernels.fog_blend(src, top, plasma, low, spread, np.float32(strength), dst)

    return ops.run_compiled(x, out, run, tuple(x.shape))


def _spatter(x, severity, rng, s, out=None):
    loc, scale, sigma, threshold, c4, mode = SPATTER[severity - 1]
    n, _, h, w = x.shape
    liquid = rng.normal(loc, scale, (h, w)).to(torch.float64)[:, None]
    liquid = ops.gaussian_filter(liquid, sigma * s, "replicate")
    liquid = torch.where(liquid < threshold, 0, liquid)
    if mode == 0:
        m = torch.stack([_spatter_water(layer, c4) for layer in liquid[:, 0].cpu().numpy()])
        m = m[:, None].to(x.device, x.dtype)
        colour = torch.tensor([175 / 255, 238 / 255, 238 / 255], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return x + m * colour
    m = ops.gaussian_filter((liquid > threshold).float(), c4 * s, "replicate")
    m = torch.where(m < 0.8, 0, m).to(x.dtype)
    colour = torch.tensor([63 / 255, 42 / 255, 20 / 255], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return x * (1 - m) + colour * m


def _spatter_water(liquid: np.ndarray, intensity: float) -> torch.Tensor:
    """The reference's water-drop mask (edges, distance transform, equalisation) via OpenCV, one image."""
    try:
        import cv2
    except ImportError as err:  # pragma: no cover - cv2 comes with imagecorruptions-imaug
        raise UserError(
            "spatter at severity 1-3 needs OpenCV: pip install opencv-python-headless (or imagecorruptions-imaug)"
        ) from err
    # The reference casts without clipping; values above 1 only occur for very small images.
    liquid8 = np.clip(liquid * 255, 0, 255).astype(np.uint8)
    dist = 255 - cv2.Canny(liquid8, 50, 150)
    dist = cv2.distanceTransform(dist, cv2.DIST_L2, 5)
    _, dist = cv2.threshold(dist, 20, 20, cv2.THRESH_TRUNC)
    dist = cv2.blur(dist, (3, 3)).astype(np.uint8)
    dist = cv2.equalizeHist(dist)
    ker = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]])
    dist = cv2.filter2D(dist, cv2.CV_8U, ker)
    dist = cv2.blur(dist, (3, 3)).astype(np.float32)
    m = liquid8 * dist
    peak = float(m.max())
    return torch.from_numpy(m / peak * intensity if peak > 0 else np.zeros_like(m))


# ----------------------------------------------------------------------------------------------------------------------
# Digital
# ----------------------------------------------------------------------------------------------------------------------


def _brightness(x, severity, rng, s, out=None):
    return ops.hsv_value_shift(x, BRIGHTNESS[severity - 1], out=out)


def _saturate(x, severity, rng, s, out=None):
    return ops.hsv_saturation_affine(x, *SATURATE[severity - 1], out=out)


def _contrast(x, severity, rng, s, out=None):
    c = CONTRAST[severity - 1]  # (x - mean) * c + mean

    def run(src, dst):  # NumPy's pairwise float32 sums are fast and accurate to about 1e-7
        kernels.contrast(src, np.add.reduce(src, axis=2) / np.float32(src.shape[2]), c, dst)

    return ops.run_compiled(x, out, run, (x.shape[0], x.shape[1], -1))


def _elastic_transform(x, severity, rng, s, out=None):
    # The reference's field is already relative to the image size (sigma 1% and amplitude 0.5% of the sides),
    # so it needs no scaling. It draws and smooths in float64 and stores float32; float32 throughout changes the
    # displacements by about 1e-6 px.
    n, _, h, w = x.shape
    alpha = ELASTIC_ALPHA[severity - 1]
    max_d = h * 0.005
    field = rng.uniform(-max_d, max_d, (2, h, w)).to(x.device, x.dtype)
    field = ops.gaussian_filter(field, (h * 0.01, w * 0.01), "symmetric", truncate=3).mul_(alpha)
    return ops.displace_reflect(x, field[:, 0], field[:, 1])


def _pixelate(x, severity, rng, s, out=None):
    # Pillow: BOX downsampling to int(size * c), NEAREST back up; one compiled pass per image plane.
    c = PIXELATE[severity - 1]
    n, ch, h, w = x.shape
    h2, w2 = max(1, int(h * c)), max(1, int(w * c))
    blocks = (*ops.box_blocks(h, h2), *ops.box_blocks(w, w2), ops.nearest_index(h2, h), ops.nearest_index(w2, w))
    return ops.run_compiled(x, out, lambda src, dst: kernels.pixelate(src, *blocks, dst), (n * ch, h, w))


def _jpeg_compression(x, severity, rng, s, out=None):
    # Pillow's save(quality=q) then open, bit for bit, without the files: the lossy steps of libjpeg-turbo in
    # compiled loops over many blocks (jpeg_kernels). Quantising to 8 bits first is inherent to JPEG (rounded,
    # as Pillow rounds a float image's conversion).
    quality = JPEG_QUALITY[severity - 1]

    def run(src, dst):
        levels = kernels.to_levels(src.ravel(), np.empty(src.size, dtype=np.uint8)).reshape(src.shape)
        jpeg_roundtrip(levels, quality, out=levels)
        kernels.from_levels(levels.ravel(), dst.reshape(-1))

    return ops.run_compiled(x, out, run, tuple(x.shape))


# name -> (function, colour-dependent, values per chunk). Colour-dependent corruptions see grayscale images as
# equal-channel RGB.
_REGISTRY: dict[str, tuple[_Fn, bool, int]] = {
    "gaussian_noise": (_gaussian_noise, False, CHUNK_VALUES),
    "shot_noise": (_shot_noise, False, CHUNK_VALUES),
    "impulse_noise": (_impulse_noise, False, CHUNK_VALUES),
    "defocus_blur": (_defocus_blur, False, 1 << 20),  # FFTs like larger batches
    "glass_blur": (_glass_blur, False, CHUNK_VALUES),
    "motion_blur": (_motion_blur, False, CHUNK_VALUES),
    "zoom_blur": (_zoom_blur, False, WIDE_CHUNK_VALUES),
    "snow": (_snow, False, CHUNK_VALUES),
    "frost": (_frost, True, CHUNK_VALUES),
    "fog": (_fog, False, 1 << 21),  # many small steps per batch
    "brightness": (_brightness, False, CHUNK_VALUES),
    "contrast": (_contrast, False, CHUNK_VALUES),
    "elastic_transform": (_elastic_transform, False, CHUNK_VALUES),
    "pixelate": (_pixelate, False, CHUNK_VALUES),
    "jpeg_compression": (_jpeg_compression, False, CHUNK_VALUES),
    "speckle_noise": (_speckle_noise, False, CHUNK_VALUES),
    "gaussian_blur": (_gaussian_blur, False, CHUNK_VALUES),
    "spatter": (_spatter, True, CHUNK_VALUES),
    "saturate": (_saturate, True, CHUNK_VALUES),
}
assert tuple(_REGISTRY) == ALL_CORRUPTIONS
