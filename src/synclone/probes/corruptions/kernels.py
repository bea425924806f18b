"""Compiled (numba) loops of the corruption engine, where NumPy and torch would make many passes over memory.

Each kernel does in one pass what the array code it replaces did in several, with the same arithmetic, so
results are unchanged up to float rounding (and bit for bit for the random streams). They run on CPU NumPy
arrays; :mod:`corruption_ops` moves tensors to and from other devices. numba comes with the ``robust``
extra (``imagecorruptions-imaug`` needs it too); without it, calling a kernel says how to install it.
Kernels compile on first use and are cached on disk.
"""

from __future__ import annotations

import math

import numpy as np

from synclone.errors import UserError

try:
    import numba
except ImportError:  # pragma: no cover - numba ships with the robust extra
    numba = None


def _compiled(fn):
    """``numba.njit`` with an on-disk cache, or a stand-in naming the missing package (also jpeg_kernels')."""
    if numba is None:  # pragma: no cover

        def missing(*args, **kwargs):
            raise UserError("the corruption engine needs numba: pip install numba (or 'synclone[robust]')")

        return missing
    return numba.njit(cache=True, nogil=True, error_model="numpy")(fn)


def _inline(fn):
    """Inlined into the compiled caller (one optimised loop nest, no per-call array bookkeeping)."""
    return fn if numba is None else numba.njit(inline="always", error_model="numpy")(fn)


# SplitMix64 constants (S. Vigna, splitmix64.c): word j of the stream seeded s is mix(s + j * GAMMA).
GAMMA = np.uint64(0x9E3779B97F4A7C15)
MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)
S30, S27, S31, S32, S9, S41 = (np.uint64(v) for v in (30, 27, 31, 32, 9, 41))
LOW32 = np.uint64(0xFFFFFFFF)
F23 = np.float32(2.0**-23)


@_compiled
def splitmix64(keys, start, out):
    """Fill ``out`` (N, count) with words ``start + 1 .. start + count`` of the streams seeded by ``keys``."""
    for i in range(out.shape[0]):
        k, row = keys[i], out[i]
        for j in range(out.shape[1]):
            row[j] = _word(k, start + 1 + j)
    return out


@_compiled
def uniforms23(keys, start, out):
    """Uniforms on [0, 1) from the streams, two per word, straight into float32 ``out`` (N, 2 * words).

    Word j's low and high 32-bit halves b (the order of a little-endian uint32 view) give columns 2j and
    2j + 1: u = (b >> 9) 2^-23, exact in float32.
    """
    for i in range(out.shape[0]):
        k, row = keys[i], out[i]
        for j in range(out.shape[1] >> 1):
            x = _word(k, start + 1 + j)
            row[2 * j] = np.float32(np.int64((x & LOW32) >> S9)) * F23
            row[2 * j + 1] = np.float32(np.int64(x >> S41)) * F23
    return out


# Box-Muller in closed form, vectorisable: numba has no SIMD log, sin or cos (its LLVM lacks Intel's SVML), so
# they are written out as float32 polynomials here, accurate to a few float32 roundings (as NumPy's are).
_f = np.float32
LN2 = _f(0.6931471805599453)
SQRT2 = _f(1.4142135623730951)
QUARTER_STEP = _f(1.5707963267948966 / 2097152.0)  # (pi / 2) / 2^21
LOG_SERIES = tuple(_f(2.0 / k) for k in (1, 3, 5, 7, 9))  # ln g = 2 atanh t = sum 2 t^k / k
SIN_SERIES = tuple(_f((-1) ** k / math.factorial(2 * k + 1)) for k in range(7))
COS_SERIES = tuple(_f((-1) ** k / math.factorial(2 * k)) for k in range(7))
ONE, TWO, HALF, MINUS_TWO = _f(1), _f(2), _f(0.5), _f(-2)
POW2 = tuple(_f(2.0**k) for k in (16, 8, 4, 2, 1))
INV_POW2 = tuple(_f(2.0**-k) for k in (16, 8, 4, 2, 1))


@_inline
def _box_muller(word, scale):
    """Two independent N(0, scale^2) values from one 64-bit word, as float32.

    Radius from the low 32 bits (their top 23, k1): R = scale sqrt(-2 ln r) with r = (2^23 - k1) / 2^23 on
    (0, 1]. Angle from the high 32 bits (their top 23, k2): 2 pi k2 / 2^23. The largest |value| is 5.65 scale.
    """
    f = _f(np.int32(8388608 - np.int32((word & LOW32) >> S9)))  # 2^23 r: an integer in [1, 2^23], exact
    # ln f = e ln 2 + ln g with f = 2^e g, g in [0.707, 1.414) (centred on 1, so that ln r is accurate near
    # r = 1 too), read off the float's bits: the exponent, and the mantissa scaled to [1, 2) then maybe halved
    bits = f.view(np.int32)
    big = (bits & 0x7FFFFF) > 0x3504F3  # mantissa above sqrt 2
    e = _f((bits >> 23) - 127 + big)
    g = np.int32((bits & 0x7FFFFF) | (0x3F000000 if big else 0x3F800000)).view(np.float32)
    t = (g - ONE) / (g + ONE)  # ln g = 2 atanh t with |t| <= 0.172: the series to t^9 errs by 3e-10
    t2 = t * t
    c = LOG_SERIES
    ln_g = t * (c[0] + t2 * (c[1] + t2 * (c[2] + t2 * (c[3] + t2 * c[4]))))
    radius = scale * np.sqrt(MINUS_TWO * ((e - _f(23)) * LN2 + ln_g))
    k2 = np.int32(word >> S41)
    q = k2 >> 21  # quadrant of the angle
    p = _f(k2 & 0x1FFFFF) * QUARTER_STEP  # angle within the quadrant, [0, pi / 2)
    p2 = p * p  # Taylor series to p^13 (sine) and p^12 (cosine): the rest is below 1e-8 on [0, pi / 2)
    c = SIN_SERIES
    sin_p = p * (c[0] + p2 * (c[1] + p2 * (c[2] + p2 * (c[3] + p2 * (c[4] + p2 * (c[5] + p2 * c[6]))))))
    c = COS_SERIES
    cos_p = c[0] + p2 * (c[1] + p2 * (c[2] + p2 * (c[3] + p2 * (c[4] + p2 * (c[5] + p2 * c[6])))))
    a = sin_p if q & 1 else cos_p  # rotate by q quarter turns
    b = cos_p if q & 1 else sin_p
    cos_a = -a if (q + 1) & 2 else a
    sin_a = -b if q & 2 else b
    return radius * cos_a, radius * sin_a


@_inline
def _word(key, j):
    """Word j (from 1) of the SplitMix64 stream seeded ``key``."""
    x = key + np.uint64(j) * GAMMA
    x = (x ^ (x >> S30)) * MIX1
    x = (x ^ (x >> S27)) * MIX2
    return x ^ (x >> S31)


@_inline
def _unit_clip(v):
    return min(max(v, _f(0)), ONE)  # min and max vectorise; numba turns conditional expressions into branches


@_compiled
def add_normals(keys, start, x, scale, multiplicative, out):
    """``out = clip(x + z)`` (or ``clip(x + x z)``) with z ~ N(0, scale^2): x, out (N, size) float32.

    Word ``start + 1 + j`` of image i's stream gives the noise of values j and pairs + j, pairs = size // 2
    (:func:`_box_muller`'s cosine and sine parts); an odd size takes one more word for its last value.
    """
    size = x.shape[1]
    pairs = size >> 1
    for i in range(x.shape[0]):
        k, src, dst = keys[i], x[i], out[i]
        # the noise goes to out first, then is added in place: reading x in the drawing loop stops its
        # vectorisation (the compiler cannot rule out that x and out overlap)
        for j in range(pairs):
            dst[j], dst[pairs + j] = _box_muller(_word(k, start + 1 + j), scale)
        if size & 1:  # an odd count: the last value takes the cosine part of one more word
            dst[size - 1] = _box_muller(_word(k, start + 1 + pairs), scale)[0]
        if multiplicative:
            for v in range(size):
                dst[v] = _unit_clip(src[v] + src[v] * dst[v])
        else:
            for v in range(size):
                dst[v] = _unit_clip(src[v] + dst[v])
    return out


@_compiled
def impulse(keys, start, x, salt_below, flip_below, out):
    """Salt-and-pepper: value v's 32-bit uniform b (the halves of word ``start + 1 + v // 2``, low first) sets
    it to 1 when b < ``salt_below``, to 0 when ``salt_below`` <= b < ``flip_below``, else keeps x."""
    size = x.shape[1]
    for i in range(x.shape[0]):
        k, src, dst = keys[i], x[i], out[i]
        for j in range(size >> 1):
            w = _word(k, start + 1 + j)
            for v, b in ((2 * j, w & LOW32), (2 * j + 1, w >> S32)):
                dst[v] = ONE if b < salt_below else (_f(0) if b < flip_below else src[v])
        if size & 1:
            b = _word(k, start + 1 + (size >> 1)) & LOW32
            dst[size - 1] = ONE if b < salt_below else (_f(0) if b < flip_below else src[size - 1])
    return out


@_compiled
def poisson_on_grid(keys, start, x, c, grid, table, cdf, width, bucket_bits, out):
    """Shot noise ``clip(Poisson(c x) / c)`` for rates on the grid (c x = level * grid, level 0-255).

    Returns False, with ``out`` unfinished, when a rate is off the grid by more than 1e-4 grid steps or above
    255 steps (the caller then takes the general path). Value v's uniform is the 32-bit half of word
    ``start + 1 + v // 2`` (low first) and its draw is the table inversion of
    :func:`corruption_ops._poisson_table`. (A scalar loop: the table lookups miss the cache whatever the
    order, and vectorising does not pay.)
    """
    size = x.shape[1]
    shift = np.uint64(32 - bucket_bits)
    for i in range(x.shape[0]):
        k, src, dst = keys[i], x[i], out[i]
        w = np.uint64(0)
        for v in range(size):
            if v & 1 == 0:
                w = _word(k, start + 1 + (v >> 1))
            b = w >> S32 if v & 1 else w & LOW32
            ratio = (src[v] * c) / grid
            level = np.rint(ratio)
            if abs(ratio - level) > _f(1e-4) or level > _f(255):
                return False
            code = np.int64(level)
            entry = np.int64(table[(code << bucket_bits) | np.int64(b >> shift)])
            draw = entry & 255
            if entry > 255:  # a CDF step falls inside the bucket: compare u with the CDF
                u = np.float64(b) * 2.0**-32
                for _ in range(entry >> 8):
                    if cdf[code * width + draw] > u:
                        break
                    draw += 1
            dst[v] = min(_f(draw) / c, ONE)
    return True


@_compiled
def normals(keys, start, loc, scale, out):
    """N(loc, scale^2) draws into float32 ``out`` (N, size), laid out as in :func:`add_normals`."""
    size = out.shape[1]
    pairs = size >> 1
    for i in range(out.shape[0]):
        k, row = keys[i], out[i]
        for j in range(pairs):
            z1, z2 = _box_muller(_word(k, start + 1 + j), scale)
            row[j] = z1 + loc
            row[pairs + j] = z2 + loc
        if size & 1:
            row[size - 1] = _box_muller(_word(k, start + 1 + pairs), scale)[0] + loc
    return out


@_inline
def _sum_rows(rows, start, count, acc):
    """``acc = rows[start] + ... + rows[start + count - 1]``, whole rows at a time (vectorised)."""
    first = rows[start]
    for q in range(acc.shape[0]):
        acc[q] = first[q]
    for r in range(start + 1, start + count):
        src = rows[r]
        for q in range(acc.shape[0]):
            acc[q] += src[q]


@_compiled
def pixelate(x, row_start, row_len, col_start, col_len, row_src, col_src, out):
    """Box-average planes ``x`` (P, H, W) into blocks, then repeat the blocks back to (H, W) in ``out``.

    Block (a, b) averages rows ``row_start[a]`` .. + ``row_len[a]`` and columns ``col_start[b]`` .. +
    ``col_len[b]`` (sums of rows first, then of columns, then one division); output pixel (y, x) takes block
    (``row_src[y]``, ``col_src[x]``). The row sums are transposed so that the column sums, too, add whole
    rows (vectorised) instead of picking single values.
    """
    h2, w2, width = len(row_start), len(col_start), x.shape[2]
    rows = np.empty((h2, width), dtype=np.float32)
    rows_t = np.empty((width, h2), dtype=np.float32)
    small_t = np.empty((w2, h2), dtype=np.float32)
    expanded = np.empty(width, dtype=np.float32)
    for p in range(x.shape[0]):
        plane = x[p]
        for a in range(h2):
            _sum_rows(plane, row_start[a], row_len[a], rows[a])
        for a in range(h2):
            src = rows[a]
            for q in range(width):
                rows_t[q, a] = src[q]
        for b in range(w2):
            acc = small_t[b]
            _sum_rows(rows_t, col_start[b], col_len[b], acc)
            for a in range(h2):
                acc[a] /= _f(row_len[a] * col_len[b])
        done = -1  # the block row ``expanded`` holds
        for y in range(out.shape[1]):
            if row_src[y] != done:
                done = row_src[y]
                for q in range(width):
                    expanded[q] = small_t[col_src[q], done]
            dst = out[p, y]
            for q in range(width):
                dst[q] = expanded[q]
    return out


@_compiled
def shift_sum(x, dy, dx, weight, clip, out):
    """``out[n] = sum_t weight[n, t] * x[n]`` shifted by (dy, dx)[n, t], borders replicated: (N, C, H, W).

    Each plane is first padded by its largest shifts (replicated edges), so every tap reads a plain slice.
    Then one output row at a time (it stays in the L1 cache): the taps of nonzero weight, in order, are
    added four at a time ((a + b) + (c + d)), in the dtype of ``x`` and ``weight``. ``clip`` clips the
    sums to [0, 1]. Offsets are unsigned: with signed ones numba checks every index for wrap-around, which
    stops the vectorisation.
    """
    n_img, channels, height, width = x.shape
    row = np.empty(width, dtype=out.dtype)
    for n in range(n_img):
        live = np.flatnonzero(weight[n])
        if len(live) == 0:
            out[n] = 0
            continue
        ys, xs, ws = dy[n][live], dx[n][live], weight[n][live]
        py = min(np.abs(ys).max(), height - 1)
        px = min(np.abs(xs).max(), width - 1)
        padded = np.empty((height + 2 * py, width + 2 * px), dtype=x.dtype)
        rows = py - ys  # tap t of output row y reads padded row y + rows[t], columns from ucols[t]
        ucols = (px - xs).astype(np.uint64)  # unsigned: numba then skips its negative-index checks
        uwidth = np.uint64(width)
        for c in range(channels):
            for r in range(height + 2 * py):
                src = x[n, c, min(max(r - py, 0), height - 1)]
                for q in range(width + 2 * px):
                    padded[r, q] = src[min(max(q - px, 0), width - 1)]
            for y in range(height):
                for q in range(width):
                    row[q] = 0
                t = 0
                while t + 4 <= len(live):
                    a, b = padded[y + rows[t]], padded[y + rows[t + 1]]
                    cc, d = padded[y + rows[t + 2]], padded[y + rows[t + 3]]
                    oa, ob, oc, od = ucols[t], ucols[t + 1], ucols[t + 2], ucols[t + 3]
                    wa, wb, wc, wd = ws[t], ws[t + 1], ws[t + 2], ws[t + 3]
                    for q in range(uwidth):
                        row[q] += (wa * a[q + oa] + wb * b[q + ob]) + (wc * cc[q + oc] + wd * d[q + od])
                    t += 4
                while t < len(live):
                    a, oa, wa = padded[y + rows[t]], ucols[t], ws[t]
                    for q in range(uwidth):
                        row[q] += wa * a[q + oa]
                    t += 1
                if clip:
                    for q in range(width):
                        out[n, c, y, q] = min(max(row[q], 0), 1)
                else:
                    for q in range(width):
                        out[n, c, y, q] = row[q]
    return out


@_compiled
def correlate_separable(x, ky, rows, kx, cols, clip, out):
    """Correlate planes ``x`` (P, H, W) with ``ky`` down the columns, then ``kx`` along the rows, into ``out``.

    ``rows`` / ``cols``: the source index of each padded row / column (the border rule), lengths H + len(ky)
    - 1 and W + len(kx) - 1. Row by row: output row y is the vertical sum over padded rows y .. y +
    len(ky) - 1, then its horizontal sums, in the dtype of ``x``. Taps are added in order, four at a time
    after the first ((a + b) + (c + d)); offsets are unsigned so that numba need not check for negative
    indices (which would stop the vectorisation). ``clip`` clips the results to [0, 1].
    """
    planes, height, width = x.shape
    ny, nx = len(ky), len(kx)
    uwidth = np.uint64(width)
    line = np.empty(width + nx - 1, dtype=out.dtype)  # the vertical sums, padded for the horizontal pass
    acc = np.empty(width, dtype=out.dtype)
    for p in range(planes):
        for y in range(height):
            src, k = x[p, rows[y]], ky[0]
            for q in range(width):
                acc[q] = src[q] * k
            t = 1
            while t + 4 <= ny:
                a, b, c, d = x[p, rows[y + t]], x[p, rows[y + t + 1]], x[p, rows[y + t + 2]], x[p, rows[y + t + 3]]
                ka, kb, kc, kd = ky[t], ky[t + 1], ky[t + 2], ky[t + 3]
                for q in range(width):
                    acc[q] += (a[q] * ka + b[q] * kb) + (c[q] * kc + d[q] * kd)
                t += 4
            while t < ny:
                src, k = x[p, rows[y + t]], ky[t]
                for q in range(width):
                    acc[q] += src[q] * k
                t += 1
            for q in range(width + nx - 1):
                line[q] = acc[cols[q]]
            dst, k = out[p, y], kx[0]
            for q in range(width):
                dst[q] = line[q] * k
            t = 1
            while t + 4 <= nx:
                ka, kb, kc, kd = kx[t], kx[t + 1], kx[t + 2], kx[t + 3]
                oa, ob, oc, od = np.uint64(t), np.uint64(t + 1), np.uint64(t + 2), np.uint64(t + 3)
                for q in range(uwidth):
                    dst[q] += (line[q + oa] * ka + line[q + ob] * kb) + (line[q + oc] * kc + line[q + od] * kd)
                t += 4
            while t < nx:
                k, oa = kx[t], np.uint64(t)
                for q in range(uwidth):
                    dst[q] += line[q + oa] * k
                t += 1
            if clip:
                for q in range(width):
                    dst[q] = min(max(dst[q], 0), 1)
    return out


@_compiled
def gather_planes(x, index, to_8bit, out):
    """``out[n, c, i] = x[n, c, index[n, i]]`` for planes (N, C, H * W); ``to_8bit`` truncates to 8-bit levels."""
    for n in range(x.shape[0]):
        idx = index[n]
        for c in range(x.shape[1]):
            src, dst = x[n, c], out[n, c]
            if to_8bit:
                for i in range(len(idx)):
                    dst[i] = np.floor(min(max(src[idx[i]] * _f(255), _f(0)), _f(255))) / _f(255)
            else:
                for i in range(len(idx)):
                    dst[i] = src[idx[i]]
    return out


# Pointwise colour corruptions: one pass from the input to the clipped output. Images are (N, C, H * W).
TINY = np.float32(np.finfo(np.float32).tiny)  # smallest normal float32: keeps quotients finite without a mask


@_compiled
def contrast(x, means, c, out):
    """``clip((x - mean) c + mean)`` per image and channel, given the ``means`` (N, C)."""
    c32 = _f(c)
    for n in range(x.shape[0]):
        for ch in range(x.shape[1]):
            src, dst = x[n, ch], out[n, ch]
            offset = _f(means[n, ch] * (1 - c))
            for p in range(src.shape[0]):
                dst[p] = _unit_clip(src[p] * c32 + offset)
    return out


@_compiled
def value_shift(x, c, out):
    """scikit-image rgb2hsv, V <- clip(V + c, 0, 1), hsv2rgb, in closed form (see ``hsv_value_shift``)."""
    channels = x.shape[1]
    for n in range(x.shape[0]):
        v = x[n, 0].copy()
        for ch in range(1, channels):
            src = x[n, ch]
            for p in range(v.shape[0]):
                v[p] = max(v[p], src[p])
        for ch in range(channels):
            src, dst = x[n, ch], out[n, ch]
            for p in range(v.shape[0]):
                v2 = _unit_clip(v[p] + c)
                ratio = v2 / max(v[p], TINY)
                dst[p] = _unit_clip(src[p] * ratio + (v2 - v[p] * ratio))
    return out


@_compiled
def saturation_affine(x, mul, add, grey_sat, out):
    """scikit-image rgb2hsv, S <- clip(S mul + add, 0, 1), hsv2rgb on RGB (N, 3, H * W), in closed form (see
    ``hsv_saturation_affine``); ``grey_sat`` = clip(add, 0, 1) is the saturation grey pixels take, as red."""
    for n in range(x.shape[0]):
        r, g, b = x[n, 0], x[n, 1], x[n, 2]
        out_r, out_g, out_b = out[n, 0], out[n, 1], out[n, 2]
        for p in range(r.shape[0]):
            v, lo = max(r[p], max(g[p], b[p])), min(r[p], min(g[p], b[p]))
            delta = v - lo
            s2 = _unit_clip((delta / max(v, TINY)) * mul + add)
            k = (s2 * v) / max(delta, TINY)
            grey = v * grey_sat * _f(delta == 0)
            out_r[p] = _unit_clip(v - (v - r[p]) * k)
            out_g[p] = _unit_clip(v - (v - g[p]) * k - grey)
            out_b[p] = _unit_clip(v - (v - b[p]) * k - grey)
    return out


@_compiled
def blend_crop(x, c_img, texture, top, left, c_tex, out):
    """``clip(c_img x + c_tex crop)`` for one image (C, H, W): crop = ``texture`` (C, H', W') uint8 at (top, left)."""
    channels, height, width = x.shape
    for ch in range(channels):
        for y in range(height):
            src, tex, dst = x[ch, y], texture[ch, top + y], out[ch, y]
            for q in range(width):
                dst[q] = _unit_clip(src[q] * c_img + _f(tex[left + q]) * c_tex)
    return out


@_compiled
def plasma_fractal(u, mapsize, wibbledecay, out):
    """The reference's diamond-square ``plasma_fractal`` per image into ``out`` (N, mapsize, mapsize), unscaled.

    ``u``: (N, plasma_count(mapsize)) float32 uniforms, consumed in the reference's order: per step the square
    centres, then the two diamond sets, each row-major; each gives ``wibble * uniform(-wibble, wibble)``
    (``u (2 wibble^2) - wibble^2``) added to a quarter of its four neighbours' sum, neighbours wrapping around
    the map as the reference's ``np.roll`` does. float32 throughout (the reference adds in float64 and stores
    float32: a last-bit difference). The reference then maps the values to [0, 1]: :func:`fog_blend` does.
    The grid of known points is kept dense (k x k) and each step interleaves it with its three new point sets,
    so every loop runs over contiguous rows.
    """
    quarter = _f(0.25)
    for n in range(u.shape[0]):
        un = u[n]
        grid = np.zeros((1, 1), dtype=np.float32)
        used, k, wibble = 0, 1, 100.0
        while k < mapsize:
            spread, shift = _f(2 * wibble * wibble), _f(wibble * wibble)
            centre = np.empty((k, k), dtype=np.float32)  # square centres: grid[i, j] + half a step both ways
            across = np.empty((k, k), dtype=np.float32)  # diamonds half a step along the rows
            down = np.empty((k, k), dtype=np.float32)  # diamonds half a step down the columns
            for i in range(k):
                g0, g1, d, w = grid[i], grid[(i + 1) % k], centre[i], un[used + i * k : used + (i + 1) * k]
                for j in range(k - 1):
                    d[j] = (w[j] * spread - shift) + ((g0[j] + g1[j]) + (g0[j + 1] + g1[j + 1])) * quarter
                d[k - 1] = (w[k - 1] * spread - shift) + ((g0[k - 1] + g1[k - 1]) + (g0[0] + g1[0])) * quarter
            used += k * k
            for i in range(k):
                g0, d, up, o = grid[i], centre[i], centre[(i - 1) % k], across[i]
                w = un[used + i * k : used + (i + 1) * k]
                for j in range(k - 1):
                    o[j] = (w[j] * spread - shift) + ((d[j] + up[j]) + (g0[j] + g0[j + 1])) * quarter
                o[k - 1] = (w[k - 1] * spread - shift) + ((d[k - 1] + up[k - 1]) + (g0[k - 1] + g0[0])) * quarter
            used += k * k
            for i in range(k):
                g0, g1, d, o = grid[i], grid[(i + 1) % k], centre[i], down[i]
                w = un[used + i * k : used + (i + 1) * k]
                o[0] = (w[0] * spread - shift) + ((d[0] + d[k - 1]) + (g0[0] + g1[0])) * quarter
                for j in range(1, k):
                    o[j] = (w[j] * spread - shift) + ((d[j] + d[j - 1]) + (g0[j] + g1[j])) * quarter
            used += k * k
            finer = np.empty((2 * k, 2 * k), dtype=np.float32)
            for i in range(k):
                top, bottom = finer[2 * i], finer[2 * i + 1]
                g0, a, b, d = grid[i], across[i], down[i], centre[i]
                for j in range(k):
                    top[2 * j], top[2 * j + 1] = g0[j], a[j]
                    bottom[2 * j], bottom[2 * j + 1] = b[j], d[j]
            grid = finer
            k *= 2
            wibble /= wibbledecay
        out[n] = grid
    return out


@_compiled
def fog_blend(x, top, plasma, low, spread, strength, out):
    """``clip((x + strength * fog) * scale)`` per image (N, C, H, W), scale = top / (top + strength), ``top``
    the image's maximum, fog = (plasma - low) / spread, the plasma map scaled to [0, 1] by its minimum and
    range (as the reference's ``(m - min) / max(m - min)``)."""
    channels, height, width = x.shape[1:]
    fog = np.empty(width, dtype=np.float32)
    for n in range(x.shape[0]):
        scale = top[n] / (top[n] + strength)
        weight = scale * strength
        for y in range(height):
            src = plasma[n, y]
            for q in range(width):
                fog[q] = ((src[q] - low[n]) / spread[n]) * weight
            for c in range(channels):
                src, dst = x[n, c, y], out[n, c, y]
                for q in range(width):
                    dst[q] = _unit_clip(fog[q] + src[q] * scale)
    return out


@_compiled
def _column_prefix(src, rows, cols, prefix):
    """``prefix[r]``: the sum of the first r rows of the padded plane, down the columns, in float64.

    The padded plane is never built: its row r is ``src[rows[r]]`` at columns ``cols`` (the border rule), read
    directly in the middle, where ``cols`` is the identity shifted by the padding.
    """
    pad, width = (len(cols) - src.shape[1]) // 2, src.shape[1]
    for q in range(len(cols)):
        prefix[0, q] = 0.0
    for r in range(len(rows)):
        line, last, acc = src[rows[r]], prefix[r], prefix[r + 1]
        for q in range(pad):
            acc[q] = last[q] + line[cols[q]]
        for q in range(width):
            acc[pad + q] = last[pad + q] + line[q]
        for q in range(pad + width, len(cols)):
            acc[q] = last[q] + line[cols[q]]


@_compiled
def _column_runs(prefix, half_widths, value, inner):
    """``inner[y, x]``: ``value`` times the sum of the runs of column dx over rows y + R - w .. y + R + w of the
    summed image (w = ``half_widths[dx]``), at columns x + dx."""
    radius = len(half_widths) // 2
    for y in range(inner.shape[0]):
        for q in range(inner.shape[1]):
            inner[y, q] = 0.0
        for dx in range(2 * radius + 1):
            w = half_widths[dx]
            if w < 0:
                continue
            top, bottom = y + radius - w, y + radius + w + 1
            for q in range(inner.shape[1]):
                inner[y, q] += prefix[bottom, q + dx] - prefix[top, q + dx]
        for q in range(inner.shape[1]):
            inner[y, q] *= value


@_compiled
def _gaussian_valid(inner, g, line, clip, out):
    """The separable Gaussian ``g`` over ``inner``, valid part only (down the columns, then along the rows);
    ``clip`` clips to [0, 1]."""
    taps = len(g)
    for y in range(out.shape[0]):
        for q in range(inner.shape[1]):
            line[q] = inner[y, q] * g[0]
        for a in range(1, taps):
            k = g[a]
            for q in range(inner.shape[1]):
                line[q] += inner[y + a, q] * k
        for q in range(out.shape[1]):
            out[y, q] = line[q] * g[0]
        for b in range(1, taps):
            k = g[b]
            for q in range(out.shape[1]):
                out[y, q] += line[q + b] * k
        if clip:
            for q in range(out.shape[1]):
                out[y, q] = min(max(out[y, q], 0), 1)


@_compiled
def disk_blur(x, rows, cols, half_widths, value, g, clip, out):
    """A disk of runs, then a small separable Gaussian: ``out`` (P, H, W) from planes ``x`` (P, H, W).

    ``rows`` / ``cols``: the source row / column of each padded row / column (the border rule), padding p = R
    + len(g) // 2 on each side. The disk is symmetric, so its columns are runs: column dx (-R..R) covers rows
    -w..w (w = ``half_widths[dx + R]``, -1 for none), each with weight ``value``. A run's sum is a
    difference of two prefix sums down the columns. The Gaussian ``g`` then runs down the columns and along
    the rows of the disk sums. Accumulates in float64; ``clip`` clips the output to [0, 1].
    """
    planes, height, width = out.shape
    gr = len(g) // 2
    prefix = np.empty((len(rows) + 1, len(cols)))
    inner = np.empty((height + 2 * gr, width + 2 * gr))
    line = np.empty(width + 2 * gr)
    for p in range(planes):
        _column_prefix(x[p], rows, cols, prefix)
        _column_runs(prefix, half_widths, value, inner)
        _gaussian_valid(inner, g, line, clip, out[p])
    return out


LUMA = (np.float32(0.299), np.float32(0.587), np.float32(0.114))  # ITU-R BT.601, as corruption_ops.LUMA


@_compiled
def snow_blend(x, layer, blend, out):
    """Snow's last steps in one pass: ``clip(blend x + (1 - blend) max(x, 1.5 gray + 0.5) + flakes)``.

    ``layer`` (N, H', W') float64 is the blurred snow layer (H' >= H, W' >= W); it is rounded to 8 bits and
    cropped to (H, W), and the flakes are it plus its 180-degree rotation. gray is the BT.601 luma for RGB
    images (the value itself for one channel). float32 arithmetic in the reference's order.
    """
    n_img, channels, height, width = x.shape
    keep, brighten = _f(blend), _f(1 - blend)
    flakes, bright = np.empty(width, dtype=np.float32), np.empty(width, dtype=np.float32)
    for n in range(n_img):
        for y in range(height):
            top, bottom = layer[n, y], layer[n, height - 1 - y]
            for q in range(width):
                flakes[q] = _f(np.rint(top[q] * 255) / 255) + _f(np.rint(bottom[width - 1 - q] * 255) / 255)
            if channels == 3:
                r, g, b = x[n, 0, y], x[n, 1, y], x[n, 2, y]
                for q in range(width):
                    bright[q] = ((r[q] * LUMA[0] + g[q] * LUMA[1]) + b[q] * LUMA[2]) * _f(1.5) + _f(0.5)
            else:
                src = x[n, 0, y]
                for q in range(width):
                    bright[q] = src[q] * _f(1.5) + _f(0.5)
            for c in range(channels):
                src, dst = x[n, c, y], out[n, c, y]
                for q in range(width):
                    dst[q] = _unit_clip(max(src[q], bright[q]) * brighten + src[q] * keep + flakes[q])
    return out


@_compiled
def glass_map(off, width, delta, out):
    """The reference glass-blur loop run on pixel indices: ``out`` (N, H * W) starts as the identity map.

    ``off`` (N, passes, nh, nw, 2) int8: per visited pixel, in visiting order (rows from the bottom, columns
    from the right), the (dx, dy) offset of the pixel it copies from (see ``corruption_ops.glass_source_map``).
    """
    n, passes, nh, nw = off.shape[:4]
    for i in range(n):
        src = out[i]
        for it in range(passes):
            for a in range(nh):
                row = (nh + delta - a) * width  # h = H - delta - a
                for b in range(nw):
                    p = row + nw + delta - b  # w = W - delta - b
                    src[p] = src[p + off[i, it, a, b, 1] * width + off[i, it, a, b, 0]]
    return out


@_compiled
def to_levels(x, out):
    """8-bit levels of values in [0, 1]: ``floor(255 v + 0.5)`` (round half up, as Pillow converts), flat arrays."""
    for i in range(x.shape[0]):
        out[i] = np.uint8(np.int32(x[i] * _f(255) + _f(0.5)))
    return out


LEVEL_VALUES = np.arange(256, dtype=np.float32) / np.float32(255)  # level / 255 in float32, looked up: no division


@_compiled
def from_levels(levels, out):
    """Values in [0, 1] from 8-bit levels: ``level / 255``, flat arrays."""
    for i in range(levels.shape[0]):
        out[i] = LEVEL_VALUES[levels[i]]
    return out


@_compiled
def small_ints(keys, start, low, span, byte_shift, out):
    """Integers in [low, low + span) as int8 into ``out`` (N, size), straight from the streams.

    With ``byte_shift`` >= 0 (a span that is a power of two, up to 256) each value is one byte's top bits,
    ``byte >> byte_shift``, eight values per word (bytes in little-endian order); otherwise each takes a
    32-bit uniform u, two per word (low half first), as ``(u * span) >> 32``. The draws of
    ``ImageRNG.randint``.
    """
    size = out.shape[1]
    for i in range(out.shape[0]):
        k, row = keys[i], out[i]
        if byte_shift >= 0:
            shift = np.uint64(byte_shift)
            for j in range((size + 7) >> 3):
                w = _word(k, start + 1 + j)
                for b in range(min(8, size - 8 * j)):
                    byte = (w >> np.uint64(8 * b)) & np.uint64(255)
                    row[8 * j + b] = np.int8(np.int64(byte >> shift) + low)
        else:
            for j in range((size + 1) >> 1):
                w = _word(k, start + 1 + j)
                row[2 * j] = np.int8(np.int64(((w & LOW32) * np.uint64(span)) >> S32) + low)
                if 2 * j + 1 < size:
                    row[2 * j + 1] = np.int8(np.int64(((w >> S32) * np.uint64(span)) >> S32) + low)
    return out


@_compiled
def zoom_threshold(x, out_h, out_w, threshold, out):
    """Bilinear zoom of planes ``x`` (P, h, w) to (out_h, out_w) with aligned corners (SciPy's
    ``zoom(order=1)``: output pixel o samples input o (in - 1) / (out - 1)), then values at or below
    ``threshold`` set to 0 and the rest capped at 1, into ``out`` (P, out_h, out_w), in float64."""
    planes, h, w = x.shape
    sy = (h - 1) / (out_h - 1) if out_h > 1 else 0.0
    sx = (w - 1) / (out_w - 1) if out_w > 1 else 0.0
    j0 = np.empty(out_w, dtype=np.int64)
    j1 = np.empty(out_w, dtype=np.int64)
    fx = np.empty(out_w)
    for q in range(out_w):
        c = q * sx
        j0[q] = min(int(np.floor(c)), w - 1)
        j1[q] = min(j0[q] + 1, w - 1)
        fx[q] = c - j0[q]
    for p in range(planes):
        for o in range(out_h):
            c = o * sy
            i0 = min(int(np.floor(c)), h - 1)
            i1 = min(i0 + 1, h - 1)
            fy = c - i0
            top, bottom, dst = x[p, i0], x[p, i1], out[p, o]
            for q in range(out_w):
                a = top[j0[q]] + (top[j1[q]] - top[j0[q]]) * fx[q]
                b = bottom[j0[q]] + (bottom[j1[q]] - bottom[j0[q]]) * fx[q]
                v = a + (b - a) * fy
                dst[q] = min(v, 1.0) if v > threshold else 0.0
    return out
