"""Training decodes (``synclone.data.decode``): both JPEG decoders read the same pixels, draft mode decodes a
large JPEG at a reduced scale never below the asked side, and a broken file is a BadImage naming it."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from synclone.data.decode import BadImage, decode_rgb, resize_center_crop


def _jpeg(w: int, h: int) -> bytes:
    rng = np.random.default_rng(0)
    a = np.clip(rng.normal(120, 30, (h, w, 3)) + np.linspace(0, 100, w)[None, :, None], 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_decoders_agree_and_draft_mode_keeps_the_asked_side():
    data = _jpeg(600, 440)
    a = np.asarray(decode_rgb(data, decoder="pillow"), dtype=np.int16)
    b = np.asarray(decode_rgb(data, decoder="torchvision"), dtype=np.int16)
    assert a.shape == b.shape == (440, 600, 3) and np.abs(a - b).max() <= 2  # two libjpeg-turbo builds
    small = decode_rgb(data, min_side=200)  # 1/2 scale (220 >= 200); 1/4 would be 110 < 200
    assert small.size == (300, 220)
    assert decode_rgb(data, min_side=300).size == (600, 440)  # less than 2x larger: full decode
    x = resize_center_crop(small, 64)
    y = resize_center_crop(decode_rgb(data), 64)
    assert x.shape == y.shape == (3, 64, 64) and (x.float() - y.float()).abs().mean() < 3  # same picture


@pytest.mark.parametrize("decoder", ["pillow", "torchvision"])
def test_broken_files_raise_bad_image_with_their_name(decoder):
    data = _jpeg(64, 48)
    for bad in (b"", data[: len(data) // 2], b"not an image"):
        with pytest.raises(BadImage, match="x.jpg"):
            decode_rgb(bad, decoder=decoder, name="x.jpg")
