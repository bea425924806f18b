"""jpeg_roundtrip against Pillow: JPEG save then open, bit for bit, on photos, noise and awkward sizes.

The reference is Pillow's own round trip (``save(buf, "JPEG", quality=q)`` then ``Image.open``), which runs
libjpeg-turbo with Pillow's defaults. Every comparison is exact: no tolerance.
"""

from __future__ import annotations

import functools
import io

import numba  # noqa: F401  (the kernels under test are compiled with it)
import numpy as np
import pytest
import skimage.data as skd
from PIL import Image, features

from synclone.errors import UserError
from synclone.probes.corruptions.jpeg import (  # noqa: E402 - after the skips
    STD_CHROMINANCE,
    STD_LUMINANCE,
    jpeg_roundtrip,
    quant_table,
)

pytestmark = pytest.mark.skipif(
    not features.check_feature("libjpeg_turbo"), reason="the reference is Pillow built with libjpeg-turbo"
)

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
SIZES = [(224, 224), (64, 64), (28, 28), (37, 50), (1, 1), (9, 17)]  # (height, width)
CORRUPTION_QUALITIES = (25, 18, 15, 10, 7)
QUALITIES = (*CORRUPTION_QUALITIES, 50, 95)


def pillow_roundtrip(batch: np.ndarray, quality: int) -> np.ndarray:
    """Pillow's JPEG save and open, image by image, on (N, C, H, W) uint8 (C = 1: mode "L")."""
    out = np.empty_like(batch)
    for i, img in enumerate(batch):
        buf = io.BytesIO()
        Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)).save(buf, "JPEG", quality=quality)
        decoded = np.asarray(Image.open(io.BytesIO(buf.getvalue())))
        out[i] = decoded[None] if decoded.ndim == 2 else decoded.transpose(2, 0, 1)
    return out


def assert_same(got: np.ndarray, want: np.ndarray, what: str) -> None:
    diff = got.astype(np.int16) - want.astype(np.int16)
    assert got.shape == want.shape and got.dtype == np.uint8, what
    assert not diff.any(), f"{what}: {np.count_nonzero(diff)} values differ, max |diff| {np.abs(diff).max()}"


@functools.cache
def photos(height: int, width: int, mode: str = "RGB") -> np.ndarray:
    """The four skimage photos resized (Pillow bilinear) to height x width, as (4, C, H, W) uint8."""
    images = []
    for name in PHOTOS:
        img = Image.fromarray(getattr(skd, name)()).convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
        arr = np.asarray(img.convert(mode))
        images.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(images))


@pytest.mark.parametrize("quality", [1, 7, 25, 50, 95, 100])
def test_quant_tables_match_pillow(quality):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "JPEG", quality=quality)
    tables = Image.open(buf).quantization
    np.testing.assert_array_equal(quant_table(STD_LUMINANCE, quality), tables[0])
    np.testing.assert_array_equal(quant_table(STD_CHROMINANCE, quality), tables[1])


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize(("height", "width"), SIZES)
def test_photos_match_pillow(height, width, mode):
    batch = photos(height, width, mode)
    for quality in QUALITIES:
        assert_same(
            jpeg_roundtrip(batch, quality), pillow_roundtrip(batch, quality), f"{mode} {height}x{width} q{quality}"
        )


# Sizes around the MCU (16 for RGB, 8 for grayscale) and the upsampler's special cases (chroma 1-2 wide).
NOISE_SIZES = [(1, 2), (2, 3), (3, 5), (4, 4), (5, 4), (4, 5), (7, 6), (8, 8), (16, 16), (17, 9), (33, 31), (41, 48)]


@pytest.mark.parametrize("channels", [3, 1])
def test_noise_matches_pillow(channels):
    rng = np.random.default_rng(7)
    for height, width in NOISE_SIZES:
        uniform = rng.integers(0, 256, (1, channels, height, width), dtype=np.uint8)
        binary = (rng.integers(0, 2, (1, channels, height, width)) * 255).astype(np.uint8)
        for batch in (uniform, binary):
            for quality in (1, 7, 25, 75, 100):
                assert_same(
                    jpeg_roundtrip(batch, quality),
                    pillow_roundtrip(batch, quality),
                    f"noise C={channels} {height}x{width} q{quality}",
                )


def test_flat_and_saturated_colours_match_pillow():
    colours = [(0, 0, 0), (255, 255, 255), (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 0, 255), (0, 255, 255)]
    batch = np.empty((len(colours), 3, 21, 35), dtype=np.uint8)
    for i, colour in enumerate(colours):
        batch[i] = np.asarray(colour, dtype=np.uint8)[:, None, None]
    batch[:, :, 5:12, 9:20] = 255 - batch[:, :, 5:12, 9:20]  # a hard-edged patch in the complementary colour
    for quality in (1, 10, 90):
        assert_same(jpeg_roundtrip(batch, quality), pillow_roundtrip(batch, quality), f"colours q{quality}")


@pytest.mark.parametrize("channels", [3, 1])
def test_batch_independence(channels):
    rng = np.random.default_rng(3)
    mode = "RGB" if channels == 3 else "L"
    image = photos(37, 50, mode)[1:2]
    others = rng.integers(0, 256, (4, channels, 37, 50), dtype=np.uint8)
    alone = jpeg_roundtrip(image, 10)
    batch = np.concatenate([others[:2], image, others[2:]])
    in_batch = jpeg_roundtrip(batch, 10)
    assert_same(in_batch[2:3], alone, "same image in a batch of 5")
    assert_same(in_batch[[0, 1, 3, 4]], jpeg_roundtrip(others, 10), "the other four")
    assert_same(jpeg_roundtrip(image, 10), alone, "repeated call")


def test_out_views_and_in_place():
    hwc = np.ascontiguousarray(photos(28, 28)[:2].transpose(0, 2, 3, 1))
    view = hwc.transpose(0, 3, 1, 2)  # a non-contiguous (N, C, H, W) view
    want = pillow_roundtrip(np.ascontiguousarray(view), 18)
    assert_same(jpeg_roundtrip(view, 18), want, "non-contiguous input")
    out = np.zeros_like(want)
    assert jpeg_roundtrip(view, 18, out=out) is out
    assert_same(out, want, "out")
    out_hwc = np.zeros_like(hwc)
    jpeg_roundtrip(view, 18, out=out_hwc.transpose(0, 3, 1, 2))  # non-contiguous out
    assert_same(out_hwc.transpose(0, 3, 1, 2), want, "non-contiguous out")
    pixels = np.ascontiguousarray(view)
    assert jpeg_roundtrip(pixels, 18, out=pixels) is pixels
    assert_same(pixels, want, "in place")
    readonly = np.ascontiguousarray(view)
    readonly.flags.writeable = False
    assert_same(jpeg_roundtrip(readonly, np.int64(18)), want, "read-only input, numpy integer quality")


def test_empty_batch():
    assert jpeg_roundtrip(np.zeros((0, 3, 5, 5), np.uint8), 10).shape == (0, 3, 5, 5)


@pytest.mark.parametrize(
    ("pixels", "quality"),
    [
        (np.zeros((1, 3, 8, 8), np.float32), 10),
        (np.zeros((1, 2, 8, 8), np.uint8), 10),
        (np.zeros((3, 8, 8), np.uint8), 10),
        (np.zeros((1, 3, 0, 8), np.uint8), 10),
        (np.zeros((1, 3, 8, 8), np.uint8), 0),
        (np.zeros((1, 3, 8, 8), np.uint8), 101),
        (np.zeros((1, 3, 8, 8), np.uint8), 10.5),
        (np.zeros((1, 3, 8, 8), np.uint8), True),
    ],
)
def test_rejects_bad_input(pixels, quality):
    with pytest.raises(UserError):
        jpeg_roundtrip(pixels, quality)


def test_rejects_bad_out():
    pixels = np.zeros((1, 3, 8, 8), np.uint8)
    with pytest.raises(UserError):
        jpeg_roundtrip(pixels, 10, out=np.zeros((1, 3, 8, 9), np.uint8))
    with pytest.raises(UserError):
        jpeg_roundtrip(pixels, 10, out=np.zeros((1, 3, 8, 8), np.int16))
