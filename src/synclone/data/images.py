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

Every reader (in memory, streamed, curate, evaluate, probes, reference images) opens files through
:func:`read_image_bytes` / :func:`open_image`, which refuse what a ``metadata.jsonl`` row can point at but is no
image file: a device (``/dev/zero`` would be read forever), a FIFO (would block forever), a folder, a file over
:data:`MAX_IMAGE_BYTES`, and images over :data:`MAX_IMAGE_PIXELS` pixels (decompression bombs, checked from the
header before any pixel is decoded). Both limits can be raised with the environment variables
``SYNCLONE_MAX_IMAGE_BYTES`` / ``SYNCLONE_MAX_IMAGE_PIXELS``.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image

from synclone.errors import UserError

# The file suffixes read as images (lower case). Pillow reads more, but these are the ones image folders use.
# The one list of image suffixes every reader accepts (Pillow decodes all of them; a GIF is read as its first frame).
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"})

# Caps on one image file: bytes read and decoded pixels (width x height); a 10k x 10k photo fits, a bomb does not.
MAX_IMAGE_BYTES = int(os.environ.get("SYNCLONE_MAX_IMAGE_BYTES", 512 << 20))
MAX_IMAGE_PIXELS = int(os.environ.get("SYNCLONE_MAX_IMAGE_PIXELS", 100_000_000))


class UnreadableImage(UserError):
    """An image file that cannot be used (not a regular file, too large, corrupt); the message names it."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"cannot read image '{path}': {reason}")
        self.path, self.reason = str(path), reason


def read_image_bytes(path: str | Path) -> bytes:
    """The bytes of an image file; refuses non-regular files and files over :data:`MAX_IMAGE_BYTES`."""
    try:
        # O_NONBLOCK: opening a FIFO for reading must not wait for a writer; the check below then refuses it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as err:
        raise UnreadableImage(path, f"{type(err).__name__}: {err.strerror or err}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a folder" if stat.S_ISDIR(st.st_mode)
                    else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "a socket")
            raise UnreadableImage(path, f"it is {kind}, not a regular file")
        if st.st_size > MAX_IMAGE_BYTES:
            raise UnreadableImage(path, f"{st.st_size:,} bytes, over the {MAX_IMAGE_BYTES:,}-byte cap "
                                        "(SYNCLONE_MAX_IMAGE_BYTES)")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_IMAGE_BYTES + 1)
    except OSError as err:
        raise UnreadableImage(path, f"{type(err).__name__}: {err.strerror or err}") from None
    finally:
        os.close(fd)
    if len(data) > MAX_IMAGE_BYTES:  # grew while being read
        raise UnreadableImage(path, f"over the {MAX_IMAGE_BYTES:,}-byte cap (SYNCLONE_MAX_IMAGE_BYTES)")
    return data


def _open_checked(data: bytes) -> Image.Image:
    """Pillow image of ``data``, its first frame decoded; refuses bombs from the header, before decoding."""
    if not data:
        raise ValueError("empty file (0 bytes)")
    try:
        src = Image.open(BytesIO(data))
    except Image.DecompressionBombError as err:  # Pillow's own limit (far above ours) hit while reading the header
        raise ValueError(f"{str(err).split(',')[0]}: over the {MAX_IMAGE_PIXELS:,}-pixel cap (a decompression "
                         "bomb? SYNCLONE_MAX_IMAGE_PIXELS raises it)") from None
    w, h = src.size
    if w * h > MAX_IMAGE_PIXELS:
        src.close()
        raise ValueError(f"{w}x{h} pixels, over the {MAX_IMAGE_PIXELS:,}-pixel cap (a decompression bomb? "
                         "SYNCLONE_MAX_IMAGE_PIXELS raises it)")
    src.seek(0)
    src.load()  # decode now: a truncated file fails here, not later inside a scorer
    return src


def check_image_file(path: str | Path) -> str | None:
    """Why ``path`` cannot be used as an image (not a regular file, empty, too large, no image header, too many
    pixels), or None; reads only the header, so a streamed set can skip bad files before decoding starts."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as err:
        return f"{type(err).__name__}: {err.strerror or err}"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return "not a regular file (a device, FIFO, folder or socket)"
        if st.st_size == 0:
            return "empty file (0 bytes)"
        if st.st_size > MAX_IMAGE_BYTES:
            return f"{st.st_size:,} bytes, over the {MAX_IMAGE_BYTES:,}-byte cap (SYNCLONE_MAX_IMAGE_BYTES)"
        with os.fdopen(os.dup(fd), "rb") as f:
            try:
                with Image.open(f) as im:
                    w, h = im.size
            except Image.DecompressionBombError:
                return f"over the {MAX_IMAGE_PIXELS:,}-pixel cap (a decompression bomb?)"
            except Exception as err:  # noqa: BLE001 - Pillow raises many types for non-images
                return f"{type(err).__name__}: {err}"
        if w * h > MAX_IMAGE_PIXELS:
            return f"{w}x{h} pixels, over the {MAX_IMAGE_PIXELS:,}-pixel cap (a decompression bomb?)"
    except OSError as err:
        return f"{type(err).__name__}: {err.strerror or err}"
    finally:
        os.close(fd)
    return None


def open_image(path: str | Path) -> Image.Image:
    """The one way to open an image file: checked (see the module docstring), first frame decoded.

    Raises :class:`UnreadableImage` (a one-line ``UserError`` naming the file) for any file it cannot use.
    """
    data = read_image_bytes(path)
    try:
        return _open_checked(data)
    except Exception as err:  # Pillow raises many types (OSError, SyntaxError, ValueError, DecompressionBomb...)
        raise UnreadableImage(path, f"{type(err).__name__}: {err}".strip() if not isinstance(err, ValueError)
                              else str(err)) from None


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
        with _open_checked(data) as src:
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
        data = read_image_bytes(path)
    except UnreadableImage as err:
        return None, _unreadable(err.reason)
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
    with open_image(path) as im:
        im = im.convert("L" if c == 1 else "RGB")
        if im.size != (w, h):
            im = im.resize((w, h), Image.Resampling.BILINEAR)
        arr = np.asarray(im, dtype=np.float32) / 255.0
    return arr[None] if c == 1 else arr.transpose(2, 0, 1)
