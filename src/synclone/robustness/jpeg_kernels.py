"""JPEG compress-then-decompress in numba, bit for bit what Pillow's libjpeg-turbo gives, without the files.

``Image.save(buf, "JPEG", quality=q)`` then ``Image.open(buf)`` runs Pillow's defaults: baseline, 4:2:0 chroma
subsampling for RGB, the IJG tables scaled by quality, the accurate integer (islow) DCT both ways and fancy
(triangular) chroma upsampling. Huffman coding is lossless, so the round trip needs only the lossy steps:
colour conversion, downsampling, forward DCT, quantisation, inverse DCT, upsampling and colour conversion back.
:func:`jpeg_roundtrip` does those for a batch with the same fixed-point arithmetic as libjpeg-turbo's C code
(whose SIMD paths give the same results), edge padding and edge rules included.

The constants and the order of operations follow libjpeg-turbo (IJG code: Copyright (C) 1991-1998, Thomas G.
Lane, Guido Vollbeding; libjpeg-turbo modifications: D. R. Commander and others; used under the IJG licence,
see libjpeg-turbo's README.ijg). This file is an independent implementation of the same arithmetic; the
comments name the libjpeg-turbo source each step reproduces.

Blocks are processed many at a time: the DCT workspace is coefficient-major (64 rows, one column per block), so
each 1-D pass is a loop over blocks that the compiler vectorises. All arithmetic is wrapped to int32 (the
widths libjpeg uses) so the vectors hold 32-bit lanes. Kernels compile on first use and are cached on disk.
"""

from __future__ import annotations

import numpy as np

from synclone.errors import UserError

try:
    import numba
except ImportError:  # pragma: no cover - numba ships with the robust extra
    numba = None

__all__ = ["jpeg_roundtrip", "quant_table"]


def _compiled(fn):
    """``numba.njit`` with an on-disk cache, or a stand-in naming the missing package."""
    if numba is None:  # pragma: no cover

        def missing(*args, **kwargs):
            raise UserError("the JPEG kernels need numba: pip install numba (or 'synclone[robust]')")

        return missing
    return numba.njit(cache=True, nogil=True, error_model="numpy")(fn)


def _inline(fn):
    return fn if numba is None else numba.njit(inline="always", error_model="numpy")(fn)


_I = np.int32

# jcparam.c: the IJG base quantisation tables (JPEG spec, Annex K), natural (row-major) order.
STD_LUMINANCE = np.array(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    dtype=np.int64,
).ravel()
STD_CHROMINANCE = np.array(
    [
        [17, 18, 24, 47, 99, 99, 99, 99],
        [18, 21, 26, 66, 99, 99, 99, 99],
        [24, 26, 56, 99, 99, 99, 99, 99],
        [47, 66, 99, 99, 99, 99, 99, 99],
        [99, 99, 99, 99, 99, 99, 99, 99],
        [99, 99, 99, 99, 99, 99, 99, 99],
        [99, 99, 99, 99, 99, 99, 99, 99],
        [99, 99, 99, 99, 99, 99, 99, 99],
    ],
    dtype=np.int64,
).ravel()

# jccolor.c / jdcolor.c: colour conversion in 16-bit fixed point.
SCALEBITS = 16
ONE_HALF = 1 << (SCALEBITS - 1)
CBCR_OFFSET = 128 << SCALEBITS


def _fix(x: float) -> int:
    """jccolor.c's FIX(x): x in 16-bit fixed point, rounded."""
    return int(x * (1 << SCALEBITS) + 0.5)


Y_R, Y_G, Y_B = _fix(0.29900), _fix(0.58700), _fix(0.11400)
CB_R, CB_G, CB_B = -_fix(0.16874), -_fix(0.33126), _fix(0.50000)
CR_R, CR_G, CR_B = _fix(0.50000), -_fix(0.41869), -_fix(0.08131)
# rgb_ycc_start: B=>Cb and R=>Cr carry the offset and a rounding fudge of 0.5 - epsilon
CBCR_ROUND = CBCR_OFFSET + ONE_HALF - 1
# build_ycc_rgb_table: Cr=>R and Cb=>B rounded per entry, Cb=>G carries ONE_HALF
R_CR, B_CB = _fix(1.40200), _fix(1.77200)
G_CB, G_CR = -_fix(0.34414), -_fix(0.71414)

# jfdctint.c / jidctint.c: CONST_BITS 13, PASS1_BITS 2, FIX_* constants.
CONST_BITS = 13
PASS1_BITS = 2
F0298, F0390, F0541, F0765 = 2446, 3196, 4433, 6270
F0899, F1175, F1501, F1847 = 7373, 9633, 12299, 15137
F1961, F2053, F2562, F3072 = 16069, 16819, 20995, 25172
FDCT1_SHIFT = CONST_BITS - PASS1_BITS  # 11
FDCT2_SHIFT = CONST_BITS + PASS1_BITS  # 15
IDCT1_SHIFT = CONST_BITS - PASS1_BITS  # 11
IDCT2_SHIFT = CONST_BITS + PASS1_BITS + 3  # 18

CHUNK = 128  # blocks per pass over the DCT workspace: 64 x 128 int32 = 32 KiB, within L1
LANES = 32  # block counts are padded to this, so vector loops need no scalar remainder


def quant_table(base: np.ndarray, quality: int) -> np.ndarray:
    """jcparam.c: jpeg_quality_scaling, then jpeg_add_quant_table with force_baseline (entries clamped to 1..255).

    Pillow's ``quality=q`` calls ``jpeg_set_quality(cinfo, q, TRUE)``.
    """
    q = min(max(int(quality), 1), 100)
    scale = 5000 // q if q < 50 else 200 - 2 * q
    return np.clip((np.asarray(base, dtype=np.int64) * scale + 50) // 100, 1, 255)


def _divisors(table: np.ndarray) -> np.ndarray:
    """jcdctmgr.c: compute_reciprocal for divisor 8 q (the islow DCT's outputs are scaled by 8).

    Returns int32 (4, 64): reciprocal, correction (rounding), total right shift, and the table itself for
    dequantisation. quantize() computes ((|x| + correction) * reciprocal) >> shift, with x's sign put back.
    """
    out = np.empty((4, 64), dtype=np.int32)
    for i, qv in enumerate(np.asarray(table, dtype=np.int64)):
        divisor = int(qv) << 3
        b = divisor.bit_length() - 1  # flss(divisor) - 1
        r = 16 + b  # sizeof(DCTELEM) * 8 + b, DCTELEM being 16 bits in SIMD builds
        fq, fr = divmod(1 << r, divisor)
        c = divisor // 2
        if fr == 0:  # power of two
            fq >>= 1
            r -= 1
        elif fr <= divisor // 2:
            c += 1
        else:
            fq += 1
        out[:, i] = (fq, c, r, qv)
    return out


# ---------------------------------------------------------------------------------------------------------
# 1-D transforms. Each returns the outputs of one 8-point pass; every operation is cast to int32 so that the
# vectorised loops work on 32-bit lanes (libjpeg's JLONG products of 16-bit values fit in 32 bits).


@_inline
def _fdct_pass1(d0, d1, d2, d3, d4, d5, d6, d7):
    """jfdctint.c jpeg_fdct_islow, pass 1 (rows): outputs scaled up by 2^PASS1_BITS."""
    tmp0 = _I(d0 + d7)
    tmp7 = _I(d0 - d7)
    tmp1 = _I(d1 + d6)
    tmp6 = _I(d1 - d6)
    tmp2 = _I(d2 + d5)
    tmp5 = _I(d2 - d5)
    tmp3 = _I(d3 + d4)
    tmp4 = _I(d3 - d4)
    tmp10 = _I(tmp0 + tmp3)
    tmp13 = _I(tmp0 - tmp3)
    tmp11 = _I(tmp1 + tmp2)
    tmp12 = _I(tmp1 - tmp2)
    o0 = _I(_I(tmp10 + tmp11) << PASS1_BITS)
    o4 = _I(_I(tmp10 - tmp11) << PASS1_BITS)
    z1 = _I(_I(tmp12 + tmp13) * F0541)
    rnd = 1 << (FDCT1_SHIFT - 1)
    o2 = _I(_I(_I(z1 + _I(tmp13 * F0765)) + rnd) >> FDCT1_SHIFT)
    o6 = _I(_I(_I(z1 - _I(tmp12 * F1847)) + rnd) >> FDCT1_SHIFT)
    z1 = _I(tmp4 + tmp7)
    z2 = _I(tmp5 + tmp6)
    z3 = _I(tmp4 + tmp6)
    z4 = _I(tmp5 + tmp7)
    z5 = _I(_I(z3 + z4) * F1175)
    tmp4 = _I(tmp4 * F0298)
    tmp5 = _I(tmp5 * F2053)
    tmp6 = _I(tmp6 * F3072)
    tmp7 = _I(tmp7 * F1501)
    z1 = _I(z1 * -F0899)
    z2 = _I(z2 * -F2562)
    z3 = _I(_I(z3 * -F1961) + z5)
    z4 = _I(_I(z4 * -F0390) + z5)
    o7 = _I(_I(_I(_I(tmp4 + z1) + z3) + rnd) >> FDCT1_SHIFT)
    o5 = _I(_I(_I(_I(tmp5 + z2) + z4) + rnd) >> FDCT1_SHIFT)
    o3 = _I(_I(_I(_I(tmp6 + z2) + z3) + rnd) >> FDCT1_SHIFT)
    o1 = _I(_I(_I(_I(tmp7 + z1) + z4) + rnd) >> FDCT1_SHIFT)
    return o0, o1, o2, o3, o4, o5, o6, o7


@_inline
def _fdct_pass2(d0, d1, d2, d3, d4, d5, d6, d7):
    """jfdctint.c jpeg_fdct_islow, pass 2 (columns): removes PASS1_BITS, leaves the outputs scaled by 8."""
    tmp0 = _I(d0 + d7)
    tmp7 = _I(d0 - d7)
    tmp1 = _I(d1 + d6)
    tmp6 = _I(d1 - d6)
    tmp2 = _I(d2 + d5)
    tmp5 = _I(d2 - d5)
    tmp3 = _I(d3 + d4)
    tmp4 = _I(d3 - d4)
    tmp10 = _I(tmp0 + tmp3)
    tmp13 = _I(tmp0 - tmp3)
    tmp11 = _I(tmp1 + tmp2)
    tmp12 = _I(tmp1 - tmp2)
    rnd0 = 1 << (PASS1_BITS - 1)
    o0 = _I(_I(_I(tmp10 + tmp11) + rnd0) >> PASS1_BITS)
    o4 = _I(_I(_I(tmp10 - tmp11) + rnd0) >> PASS1_BITS)
    z1 = _I(_I(tmp12 + tmp13) * F0541)
    rnd = 1 << (FDCT2_SHIFT - 1)
    o2 = _I(_I(_I(z1 + _I(tmp13 * F0765)) + rnd) >> FDCT2_SHIFT)
    o6 = _I(_I(_I(z1 - _I(tmp12 * F1847)) + rnd) >> FDCT2_SHIFT)
    z1 = _I(tmp4 + tmp7)
    z2 = _I(tmp5 + tmp6)
    z3 = _I(tmp4 + tmp6)
    z4 = _I(tmp5 + tmp7)
    z5 = _I(_I(z3 + z4) * F1175)
    tmp4 = _I(tmp4 * F0298)
    tmp5 = _I(tmp5 * F2053)
    tmp6 = _I(tmp6 * F3072)
    tmp7 = _I(tmp7 * F1501)
    z1 = _I(z1 * -F0899)
    z2 = _I(z2 * -F2562)
    z3 = _I(_I(z3 * -F1961) + z5)
    z4 = _I(_I(z4 * -F0390) + z5)
    o7 = _I(_I(_I(_I(tmp4 + z1) + z3) + rnd) >> FDCT2_SHIFT)
    o5 = _I(_I(_I(_I(tmp5 + z2) + z4) + rnd) >> FDCT2_SHIFT)
    o3 = _I(_I(_I(_I(tmp6 + z2) + z3) + rnd) >> FDCT2_SHIFT)
    o1 = _I(_I(_I(_I(tmp7 + z1) + z4) + rnd) >> FDCT2_SHIFT)
    return o0, o1, o2, o3, o4, o5, o6, o7


@_inline
def _idct_pass(c0, c1, c2, c3, c4, c5, c6, c7, shift):
    """jidctint.c jpeg_idct_islow, one pass on dequantised inputs, descaled by ``shift``.

    Pass 1 (columns) descales by CONST_BITS - PASS1_BITS, pass 2 (rows) by CONST_BITS + PASS1_BITS + 3. The
    C code's shortcuts for all-zero AC terms give the same values as the general path, so there are none here.
    """
    # even part
    z1 = _I(_I(c2 + c6) * F0541)
    tmp2 = _I(z1 - _I(c6 * F1847))
    tmp3 = _I(z1 + _I(c2 * F0765))
    tmp0 = _I(_I(c0 + c4) << CONST_BITS)
    tmp1 = _I(_I(c0 - c4) << CONST_BITS)
    tmp10 = _I(tmp0 + tmp3)
    tmp13 = _I(tmp0 - tmp3)
    tmp11 = _I(tmp1 + tmp2)
    tmp12 = _I(tmp1 - tmp2)
    # odd part: tmp0..tmp3 are inputs 7, 5, 3, 1
    z1 = _I(c7 + c1)
    z2 = _I(c5 + c3)
    z3 = _I(c7 + c3)
    z4 = _I(c5 + c1)
    z5 = _I(_I(z3 + z4) * F1175)
    tmp0 = _I(c7 * F0298)
    tmp1 = _I(c5 * F2053)
    tmp2 = _I(c3 * F3072)
    tmp3 = _I(c1 * F1501)
    z1 = _I(z1 * -F0899)
    z2 = _I(z2 * -F2562)
    z3 = _I(_I(z3 * -F1961) + z5)
    z4 = _I(_I(z4 * -F0390) + z5)
    tmp0 = _I(tmp0 + _I(z1 + z3))
    tmp1 = _I(tmp1 + _I(z2 + z4))
    tmp2 = _I(tmp2 + _I(z2 + z3))
    tmp3 = _I(tmp3 + _I(z1 + z4))
    rnd = _I(1 << (shift - 1))
    o0 = _I(_I(_I(tmp10 + tmp3) + rnd) >> shift)
    o7 = _I(_I(_I(tmp10 - tmp3) + rnd) >> shift)
    o1 = _I(_I(_I(tmp11 + tmp2) + rnd) >> shift)
    o6 = _I(_I(_I(tmp11 - tmp2) + rnd) >> shift)
    o2 = _I(_I(_I(tmp12 + tmp1) + rnd) >> shift)
    o5 = _I(_I(_I(tmp12 - tmp1) + rnd) >> shift)
    o3 = _I(_I(_I(tmp13 + tmp0) + rnd) >> shift)
    o4 = _I(_I(_I(tmp13 - tmp0) + rnd) >> shift)
    return o0, o1, o2, o3, o4, o5, o6, o7


@_inline
def _qdq(x, recip, corr, shift, qval):
    """jcdctmgr.c quantize (the reciprocal form), then jidctint.c's DEQUANTIZE: the coefficient the decoder sees."""
    s = _I(x >> 31)  # 0 or -1
    a = _I(_I(x ^ s) - s)
    t = _I(_I(_I(a + corr) * recip) >> shift)
    return _I(_I(_I(t ^ s) - s) * qval)


@_inline
def _sample(v):
    """jidctint.c range limit after pass 2: the sample v + CENTERJSAMPLE clamped to 0..255."""
    v = _I(v + 128)
    return np.uint8(min(max(v, 0), 255))


@_compiled
def _code_blocks(plane, nblocks, tables, ws):
    """Forward DCT, quantise, dequantise and inverse DCT every 8x8 block of ``plane``, in place.

    plane: uint8 (8, >= nblocks * 8), strip-major: block b's row r is plane[r, 8 b : 8 b + 8]. tables: int32
    (4, 64) from :func:`_divisors`. ws: int32 (64 * CHUNK,) workspace, coefficient k of the chunk's block j at
    k * CHUNK + j. (One flat array with a constant stride lets the compiler see that the 64 rows never overlap.)
    """
    for b0 in range(0, nblocks, CHUNK):
        n = min(CHUNK, nblocks - b0)
        # jcdctmgr.c convsamp + jfdctint.c pass 1 (rows)
        for r in range(8):
            src = plane[r, b0 * 8 : (b0 + n) * 8]
            k = r * 8 * CHUNK
            for j in range(n):
                o = j * 8
                e = _fdct_pass1(
                    _I(_I(src[o]) - 128),
                    _I(_I(src[o + 1]) - 128),
                    _I(_I(src[o + 2]) - 128),
                    _I(_I(src[o + 3]) - 128),
                    _I(_I(src[o + 4]) - 128),
                    _I(_I(src[o + 5]) - 128),
                    _I(_I(src[o + 6]) - 128),
                    _I(_I(src[o + 7]) - 128),
                )
                ws[k + j] = e[0]
                ws[k + 1 * CHUNK + j] = e[1]
                ws[k + 2 * CHUNK + j] = e[2]
                ws[k + 3 * CHUNK + j] = e[3]
                ws[k + 4 * CHUNK + j] = e[4]
                ws[k + 5 * CHUNK + j] = e[5]
                ws[k + 6 * CHUNK + j] = e[6]
                ws[k + 7 * CHUNK + j] = e[7]
        # pass 2 (columns), quantise / dequantise, then jidctint.c pass 1 (columns), one column at a time
        for c in range(8):
            rc = tables[0, c::8]
            co = tables[1, c::8]
            sh = tables[2, c::8]
            qv = tables[3, c::8]
            rc0, rc1, rc2, rc3, rc4, rc5, rc6, rc7 = rc[0], rc[1], rc[2], rc[3], rc[4], rc[5], rc[6], rc[7]
            co0, co1, co2, co3, co4, co5, co6, co7 = co[0], co[1], co[2], co[3], co[4], co[5], co[6], co[7]
            sh0, sh1, sh2, sh3, sh4, sh5, sh6, sh7 = sh[0], sh[1], sh[2], sh[3], sh[4], sh[5], sh[6], sh[7]
            qv0, qv1, qv2, qv3, qv4, qv5, qv6, qv7 = qv[0], qv[1], qv[2], qv[3], qv[4], qv[5], qv[6], qv[7]
            k = c * CHUNK
            for j in range(n):
                f = _fdct_pass2(
                    ws[k + j],
                    ws[k + 8 * CHUNK + j],
                    ws[k + 16 * CHUNK + j],
                    ws[k + 24 * CHUNK + j],
                    ws[k + 32 * CHUNK + j],
                    ws[k + 40 * CHUNK + j],
                    ws[k + 48 * CHUNK + j],
                    ws[k + 56 * CHUNK + j],
                )
                w = _idct_pass(
                    _qdq(f[0], rc0, co0, sh0, qv0),
                    _qdq(f[1], rc1, co1, sh1, qv1),
                    _qdq(f[2], rc2, co2, sh2, qv2),
                    _qdq(f[3], rc3, co3, sh3, qv3),
                    _qdq(f[4], rc4, co4, sh4, qv4),
                    _qdq(f[5], rc5, co5, sh5, qv5),
                    _qdq(f[6], rc6, co6, sh6, qv6),
                    _qdq(f[7], rc7, co7, sh7, qv7),
                    IDCT1_SHIFT,
                )
                ws[k + j] = w[0]
                ws[k + 8 * CHUNK + j] = w[1]
                ws[k + 16 * CHUNK + j] = w[2]
                ws[k + 24 * CHUNK + j] = w[3]
                ws[k + 32 * CHUNK + j] = w[4]
                ws[k + 40 * CHUNK + j] = w[5]
                ws[k + 48 * CHUNK + j] = w[6]
                ws[k + 56 * CHUNK + j] = w[7]
        # jidctint.c pass 2 (rows) and range limit
        for r in range(8):
            dst = plane[r, b0 * 8 : (b0 + n) * 8]
            k = r * 8 * CHUNK
            for j in range(n):
                o = j * 8
                p = _idct_pass(
                    ws[k + j],
                    ws[k + CHUNK + j],
                    ws[k + 2 * CHUNK + j],
                    ws[k + 3 * CHUNK + j],
                    ws[k + 4 * CHUNK + j],
                    ws[k + 5 * CHUNK + j],
                    ws[k + 6 * CHUNK + j],
                    ws[k + 7 * CHUNK + j],
                    IDCT2_SHIFT,
                )
                dst[o] = _sample(p[0])
                dst[o + 1] = _sample(p[1])
                dst[o + 2] = _sample(p[2])
                dst[o + 3] = _sample(p[3])
                dst[o + 4] = _sample(p[4])
                dst[o + 5] = _sample(p[5])
                dst[o + 6] = _sample(p[6])
                dst[o + 7] = _sample(p[7])


@_compiled
def _luma_row(r, g, b, dst, w):
    """jccolext.c rgb_ycc_convert, Y only, then jcsample.c expand_right_edge to len(dst)."""
    for x in range(w):
        dst[x] = _I(_I(_I(_I(r[x]) * Y_R) + _I(_I(g[x]) * Y_G) + _I(_I(b[x]) * Y_B) + ONE_HALF) >> SCALEBITS)
    last = dst[w - 1]
    for x in range(w, dst.shape[0]):
        dst[x] = last


@_inline
def _cb(r, g, b):
    return _I(_I(_I(_I(r) * CB_R) + _I(_I(g) * CB_G) + _I(_I(b) * CB_B) + CBCR_ROUND) >> SCALEBITS)


@_inline
def _cr(r, g, b):
    return _I(_I(_I(_I(r) * CR_R) + _I(_I(g) * CR_G) + _I(_I(b) * CR_B) + CBCR_ROUND) >> SCALEBITS)


@_compiled
def _chroma_row(r0, g0, b0, r1, g1, b1, cb_dst, cr_dst, w):
    """jccolext.c rgb_ycc_convert (Cb, Cr) of two pixel rows, then jcsample.c h2v2_downsample.

    Pixels right of the image repeat its last column (expand_right_edge); the bias alternates 1, 2.
    """
    for j in range(w >> 1):
        x = 2 * j
        bias = 1 + (j & 1)
        cb = _cb(r0[x], g0[x], b0[x]) + _cb(r0[x + 1], g0[x + 1], b0[x + 1])
        cb += _cb(r1[x], g1[x], b1[x]) + _cb(r1[x + 1], g1[x + 1], b1[x + 1])
        cr = _cr(r0[x], g0[x], b0[x]) + _cr(r0[x + 1], g0[x + 1], b0[x + 1])
        cr += _cr(r1[x], g1[x], b1[x]) + _cr(r1[x + 1], g1[x + 1], b1[x + 1])
        cb_dst[j] = _I(_I(cb + bias) >> 2)
        cr_dst[j] = _I(_I(cr + bias) >> 2)
    for j in range(w >> 1, cb_dst.shape[0]):
        x0 = min(2 * j, w - 1)
        x1 = min(2 * j + 1, w - 1)
        bias = 1 + (j & 1)
        cb = _cb(r0[x0], g0[x0], b0[x0]) + _cb(r0[x1], g0[x1], b0[x1])
        cb += _cb(r1[x0], g1[x0], b1[x0]) + _cb(r1[x1], g1[x1], b1[x1])
        cr = _cr(r0[x0], g0[x0], b0[x0]) + _cr(r0[x1], g0[x1], b0[x1])
        cr += _cr(r1[x0], g1[x0], b1[x0]) + _cr(r1[x1], g1[x1], b1[x1])
        cb_dst[j] = _I(_I(cb + bias) >> 2)
        cr_dst[j] = _I(_I(cr + bias) >> 2)


@_compiled
def _upsample_row(near, far, wc, colsum, dst):
    """jdsample.c h2v2_fancy_upsample, one output row: 3/4 nearer input row + 1/4 farther, then the same
    across columns, with biases 8 and 7. Columns outside the image repeat the edge column's sum."""
    for j in range(wc):
        colsum[j + 1] = _I(_I(_I(near[j]) * 3) + _I(far[j]))
    colsum[0] = colsum[1]
    colsum[wc + 1] = colsum[wc]
    for j in range(wc):
        t = _I(colsum[j + 1] * 3)
        dst[2 * j] = _I(_I(_I(t + colsum[j]) + 8) >> 4)
        dst[2 * j + 1] = _I(_I(_I(t + colsum[j + 2]) + 7) >> 4)


@_compiled
def _rgb_row(yrow, cb, cr, r, g, b, w):
    """jdcolext.c ycc_rgb_convert with build_ycc_rgb_table's rounding, clamped to 0..255."""
    for x in range(w):
        y = _I(yrow[x])
        cbv = _I(_I(cb[x]) - 128)
        crv = _I(_I(cr[x]) - 128)
        rv = _I(y + _I(_I(_I(crv * R_CR) + ONE_HALF) >> SCALEBITS))
        gv = _I(y + _I(_I(_I(_I(cbv * G_CB) + ONE_HALF) + _I(crv * G_CR)) >> SCALEBITS))
        bv = _I(y + _I(_I(_I(cbv * B_CB) + ONE_HALF) >> SCALEBITS))
        r[x] = min(max(rv, 0), 255)
        g[x] = min(max(gv, 0), 255)
        b[x] = min(max(bv, 0), 255)


@_inline
def _round_up(n, m):
    return (n + m - 1) // m * m


@_compiled
def _roundtrip_rgb(pixels, out, lum, chrom):
    """RGB batch (N, 3, H, W) -> out: 4:2:0, MCU 16x16."""
    n, _, h, w = pixels.shape
    mx = (w + 15) >> 4
    my = (h + 15) >> 4
    wp = mx * 16  # luma plane width and height, padded to whole MCUs
    hp = my * 16
    wc = (w + 1) >> 1  # chroma component size (jdinput.c downsampled_width / height)
    hc = (h + 1) >> 1
    wcp = mx * 8
    hcp = my * 8
    nby = (hp >> 3) * (wp >> 3)
    nbc = my * mx
    ysm = np.zeros((8, _round_up(nby, LANES) * 8), np.uint8)
    cbsm = np.zeros((8, _round_up(nbc, LANES) * 8), np.uint8)
    crsm = np.zeros((8, _round_up(nbc, LANES) * 8), np.uint8)
    ws = np.empty(64 * CHUNK, np.int32)
    colsum = np.empty(wc + 2, np.int32)
    up_cb = np.empty(2 * wc, np.uint8)
    up_cr = np.empty(2 * wc, np.uint8)
    fancy = wc > 2  # jdsample.c: h2v2_fancy_upsample only for components wider than 2
    for i in range(n):
        rp, gp, bp = pixels[i, 0], pixels[i, 1], pixels[i, 2]
        # encoder: jcprepct.c pads rows by repeating the last one; jcsample.c pads columns
        for y in range(hp):
            ys = min(y, h - 1)
            o = (y >> 3) * wp
            _luma_row(rp[ys], gp[ys], bp[ys], ysm[y & 7, o : o + wp], w)
        for yc in range(hc):
            y0 = 2 * yc
            y1 = min(y0 + 1, h - 1)
            o = (yc >> 3) * wcp
            row = yc & 7
            _chroma_row(
                rp[y0], gp[y0], bp[y0], rp[y1], gp[y1], bp[y1], cbsm[row, o : o + wcp], crsm[row, o : o + wcp], w
            )
        # jcprepct.c: the downsampled rows below the image repeat the last one, to whole blocks
        src_o = ((hc - 1) >> 3) * wcp
        src_r = (hc - 1) & 7
        for yc in range(hc, hcp):
            o = (yc >> 3) * wcp
            cbsm[yc & 7, o : o + wcp] = cbsm[src_r, src_o : src_o + wcp]
            crsm[yc & 7, o : o + wcp] = crsm[src_r, src_o : src_o + wcp]
        _code_blocks(ysm, nby, lum, ws)
        _code_blocks(cbsm, nbc, chrom, ws)
        _code_blocks(crsm, nbc, chrom, ws)
        # decoder: jdmainct.c gives the upsampler the first / last chroma row again above / below the image
        ro, go, bo = out[i, 0], out[i, 1], out[i, 2]
        for y in range(h):
            o = (y >> 3) * wp
            yrow = ysm[y & 7, o : o + wp]
            yc = y >> 1
            oc = (yc >> 3) * wcp
            cb_near = cbsm[yc & 7, oc : oc + wcp]
            cr_near = crsm[yc & 7, oc : oc + wcp]
            if fancy:
                yf = max(yc - 1, 0) if (y & 1) == 0 else min(yc + 1, hc - 1)
                of = (yf >> 3) * wcp
                _upsample_row(cb_near, cbsm[yf & 7, of : of + wcp], wc, colsum, up_cb)
                _upsample_row(cr_near, crsm[yf & 7, of : of + wcp], wc, colsum, up_cr)
            else:  # jdsample.c h2v2_upsample: box
                for x in range(w):
                    up_cb[x] = cb_near[x >> 1]
                    up_cr[x] = cr_near[x >> 1]
            _rgb_row(yrow, up_cb, up_cr, ro[y], go[y], bo[y], w)
    return out


@_compiled
def _roundtrip_gray(pixels, out, lum):
    """Grayscale batch (N, 1, H, W) -> out: one component, 8x8 MCU, no colour conversion."""
    n, _, h, w = pixels.shape
    wp = _round_up(w, 8)
    hp = _round_up(h, 8)
    nb = (hp >> 3) * (wp >> 3)
    sm = np.zeros((8, _round_up(nb, LANES) * 8), np.uint8)
    ws = np.empty(64 * CHUNK, np.int32)
    for i in range(n):
        src = pixels[i, 0]
        for y in range(hp):
            o = (y >> 3) * wp
            row = sm[y & 7, o : o + wp]
            s = src[min(y, h - 1)]
            for x in range(w):
                row[x] = s[x]
            for x in range(w, wp):
                row[x] = s[w - 1]
        _code_blocks(sm, nb, lum, ws)
        dst = out[i, 0]
        for y in range(h):
            o = (y >> 3) * wp
            dst[y, :] = sm[y & 7, o : o + w]
    return out


def jpeg_roundtrip(pixels: np.ndarray, quality: int, out: np.ndarray | None = None) -> np.ndarray:
    """JPEG-compress and decompress a batch, bit for bit as Pillow's ``save(quality=q)`` then ``open``.

    pixels: uint8 (N, C, H, W) with C = 3 (RGB: YCbCr 4:2:0) or 1 (grayscale, Pillow mode "L"); any H, W >= 1.
    quality: 1..100 as Pillow takes it (IJG tables scaled by quality, baseline). out: optional uint8 array of
    the same shape to write into. Returns uint8 (N, C, H, W). Runs on the calling thread; numba releases the
    GIL, so batches can run on several threads at once.
    """
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim != 4 or pixels.shape[1] not in (1, 3):
        raise UserError(f"jpeg_roundtrip takes uint8 (N, C, H, W) with C = 1 or 3, got {pixels.dtype} {pixels.shape}")
    if min(pixels.shape[2:]) < 1:
        raise UserError(f"jpeg_roundtrip needs images of at least 1x1 pixels, got {pixels.shape}")
    if not 1 <= int(quality) <= 100:
        raise UserError(f"JPEG quality must be 1..100, got {quality}")
    if out is None:
        out = np.empty(pixels.shape, dtype=np.uint8)
    elif out.shape != pixels.shape or out.dtype != np.uint8:
        raise UserError(f"out must be uint8 {pixels.shape}, got {out.dtype} {out.shape}")
    if pixels.shape[0] == 0:
        return out
    pixels = np.ascontiguousarray(pixels)
    lum = _divisors(quant_table(STD_LUMINANCE, quality))
    if pixels.shape[1] == 1:
        return _roundtrip_gray(pixels, out, lum)
    return _roundtrip_rgb(pixels, out, lum, _divisors(quant_table(STD_CHROMINANCE, quality)))
