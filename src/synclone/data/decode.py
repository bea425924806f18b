"""Fast decoding of training images: libjpeg-turbo through ``torchvision.io.decode_jpeg``, Pillow otherwise.

The training data path decodes every image of every epoch, so this is the hot loop of a big-folder run.
Two shortcuts matter for JPEGs (ImageNet and most generated clones saved as JPEG):

- ``torchvision.io.decode_jpeg`` decodes straight into a uint8 tensor, without Pillow's image object;
- when the image will only be resized down to a known shorter side (the fixed resize + centre crop of the
  ``simple`` preset), Pillow's *draft mode* asks libjpeg to decode at 1/2, 1/4 or 1/8 scale (the DCT
  does the downscaling), never below the requested size; the resize that follows is then much cheaper.

A file that cannot be decoded raises :class:`BadImage` (one line naming the file); the training loader
turns it into a skipped image, never a crash mid-epoch.
"""

from __future__ import annotations

import io
import math
from typing import Literal

import torch

Decoder = Literal["auto", "pillow", "torchvision"]
_JPEG_MAGIC = b"\xff\xd8\xff"


class BadImage(Exception):
    """An image file that cannot be read or decoded."""


def is_jpeg(data: bytes) -> bool:
    return data[:3] == _JPEG_MAGIC


def decode_rgb(data: bytes, *, decoder: Decoder = "auto", min_side: int | None = None, name: str = "image"):
    """The image in ``data`` as an RGB Pillow image (what timm's transforms take).

    ``min_side``: the caller will resize the shorter side down to this; a JPEG at least twice that size is
    then decoded at a reduced scale (draft mode) whose shorter side is still >= ``min_side``. ``decoder``:
    ``auto`` uses torchvision's libjpeg-turbo decoder for JPEGs read at full size and Pillow otherwise;
    ``pillow`` / ``torchvision`` force one (``torchvision`` falls back to Pillow for non-JPEG files).
    """
    from PIL import Image

    if not data:
        raise BadImage(f"{name}: empty file")
    jpeg = is_jpeg(data)
    draft = jpeg and min_side is not None and decoder != "torchvision"
    if jpeg and decoder != "pillow" and not draft:
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            t = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
            return Image.fromarray(t.permute(1, 2, 0).numpy())
        except RuntimeError as err:
            if decoder == "torchvision":
                raise BadImage(f"{name}: {err}") from None
            # fall through to Pillow, which reads some files libjpeg-turbo's strict mode refuses
    return _pillow_rgb(data, min_side if draft else None, name)


def _pillow_rgb(data: bytes, min_side: int | None, name: str):
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            if min_side is not None and im.format == "JPEG":
                w, h = im.size
                s = min_side / min(w, h)
                if s <= 0.5:
                    im.draft("RGB", (math.ceil(w * s), math.ceil(h * s)))
            im.seek(0)
            return im.convert("RGB")  # decodes now: a truncated file fails here
    except Exception as err:  # Pillow raises many types (OSError, SyntaxError, ValueError, DecompressionBomb...)
        raise BadImage(f"{name}: {type(err).__name__}: {err}") from None


def read_bytes(path: str) -> bytes:
    """A file's bytes; a missing or unreadable file raises :class:`BadImage`."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise BadImage(f"{path}: {err.strerror or err}") from None


def resize_center_crop(image, size: int, crop_pct: float = 0.875) -> torch.Tensor:
    """Shorter side to ``floor(size / crop_pct)`` (bilinear, antialiased), then the centre ``size`` x ``size``,
    as uint8 (3, H, W): the evaluation preprocessing of ``data.streaming.Preprocess`` (same pixels for the
    same decoded image)."""
    import torchvision.transforms.functional as TF

    image = TF.resize(image, math.floor(size / crop_pct), interpolation=TF.InterpolationMode.BILINEAR,
                      antialias=True)
    return TF.pil_to_tensor(TF.center_crop(image, [size, size]))
