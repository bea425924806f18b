"""Common corruptions (Hendrycks & Dietterich, 2019), batched in torch, seeded, for any image size.

    >>> from synclone.robustness.corruptions import corrupt, CORRUPTIONS
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

import io
import math
from collections.abc import Callable, Iterable

import numpy as np
import torch

from synclone.errors import UserError
from synclone.robustness import corruption_ops as ops
from synclone.robustness.corruption_ops import ImageRNG, image_seed

__all__ = [
    "ALL_CORRUPTIONS",
    "CORRUPTIONS",
    "HELD_OUT",
    "REFERENCE_SIZE",
    "SEVERITIES",
    "ImageRNG",
    "corrupt",
    "corrupt_with",
    "image_seed",
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
CHUNK_VALUES = 1 << 19  # float32 values per chunk of work (2 MB)

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
    x = _check_images(images)
    idx = _check_indices(indices, x.shape[0])
    seeds = [image_seed(seed, name, severity, i) for i in idx]
    # Work in chunks of about 2 MB of pixels: the many passes of a corruption then stay in the CPU cache, which
    # doubles throughput at 224x224. Every image has its own random stream, so chunking changes nothing else.
    step = max(1, CHUNK_VALUES // (x.shape[1] * x.shape[2] * x.shape[3] or 1))
    if x.shape[0] <= step:
        return _run(images, x, spec, severity, ImageRNG(seeds, x.device), reference_size)
    out = torch.empty_like(images)
    for i in range(0, x.shape[0], step):
        rng = ImageRNG(seeds[i : i + step], x.device)
        out[i : i + step] = _run(images[i : i + step], x[i : i + step], spec, severity, rng, reference_size)
    return out


def corrupt_with(
    images: torch.Tensor, name: str, severity: int, rng, reference_size: float | None = REFERENCE_SIZE
) -> torch.Tensor:
    """:func:`corrupt` with a caller-supplied random source.

    ``rng`` has the methods of :class:`ImageRNG` (``uniform``, ``normal``, ``randint``, ``poisson``), one row
    per image. Tests pass a NumPy-backed source that replays the reference's own random draws.
    """
    spec = _spec(name, severity)
    return _run(images, _check_images(images), spec, severity, rng, reference_size)


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

_Fn = Callable[[torch.Tensor, int, object, float], torch.Tensor]


def _spec(name: str, severity: int) -> tuple[_Fn, bool]:
    if name not in _REGISTRY:
        raise UserError(f"unknown corruption {name!r}; valid names: {', '.join(ALL_CORRUPTIONS)}")
    if isinstance(severity, bool) or not isinstance(severity, int | np.integer) or severity not in SEVERITIES:
        raise UserError(f"severity must be an integer from 1 to 5, got {severity!r}")
    return _REGISTRY[name]


def _check_images(images) -> torch.Tensor:
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
    if x.numel():
        lo, hi = (float(v) for v in torch.aminmax(x))
        if not (lo >= 0.0 and hi <= 1.0):  # also catches NaN
            raise UserError(f"images must lie in [0, 1], got values from {lo:g} to {hi:g}")
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


def _run(images, x, spec, severity, rng, reference_size) -> torch.Tensor:
    fn, colour = spec
    s = size_scale(x.shape[-2], x.shape[-1], reference_size)
    if x.shape[0] == 0:
        return images.clone()
    with torch.no_grad():
        if colour and x.shape[1] == 1:
            # Colour-dependent corruptions run on the equal-channel RGB image, then back to luma.
            out = ops.to_gray(fn(x.expand(-1, 3, -1, -1), severity, rng, s).clamp(0, 1))
        else:
            out = fn(x, severity, rng, s)
    # out of place: a corruption that leaves the image unchanged may hand back the caller's own tensor
    return out.clamp(0, 1).to(images.dtype)


def _pixels(value: float, s: float) -> int:
    """A whole-pixel length of the reference scaled by ``s``: unchanged at s = 1, else rounded, at least 1."""
    return int(value) if s == 1 else max(1, int(math.floor(value * s + 0.5)))


# ----------------------------------------------------------------------------------------------------------------------
# Noise (drawn per value in (C, H, W) order; the reference draws in (H, W, C) order, which tests replay)
# ----------------------------------------------------------------------------------------------------------------------


def _gaussian_noise(x, severity, rng, s):
    return x + rng.normal(0.0, GAUSSIAN_NOISE[severity - 1], tuple(x.shape[1:]))


def _shot_noise(x, severity, rng, s):
    c = SHOT_NOISE[severity - 1]
    return rng.poisson(x * c, grid=c / 255) / c  # 8-bit images take the fast table path


def _impulse_noise(x, severity, rng, s):
    # scikit-image random_noise(mode="s&p", amount=c): each value flips with probability c, to 1 or 0 evenly.
    # One uniform per value does both draws: u < c flips, and given that, u < c / 2 is a fair coin.
    c = IMPULSE_NOISE[severity - 1]
    u = rng.uniform(0.0, 1.0, tuple(x.shape[1:]))
    return torch.where(u < c, (u < c / 2).to(x.dtype), x)


def _speckle_noise(x, severity, rng, s):
    return x + x * rng.normal(0.0, SPECKLE_NOISE[severity - 1], tuple(x.shape[1:]))


# ----------------------------------------------------------------------------------------------------------------------
# Blur
# ----------------------------------------------------------------------------------------------------------------------


def _gaussian_blur(x, severity, rng, s):
    return ops.gaussian_filter(x, GAUSSIAN_BLUR[severity - 1] * s, "replicate")


def _glass_blur(x, severity, rng, s):
    sigma, delta, passes = GLASS_BLUR[severity - 1]
    sigma, delta = sigma * s, _pixels(delta, s)
    # The reference stores the first blur as uint8 (truncating) before shuffling pixels.
    y = torch.floor(torch.clamp(ops.gaussian_filter(x, sigma) * 255, 0, 255)).div_(255)
    h, w = x.shape[-2:]
    nh, nw = max(h - 2 * delta, 0), max(w - 2 * delta, 0)
    offsets = rng.randint(-delta, delta, (passes, nh, nw, 2))
    return ops.gaussian_filter(ops.glass_shuffle(y, offsets, delta), sigma)


def _defocus_blur(x, severity, rng, s):
    radius, alias_blur = DEFOCUS_BLUR[severity - 1]
    return ops.defocus(x, radius * s, alias_blur)


def _motion_blur(x, severity, rng, s):
    radius, sigma = MOTION_BLUR[severity - 1]
    angles = rng.uniform(-45.0, 45.0, (), dtype=torch.float64)
    dy, dx, w = ops.motion_taps(_pixels(radius, s), sigma * s, angles.cpu().tolist(), *x.shape[-2:])
    return ops.shift_sum(x, dy, dx, w)


def _zoom_blur(x, severity, rng, s):
    h, w = x.shape[-2:]
    out = torch.zeros_like(x)
    factors = ZOOM_BLUR[severity - 1]
    for factor in factors:
        out += ops.clipped_zoom(x, float(factor))[..., :h, :w]
    return (x + out) / (len(factors) + 1)


# ----------------------------------------------------------------------------------------------------------------------
# Weather
# ----------------------------------------------------------------------------------------------------------------------


def _snow(x, severity, rng, s):
    loc, scale, zoom, threshold, radius, sigma, blend = SNOW[severity - 1]
    n, _, h, w = x.shape
    layer = rng.normal(loc, scale, (h, w)).to(torch.float64)[:, None]
    layer = ops.clipped_zoom(layer, zoom if s == 1 else max(1.0, zoom * s))
    layer = torch.where(layer < threshold, 0, layer).clamp_(0, 1)
    angles = rng.uniform(-135.0, -45.0, (), dtype=torch.float64)
    dy, dx, wt = ops.motion_taps(_pixels(radius, s), sigma * s, angles.cpu().tolist(), *layer.shape[-2:])
    layer = ops.shift_sum(layer, dy, dx, wt)
    layer = (torch.round(layer * 255) / 255)[..., :h, :w].to(x.dtype)
    gray = ops.to_gray(x) if x.shape[1] == 3 else x
    x = blend * x + (1 - blend) * torch.maximum(x, gray * 1.5 + 0.5)
    return x + layer + torch.flip(layer, dims=(-2, -1))


def _frost(x, severity, rng, s):
    c_img, c_frost = FROST[severity - 1]
    n, _, h, w = x.shape
    which = rng.randint(0, len(ops.FROST_FILES), ()).tolist()
    textures = [ops.frost_resized(i, h, w, s) for i in which]
    tops = rng.randint(0, [t.shape[1] - h for t in textures], ()).tolist()
    lefts = rng.randint(0, [t.shape[2] - w for t in textures], ()).tolist()
    crops = torch.stack([t[:, a : a + h, b : b + w] for t, a, b in zip(textures, tops, lefts, strict=True)])
    return c_img * x + c_frost / 255 * crops.to(x.device, x.dtype)


def _fog(x, severity, rng, s):
    strength, decay = FOG[severity - 1]
    h, w = x.shape[-2:]
    mapsize = 1 << (max(h, w, 3) - 1).bit_length()  # the reference's next power of two of the longest side
    u = rng.uniform(0.0, 1.0, (ops.plasma_count(mapsize),))
    plasma = ops.plasma_fractal(u, mapsize, decay)[:, None, :h, :w].to(x.device, x.dtype)
    max_val = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x + strength * plasma) * max_val / (max_val + strength)


def _spatter(x, severity, rng, s):
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


def _brightness(x, severity, rng, s):
    return ops.hsv_value_shift(x, BRIGHTNESS[severity - 1])


def _saturate(x, severity, rng, s):
    return ops.hsv_saturation_affine(x, *SATURATE[severity - 1])


def _contrast(x, severity, rng, s):
    c = CONTRAST[severity - 1]
    means = x.mean(dim=(2, 3), keepdim=True)
    return (x - means) * c + means


def _elastic_transform(x, severity, rng, s):
    # The reference's field is already relative to the image size (sigma 1% and amplitude 0.5% of the sides),
    # so it needs no scaling.
    n, _, h, w = x.shape
    alpha = ELASTIC_ALPHA[severity - 1]
    max_d = h * 0.005
    field = rng.uniform(-max_d, max_d, (2, h, w), dtype=torch.float64)
    field = (ops.gaussian_filter(field, (h * 0.01, w * 0.01), "symmetric", truncate=3) * alpha).float()
    yy, xx = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
    return ops.map_coordinates_reflect(x, yy + field[:, 1].to(x.device), xx + field[:, 0].to(x.device))


def _pixelate(x, severity, rng, s):
    # Pillow: BOX downsampling to int(size * c) (horizontal pass first), NEAREST back up. Every work step runs
    # along dim -2, where torch gathers are an order of magnitude faster than along the last dimension.
    c = PIXELATE[severity - 1]
    h, w = x.shape[-2:]
    h2, w2 = max(1, int(h * c)), max(1, int(w * c))
    rows, cols = ops.box_blocks(h, h2), ops.box_blocks(w, w2)
    small = ops.block_sums(x, *rows).transpose(-1, -2).contiguous()  # (N, C, W, h2)
    small = ops.block_sums(small, *cols) / torch.as_tensor(np.outer(cols[1], rows[1]), dtype=x.dtype, device=x.device)
    small = small.index_select(-2, torch.from_numpy(ops.nearest_index(w2, w)).to(x.device))
    small = small.transpose(-1, -2).contiguous()  # (N, C, h2, W)
    return small.index_select(-2, torch.from_numpy(ops.nearest_index(h2, h)).to(x.device))


def _jpeg_compression(x, severity, rng, s):
    # Pillow encodes (as the reference does; it is the faster encoder here) and torchvision decodes (the faster
    # decoder; both are libjpeg-turbo and give identical pixels). One image at a time is inherent to JPEG.
    from PIL import Image
    from torchvision.io import decode_jpeg

    quality = JPEG_QUALITY[severity - 1]
    n, c, h, w = x.shape
    mode = "RGB" if c == 3 else "L"
    pixels = x.cpu().mul(255).add_(0.5).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    files = []
    for img in pixels:
        buf = io.BytesIO()
        Image.frombuffer(mode, (w, h), img, "raw", mode, 0, 1).save(buf, "JPEG", quality=quality)
        files.append(torch.frombuffer(bytearray(buf.getbuffer()), dtype=torch.uint8))
    return torch.stack(decode_jpeg(files)).to(x.device, x.dtype).div_(255)


# name -> (function, colour-dependent). Colour-dependent corruptions see grayscale images as equal-channel RGB.
_REGISTRY: dict[str, tuple[_Fn, bool]] = {
    "gaussian_noise": (_gaussian_noise, False),
    "shot_noise": (_shot_noise, False),
    "impulse_noise": (_impulse_noise, False),
    "defocus_blur": (_defocus_blur, False),
    "glass_blur": (_glass_blur, False),
    "motion_blur": (_motion_blur, False),
    "zoom_blur": (_zoom_blur, False),
    "snow": (_snow, False),
    "frost": (_frost, True),
    "fog": (_fog, False),
    "brightness": (_brightness, False),
    "contrast": (_contrast, False),
    "elastic_transform": (_elastic_transform, False),
    "pixelate": (_pixelate, False),
    "jpeg_compression": (_jpeg_compression, False),
    "speckle_noise": (_speckle_noise, False),
    "gaussian_blur": (_gaussian_blur, False),
    "spatter": (_spatter, True),
    "saturate": (_saturate, True),
}
assert tuple(_REGISTRY) == ALL_CORRUPTIONS
