"""Batched torch building blocks of the common-corruption engine (used by :mod:`corruptions`).

Each helper is a port of a routine that the reference corruption code (``imagecorruptions-imaug`` 1.1.5,
Apache-2.0, by the imaug team, after E. Rusak, B. Mitzkus and D. Hendrycks) calls per image in NumPy,
SciPy, scikit-image, OpenCV or Pillow. The docstrings name the routine, and the numerics follow it: the
same kernel radius, border rule and coordinate mapping, so a corruption built from these helpers matches
the reference at the reference image size.

Random numbers come from :class:`ImageRNG`: one counter-based stream per image, seeded from (seed,
corruption, severity, image index), so an image's corruption never depends on the batch it was processed in.
Loops that would take many passes over memory in torch run compiled with numba (:mod:`corruption_kernels`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from synclone.errors import UserError
from synclone.probes.corruptions import kernels

# ----------------------------------------------------------------------------------------------------------------------
# Random numbers
# ----------------------------------------------------------------------------------------------------------------------


def splitmix64(keys: np.ndarray, start: int, count: int) -> np.ndarray:
    """Words ``start + 1 .. start + count`` of the SplitMix64 streams seeded by ``keys``: (len(keys), count).

    SplitMix64: G. Steele, D. Lea, C. Flood, "Fast splittable pseudorandom number generators", OOPSLA 2014,
    constants from S. Vigna's reference splitmix64.c. Word j of the stream seeded s is mix(s + j * GAMMA):
    counter-based, so every image's words come from one compiled loop (:mod:`corruption_kernels`).
    """
    keys = np.ascontiguousarray(keys, dtype=np.uint64)
    return kernels.splitmix64(keys, int(start), np.empty((len(keys), int(count)), dtype=np.uint64))


def uniforms23(keys: np.ndarray, start: int, count: int) -> np.ndarray:
    """``count`` float32 uniforms on [0, 1) per stream from its next ``ceil(count / 2)`` words (23 bits each).

    Equal to the top 23 bits of each uint32 of :func:`splitmix64`'s words viewed as little-endian uint32
    values, scaled by 2^-23.
    """
    out = np.empty((len(keys), count + (count & 1)), dtype=np.float32)
    return kernels.uniforms23(np.ascontiguousarray(keys, dtype=np.uint64), int(start), out)[:, :count]


class ImageRNG:
    """Independent random streams, one per image of a batch.

    Image ``i``'s stream is SplitMix64 seeded with its seed (:func:`~synclone.util.seeds.corruption_seed`).
    Calls consume it in order and every image consumes the same number of words per call, so row ``i`` of
    every result depends on that image's seed and the sequence of calls only, never on the rest of the batch.
    The words for a whole batch are made at once in NumPy on the CPU (every device sees the same numbers),
    then moved to ``device``:

    - uniforms: float32 from 23 bits (two per word), float64 from 53 bits;
    - normals: Box-Muller on two 23-bit uniforms, two normals per word (the largest is 5.65 standard
      deviations; the tail beyond has probability 2e-8);
    - integers in [low, high): the top bits of a byte for ranges that are powers of two (exact), otherwise
      ``low + (u * (high - low) >> 32)`` with a 32-bit uniform u (biased by less than (high - low) / 2^32).

    The method signatures mirror the legacy ``np.random`` calls of the reference code, so a test can
    substitute a NumPy-backed object and replay the reference's own random numbers.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.keys = np.array([int(s) & 0xFFFFFFFFFFFFFFFF for s in seeds], dtype=np.uint64)
        self.device = torch.device(device)
        self._used = 0  # words consumed per image so far

    def __len__(self) -> int:
        return len(self.keys)

    def words(self, count: int) -> np.ndarray:
        """The next ``count`` 64-bit words of every image's stream, (N, count) uint64."""
        out = splitmix64(self.keys, self._used, count)
        self._used += count
        return out

    def bits32(self, shape: tuple[int, ...] = ()) -> np.ndarray:
        """Uniform 32-bit integers (N, *shape) as uint32, two per word."""
        size = math.prod(shape)
        return self.words((size + 1) // 2).view(np.uint32)[:, :size].reshape(len(self), *shape)

    def _uniforms23(self, size: int) -> np.ndarray:
        """``size`` float32 uniforms per image, 23 bits each, two per word (:func:`uniforms23`)."""
        out = uniforms23(self.keys, self._used, size)
        self._used += (size + 1) // 2
        return out

    def random(self, shape: tuple[int, ...] = (), dtype=np.float64) -> np.ndarray:
        """Uniforms on [0, 1) as a NumPy array (N, *shape), on the CPU."""
        if np.dtype(dtype) == np.float32:
            return self._uniforms23(math.prod(shape)).reshape(len(self), *shape)
        w = self.words(math.prod(shape)).reshape(len(self), *shape)
        return np.multiply(w >> np.uint64(11), 2.0**-53)

    def uniform(self, low: float, high: float, shape: tuple[int, ...] = (), dtype=torch.float32) -> torch.Tensor:
        """Uniform on [low, high): ``np.random.uniform(low, high, shape)`` per image."""
        np_dtype = np.float64 if dtype == torch.float64 else np.float32
        u = self.random(shape, np_dtype)
        if (low, high) != (0.0, 1.0):
            u *= np_dtype(high - low)
            u += np_dtype(low)
        return torch.from_numpy(np.asarray(u)).to(self.device)

    def normal(self, loc: float, scale: float, shape: tuple[int, ...] = ()) -> torch.Tensor:
        """Normal with mean ``loc`` and std ``scale``: ``np.random.normal(loc, scale, shape)`` per image."""
        return torch.from_numpy(self.normal_np(loc, scale, shape)).to(self.device)

    def normal_np(self, loc: float, scale: float, shape: tuple[int, ...] = ()) -> np.ndarray:
        """:meth:`normal` as a float32 NumPy array on the CPU (Box-Muller, one word per pair of values)."""
        size = math.prod(shape)
        out = kernels.normals(self.keys, self._used, np.float32(loc), np.float32(scale),
                              np.empty((len(self), size), dtype=np.float32))
        self._used += (size + 1) // 2
        return out.reshape(len(self), *shape)

    # Fused draws: one compiled pass from the stream to the corrupted values (no noise array in between). Each
    # writes straight into ``out`` (the caller's result, already clipped to [0, 1]) when it is a contiguous
    # float32 CPU tensor, and returns it; otherwise a new tensor.

    def add_normal(self, x: torch.Tensor, scale: float, multiplicative: bool = False,
                   out: torch.Tensor | None = None) -> torch.Tensor:
        """``clip(x + z, 0, 1)`` (``clip(x + x z, 0, 1)`` if ``multiplicative``), z ~ N(0, scale^2) per value.

        The same numbers as ``x + normal(0, scale, x.shape[1:])`` would add.
        """
        def run(src, dst):
            kernels.add_normals(self.keys, self._used, src, np.float32(scale), bool(multiplicative), dst)

        return self._fused(x, out, run)

    def impulse(self, x: torch.Tensor, amount: float, out: torch.Tensor | None = None) -> torch.Tensor:
        """Salt-and-pepper: each value becomes 1 with probability amount / 2, 0 with amount / 2, else stays.

        One 32-bit uniform u per value (:meth:`bits32`'s) decides both: u < amount flips, and given that,
        u < amount / 2 is a fair coin; probabilities exact to 2^-32.
        """
        def run(src, dst):
            kernels.impulse(self.keys, self._used, src, np.uint64(round(amount / 2 * 2**32)),
                            np.uint64(round(amount * 2**32)), dst)

        return self._fused(x, out, run)

    def shot(self, x: torch.Tensor, c: float, out: torch.Tensor | None = None) -> torch.Tensor | None:
        """``clip(Poisson(c x) / c, 0, 1)`` for 8-bit images (rates on the grid c / 255), else None.

        The draws equal :meth:`poisson`'s table path; None (nothing consumed) sends other images there.
        """
        cdf, table, width = _poisson_tables(c / 255)

        def run(src, dst):
            return kernels.poisson_on_grid(self.keys, self._used, src, np.float32(c), np.float32(c / 255),
                                           table.ravel(), cdf.ravel(), width, POISSON_BUCKET_BITS, dst)

        return self._fused(x, out, run)

    def _fused(self, x: torch.Tensor, out: torch.Tensor | None, run) -> torch.Tensor | None:
        """Run a fused kernel ``run(src, dst)`` on (N, values) rows; it consumes one word per two values."""
        result = run_compiled(x, out, run, (x.shape[0], -1))
        if result is not None:
            self._used += (math.prod(x.shape[1:]) + 1) // 2
        return result

    def randint(self, low: int, high: int | Sequence[int], shape: tuple[int, ...] = ()) -> torch.Tensor:
        """Integers in [low, high) (``high`` may differ per image): ``np.random.randint(low, high, shape)``.

        int8 when every value fits, else int64. A range that is the same power of two (up to 256) for every
        image takes one byte per value (its top bits); any other takes 32 bits per value.
        """
        highs = np.broadcast_to(np.asarray(high, dtype=np.int64), (len(self),))
        spans = highs - int(low)
        if np.any(spans <= 0):
            raise ValueError(f"empty range [{low}, {high})")
        span = int(spans[0])
        size = math.prod(shape)
        power_of_two = span <= 256 and span & (span - 1) == 0
        if np.all(spans == span) and -128 <= low and low + span <= 128:  # int8 values: one compiled pass
            out = kernels.small_ints(self.keys, self._used, int(low), span, 8 - span.bit_length() + 1 if power_of_two
                                     else -1, np.empty((len(self), size), dtype=np.int8))
            self._used += (size + 7) // 8 if power_of_two else (size + 1) // 2
            return torch.from_numpy(out.reshape(len(self), *shape)).to(self.device)
        if np.all(spans == span) and power_of_two:
            draw = self.words((size + 7) // 8).view(np.uint8)[:, :size] >> np.uint8(8 - span.bit_length() + 1)
            draw = draw.reshape(len(self), *shape)
        else:
            span_col = spans.astype(np.uint64).reshape(-1, *([1] * len(shape)))
            draw = (self.bits32(shape).astype(np.uint64) * span_col) >> np.uint64(32)
        small = -128 <= low and int(highs.max()) <= 128
        out = draw.astype(np.int8 if small else np.int64)
        out += np.int8(low) if small else int(low)
        return torch.from_numpy(out).to(self.device)

    def poisson(self, lam: torch.Tensor, grid: float) -> torch.Tensor:
        """Poisson draws with per-element rates ``lam`` (N, ...), exact in distribution; see :func:`poisson`."""
        return poisson(lam, self, grid)


def run_compiled(x: torch.Tensor, out: torch.Tensor | None, run, shape: tuple[int, ...],
                 dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """Run a compiled kernel ``run(src, dst)`` on ``x`` as a contiguous CPU array of ``dtype`` viewed as ``shape``.

    The kernel writes straight into ``out`` when that is a contiguous CPU tensor of ``dtype`` (saving a pass)
    and ``out`` is returned; otherwise into a new array, returned as a tensor on x's device (copied into
    ``out`` if given). A kernel returning False means "not done here": then None.
    """
    src = x.detach().to("cpu", dtype).contiguous().numpy().reshape(shape)
    direct = out is not None and out.device.type == "cpu" and out.dtype == dtype and out.is_contiguous()
    dst = out.numpy().reshape(shape) if direct else np.empty_like(src)
    if run(src, dst) is False:
        return None
    if direct:
        return out
    result = torch.from_numpy(dst).view(x.shape).to(x.device)
    return result if out is None else out.copy_(result)


def poisson(lam: torch.Tensor, rng: ImageRNG, grid: float) -> torch.Tensor:
    """Vectorised exact Poisson sampler over a batch, one random stream per image.

    A rate is split as ``k * grid + r`` (k <= 255, r >= 0), and since a sum of independent Poisson variables
    is Poisson, the draw is Poisson(k * grid) + Poisson(r). The first part inverts the CDF of the 256 grid
    rates with a 32-bit uniform and a lookup table (:func:`_poisson_tables`); the second, needed only off the
    grid, inverts the CDF of the small remainder step by step (usually zero steps). Shot noise passes
    grid = c / 255, so 8-bit images are on the grid and take one table lookup per value (rates within 1e-4
    grid steps of a grid rate count as on it: float32 rounding of 8-bit values). Each image's uniforms come
    from its own stream, so its draws do not depend on the rest of the batch. The work runs in NumPy on the
    CPU, where gathers from a table are much cheaper than in torch.
    """
    n = len(rng)
    ratio = lam.detach().to("cpu", torch.float32).reshape(n, -1).numpy() / np.float32(grid)
    codes = np.rint(ratio)
    off_grid = np.subtract(ratio, codes)
    if ratio.size == 0 or (max(float(off_grid.max()), -float(off_grid.min())) <= 1e-4 and float(codes.max()) <= 255):
        out = _poisson_table(codes.astype(np.int32), rng.bits32(ratio.shape[1:]), grid)
    else:
        codes = np.clip(np.floor(ratio + np.float32(1e-4)), 0, 255)  # rounding noise just below a level snaps up
        rest = np.maximum(ratio - codes, 0).astype(np.float64) * grid
        rest[rest < 1e-4 * grid] = 0.0
        out = _poisson_table(codes.astype(np.int32), rng.bits32(ratio.shape[1:]), grid)
        u = rng.random(ratio.shape[1:])
        off = rest > 0
        out[off] += _poisson_inversion(rest[off], u[off])
    return torch.from_numpy(out).reshape(lam.shape).to(lam.device, lam.dtype)


POISSON_BUCKET_BITS = 10


@lru_cache(maxsize=16)
def _poisson_tables(grid: float) -> tuple[np.ndarray, np.ndarray, int]:
    """CDF tables of Poisson(level * grid) for the 256 levels, and a bucket table for 32-bit uniforms.

    ``cdf``: (256, width) float64, columns to 12 standard deviations past the largest rate plus 16 (the mass
    beyond is below 1e-30), the last set to 1 so every search ends. ``table``: (256, 2^10) uint16. For the
    uniforms u = bits / 2^32 of bucket b (the top 10 bits), the draw min{k : u < cdf[k]} is at least
    ``table & 255`` and exceeds it by at most ``table >> 8``, which is 0 for most buckets: the table alone
    then decides the draw.
    """
    top = 255 * grid
    width = int(top + 12 * math.sqrt(top) + 16)
    if width > 255:
        raise ValueError(f"Poisson grid {grid} is too coarse for the 8-bit table")
    rates = np.arange(256)[:, None] * grid
    j = np.arange(1, width)
    with np.errstate(divide="ignore"):
        logp = -rates + np.concatenate([np.zeros((256, 1)), np.cumsum(np.log(rates) - np.log(j), axis=1)], axis=1)
    cdf = np.cumsum(np.exp(logp), axis=1)
    cdf[0] = 1.0
    cdf[:, -1] = 1.0
    edges = np.arange((1 << POISSON_BUCKET_BITS) + 1) / (1 << POISSON_BUCKET_BITS)
    lo = np.stack([np.searchsorted(row, edges[:-1], side="right") for row in cdf])  # draw at the bucket's first u
    hi = np.stack([np.searchsorted(row, edges[1:] - 2.0**-32, side="right") for row in cdf])  # ... and its last
    return cdf, (lo + ((hi - lo) << 8)).astype(np.uint16), width


def _poisson_table(codes: np.ndarray, bits: np.ndarray, grid: float) -> np.ndarray:
    """Inverse-CDF Poisson draws (float32) for rates ``codes * grid`` (int32, 0..255) with 32-bit uniforms."""
    cdf, table, width = _poisson_tables(float(grid))
    shape = codes.shape
    codes, bits = codes.ravel(), bits.ravel()
    idx = codes << POISSON_BUCKET_BITS
    idx |= (bits >> np.uint32(32 - POISSON_BUCKET_BITS)).view(np.int32)
    entry = table.ravel().take(idx)
    k = np.empty(entry.shape, dtype=np.float32)
    np.bitwise_and(entry, np.uint16(255), out=k, casting="unsafe")
    unsure = np.flatnonzero(entry > 255)
    if unsure.size:  # a CDF step falls inside the bucket: compare u with the CDF for those draws only
        u = bits[unsure] * 2.0**-32
        base = codes[unsure].astype(np.int64) * width + (entry[unsure] & 255)
        extra = np.zeros(unsure.size, dtype=np.int64)
        more = np.arange(unsure.size)
        flat = cdf.ravel()
        for _ in range(int(entry.max()) >> 8):
            more = more[flat.take(base[more] + extra[more]) <= u[more]]
            if more.size == 0:
                break
            extra[more] += 1
        k[unsure] += extra
    return k.reshape(shape)


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
    if mode == "symmetric" and py <= h and px <= w:  # mirrored copies of the edge strips: a copy, not a gather
        if py:
            x = torch.cat([x[..., :py, :].flip(-2), x, x[..., h - py :, :].flip(-2)], dim=-2)
        if px:
            x = torch.cat([x[..., :px].flip(-1), x, x[..., w - px :].flip(-1)], dim=-1)
        return x
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


def correlate_separable(x: torch.Tensor, ky: np.ndarray, kx: np.ndarray, mode: str,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """Correlate the last two dimensions of ``x`` with 1-D kernels along H then W (odd lengths).

    Border rule ``mode`` as in :func:`border_index`; one compiled pass per plane
    (:func:`corruption_kernels.correlate_separable`). With ``out`` the result is clipped to [0, 1] and
    written there (:func:`run_compiled`).
    """
    h, w = x.shape[-2:]
    ry, rx = len(ky) // 2, len(kx) // 2

    def run(src, dst):
        kernels.correlate_separable(src, np.asarray(ky, dtype=src.dtype), border_index(h, ry, ry, mode),
                                    np.asarray(kx, dtype=src.dtype), border_index(w, rx, rx, mode),
                                    out is not None, dst)

    return run_compiled(x, out, run, (-1, h, w), x.dtype)


def gaussian_filter(x: torch.Tensor, sigma: float | tuple[float, float], mode: str = "replicate",
                    truncate: float = 4.0, out: torch.Tensor | None = None) -> torch.Tensor:
    """scikit-image ``filters.gaussian`` (SciPy ``gaussian_filter``) over the last two dimensions.

    With ``out``, clipped to [0, 1] and written there.
    """
    sy, sx = (sigma, sigma) if np.isscalar(sigma) else sigma
    return correlate_separable(x, gaussian_kernel1d(sy, truncate), gaussian_kernel1d(sx, truncate), mode, out)


@lru_cache(maxsize=64)
def disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """The reference ``disk`` kernel, float32 values (as float64), on its full (2R + 1)^2 grid.

    The reference draws an aliased disk (points with x^2 + y^2 <= r^2, normalised) on a 17x17 grid (2r+1
    for r > 8) and antialiases it with ``cv2.GaussianBlur`` (3x3, 5x5 for r > 8; OpenCV's default border
    BORDER_REFLECT_101, its kernel exp(-x^2 / (2 sigma^2)) normalised, in double), storing float32.
    """
    if radius <= 8:
        grid, ksize = 8, 3
    else:
        grid, ksize = math.ceil(radius), 5
    ax = np.arange(-grid, grid + 1)
    xx, yy = np.meshgrid(ax, ax)
    aliased = np.array((xx**2 + yy**2) <= radius**2, dtype=np.float32)
    aliased /= np.sum(aliased)
    t = np.arange(ksize) - (ksize - 1) / 2
    g = np.exp(-(t**2) / (2 * alias_blur**2))
    g /= g.sum()
    padded = np.pad(aliased.astype(np.float64), ksize // 2, mode="reflect")  # numpy 'reflect' = REFLECT_101
    ref = np.zeros_like(aliased, dtype=np.float64)
    for a in range(ksize):
        for b in range(ksize):
            ref += g[a] * g[b] * padded[a : a + aliased.shape[0], b : b + aliased.shape[1]]
    return ref.astype(np.float32).astype(np.float64)


def _fft_size(n: int) -> int:
    """The smallest multiple of 8 >= n with no prime factor above 5 (fast for the FFT: 240 and 256 take about
    0.8x the time of 250 here, and odd powers such as 243 twice as long)."""
    n = -(-n // 8) * 8
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 8


@lru_cache(maxsize=16)
def _kernel_spectrum(radius: float, alias_blur: float, lh: int, lw: int) -> torch.Tensor:
    """rfft2 of the disk kernel laid out for correlation by circular convolution on an (lh, lw) grid."""
    ker = disk_kernel(radius, alias_blur)
    r = ker.shape[0] // 2
    g = np.zeros((lh, lw))
    # correlation: out[i] = sum_m ker[m + r] x[i + m] = sum_m g[-m] x[i + m], so g[-m] = ker[m + r]
    rows = (-np.arange(-r, r + 1)) % lh
    cols = (-np.arange(-r, r + 1)) % lw
    g[np.ix_(rows, cols)] = ker
    return torch.fft.rfft2(torch.from_numpy(g)).to(torch.complex64)


@lru_cache(maxsize=16)
def _disk_taps(height: int, width: int, radius: float, alias_blur: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The disk kernel's nonzero taps as :func:`gather_sum` tables, border BORDER_REFLECT_101."""
    ker = disk_kernel(radius, alias_blur)
    r = ker.shape[0] // 2
    dys, dxs = np.nonzero(ker)
    rows = border_index(height, r, r, "reflect")  # padded row p reads image row rows[p]
    cols = border_index(width, r, r, "reflect")
    yy, xx = np.arange(height)[:, None, None], np.arange(width)[None, :, None]
    index = rows[yy + dys] * width + cols[xx + dxs]  # output (y, x), tap k reads padded (y + dy, x + dx)
    weight = np.broadcast_to(ker[dys, dxs], index.shape)
    return (torch.from_numpy(index.reshape(height * width, -1).astype(np.int32)),
            torch.from_numpy(weight.reshape(height * width, -1).astype(np.float32)))


@lru_cache(maxsize=64)
def disk_runs(radius: float, alias_blur: float) -> tuple[np.ndarray, float, np.ndarray] | None:
    """The disk kernel as Gaussian * (aliased disk), if that factorisation is exact; else None.

    The reference blurs the aliased disk inside its (2R + 1)^2 grid, reflecting at the grid's edge. While the
    blur stays inside the grid (radius up to 6 on the 17 x 17 grid) the kernel is exactly the full convolution
    of the Gaussian with the disk (checked here to 1e-7), so filtering with it is filtering with the disk,
    whose rows are runs of equal weight, then with the separable Gaussian. Returns the run half-widths per
    disk row (-1 for none), the disk's weight and the Gaussian's taps.
    """
    if radius <= 8:
        grid, ksize = 8, 3
    else:
        grid, ksize = math.ceil(radius), 5
    ax = np.arange(-grid, grid + 1)
    inside = ax[None, :] ** 2 + ax[:, None] ** 2 <= radius**2
    t = np.arange(ksize) - (ksize - 1) / 2
    g = np.exp(-(t**2) / (2 * alias_blur**2))
    g /= g.sum()
    value = float(np.float32(1) / np.float32(inside.sum()))  # the reference's float32 normalisation
    disk = np.pad(inside * value, ksize // 2)
    full = sum(g[a] * g[b] * np.roll(np.roll(disk, a - ksize // 2, 0), b - ksize // 2, 1)
               for a in range(ksize) for b in range(ksize))
    kernel = np.pad(disk_kernel(radius, alias_blur), ksize // 2)
    if np.abs(full - kernel).max() > 1e-7:
        return None
    used = inside.any(axis=1)
    half = np.where(used, np.abs(ax)[np.argmax(inside, axis=1)], -1)
    lo = int(np.flatnonzero(used)[0])
    edge = int(np.argmax(g > 1e-12))  # a Gaussian of sigma 0.1 has outer taps of 2e-22: not worth a pass
    return half[lo : len(half) - lo].astype(np.int64), value, g[edge : len(g) - edge]


def defocus(x: torch.Tensor, radius: float, alias_blur: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """``cv2.filter2D(x, -1, disk(radius, alias_blur))`` (border BORDER_REFLECT_101).

    Small kernels on small images (the sub-pixel disks of 28x28 images) apply their nonzero taps with one
    fused gather (:func:`gather_sum`). Kernels that factorise (:func:`disk_runs`) go through the disk's runs
    and the Gaussian in one compiled pass (:func:`corruption_kernels.disk_blur`), on the image mirrored as
    filter2D mirrors it. The others go by FFT: the image is mirrored by the kernel's radius R (what filter2D
    reads beyond the edge), zero-filled to an FFT-friendly size and multiplied by the kernel's spectrum; the
    output keeps the centre, which circular wrap-around cannot reach. float32 FFTs round at about 1e-7, far
    below an 8-bit level. With ``out``, the compiled path writes its result there, clipped to [0, 1].
    """
    ker = disk_kernel(radius, alias_blur)
    if np.count_nonzero(ker) <= 64 and x.shape[-2] * x.shape[-1] <= 128 * 128:  # tap tables stay small
        return gather_sum(x, *_disk_taps(*x.shape[-2:], float(radius), float(alias_blur)))
    h, w = x.shape[-2:]
    runs = disk_runs(float(radius), float(alias_blur))
    if runs is not None:
        half, value, g = runs
        p = len(half) // 2 + len(g) // 2
        if p < min(h, w):  # a wider border would reflect more than once
            rows, cols = border_index(h, p, p, "reflect"), border_index(w, p, p, "reflect")
            return run_compiled(x, out, lambda src, dst: kernels.disk_blur(src, rows, cols, half, value, g,
                                                                           out is not None, dst), (-1, h, w))
    r = ker.shape[0] // 2
    lh, lw = _fft_size(h + 2 * r), _fft_size(w + 2 * r)
    spec = _kernel_spectrum(float(radius), float(alias_blur), lh, lw).to(x.device)
    xp = pad(x, r, r, "reflect")
    blurred = torch.fft.irfft2(torch.fft.rfft2(xp, s=(lh, lw)).mul_(spec), s=(lh, lw))
    return blurred[..., r : r + h, r : r + w]


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


def shift_sum(x: torch.Tensor, dy: np.ndarray, dx: np.ndarray, w: np.ndarray,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over taps of ``w * x`` shifted by (dy, dx) with replicated borders (the reference ``shift``).

    Taps differ per image (one row of ``dy``, ``dx``, ``w`` per image); each image's taps are added in order
    (:func:`corruption_kernels.shift_sum`), so its result never depends on the rest of the batch. With
    ``out`` the sum is clipped to [0, 1] and written there (:func:`run_compiled`).
    """
    def run(src, dst):
        kernels.shift_sum(src, np.ascontiguousarray(dy, dtype=np.int64), np.ascontiguousarray(dx, dtype=np.int64),
                          np.ascontiguousarray(w, dtype=src.dtype), out is not None, dst)

    return run_compiled(x, out, run, tuple(x.shape), x.dtype)


def clipped_zoom_threshold(x: torch.Tensor, factor: float, threshold: float) -> torch.Tensor:
    """The reference ``clipped_zoom`` of planes (N, 1, H, W), then values at or below ``threshold`` set to 0 and
    the rest capped at 1 (snow's layer), in float64.

    ``clipped_zoom`` crops the centre to ceil(size / factor) and zooms it by ``factor``. SciPy's
    ``ndimage.zoom(order=1)`` maps output pixel o to input coordinate o (in - 1) / (out - 1), which is
    bilinear interpolation with aligned corners; the output has ``round(crop * factor)`` pixels per side (at
    least the input size) and is not trimmed here. One compiled pass (:func:`corruption_kernels.zoom_threshold`).
    """
    h, w = x.shape[-2:]
    ch, cw = int(np.ceil(h / float(factor))), int(np.ceil(w / float(factor)))
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[:, 0, top : top + ch, left : left + cw].detach().to("cpu", torch.float64).contiguous().numpy()
    oh, ow = int(round(ch * factor)), int(round(cw * factor))
    out = kernels.zoom_threshold(crop, oh, ow, float(threshold), np.empty((len(crop), oh, ow)))
    return torch.from_numpy(out)[:, None].to(x.device)


def zoom_blur_taps(height: int, width: int, factors: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference zoom blur, ``(x + sum_f clipped_zoom(x, f)[:H, :W]) / (len(factors) + 1)``, as sparse taps
    (``clipped_zoom``: see :func:`clipped_zoom_threshold`).

    Each zoom is bilinear: SciPy's ``zoom(order=1)`` maps output pixel o of the crop (ceil(n / f) pixels,
    centred) to input coordinate o * ((in - 1) / (out - 1)), out = round(in * f), in double precision. So every
    output pixel is a weighted sum of 4 pixels per factor plus itself. Returns (index, weight), each
    (H * W, 4 * len(factors) + 1): int32 positions in the flattened image and float32 weights, for
    :func:`gather_sum`. Tables up to 256 x 256 pixels are cached (about 20 MB per severity at 224 x 224).
    """
    if height * width <= 256 * 256:
        return _zoom_blur_taps_cached(height, width, factors)
    return _zoom_blur_taps(height, width, factors)


@lru_cache(maxsize=5)
def _zoom_blur_taps_cached(height: int, width: int, factors: tuple[float, ...]):
    return _zoom_blur_taps(height, width, factors)


def _zoom_blur_taps(height: int, width: int, factors: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    def axis(n: int) -> tuple[np.ndarray, np.ndarray]:
        """(F, 2, n) source indices and weights of the two interpolation taps along one axis."""
        index, weight = [], []
        for f in factors:
            crop = int(np.ceil(n / float(f)))
            start, out = (n - crop) // 2, int(round(crop * f))
            pos = np.arange(n) * ((crop - 1) / (out - 1) if out > 1 else 0.0)
            i0 = np.minimum(np.floor(pos), max(crop - 2, 0)).astype(np.int64)
            index.append([i0 + start, np.minimum(i0 + 1, crop - 1) + start])
            weight.append([1 - (pos - i0), pos - i0])
        return np.array(index), np.array(weight)

    (yi, yw), (xi, xw) = axis(height), axis(width)
    k = len(factors) * 4 + 1
    index = np.empty((k, height, width), dtype=np.int32)  # built tap-major (long inner loops), then transposed
    weight = np.empty((k, height, width), dtype=np.float32)
    index[0] = np.arange(height * width).reshape(height, width)
    weight[0] = 1.0
    # taps 1.. : factor f, row tap a, column tap b, as (F, 2, 2, H, W)
    index[1:] = (yi[:, :, None, :, None] * width + xi[:, None, :, None, :]).reshape(k - 1, height, width)
    weight[1:] = (yw[:, :, None, :, None] * xw[:, None, :, None, :]).reshape(k - 1, height, width)
    weight /= len(factors) + 1
    return (torch.from_numpy(np.ascontiguousarray(index.reshape(k, -1).T)),
            torch.from_numpy(np.ascontiguousarray(weight.reshape(k, -1).T)))


def gather_sum(x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Output pixel p of every image and channel = sum_k weight[p, k] * x[..., index[p, k]] (flattened H * W).

    The batch is laid out pixel-major, (H * W, N * C), so each tap reads one contiguous row of N * C values,
    and ``embedding_bag`` (a fused gather and weighted sum) applies all taps in one pass. The two transposes
    cost about as much as the gather; with N * C of about 100 the whole thing runs at 2-3 ns per output value.
    """
    n, c, h, w = x.shape
    table = x.reshape(n * c, h * w).t().contiguous()
    out = F.embedding_bag(index.to(x.device), table, per_sample_weights=weight.to(x.device, x.dtype), mode="sum")
    return out.t().contiguous().view(n, c, h, w)


def glass_shuffle(x: torch.Tensor, offsets: torch.Tensor | np.ndarray, delta: int,
                  to_8bit: bool = False) -> torch.Tensor:
    """The reference glass-blur pixel loop, exactly: ``x`` gathered through :func:`glass_source_map`.

    ``to_8bit`` also truncates the values to 8-bit levels (``floor(clip(255 v, 0, 255)) / 255``), in the
    same pass, as the reference stores its first blur as uint8.
    """
    n, c, h, w = x.shape
    off = offsets.cpu().numpy() if isinstance(offsets, torch.Tensor) else np.asarray(offsets)
    index = glass_source_map(off, h, w, delta)
    src = x.detach().cpu().reshape(n, c, h * w).contiguous().numpy()
    out = kernels.gather_planes(src, index, bool(to_8bit), np.empty_like(src))
    return torch.from_numpy(out).view(x.shape).to(x.device)


def glass_source_map(offsets: np.ndarray, height: int, width: int, delta: int) -> np.ndarray:
    """Where each pixel's value comes from after the reference glass-blur loop: (N, H * W) int64 indices.

    The reference visits interior pixels (h, w) from the bottom-right corner backwards (h from H - delta
    down to delta + 1, then w likewise) and runs ``x[h, w], x[h', w'] = x[h', w'], x[h, w]``. On an RGB
    array both sides are views, so this is not a swap: it copies x[h', w'] into x[h, w] and leaves x[h', w']
    as it was. Running that loop on the pixels' indices instead of their values gives a map such that the
    final image is ``x[map]``, one gather for all passes. The loop is sequential; it runs compiled, as the
    reference's own does (:func:`corruption_kernels.glass_map`).

    ``offsets``: (N, passes, nh, nw, 2) integers in [-delta, delta), rows and columns in visiting order,
    last axis (dx, dy) in the order the reference draws them.
    """
    n = offsets.shape[0]
    out = np.empty((n, height * width), dtype=np.int64)
    out[:] = np.arange(height * width)
    if height - 2 * delta <= 0 or width - 2 * delta <= 0:
        return out
    return kernels.glass_map(np.ascontiguousarray(offsets, dtype=np.int8), width, delta, out)


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


@lru_cache(maxsize=16)
def _pixel_centres(n: int) -> torch.Tensor:
    """grid_sample coordinates (align_corners=False) of the pixel centres 0..n-1: (2 i + 1) / n - 1."""
    return (torch.arange(n, dtype=torch.float64) * 2 + 1).div_(n).sub_(1).float()


def displace_reflect(x: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """SciPy ``map_coordinates(order=1, mode='reflect')`` at (y + dy, x + dx): bilinear, per image.

    ``dx``, ``dy``: (N, H, W) displacements in pixels. SciPy's 'reflect' mirrors about the pixel edges (-0.5
    and n - 0.5); ``grid_sample`` with ``padding_mode='reflection', align_corners=False`` does the same, then
    clamps to the border pixels, which is what the half-sample mirror gives for the interpolation neighbours.
    """
    n, _, h, w = x.shape
    grid = torch.empty(n, h, w, 2, dtype=x.dtype, device=x.device)
    torch.add(_pixel_centres(w).to(x.device), dx, alpha=2.0 / w, out=grid[..., 0])
    torch.add(_pixel_centres(h).to(x.device)[:, None], dy, alpha=2.0 / h, out=grid[..., 1])
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


# ----------------------------------------------------------------------------------------------------------------------
# Colour
# ----------------------------------------------------------------------------------------------------------------------

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as in OpenCV's RGB2GRAY and Pillow's convert("L")


def to_gray(x: torch.Tensor) -> torch.Tensor:
    """BT.601 luma of an (N, 3, H, W) batch, shape (N, 1, H, W)."""
    return (x[:, 0:1] * LUMA[0] + x[:, 1:2] * LUMA[1] + x[:, 2:3] * LUMA[2])


def hsv_value_shift(x: torch.Tensor, c: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """scikit-image rgb2hsv, V <- clip(V + c, 0, 1), hsv2rgb, in closed form, clipped to [0, 1].

    With hue and saturation fixed every channel is proportional to V, so the round trip scales the pixel
    by V'/V; a black pixel (V = 0, saturation 0 by scikit-image's convention) becomes grey V'. Written as
    x * r + (V' - V r) with r = V' / V: a black pixel gets r * 0 + V' without a branch (the offset is
    otherwise a float rounding of zero). One compiled pass (:func:`corruption_kernels.value_shift`).
    """
    return run_compiled(x, out, lambda src, dst: kernels.value_shift(src, np.float32(c), dst),
                        (x.shape[0], x.shape[1], -1))


def hsv_saturation_affine(x: torch.Tensor, mul: float, add: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """scikit-image rgb2hsv, S <- clip(S * mul + add, 0, 1), hsv2rgb on RGB, in closed form, clipped to [0, 1].

    For fixed hue and value each channel is v - S' * v * (v - x) / (v - min): the maximum stays, the rest
    move linearly with S. A grey pixel (v = min) has hue 0 (red) by scikit-image's convention, so it becomes
    (v, v (1 - S'), v (1 - S')) with S' = clip(add, 0, 1); the first formula gives v there (its (v - x) is
    0), so only ``add`` > 0 needs the red correction. One compiled pass
    (:func:`corruption_kernels.saturation_affine`).
    """
    grey_sat = np.float32(min(max(add, 0.0), 1.0))
    return run_compiled(x, out, lambda src, dst: kernels.saturation_affine(src, np.float32(mul), np.float32(add),
                                                                           grey_sat, dst),
                        (x.shape[0], 3, -1))


# ----------------------------------------------------------------------------------------------------------------------
# Random fields and textures
# ----------------------------------------------------------------------------------------------------------------------


def plasma_count(mapsize: int) -> int:
    """How many uniforms :func:`corruption_kernels.plasma_fractal` consumes per image."""
    total, step = 0, mapsize
    while step >= 2:
        total += 3 * (mapsize // step) ** 2
        step //= 2
    return total


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
