"""Batched torch building blocks of the common-corruption engine (used by :mod:`corruptions`).

Each helper is a port of a routine that the reference corruption code (``imagecorruptions-imaug`` 1.1.5,
Apache-2.0, by the imaug team, after E. Rusak, B. Mitzkus and D. Hendrycks) calls per image in NumPy,
SciPy, scikit-image, OpenCV or Pillow. The docstrings name the routine, and the numerics follow it: the
same kernel radius, border rule and coordinate mapping, so a corruption built from these helpers matches
the reference at the reference image size.

Random numbers come from :class:`ImageRNG`: one generator per image, seeded from (seed, corruption,
severity, image index), so an image's corruption never depends on the batch it was processed in.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from synclone.errors import UserError

# ----------------------------------------------------------------------------------------------------------------------
# Random numbers
# ----------------------------------------------------------------------------------------------------------------------


def image_seed(seed: int, name: str, severity: int, index: int) -> int:
    """The 64-bit seed of one image's random stream: a hash of (seed, corruption, severity, image index)."""
    key = f"synclone-corruption/{int(seed)}/{name}/{int(severity)}/{int(index)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


class ImageRNG:
    """Independent random streams, one per image of a batch.

    Every method returns a tensor with a leading batch dimension whose row ``i`` comes from image ``i``'s
    own streams, in call order: a NumPy PCG64 generator for uniforms and integers (cheap bits), a torch
    generator for normals (fast Box-Muller), both seeded by the image's seed. Numbers are drawn on the CPU,
    so every device sees the same ones, then moved to ``device``. The method signatures mirror the legacy
    ``np.random`` calls of the reference code, so a test can substitute a NumPy-backed object and replay the
    reference's own random numbers.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.seeds = [int(s) for s in seeds]
        self.device = torch.device(device)
        self._np: list[np.random.Generator] | None = None
        self._torch: list[torch.Generator] | None = None

    def __len__(self) -> int:
        return len(self.seeds)

    @property
    def np_generators(self) -> list[np.random.Generator]:
        if self._np is None:
            self._np = [np.random.Generator(np.random.PCG64(s)) for s in self.seeds]
        return self._np

    @property
    def torch_generators(self) -> list[torch.Generator]:
        if self._torch is None:
            # a different seed from the NumPy stream's, so the two streams are unrelated
            self._torch = [torch.Generator().manual_seed(s ^ 0x5DEECE66D) for s in self.seeds]
        return self._torch

    def random(self, shape: tuple[int, ...] = (), dtype=np.float64) -> np.ndarray:
        """Uniforms on [0, 1) as a NumPy array (N, *shape), on the CPU."""
        out = np.empty((len(self), *shape), dtype=dtype)
        for i, gen in enumerate(self.np_generators):
            if shape:
                gen.random(out=out[i], dtype=dtype)
            else:
                out[i] = gen.random(dtype=dtype)
        return out

    def uniform(self, low: float, high: float, shape: tuple[int, ...] = (), dtype=torch.float32) -> torch.Tensor:
        """Uniform on [low, high): ``np.random.uniform(low, high, shape)`` per image."""
        u = torch.from_numpy(self.random(shape, np.float64 if dtype == torch.float64 else np.float32))
        u = u if (low, high) == (0.0, 1.0) else u * (high - low) + low
        return u.to(self.device)

    def normal(self, loc: float, scale: float, shape: tuple[int, ...] = ()) -> torch.Tensor:
        """Normal with mean ``loc`` and std ``scale``: ``np.random.normal(loc, scale, shape)`` per image."""
        z = torch.empty((len(self), *shape))
        for row, gen in zip(z, self.torch_generators, strict=True):
            row.normal_(0.0, 1.0, generator=gen)
        return (z * scale + loc).to(self.device)

    def randint(self, low: int, high: int | Sequence[int], shape: tuple[int, ...] = ()) -> torch.Tensor:
        """Integers in [low, high) (``high`` may differ per image): ``np.random.randint(low, high, shape)``."""
        highs = [int(high)] * len(self) if isinstance(high, int | np.integer) else [int(h) for h in high]
        small = -128 <= low and max(highs) <= 128
        out = np.empty((len(self), *shape), dtype=np.int8 if small else np.int64)
        for i, (gen, hi) in enumerate(zip(self.np_generators, highs, strict=True)):
            out[i] = gen.integers(low, hi, shape, dtype=out.dtype)
        return torch.from_numpy(out).to(self.device, torch.int64)

    def poisson(self, lam: torch.Tensor, grid: float) -> torch.Tensor:
        """Poisson draws with per-element rates ``lam`` (N, ...), exact in distribution; see :func:`poisson`."""
        return poisson(lam, self, grid)


def poisson(lam: torch.Tensor, rng: ImageRNG, grid: float) -> torch.Tensor:
    """Vectorised exact Poisson sampler over a batch, one random stream per image.

    A rate is split as ``k * grid + r`` (k <= 255, r >= 0), and since a sum of independent Poisson variables
    is Poisson, the draw is Poisson(k * grid) + Poisson(r). The first part inverts a precomputed CDF table of
    the 256 grid rates (a guide table leaves about one comparison per draw); the second, needed only off the
    grid, inverts the CDF of the small remainder step by step (usually zero steps). Shot noise passes
    grid = c / 255, so 8-bit images are on the grid and take one uniform per value (rates within 1e-6,
    relative, of a grid rate count as on it: float32 rounding of 8-bit values). Each image's uniforms come from its own
    stream, so its draws do not depend on the rest of the batch. The index work runs in NumPy on the CPU,
    where masked selection and gathers are much cheaper than in torch.
    """
    n = len(rng)
    ratio = lam.detach().to("cpu", torch.float64).reshape(n, -1).numpy() / grid
    codes = np.rint(ratio)
    snapped = np.abs(ratio - codes) <= 1e-6 * np.maximum(codes, 1)  # float noise around a grid rate
    if snapped.all() and codes.max(initial=0) <= 255:
        out = _poisson_table(codes.astype(np.int64), rng.random(ratio.shape[1:]), grid)
    else:
        codes = np.minimum(np.where(snapped, codes, np.floor(ratio)), 255)
        rest = np.where(snapped & (codes == np.rint(ratio)), 0.0, (ratio - codes) * grid)
        out = _poisson_table(codes.astype(np.int64), rng.random(ratio.shape[1:]), grid)
        u = rng.random(ratio.shape[1:])
        off = rest > 0
        out[off] += _poisson_inversion(rest[off], u[off])
    return torch.from_numpy(out).reshape(lam.shape).to(lam.device, lam.dtype)


@lru_cache(maxsize=16)
def _poisson_tables(grid: float, buckets: int = 256) -> tuple[np.ndarray, np.ndarray, int]:
    """CDF tables of Poisson(level * grid) for the 256 levels, and a guide table for each.

    Columns run to 12 standard deviations past the largest rate plus 16 (the mass beyond is below 1e-30);
    the last column is set to 1 so every search ends. guide[level, b] is the first k with cdf >= b / buckets.
    """
    top = 255 * grid
    width = int(top + 12 * math.sqrt(top) + 16)
    rates = np.arange(256)[:, None] * grid
    j = np.arange(1, width)
    with np.errstate(divide="ignore"):
        logp = -rates + np.concatenate([np.zeros((256, 1)), np.cumsum(np.log(rates) - np.log(j), axis=1)], axis=1)
    cdf = np.cumsum(np.exp(logp), axis=1)
    cdf[0] = 1.0
    cdf[:, -1] = 1.0
    edges = np.arange(buckets) / buckets
    guide = np.stack([np.searchsorted(row, edges, side="left") for row in cdf])
    return cdf.ravel(), guide.ravel().astype(np.int32), width


def _poisson_table(codes: np.ndarray, u: np.ndarray, grid: float, buckets: int = 256) -> np.ndarray:
    """Inverse-CDF Poisson draws for rates ``codes * grid`` (codes in 0..255) with uniforms ``u``."""
    cdf, guide, width = _poisson_tables(float(grid), buckets)
    shape = codes.shape
    codes, u = codes.ravel(), u.ravel()
    k = np.take(guide, codes * buckets + (u * buckets).astype(np.int64)).astype(np.int64)
    base = codes * width
    idx = np.flatnonzero(np.take(cdf, base + k) < u)
    while idx.size:  # the guide leaves about one step, for a few percent of the draws
        k[idx] += 1
        idx = idx[np.take(cdf, base[idx] + k[idx]) < u[idx]]
    return k.astype(np.float64).reshape(shape)


def _poisson_inversion(lam: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Smallest k with CDF(k; lam) >= u, step by step (meant for small rates)."""
    out = np.zeros_like(lam)
    pos = np.arange(lam.size)
    p = np.exp(-lam)
    cdf = p.copy()
    limit = int(lam.max(initial=0) + 20 * math.sqrt(lam.max(initial=0)) + 50)  # the mass beyond is < 1e-40
    for k in range(1, limit):
        more = u > cdf
        if not more.all():
            pos, lam, u, p, cdf = pos[more], lam[more], u[more], p[more], cdf[more]
            if pos.size == 0:
                break
        out[pos] = k
        p = p * lam / k
        cdf += p
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Borders and filters
# ----------------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=256)
def border_index(n: int, before: int, after: int, mode: str) -> np.ndarray:
    """Source indices of a padded axis of length ``n`` for the border ``mode``.

    ``replicate``: a a | a b c | c c (SciPy 'nearest'). ``reflect``: c b | a b c | b a (OpenCV
    BORDER_REFLECT_101, torch 'reflect'). ``symmetric``: b a | a b c | c b (SciPy 'reflect').
    """
    i = np.arange(-before, n + after)
    if mode == "replicate" or n == 1:
        return np.clip(i, 0, n - 1)
    if mode == "reflect":
        i = np.mod(i, 2 * n - 2)
        return np.where(i >= n, 2 * n - 2 - i, i)
    if mode == "symmetric":
        i = np.mod(i, 2 * n)
        return np.where(i >= n, 2 * n - 1 - i, i)
    raise ValueError(f"unknown border mode {mode!r}")


def pad(x: torch.Tensor, py: int, px: int, mode: str) -> torch.Tensor:
    """Pad the last two dimensions by (py, px) on each side with a border rule of :func:`border_index`."""
    h, w = x.shape[-2:]
    if (py or px) and (mode == "replicate" or (mode == "reflect" and py < h and px < w)) and x.dim() == 4:
        return F.pad(x, (px, px, py, py), mode=mode)  # torch's own padding is much faster than a gather
    if py:
        x = x.index_select(-2, torch.from_numpy(border_index(h, py, py, mode)).to(x.device))
    if px:
        x = x.index_select(-1, torch.from_numpy(border_index(w, px, px, mode)).to(x.device))
    return x


@lru_cache(maxsize=256)
def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """SciPy's ``gaussian_filter1d`` weights: radius ``int(truncate * sigma + 0.5)``, normalised to sum 1."""
    radius = int(truncate * float(sigma) + 0.5)
    if sigma <= 1e-15 or radius == 0:
        return np.ones(1)
    x = np.arange(-radius, radius + 1)
    phi = np.exp(-0.5 / (sigma * sigma) * x**2)
    return phi / phi.sum()


def correlate_separable(x: torch.Tensor, ky: np.ndarray, kx: np.ndarray, mode: str) -> torch.Tensor:
    """Correlate the last two dimensions of ``x`` with 1-D kernels along H then W (odd lengths).

    A sum of shifted slices: on the CPU this is far faster than ``conv2d`` with a one-channel kernel.
    """
    for k, dim in ((ky, -2), (kx, -1)):
        if len(k) == 1:
            continue
        r = len(k) // 2
        if mode == "valid":  # no padding: the output is 2r shorter
            xp, n = x, x.shape[dim] - 2 * r
        else:
            n = x.shape[dim]
            xp = pad(x, r, 0, mode) if dim == -2 else pad(x, 0, r, mode)
        out = xp.narrow(dim, 0, n) * float(k[0])
        for i in range(1, len(k)):
            out.add_(xp.narrow(dim, i, n), alpha=float(k[i]))
        x = out
    return x


def gaussian_filter(x: torch.Tensor, sigma: float | tuple[float, float], mode: str = "replicate",
                    truncate: float = 4.0) -> torch.Tensor:
    """scikit-image ``filters.gaussian`` (SciPy ``gaussian_filter``) over the last two dimensions."""
    sy, sx = (sigma, sigma) if np.isscalar(sigma) else sigma
    return correlate_separable(x, gaussian_kernel1d(sy, truncate), gaussian_kernel1d(sx, truncate), mode)


@lru_cache(maxsize=256)
def _disk_parts(radius: float, alias_blur: float):
    """The reference ``disk`` kernel and its factorisation: aliased disk, Gaussian, and a border correction.

    The reference draws an aliased disk (points with x^2 + y^2 <= r^2, normalised) on a 17x17 grid (2r+1
    for r > 8) and antialiases it with ``cv2.GaussianBlur`` (3x3, 5x5 for r > 8; OpenCV's default border
    BORDER_REFLECT_101). Away from the grid's edge that kernel is exactly disk (*) Gaussian; where the disk
    touches the edge (r = 8 and r > 8) the blur is cut and mirrored, which ``correction`` (reference kernel
    minus disk (*) Gaussian) puts back, as a handful of taps.
    """
    if radius <= 8:
        grid, ksize = 8, 3
    else:
        grid, ksize = math.ceil(radius), 5
    ax = np.arange(-grid, grid + 1)
    xx, yy = np.meshgrid(ax, ax)
    aliased = np.array((xx**2 + yy**2) <= radius**2, dtype=np.float32)
    aliased /= np.sum(aliased)
    # cv2.getGaussianKernel for sigma > 0: exp(-x^2 / (2 sigma^2)), normalised, computed in double.
    t = np.arange(ksize) - (ksize - 1) / 2
    g = np.exp(-(t**2) / (2 * alias_blur**2))
    g /= g.sum()
    padded = np.pad(aliased.astype(np.float64), ksize // 2, mode="reflect")  # numpy 'reflect' = REFLECT_101
    ref = np.zeros_like(aliased, dtype=np.float64)
    for a in range(ksize):
        for b in range(ksize):
            ref += g[a] * g[b] * padded[a : a + aliased.shape[0], b : b + aliased.shape[1]]
    ref = ref.astype(np.float32).astype(np.float64)  # the reference kernel is float32
    half = ksize // 2
    full = np.zeros((aliased.shape[0] + 2 * half,) * 2)
    for a in range(ksize):
        for b in range(ksize):
            full[a : a + aliased.shape[0], b : b + aliased.shape[1]] += g[a] * g[b] * aliased
    correction = np.pad(ref, half) - full
    correction[np.abs(correction) < 1e-7 * ref.max()] = 0  # float32 rounding of the reference kernel only
    rows = aliased[:, grid] > 0
    half_widths = (aliased > 0).sum(axis=1)[rows] // 2
    return ref, g, half_widths, float(aliased.max()), correction


def disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """The reference ``disk`` kernel (see :func:`_disk_parts`), as float64, on its full grid."""
    return _disk_parts(radius, alias_blur)[0]


def defocus(x: torch.Tensor, radius: float, alias_blur: float) -> torch.Tensor:
    """``cv2.filter2D(x, -1, disk(radius, alias_blur))`` (border BORDER_REFLECT_101), fast.

    The disk is a stack of horizontal runs, so its correlation is one cumulative sum along rows, a
    difference per run width and a sum over rows; then the separable Gaussian and the border correction of
    :func:`_disk_parts`. Exact up to float rounding, and independent of the radius apart from the row count.
    """
    _, g, half_widths, weight, correction = _disk_parts(radius, alias_blur)
    n, c, h, w = x.shape
    rd, gh = len(half_widths) // 2, len(g) // 2
    pc = correction.shape[0] // 2
    p = max(rd + gh + 1, pc)  # one spare column on the left lets run sums skip a zero column
    xp = pad(x, p, p, "reflect")
    cs = torch.cumsum(xp, dim=-1)
    # disk sums on the output region grown by the Gaussian's half-width
    ho, wo, y0, x0 = h + 2 * gh, w + 2 * gh, p - gh, p - gh
    boxes = {}
    disk = torch.zeros(n, c, ho, wo, dtype=x.dtype, device=x.device)
    for dy, hw in zip(range(-rd, rd + 1), half_widths.tolist(), strict=True):
        if hw not in boxes:
            boxes[hw] = cs[..., x0 + hw : x0 + hw + wo] - cs[..., x0 - hw - 1 : x0 - hw - 1 + wo]
        disk.add_(boxes[hw][..., y0 + dy : y0 + dy + ho, :])
    disk.mul_(weight)
    out = correlate_separable(disk, g, g, "valid")
    for a, b in np.argwhere(correction != 0):
        out.add_(xp[..., p - pc + a : p - pc + a + h, p - pc + b : p - pc + b + w], alpha=float(correction[a, b]))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Geometry: shifts, zooms, resampling
# ----------------------------------------------------------------------------------------------------------------------


def motion_taps(radius: int, sigma: float, angles_deg: Sequence[float], height: int, width: int):
    """Per-image taps of the reference ``_motion_blur``: offsets (dy, dx) and weights, shape (N, 2r+1).

    Tap i of an image blurred at angle a is its shift by (-ceil(i sin a - 0.5), -ceil(i cos a - 0.5)) with
    weight exp(-i^2 / 2 sigma^2) (normalised over all taps); as in the reference, the taps stop (weight 0,
    no renormalisation) from the first one whose shift reaches the image size.
    """
    size = radius * 2 + 1
    i = np.arange(size)
    k = np.exp(-((i - 0) ** 2) / (2 * (sigma**2))) / (np.sqrt(2 * np.pi) * sigma)
    k = k / np.sum(k)
    dys, dxs, ws = [], [], []
    for angle in angles_deg:
        p0, p1 = size * np.sin(np.deg2rad(angle)), size * np.cos(np.deg2rad(angle))
        hyp = math.hypot(p0, p1)
        dy = -np.ceil(((i * p0) / hyp) - 0.5)
        dx = -np.ceil(((i * p1) / hyp) - 0.5)
        inside = np.cumprod(~((np.abs(dy) >= height) | (np.abs(dx) >= width)))
        dys.append(dy.astype(np.int64))
        dxs.append(dx.astype(np.int64))
        ws.append(k * inside)
    return np.stack(dys), np.stack(dxs), np.stack(ws)


def shift_sum(x: torch.Tensor, dy: np.ndarray, dx: np.ndarray, w: np.ndarray) -> torch.Tensor:
    """Sum over taps of ``w * x`` shifted by (dy, dx) with replicated borders (the reference ``shift``)."""
    n, _, h, wd = x.shape
    py = int(min(np.abs(dy).max(), h - 1)) if dy.size else 0
    px = int(min(np.abs(dx).max(), wd - 1)) if dx.size else 0
    xp = pad(x, py, px, "replicate")
    out = torch.zeros_like(x)
    for b in range(n):
        acc = out[b]
        for j in range(dy.shape[1]):
            if w[b, j] == 0:
                continue
            y0, x0 = py - int(dy[b, j]), px - int(dx[b, j])
            acc.add_(xp[b, :, y0 : y0 + h, x0 : x0 + wd], alpha=float(w[b, j]))
    return out


def clipped_zoom(x: torch.Tensor, factor: float) -> torch.Tensor:
    """The reference ``clipped_zoom``: crop the centre to ceil(size / factor), zoom it by ``factor``.

    SciPy's ``ndimage.zoom(order=1)`` maps output pixel o to input coordinate o (in - 1) / (out - 1), which
    is bilinear interpolation with ``align_corners=True``; the output has ``round(crop * factor)`` pixels
    per side (at least the input size) and is not trimmed here.
    """
    h, w = x.shape[-2:]
    ch, cw = int(np.ceil(h / float(factor))), int(np.ceil(w / float(factor)))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[..., top : top + ch, left : left + cw]
    oh, ow = int(round(ch * factor)), int(round(cw * factor))
    if (oh, ow) == (ch, cw):
        return crop
    return F.interpolate(crop, size=(oh, ow), mode="bilinear", align_corners=True)


def glass_shuffle(x: torch.Tensor, offsets: torch.Tensor, delta: int) -> torch.Tensor:
    """The reference glass-blur pixel loop, vectorised exactly.

    The reference visits interior pixels (h, w) from the bottom-right corner backwards (h from H - delta
    down to delta + 1, then w likewise) and runs ``x[h, w], x[h', w'] = x[h', w'], x[h, w]``. On an RGB
    array both sides are views, so this is not a swap: it copies x[h', w'] into x[h, w] and leaves x[h', w']
    as it was. Each pixel is therefore written once per pass, with the value its source holds at that
    moment: the source's final value when the source was visited earlier, its starting value otherwise.
    Following those links is a pointer chase, done here by pointer doubling over the whole batch.

    ``offsets``: (N, passes, nh, nw, 2) integers in [-delta, delta), rows and columns in visiting order,
    last axis (dx, dy) in the order the reference draws them.
    """
    n, c, h, w = x.shape
    hs, ws = np.arange(h - delta, delta, -1), np.arange(w - delta, delta, -1)
    if hs.size == 0 or ws.size == 0:
        return x
    hw = h * w
    p = (hs[:, None] * w + ws[None, :]).ravel()
    interior = np.zeros(hw, dtype=bool)
    interior[p] = True
    base = np.arange(n)[:, None] * hw
    off = np.asarray(offsets.cpu() if isinstance(offsets, torch.Tensor) else offsets, dtype=np.int64)
    flat = x.reshape(n, c, hw)
    for it in range(off.shape[1]):
        o = off[:, it].reshape(n, -1, 2)
        q = p[None] + o[..., 1] * w + o[..., 0]
        src = np.tile(np.arange(hw), (n, 1))
        src[:, p] = q
        src = src.ravel()
        # pointer doubling on the linked pixels only (index work in NumPy: far cheaper than torch indexing)
        active = (p[None] + base)[interior[q] & (q > p[None])]
        done = np.ones(n * hw, dtype=bool)
        done[active] = False
        while active.size:
            target = src[active] + (active // hw) * hw
            src[active], finished = src[target], done[target]
            done[active[finished]] = True
            active = active[~finished]
        index = torch.from_numpy(src.reshape(n, 1, hw)).to(x.device)
        flat = flat.gather(2, index.expand(n, c, hw))
    return flat.reshape(n, c, h, w)


@lru_cache(maxsize=256)
def box_blocks(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's BOX-filter support per output pixel (``precompute_coeffs``): (start, length) of input runs.

    For a box filter the weights are 1 inside the run and 0 elsewhere, so an output pixel is the mean of
    its run; the run starts at ``int(center - support + 0.5)`` with center = (o + 0.5) * scale.
    """
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    starts, lengths = [], []
    for o in range(n_out):
        center = (o + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), n_in) - xmin
        taps = [xmin + j for j in range(xmax) if -0.5 < (j + xmin - center + 0.5) / filterscale <= 0.5]
        starts.append(taps[0])
        lengths.append(len(taps))
    return np.array(starts), np.array(lengths)


def block_sums(x: torch.Tensor, starts: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
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


@lru_cache(maxsize=256)
def nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """Pillow's NEAREST resize source index (``ImagingScaleAffine``).

    Pillow starts at 0.5 * n_in / n_out and adds n_in / n_out per output pixel in double precision, taking
    the integer part; the running sum (not (o + 0.5) * scale) decides the ties.
    """
    step = float(n_in) / n_out
    pos, out = step * 0.5, []
    for _ in range(n_out):
        out.append(min(int(pos), n_in - 1))
        pos += step
    return np.array(out, dtype=np.int64)


def map_coordinates_reflect(x: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor) -> torch.Tensor:
    """SciPy ``map_coordinates(order=1, mode='reflect')``: bilinear sampling at (cy, cx) per image.

    SciPy's 'reflect' mirrors about the pixel edges (-0.5 and n - 0.5); ``grid_sample`` with
    ``padding_mode='reflection', align_corners=False`` does the same, then clamps to the border pixels,
    which is what the half-sample mirror gives for the interpolation neighbours.
    """
    _, _, h, w = x.shape
    gx = (2 * cx + 1) / w - 1
    gy = (2 * cy + 1) / h - 1
    grid = torch.stack([gx, gy], dim=-1).to(x.dtype)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


# ----------------------------------------------------------------------------------------------------------------------
# Colour
# ----------------------------------------------------------------------------------------------------------------------

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as in OpenCV's RGB2GRAY and Pillow's convert("L")


def to_gray(x: torch.Tensor) -> torch.Tensor:
    """BT.601 luma of an (N, 3, H, W) batch, shape (N, 1, H, W)."""
    return (x[:, 0:1] * LUMA[0] + x[:, 1:2] * LUMA[1] + x[:, 2:3] * LUMA[2])


def hsv_value_shift(x: torch.Tensor, c: float) -> torch.Tensor:
    """scikit-image rgb2hsv, V <- clip(V + c, 0, 1), hsv2rgb, in closed form.

    With hue and saturation fixed every channel is proportional to V, so the round trip scales the pixel
    by V'/V; a black pixel (V = 0, saturation 0 by scikit-image's convention) becomes grey V'.
    """
    v = x.amax(dim=1, keepdim=True)
    v2 = torch.clamp(v + c, 0, 1)
    return torch.where(v > 0, x * (v2 / torch.where(v > 0, v, 1)), v2.expand_as(x))


def hsv_saturation_affine(x: torch.Tensor, mul: float, add: float) -> torch.Tensor:
    """scikit-image rgb2hsv, S <- clip(S * mul + add, 0, 1), hsv2rgb, in closed form.

    For fixed hue and value each channel is v - S' * v * (v - x) / (v - min): the maximum stays, the rest
    move linearly with S. A grey pixel has hue 0 (red) by scikit-image's convention, so it becomes
    (v, v (1 - S'), v (1 - S')).
    """
    v = x.amax(dim=1, keepdim=True)
    delta = v - x.amin(dim=1, keepdim=True)
    grey = delta == 0
    s = torch.where(grey, 0, delta / torch.where(grey, 1, v))
    s2 = torch.clamp(s * mul + add, 0, 1)
    coloured = v - s2 * v * (v - x) / torch.where(grey, 1, delta)
    red = torch.cat([v, v * (1 - s2), v * (1 - s2)], dim=1)
    return torch.where(grey, red, coloured)


# ----------------------------------------------------------------------------------------------------------------------
# Random fields and textures
# ----------------------------------------------------------------------------------------------------------------------


def plasma_count(mapsize: int) -> int:
    """How many uniforms :func:`plasma_fractal` consumes per image."""
    total, step = 0, mapsize
    while step >= 2:
        total += 3 * (mapsize // step) ** 2
        step //= 2
    return total


def plasma_fractal(u: torch.Tensor, mapsize: int, wibbledecay: float) -> torch.Tensor:
    """The reference diamond-square ``plasma_fractal``, batched: (N, mapsize, mapsize) in [0, 1].

    ``u``: (N, plasma_count(mapsize)) uniforms on [0, 1), consumed in the reference's order (squares, then
    the two diamond sets, per step), each giving ``wibble * uniform(-wibble, wibble)`` as it does. The
    reference adds that in float64 and stores float32; we compute in float32 (a last-bit difference).
    """
    n = u.shape[0]
    u = u.to(torch.float32)
    m = torch.zeros(n, mapsize, mapsize, dtype=torch.float32, device=u.device)
    step, wibble, used = mapsize, 100.0, 0

    def wibbled(arr: torch.Tensor) -> torch.Tensor:
        nonlocal used
        k = arr.shape[1] * arr.shape[2]
        noise = u[:, used : used + k].reshape(arr.shape).mul(2 * wibble * wibble).sub_(wibble * wibble)
        used += k
        return noise.add_(arr, alpha=0.25)

    while step >= 2:
        half = step // 2
        corner = m[:, 0:mapsize:step, 0:mapsize:step]
        sq = corner + torch.roll(corner, -1, dims=1)
        sq = sq + torch.roll(sq, -1, dims=2)
        m[:, half:mapsize:step, half:mapsize:step] = wibbled(sq)
        dr = m[:, half:mapsize:step, half:mapsize:step]
        ul = m[:, 0:mapsize:step, 0:mapsize:step]
        lt = (dr + torch.roll(dr, 1, dims=1)) + (ul + torch.roll(ul, -1, dims=2))
        m[:, 0:mapsize:step, half:mapsize:step] = wibbled(lt)
        tt = (dr + torch.roll(dr, 1, dims=2)) + (ul + torch.roll(ul, -1, dims=1))
        m[:, half:mapsize:step, 0:mapsize:step] = wibbled(tt)
        step //= 2
        wibble /= wibbledecay
    m = m - m.amin(dim=(1, 2), keepdim=True)
    return m / m.amax(dim=(1, 2), keepdim=True)


FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg", "frost6.jpg")


@lru_cache(maxsize=8)
def frost_texture(index: int) -> torch.Tensor:
    """Frost texture ``index`` (0-5) as a (3, H, W) uint8 tensor, read from the installed imagecorruptions.

    The six textures ship with ``imagecorruptions`` (-imaug); they are read from that installed package and
    not copied into synclone.
    """
    import importlib.resources

    from PIL import Image

    try:
        ref = importlib.resources.files("imagecorruptions") / "frost" / FROST_FILES[index]
        with importlib.resources.as_file(ref) as path, Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    except (ModuleNotFoundError, FileNotFoundError) as err:
        raise UserError(
            "frost needs the frost textures shipped with imagecorruptions: pip install imagecorruptions-imaug"
        ) from err
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


@lru_cache(maxsize=48)
def frost_resized(index: int, height: int, width: int, scale: float) -> torch.Tensor:
    """Texture ``index`` resized as the reference does for an image of (height, width), times ``scale``.

    The reference enlarges the texture until it covers the image, then by 1.1, with bicubic interpolation
    (``cv2.INTER_CUBIC``, a = -0.75, rounded to uint8), and crops it at random. For small images
    (``scale`` < 1) the texture is shrunk by the same factor as the image's lengths, with an antialiased
    bicubic filter, so the frost keeps its look relative to the image.
    """
    tex = frost_texture(index)
    fh, fw = tex.shape[-2:]
    rh, rw = height / scale, width / scale  # the image's size in reference pixels
    factor = 1.0
    if fh < rh and fw >= rw:
        factor = rh / fh
    elif fh >= rh and fw < rw:
        factor = rw / fw
    elif fh < rh and fw < rw:
        factor = max(rh / fh, rw / fw)
    factor *= 1.1 * scale
    size = (max(int(np.ceil(fh * factor)), height + 1), max(int(np.ceil(fw * factor)), width + 1))
    out = F.interpolate(tex[None].float(), size=size, mode="bicubic", align_corners=False, antialias=factor < 1)
    return out[0].round_().clamp_(0, 255).to(torch.uint8)
