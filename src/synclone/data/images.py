"""Decode any image file into 8-bit grey or RGB pixels, plus the numbers that flag degenerate images.

Generated datasets are PNGs, but image folders from elsewhere hold every mode Pillow knows. Each one is
converted to 8-bit ``L`` or ``RGB`` the same documented way, so a scorer sees one kind of input:

=================  ==========================================================================================
source mode        conversion
=================  ==========================================================================================
``1``, ``L``       grey (``1`` becomes 0/255)
``I;16*``, ``I``   16-bit grey: value / 257, rounded (65535 -> 255). Pillow's own ``convert("L")`` clips
                   everything above 255 to white instead, which turns most 16-bit images into a white square.
16-bit RGB(A)      Pillow already reduces these to 8 bits per channel (the high byte) when it opens them.
``F``              32-bit float: values in [0, 1] are scaled by 255, larger ranges are clipped to [0, 255];
                   NaN pixels are counted (the image is flagged degenerate) and set to 0.
``LA``, ``RGBA``,  alpha-composited over a flat background (``alpha_background`` grey level, default 0 = black,
``P`` + alpha      the background of Fashion-MNIST-style data); grey stays grey, colour stays colour.
``P``              palette expanded to RGB.
``CMYK``           Pillow's conversion to RGB (R = 255 - min(255, C + K), etc.; embedded ICC profiles are not
                   applied).
others             Pillow's ``convert("RGB")`` (``YCbCr``, ``LAB``, ``HSV``, ...).
multi-frame        the first frame.
=================  ==========================================================================================

A file that Pillow cannot open or fully decode (missing, zero bytes, truncated, corrupt) gives a
:class:`Decoded` with ``error`` set instead of raising: curation drops it as "unreadable" and goes on.
"""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image

from synclone.errors import UserError

# The file suffixes read as images (lower case). Pillow reads more, but these are the ones image folders use.
# The one list of image suffixes every reader accepts (Pillow decodes all of them; a GIF is read as its first frame).
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"})

# Column order of the per-image pixel statistics (grey levels 0..255 after conversion, NaN share of the source).
STAT_NAMES = ("px_min", "px_max", "px_mean", "px_std", "px_nan")


@dataclass
class Decoded:
    """One decoded image: 8-bit ``L`` or ``RGB`` pixels, the source mode, pixel statistics, or an error."""

    image: Image.Image | None
    mode: str
    stats: np.ndarray  # float32 (5,), see STAT_NAMES; NaN when unreadable
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _unreadable(message: str, mode: str = "") -> Decoded:
    return Decoded(None, mode, np.full(len(STAT_NAMES), np.nan, dtype=np.float32), message)


def decode_image(data: bytes, alpha_background: int = 0) -> Decoded:
    """Decode image file bytes into 8-bit ``L`` or ``RGB`` (see the module table); never raises for bad files."""
    if not data:
        return _unreadable("empty file (0 bytes)")
    try:
        with Image.open(BytesIO(data)) as src:
            src.seek(0)
            src.load()  # decode now: a truncated file fails here, not later inside a scorer
            mode = src.mode
            image, nan_share = _to_8bit(src, alpha_background)
    except Exception as err:  # Pillow raises many types (OSError, SyntaxError, ValueError, DecompressionBomb...)
        return _unreadable(f"{type(err).__name__}: {err}".strip())
    arr = np.asarray(image, dtype=np.float32)
    stats = np.array([arr.min(), arr.max(), arr.mean(), arr.std(), nan_share], dtype=np.float32)
    return Decoded(image, mode, stats)


def _to_8bit(src: Image.Image, background: int) -> tuple[Image.Image, float]:
    """Convert ``src`` to 8-bit ``L`` or ``RGB``; return it with the share of NaN pixels in the source."""
    mode = src.mode
    if mode in ("L", "RGB"):
        return src.copy(), 0.0
    if mode == "1":
        return src.convert("L"), 0.0
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(src, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8), "L"), 0.0
    if mode == "F":
        a = np.asarray(src, dtype=np.float64)
        nan = ~np.isfinite(a)
        a = np.where(nan, 0.0, a)
        if a.size and a.max() <= 1.0 and a.min() >= 0.0:
            a = a * 255.0
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L"), float(nan.mean()) if a.size else 0.0
    if mode == "P":
        src = src.convert("RGBA") if "transparency" in src.info else src.convert("RGB")
        mode = src.mode
        if mode == "RGB":
            return src, 0.0
    if mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        grey = mode in ("LA", "La")
        rgba = src.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (background, background, background, 255))
        flat = Image.alpha_composite(base, rgba)
        return flat.convert("L" if grey else "RGB"), 0.0
    return src.convert("RGB"), 0.0


def read_and_decode(path: str, alpha_background: int = 0) -> tuple[bytes | None, Decoded]:
    """Read a file and decode it; a missing or unreadable file gives an error, not an exception."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        return None, _unreadable(f"{type(err).__name__}: {err.strerror or err}")
    return data, decode_image(data, alpha_background)


def to_channels(image: Image.Image, channels: int) -> Image.Image:
    """The image as ``L`` (channels 1, ITU-R 601-2 luma for RGB) or ``RGB`` (channels 3, grey replicated)."""
    if channels == 1:
        return image if image.mode == "L" else image.convert("L")
    if channels == 3:
        return image if image.mode == "RGB" else image.convert("RGB")
    raise ValueError(f"channels must be 1 or 3, got {channels}")


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name (hidden files skipped)."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))


def load_image(path: Path, size: tuple[int, int, int]) -> np.ndarray:
    """One image file as float32 (C, H, W) in [0, 1], converted to ``size``'s channels and resized to its H x W."""
    c, h, w = size
    try:
        with Image.open(path) as im:
            im = im.convert("L" if c == 1 else "RGB")
            if im.size != (w, h):
                im = im.resize((w, h), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except OSError as err:
        raise UserError(f"cannot read image '{path}': {err}") from None
    return arr[None] if c == 1 else arr.transpose(2, 0, 1)
