"""Fast decoding of training images: Pillow (libjpeg-turbo) with JPEG draft mode, or ``torchvision.io.decode_jpeg``.

The training data path decodes every image of every epoch, so this is the hot loop of a big-folder run.
timm's transforms take Pillow images, so Pillow decodes by default: on 500x375 quality-90 JPEGs it decoded
+ resized ~11% more images per CPU-second here than ``torchvision.io.decode_jpeg`` followed by the copy into
a Pillow image (``bench/bench_dataloader.py``; both are libjpeg-turbo). ``decoder: torchvision`` picks the
latter (a different libjpeg-turbo build; worth it where Pillow's is slow). When the image will only be
resized down to a known shorter side (the fixed resize + centre crop of the ``simple`` preset), Pillow's
*draft mode* asks libjpeg to decode at 1/2, 1/4 or 1/8 scale (the DCT does the downscaling), never below
the requested size; the resize that follows is then much cheaper (generated 512x512 images read at 224).

A file that cannot be decoded raises :class:`BadImage` (one line naming the file); the training loader
turns it into a skipped image, never a crash mid-epoch.
"""

from __future__ import annotations

import io
import math
from typing import Literal

import torch

from synclone.data.images import MAX_IMAGE_PIXELS, UnreadableImage, read_image_bytes

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
    ``auto`` and ``pillow`` decode with Pillow; ``torchvision`` decodes JPEGs with ``decode_jpeg`` (no draft
    mode) and everything else with Pillow.
    """
    from PIL import Image

    if not data:
        raise BadImage(f"{name}: empty file")
    if decoder == "torchvision" and is_jpeg(data):
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            t = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError as err:
            raise BadImage(f"{name}: {err}") from None
        return Image.fromarray(t.permute(1, 2, 0).numpy())
    return _pillow_rgb(data, min_side, name)


def _pillow_rgb(data: bytes, min_side: int | None, name: str):
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.size[0] * im.size[1] > MAX_IMAGE_PIXELS:  # a decompression bomb, refused from its header
                raise ValueError(f"{im.size[0]}x{im.size[1]} pixels, over the {MAX_IMAGE_PIXELS:,}-pixel cap "
                                 "(SYNCLONE_MAX_IMAGE_PIXELS)")
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
    """A file's bytes through the one opener's checks (a regular file under the byte cap); a missing or unusable
    file raises :class:`BadImage`."""
    try:
        return read_image_bytes(path)
    except UnreadableImage as err:
        raise BadImage(f"{path}: {err.reason}") from None


def resize_center_crop(image, size: int, crop_pct: float = 0.875) -> torch.Tensor:
    """Shorter side to ``floor(size / crop_pct)`` (bilinear, antialiased), then the centre ``size`` x ``size``,
    as uint8 (3, H, W): the evaluation preprocessing of ``data.streaming.Preprocess`` (same pixels for the
    same decoded image)."""
    import torchvision.transforms.functional as TF

    image = TF.resize(image, math.floor(size / crop_pct), interpolation=TF.InterpolationMode.BILINEAR,
                      antialias=True)
    return TF.pil_to_tensor(TF.center_crop(image, [size, size]))
