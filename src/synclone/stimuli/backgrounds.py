"""Build ImageNet-9-style background probes from any images with foreground masks (Xiao et al., ICLR 2021).

Every variant of Xiao et al.'s Table 1 is made from the same test images, so their accuracies differ
only in what the background says:

    original    the image (or, given ``backgrounds``, its foreground pasted on a class-specific texture)
    only_fg     foreground on black                 no_fg      foreground pixels blacked out
    only_bg_b   foreground bounding box blacked out  only_bg_t  box filled by tiling the largest strip
                                                                 of background outside it (their Fig. 9)
    mixed_same  foreground on the only_bg_t background of another image of the same class
    mixed_rand  foreground on the only_bg_t background of an image of a random class
    mixed_next  foreground on the only_bg_t background of an image of the next class (y + 1 mod K)

As in the paper the mixed backgrounds are taken from ONLY-BG-T, so no foreground leaks in.

Images that are objects on an empty background (Fashion-MNIST garments on black) have no background
signal to swap. Pass ``backgrounds`` (e.g. scikit-image's natural textures, :func:`natural_textures`):
each class is then given its own texture (class y -> texture y mod T, a random window per image),
which builds the class-background correlation that ``mixed_same`` keeps and ``mixed_rand`` breaks.

Output: ``<out>/<variant>/val/<NN_slug>/<id>.png`` (the bg_challenge layout, read by the ``background``
probe's ``folder:``), ``<out>/metadata.csv`` (one row per
written image: variant, file, label, class, source image, background image and its class) and
``<out>/probe.json``.
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
    match_channels,
    natural_textures,
    random_crop_resized,
    read_masked_folder,
    save_image,
)
from synclone.util.files import write_text_atomic

# The eight ImageNet-9 variants (Xiao et al., 2020), in the order of the released bg_challenge folders.
IN9_VARIANTS = ("original", "only_fg", "no_fg", "only_bg_b", "only_bg_t", "mixed_same", "mixed_rand", "mixed_next")


def tiled_background(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """ONLY-BG-T of one image: its foreground box filled by tiling the largest background strip outside the box.

    The strip is the biggest of the four bands above, below, left and right of the box; a horizontal
    band is repeated down the image, a vertical one across it. If the box fills the whole image the
    box takes the mean colour of the pixels outside the mask (or black when there are none).
    """
    h, w = mask.shape
    y0, y1, x0, x1 = bbox(mask)
    strips = [(y0 * w, img[:y0]), ((h - y1) * w, img[y1:]), (x0 * h, img[:, :x0]), ((w - x1) * h, img[:, x1:])]
    area, strip = max(strips, key=lambda s: s[0])
    out = img.copy()
    if area == 0:
        outside = img[~mask]
        out[y0:y1, x0:x1] = outside.mean(axis=0) if len(outside) else 0.0
        return out
    if strip.shape[0] < h:  # horizontal band: repeat rows
        reps = -(-h // strip.shape[0])
        tiled = np.concatenate([strip] * reps, axis=0)[:h]
    else:  # vertical band: repeat columns
        reps = -(-w // strip.shape[1])
        tiled = np.concatenate([strip] * reps, axis=1)[:, :w]
    out[y0:y1, x0:x1] = tiled[y0:y1, x0:x1]
    return out


def _pick(rng: np.random.Generator, pool: np.ndarray, exclude: int) -> int:
    cands = pool[pool != exclude]
    if cands.size == 0:
        cands = pool
    return int(rng.choice(cands))


def build_background_probe(images, masks, labels, out_dir: str | Path, class_names: Sequence[str], *,
                           backgrounds: Sequence[np.ndarray] | None = None, variants: Sequence[str] = IN9_VARIANTS,
                           seed: int = 0, texture_scale: float = 0.25, image_names: Sequence[str] | None = None,
                           ) -> pd.DataFrame:
    """Write the background variants of ``images`` (with foreground ``masks``) under ``out_dir``.

    ``images``: (N, H, W) or (N, H, W, C) uint8 or floats in [0, 1]; ``masks``: one (H, W) mask per
    image (True / nonzero on the object); ``labels``: class index per image into ``class_names``.
    ``backgrounds``: texture images to build the originals on (see the module doc); without them the
    images themselves are the originals. Returns the metadata table (also written as metadata.csv).
    """
    imgs = as_image_batch(images)
    m = check_masks(masks, imgs, image_names)
    y = np.asarray(labels, dtype=np.int64)
    if y.shape != (len(imgs),):
        raise UserError(f"{len(y)} labels for {len(imgs)} images: give one label per image")
    space = LabelSpace.from_names(class_names, name="probe")
    if y.size and (y.min() < 0 or y.max() >= len(space)):
        raise UserError(f"labels must lie in [0, {len(space)}) for the {len(space)} class names")
    unknown = [v for v in variants if v not in IN9_VARIANTS]
    if unknown or not variants:
        raise UserError(f"unknown variants {unknown}: choose from {IN9_VARIANTS}")
    present = np.unique(y)
    counts = np.bincount(y, minlength=len(space))
    if "mixed_same" in variants and (counts[present] < 2).any():
        lonely = [space.classes[c] for c in present if counts[c] < 2]
        raise UserError(f"mixed_same needs two images of each class; {lonely} have one. Add images or drop mixed_same")
    rng = np.random.default_rng(seed)
    n, h, w, c = imgs.shape
    fg_mask = m[..., None]

    if backgrounds is not None:
        if len(backgrounds) == 0:
            raise UserError("backgrounds is empty: give at least one background image, or None")
        texs = [match_channels(as_image_batch(np.asarray(b)[None], "backgrounds")[0], c) for b in backgrounds]
        bg_of = [random_crop_resized(texs[int(y[i]) % len(texs)], (h, w), rng, texture_scale) for i in range(n)]
        originals = np.where(fg_mask, imgs, np.stack(bg_of))
    else:
        originals = imgs
    only_bg_t = np.stack([tiled_background(originals[i], m[i]) for i in range(n)])

    # Background donors, drawn once so every mixed variant is reproducible from the seed alone.
    by_class = {int(k): np.flatnonzero(y == k) for k in present}
    next_class = {int(k): int(present[(i + 1) % len(present)]) for i, k in enumerate(present)}
    donors = {"mixed_same": [], "mixed_rand": [], "mixed_next": []}
    for i in range(n):
        donors["mixed_same"].append(_pick(rng, by_class[int(y[i])], i))
        rand_class = int(rng.choice(present))  # "random background of a random class" (Xiao et al., Table 1)
        donors["mixed_rand"].append(_pick(rng, by_class[rand_class], i))
        donors["mixed_next"].append(_pick(rng, by_class[next_class[int(y[i])]], i))

    out = Path(out_dir)
    names = [f"{i:05d}" for i in range(n)] if image_names is None else [Path(s).stem for s in image_names]
    if len(set(names)) != len(names):
        names = [f"{i:05d}_{s}" for i, s in enumerate(names)]
    rows = []
    for variant in variants:
        for i in range(n):
            donor = -1
            if variant == "original":
                img = originals[i]
            elif variant == "only_fg":
                img = np.where(fg_mask[i], originals[i], 0.0)
            elif variant == "no_fg":
                img = np.where(fg_mask[i], 0.0, originals[i])
            elif variant == "only_bg_b":
                y0, y1, x0, x1 = bbox(m[i])
                img = originals[i].copy()
                img[y0:y1, x0:x1] = 0.0
            elif variant == "only_bg_t":
                img = only_bg_t[i]
            else:
                donor = donors[variant][i]
                img = np.where(fg_mask[i], originals[i], only_bg_t[donor])
            label = int(y[i])
            rel = Path(variant) / "val" / f"{label:02d}_{space.slugs[label]}" / f"{names[i]}.png"
            save_image(img, out / rel)
            rows.append({"variant": variant, "file": rel.as_posix(), "label": label, "class_name": space.classes[label],
                         "source": i, "background_source": donor,
                         "background_label": int(y[donor]) if donor >= 0 else label})
    meta = pd.DataFrame(rows)
    meta.to_csv(out / "metadata.csv", index=False)
    info = {"kind": "backgrounds", "layout": "<variant>/val/<NN_slug>/<id>.png", "variants": list(variants),
            "label_space": space.to_dict(), "n_images": int(n), "seed": int(seed),
            "backgrounds": "textures by class (label mod number of textures)" if backgrounds is not None else "own",
            "reference": "Xiao, Engstrom, Ilyas & Madry, Noise or Signal: The Role of Image Backgrounds in Object "
                         "Recognition, ICLR 2021"}
    write_text_atomic(out / "probe.json", json.dumps(info, indent=2))
    return meta


def build_background_probe_from_folders(images_dir: str | Path, masks_dir: str | Path, out_dir: str | Path, *,
                                        channels: int = 3, textures: Sequence[str] | None = None,
                                        **kwargs) -> pd.DataFrame:
    """:func:`build_background_probe` on ``<images_dir>/<class>/<image>`` with masks of the same names in ``masks_dir``.

    ``textures``: names of scikit-image's bundled textures (e.g. ``["brick", "grass", "gravel"]``) to
    paste the foregrounds on; by default the images keep their own backgrounds.
    """
    imgs, masks, labels, classes, names = read_masked_folder(images_dir, masks_dir, channels)
    backgrounds = natural_textures(textures) if textures else None
    return build_background_probe(imgs, masks, labels, out_dir, classes, backgrounds=backgrounds,
                                  image_names=names, **kwargs)
