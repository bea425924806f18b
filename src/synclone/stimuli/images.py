"""Array helpers the probe builders share: foreground masks, natural textures, tiling, reading and writing images.

Images are float arrays in [0, 1] shaped (H, W, C) with C = 1 (grey) or 3 (RGB); a batch is
(N, H, W, C). Masks are boolean (H, W), True on the foreground.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from synclone.data.images import list_images, open_image
from synclone.errors import UserError

# Natural textures scikit-image ships inside its wheel (no download): grey 512 x 512 photographs.
SKIMAGE_TEXTURES = ("brick", "grass", "gravel")


def as_image_batch(images, name: str = "images") -> np.ndarray:
    """(N, H, W) or (N, H, W, C) uint8 / float images -> float64 (N, H, W, C) in [0, 1]."""
    arr = np.asarray(images.detach().cpu().numpy() if hasattr(images, "detach") else images)
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise UserError(f"{name} must be (N, H, W) or (N, H, W, C) with C = 1 or 3, got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    arr = arr.astype(np.float64)
    if arr.size and (arr.min() < 0 or arr.max() > 1):
        raise UserError(f"{name} must be uint8 or floats in [0, 1], got values in [{arr.min():.3g}, {arr.max():.3g}]")
    return arr


def check_masks(masks, images: np.ndarray, names: Sequence[str] | None = None) -> np.ndarray:
    """Masks as bool (N, H, W) matching ``images``; a mask of another size stops naming its image."""
    items = list(masks)
    if len(items) != len(images):
        raise UserError(f"{len(items)} masks for {len(images)} images: give one mask per image")
    out = np.zeros(images.shape[:3], dtype=bool)
    for i, m in enumerate(items):
        m = np.asarray(m)
        if m.ndim == 3 and m.shape[-1] == 1:
            m = m[..., 0]
        if m.shape != images.shape[1:3]:
            what = f"'{names[i]}'" if names is not None else f"image {i}"
            raise UserError(f"mask of {what} is {m.shape[0]}x{m.shape[1]} but the image is "
                            f"{images.shape[1]}x{images.shape[2]}; masks must have their image's size")
        out[i] = m > (0.5 if m.dtype.kind == "f" else 0)
    empty = np.flatnonzero(~out.reshape(len(out), -1).any(axis=1))
    if empty.size:
        what = f"'{names[empty[0]]}'" if names is not None else f"image {int(empty[0])}"
        raise UserError(f"the mask of {what} is empty ({empty.size} empty in all): every image needs a foreground")
    return out


def masks_from_threshold(images, threshold: float = 0.05, fill_holes: bool = True) -> np.ndarray:
    """Foreground masks of objects on a dark background (e.g. Fashion-MNIST): pixels brighter than ``threshold``.

    ``fill_holes`` closes holes inside the silhouette (dark prints on a garment are still garment).
    """
    from scipy.ndimage import binary_fill_holes

    imgs = as_image_batch(images)
    masks = imgs.max(axis=-1) > threshold
    if fill_holes:
        masks = np.stack([binary_fill_holes(m) for m in masks])
    return masks


def bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1), half-open, of the True pixels of ``mask``."""
    ys, xs = np.nonzero(mask)
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def natural_textures(names: Sequence[str] = SKIMAGE_TEXTURES) -> list[np.ndarray]:
    """scikit-image's bundled texture photographs as float (H, W, 1) arrays in [0, 1]."""
    import skimage.data

    out = []
    for name in names:
        loader = getattr(skimage.data, name, None)
        if loader is None:
            raise UserError(f"scikit-image has no bundled image '{name}'; use one of {SKIMAGE_TEXTURES}")
        out.append(as_image_batch(loader()[None])[0])
    return out


def match_channels(img: np.ndarray, channels: int) -> np.ndarray:
    """(H, W, C) -> (H, W, channels): grey is repeated into RGB, RGB is averaged (ITU-R 601 luma) into grey."""
    if img.shape[-1] == channels:
        return img
    if channels == 3:
        return np.repeat(img, 3, axis=-1)
    return (img @ np.array([0.299, 0.587, 0.114]))[..., None]


def random_crop_resized(texture: np.ndarray, size: tuple[int, int], rng: np.random.Generator,
                        scale: float = 0.25) -> np.ndarray:
    """A random square window (``scale`` of the texture's shorter side) resized to ``size`` (H, W), random flips."""
    from skimage.transform import resize

    h, w = texture.shape[:2]
    side = max(2, int(round(min(h, w) * scale)))
    y = int(rng.integers(0, h - side + 1))
    x = int(rng.integers(0, w - side + 1))
    win = texture[y:y + side, x:x + side]
    if rng.random() < 0.5:
        win = win[:, ::-1]
    if rng.random() < 0.5:
        win = win[::-1]
    return np.clip(resize(win, size + (win.shape[-1],), anti_aliasing=True, order=1), 0.0, 1.0)


def mirror_tile(patch: np.ndarray, size: tuple[int, int], offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Fill ``size`` (H, W) with ``patch`` and its mirror images (no seams), starting at ``offset`` in the tiling."""
    block = np.concatenate([np.concatenate([patch, patch[:, ::-1]], axis=1),
                            np.concatenate([patch[::-1], patch[::-1, ::-1]], axis=1)], axis=0)
    bh, bw = block.shape[:2]
    oy, ox = offset[0] % bh, offset[1] % bw
    reps = ((size[0] + oy) // bh + 1, (size[1] + ox) // bw + 1) + (1,) * (block.ndim - 2)
    return np.tile(block, reps)[oy:oy + size[0], ox:ox + size[1]]


def largest_inner_square(mask: np.ndarray) -> tuple[int, int, int]:
    """(y, x, side) of the largest odd-sided square lying entirely inside the True pixels of ``mask``."""
    from scipy.ndimage import distance_transform_cdt

    # Chessboard distance d to the nearest outside pixel = a (2d - 1)-wide square centred there fits.
    dist = distance_transform_cdt(np.pad(mask, 1), metric="chessboard")[1:-1, 1:-1]
    cy, cx = np.unravel_index(int(dist.argmax()), dist.shape)
    d = int(dist[cy, cx])
    return int(cy) - d + 1, int(cx) - d + 1, max(2 * d - 1, 0)


def save_image(img: np.ndarray, path: Path) -> None:
    """Write a float (H, W, C) image in [0, 1] as an 8-bit PNG (grey for C = 1)."""
    from PIL import Image

    arr = np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(path)


def read_masked_folder(images_dir: str | Path, masks_dir: str | Path, channels: int = 3):
    """Images ``<images_dir>/<class>/<name>`` with masks ``<masks_dir>/<class>/<name stem>.<any image suffix>``.

    Returns (images (N, H, W, C) float, masks (N, H, W) bool, labels (N,), class names, file names).
    Class indices follow the sorted class folder names. A missing mask or one of another size than
    its image stops with a :class:`UserError` naming the file.
    """

    images_dir, masks_dir = Path(images_dir), Path(masks_dir)
    for d in (images_dir, masks_dir):
        if not d.is_dir():
            raise UserError(f"folder '{d}' does not exist")
    classes = sorted(p.name for p in images_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"'{images_dir}' has no class sub-folders (expected <images_dir>/<class>/<image>)")
    imgs, masks, labels, names = [], [], [], []
    size = None
    for label, cls in enumerate(classes):
        for path in list_images(images_dir / cls):
            cands = [p for p in (masks_dir / cls).glob(path.stem + ".*") if p.suffix.lower() in (".png", ".bmp", ".tif",
                                                                                                  ".tiff", ".npy")]
            if not cands:
                raise UserError(f"no mask for image '{path}': expected '{masks_dir / cls / (path.stem + '.png')}'")
            mpath = sorted(cands)[0]
            with open_image(path) as im:
                img = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.float64) / 255.0
            if mpath.suffix == ".npy":
                mask = np.load(mpath)
            else:
                with open_image(mpath) as mm:
                    mask = np.asarray(mm.convert("L"))
            if mask.shape[:2] != img.shape[:2]:
                raise UserError(f"mask '{mpath}' is {mask.shape[0]}x{mask.shape[1]} but its image '{path}' is "
                                f"{img.shape[0]}x{img.shape[1]}; masks must have their image's size")
            if size is None:
                size = img.shape[:2]
            elif img.shape[:2] != size:
                raise UserError(f"image '{path}' is {img.shape[0]}x{img.shape[1]}, the others {size[0]}x{size[1]}; "
                                "resize the images to one size first")
            imgs.append(img if img.ndim == 3 else img[..., None])
            masks.append(mask > 0)
            labels.append(label)
            names.append(str(path.relative_to(images_dir)))
    if not imgs:
        raise UserError(f"'{images_dir}' has no images")
    return np.stack(imgs), np.stack(masks), np.array(labels), classes, names
