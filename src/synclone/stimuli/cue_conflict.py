"""Build cue-conflict stimuli: the silhouette of one class filled with the texture of another.

Geirhos et al. (ICLR 2019) made their cue-conflict images by style transfer; for small domains a
filled silhouette carries the same conflict with no extra model: the shape image's foreground mask is
filled with a texture patch tiled from an image of another class (the largest square that lies wholly
inside that image's own mask, mirror-tiled so it has no seams; or the whole texture image when it has
no mask), and the rest is set to a flat ``background`` value (0 = black, Fashion-MNIST's background).

Output follows model-vs-human's cue-conflict layout, so the ``shape_bias`` probe (``folder:``) reads it
directly:
``<out>/<shape slug>/<shape slug><i>-<texture slug><j>.png`` (i, j: indices of the source images),
plus ``<out>/metadata.csv`` (file, shape, texture, their labels and sources) and ``<out>/probe.json``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from synclone.errors import UserError
from synclone.labels import LabelSpace
from synclone.stimuli.images import (
    as_image_batch,
    bbox,
    check_masks,
    largest_inner_square,
    match_channels,
    mirror_tile,
    read_masked_folder,
    save_image,
)
from synclone.util.files import write_text_atomic

MIN_PATCH = 3  # a texture patch narrower than this is a few flat pixels, not a texture


def texture_patch(image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """The texture sample of one image: the largest square wholly inside its mask, else the mask's bounding box.

    Without a mask the whole image is the texture.
    """
    if mask is None:
        return image
    y, x, side = largest_inner_square(mask)
    if side >= MIN_PATCH:
        return image[y:y + side, x:x + side]
    y0, y1, x0, x1 = bbox(mask)
    return image[y0:y1, x0:x1]


def cue_conflict_image(shape_image: np.ndarray, shape_mask: np.ndarray, patch: np.ndarray,
                       background: float = 0.0, offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """``shape_mask`` filled with ``patch`` mirror-tiled to the image size; ``background`` elsewhere."""
    h, w, c = shape_image.shape
    fill = mirror_tile(match_channels(patch, c), (h, w), offset)
    return np.where(shape_mask[..., None], fill, background)


def build_cue_conflict_probe(shape_images, shape_masks, shape_labels, texture_images, texture_labels,
                             out_dir: str | Path, class_names: Sequence[str], *, texture_masks=None,
                             per_pair: int = 1, seed: int = 0, background: float = 0.0,
                             shape_names: Sequence[str] | None = None) -> pd.DataFrame:
    """Write ``per_pair`` stimuli for every ordered pair of different classes (shape class, texture class).

    ``shape_images`` / ``texture_images``: (N, H, W[, C]) uint8 or floats in [0, 1] (the two may be the
    same array); ``shape_masks``: one mask per shape image, of its size; ``texture_masks``: optional
    masks of the texture images (their object, so the texture comes from inside it). Labels index
    ``class_names``. Returns the metadata table (also written as metadata.csv).
    """
    shp = as_image_batch(shape_images, "shape_images")
    tex = as_image_batch(texture_images, "texture_images")
    smask = check_masks(shape_masks, shp, shape_names)
    tmask = check_masks(texture_masks, tex) if texture_masks is not None else None
    ys, yt = np.asarray(shape_labels, dtype=np.int64), np.asarray(texture_labels, dtype=np.int64)
    if ys.shape != (len(shp),) or yt.shape != (len(tex),):
        raise UserError(f"need one label per image: {len(ys)} shape labels for {len(shp)} shape images, "
                        f"{len(yt)} texture labels for {len(tex)} texture images")
    space = LabelSpace.from_names(class_names, name="probe")
    for arr in (ys, yt):
        if arr.size and (arr.min() < 0 or arr.max() >= len(space)):
            raise UserError(f"labels must lie in [0, {len(space)}) for the {len(space)} class names")
    if per_pair < 1:
        raise UserError(f"per_pair must be at least 1, got {per_pair}")
    rng = np.random.default_rng(seed)
    shape_classes, texture_classes = np.unique(ys), np.unique(yt)
    pairs = [(int(s), int(t)) for s in shape_classes for t in texture_classes if s != t]
    if not pairs:
        raise UserError("no class pair with different shape and texture classes: give images of at least two classes")
    patches = [texture_patch(tex[j], tmask[j] if tmask is not None else None) for j in range(len(tex))]
    out = Path(out_dir)
    rows, used = [], set()
    for s, t in pairs:
        src = rng.choice(np.flatnonzero(ys == s), size=per_pair, replace=per_pair > int((ys == s).sum()))
        tsrc = rng.choice(np.flatnonzero(yt == t), size=per_pair, replace=per_pair > int((yt == t).sum()))
        for k, (i, j) in enumerate(zip(src, tsrc, strict=True)):
            offset = (int(rng.integers(0, 64)), int(rng.integers(0, 64)))
            img = cue_conflict_image(shp[i], smask[i], patches[j], background, offset)
            stem = f"{space.slugs[s]}{i}-{space.slugs[t]}{j}"
            if stem in used:  # the same two sources drawn twice: keep both, still parseable as <shape><n>-...
                stem = f"{space.slugs[s]}{i}0{k}-{space.slugs[t]}{j}"
            used.add(stem)
            rel = Path(space.slugs[s]) / f"{stem}.png"
            save_image(img, out / rel)
            rows.append({"file": rel.as_posix(), "shape": space.slugs[s], "texture": space.slugs[t],
                         "shape_label": s, "texture_label": t, "shape_source": int(i), "texture_source": int(j)})
    meta = pd.DataFrame(rows)
    meta.to_csv(out / "metadata.csv", index=False)
    info = {"kind": "cue_conflict", "layout": "<shape>/<shape><i>-<texture><j>.png (model-vs-human)",
            "label_space": space.to_dict(), "n_images": len(meta), "per_pair": per_pair, "seed": int(seed),
            "background": background,
            "reference": "Geirhos et al., ImageNet-trained CNNs are biased towards texture, ICLR 2019"}
    write_text_atomic(out / "probe.json", json.dumps(info, indent=2))
    return meta


def build_cue_conflict_probe_from_folders(images_dir: str | Path, masks_dir: str | Path, out_dir: str | Path, *,
                                          channels: int = 3, **kwargs) -> pd.DataFrame:
    """:func:`build_cue_conflict_probe` with shapes and textures from ``<images_dir>/<class>/<image>`` and masks."""
    imgs, masks, labels, classes, names = read_masked_folder(images_dir, masks_dir, channels)
    return build_cue_conflict_probe(imgs, masks, labels, imgs, labels, out_dir, classes, texture_masks=masks,
                                    shape_names=names, **kwargs)
