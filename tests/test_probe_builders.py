"""Probe builders: background variants and cue-conflict stimuli, checked pixel by pixel and end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from _probe_helpers import probe_on_folder
from synclone.errors import UserError
from synclone.labels import LabelSpace
from synclone.probes.shape_bias import parse_cue_conflict_name
from synclone.stimuli.backgrounds import (
    IN9_VARIANTS,
    build_background_probe,
    build_background_probe_from_folders,
    tiled_background,
)
from synclone.stimuli.cue_conflict import build_cue_conflict_probe, texture_patch
from synclone.stimuli.images import bbox, masks_from_threshold, natural_textures

CLASSES = ["square", "disk", "bar"]
SIZE = 16


def _shape_mask(label: int, shift: int = 0) -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE]
    if label == 0:
        m = (abs(yy - 8) < 3) & (abs(xx - 8) < 3)  # 5 x 5 = 25 px
    elif label == 1:
        m = (yy - 8) ** 2 + (xx - 8) ** 2 <= 36  # 113 px
    else:
        m = (abs(yy - 8) < 1) & (abs(xx - 8) < 7)  # 1 x 13 = 13 px
    return np.roll(m, shift, axis=1)


AREAS = np.array([_shape_mask(k).sum() for k in range(3)])


def _shapes(per_class: int = 2, fg=lambda label: 1.0):
    """Synthetic objects: class k has shape k, drawn with grey level fg(k) on black."""
    masks, labels = [], []
    for k in range(3):
        for j in range(per_class):
            masks.append(_shape_mask(k, shift=j - per_class // 2))
            labels.append(k)
    masks = np.stack(masks)
    labels = np.array(labels)
    images = np.where(masks, np.array([fg(k) for k in labels])[:, None, None], 0.0)
    return images, masks, labels


class _Probe(torch.nn.Module):
    """A hand-made 3-class model over 16x16 grey images reading one cue only.

    'area': the number of near-white pixels (the object's shape); 'level': the mean grey level of
    the non-black pixels (the texture); 'border': the mean of the image border (the background).
    """

    input_size = (1, SIZE, SIZE)

    def __init__(self, cue: str, levels=(0.0, 0.5, 1.0)):
        super().__init__()
        self.cue = cue
        self.levels = torch.tensor(levels)
        self.label_space = LabelSpace.from_names(CLASSES)

    def forward(self, x):
        x = x[:, 0]
        if self.cue == "area":
            value, centres = (x > 0.02).sum(dim=(1, 2)).float(), torch.tensor(AREAS, dtype=torch.float32)
        elif self.cue == "white_area":
            value, centres = (x > 0.95).sum(dim=(1, 2)).float(), torch.tensor(AREAS, dtype=torch.float32)
        elif self.cue == "level":
            lit = x > 0.02
            value, centres = (x * lit).sum(dim=(1, 2)) / lit.sum(dim=(1, 2)).clamp(min=1), self.levels
        else:
            border = torch.cat([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], dim=1)
            value, centres = border.mean(dim=1), self.levels
        return -(value[:, None] - centres[None]) ** 2


def _read(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.float64) / 255.0


# --- background probes --------------------------------------------------------------------------------


@pytest.fixture
def bg_probe(tmp_path):
    images, masks, labels = _shapes(per_class=3)
    backgrounds = [np.full((40, 40), v) for v in (0.2, 0.5, 0.8)]  # class k gets flat background k
    meta = build_background_probe(images, masks, labels, tmp_path, CLASSES, backgrounds=backgrounds, seed=1)
    return tmp_path, images, masks, labels, meta


def test_background_builder_writes_every_variant_with_labels_and_donors(bg_probe):
    root, images, masks, labels, meta = bg_probe
    n = len(images)
    assert sorted(meta["variant"].unique()) == sorted(IN9_VARIANTS)
    for v in IN9_VARIANTS:
        rows = meta[meta["variant"] == v]
        assert len(rows) == n and (rows["label"].to_numpy() == labels).all()
        for r in rows.itertuples():
            assert (root / r.file).is_file()
            assert r.file.split("/")[2] == f"{r.label:02d}_{CLASSES[r.label]}"
    same = meta[meta["variant"] == "mixed_same"]
    assert (same["background_label"] == same["label"]).all() and (same["background_source"] != same["source"]).all()
    nxt = meta[meta["variant"] == "mixed_next"]
    assert (nxt["background_label"] == (nxt["label"] + 1) % 3).all()
    rand = meta[meta["variant"] == "mixed_rand"]
    assert (rand["background_source"] != rand["source"]).all() and rand["background_label"].nunique() > 1
    assert (meta[meta["variant"] == "original"]["background_source"] == -1).all()


def test_background_variants_are_right_pixel_by_pixel(bg_probe):
    root, images, masks, labels, meta = bg_probe
    tol = 0.6 / 255
    files = {(r.variant, r.source): root / r.file for r in meta.itertuples()}
    donors = {(r.variant, r.source): r.background_source for r in meta.itertuples()}
    levels = (0.2, 0.5, 0.8)
    for i in range(len(images)):
        m, y = masks[i], labels[i]
        original = _read(files["original", i])
        assert np.allclose(original[m], 1.0, atol=tol) and np.allclose(original[~m], levels[y], atol=tol)
        only_fg, no_fg = _read(files["only_fg", i]), _read(files["no_fg", i])
        assert np.allclose(only_fg[m], 1.0, atol=tol) and (only_fg[~m] == 0).all()
        assert (no_fg[m] == 0).all() and np.allclose(no_fg[~m], levels[y], atol=tol)
        y0, y1, x0, x1 = bbox(m)
        only_bg_b = _read(files["only_bg_b", i])
        assert (only_bg_b[y0:y1, x0:x1] == 0).all()
        only_bg_t = _read(files["only_bg_t", i])
        assert np.allclose(only_bg_t, levels[y], atol=tol)  # no foreground pixel survives the tiling
        for v in ("mixed_same", "mixed_rand", "mixed_next"):
            img = _read(files[v, i])
            donor_bg = _read(files["only_bg_t", donors[v, i]])
            assert np.allclose(img[m], 1.0, atol=tol), v
            assert np.allclose(img[~m], donor_bg[~m], atol=tol), v


def test_tiled_background_repeats_the_largest_strip():
    img = np.zeros((6, 10, 1))
    img[:, 7:] = 0.5  # right band (3 columns) is the largest strip outside the box
    img[:, 7:, 0] += np.arange(3) / 10
    mask = np.zeros((6, 10), dtype=bool)
    mask[1:5, 2:7] = True
    img[mask] = 1.0
    out = tiled_background(img, mask)
    assert (out[mask] < 1).all()
    assert np.allclose(out[:, :, 0][1:5, 2:7], np.tile(img[:, 7:, 0], (1, 4))[1:5, 2:7])


def test_background_model_shows_a_gap_foreground_model_none(bg_probe):
    root = bg_probe[0]
    fg, _ = probe_on_folder("background", _Probe("white_area"), folder=str(root))
    bg, _ = probe_on_folder("background", _Probe("border", levels=(0.2, 0.5, 0.8)), folder=str(root))
    for v in ("original", "only_fg", "mixed_same", "mixed_rand", "mixed_next"):
        assert fg[v, "top1"] == 1.0, v
    assert fg["all", "bg_gap"] == 0.0
    assert bg["original", "top1"] == bg["mixed_same", "top1"] == 1.0
    assert bg["mixed_next", "top1"] == 0.0
    assert bg["all", "bg_gap"] == pytest.approx(1 - bg["mixed_rand", "top1"]) and bg["all", "bg_gap"] > 0


def test_missing_variant_in_a_built_probe_names_the_folder(tmp_path):
    images, masks, labels = _shapes()
    build_background_probe(images, masks, labels, tmp_path, CLASSES, variants=["original", "mixed_same"])
    with pytest.raises(UserError, match=str(tmp_path / "mixed_rand" / "val")):
        probe_on_folder("background", _Probe("area"), folder=str(tmp_path),
                        variants=["original", "mixed_same", "mixed_rand"])


def test_mask_size_mismatch_names_the_image_or_file(tmp_path):
    images, masks, labels = _shapes()
    with pytest.raises(UserError, match="image 0 is 8x8"):
        build_background_probe(images, [m[:8, :8] for m in masks], labels, tmp_path / "out", CLASSES)
    for k, (img, m) in enumerate(zip(images, masks, strict=True)):
        cls = CLASSES[labels[k]]
        (tmp_path / "img" / cls).mkdir(parents=True, exist_ok=True)
        (tmp_path / "mask" / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray((img * 255).astype(np.uint8)).save(tmp_path / "img" / cls / f"{k}.png")
        mk = m if k != 3 else m[:12]
        Image.fromarray(mk.astype(np.uint8) * 255).save(tmp_path / "mask" / cls / f"{k}.png")
    with pytest.raises(UserError, match=str(tmp_path / "mask" / CLASSES[labels[3]] / "3.png")):
        build_background_probe_from_folders(tmp_path / "img", tmp_path / "mask", tmp_path / "out", channels=1)


def test_mixed_same_needs_two_images_per_class(tmp_path):
    images, masks, labels = _shapes(per_class=1)
    with pytest.raises(UserError, match="mixed_same"):
        build_background_probe(images, masks, labels, tmp_path, CLASSES)


# --- cue-conflict probes ------------------------------------------------------------------------------


@pytest.fixture
def cue_probe(tmp_path):
    levels = (0.3, 0.6, 0.9)  # texture of class k = grey level k
    images, masks, labels = _shapes(per_class=2, fg=lambda k: levels[k])
    meta = build_cue_conflict_probe(images, masks, labels, images, labels, tmp_path, CLASSES, texture_masks=masks,
                                    per_pair=2, seed=0)
    return tmp_path, images, masks, labels, meta, levels


def test_cue_conflict_builder_names_and_fills(cue_probe):
    root, images, masks, labels, meta, levels = cue_probe
    assert len(meta) == 3 * 2 * 2  # ordered pairs of different classes x per_pair
    assert (meta["shape"] != meta["texture"]).all()
    for r in meta.itertuples():
        path = root / r.file
        assert path.parent.name == r.shape
        assert parse_cue_conflict_name(path.name, CLASSES) == (r.shape, r.texture)
        img = _read(path)
        m = masks[r.shape_source]
        assert labels[r.shape_source] == r.shape_label and labels[r.texture_source] == r.texture_label
        assert (img[~m] == 0).all()  # outside the silhouette: the background value
        assert np.allclose(img[m], levels[r.texture_label], atol=0.6 / 255)  # inside: the other class's texture


def test_shape_and_texture_models_get_opposite_shape_bias(cue_probe):
    root, *_, levels = cue_probe
    shape_res, _ = probe_on_folder("shape_bias", _Probe("area"), folder=str(root))
    texture_res, _ = probe_on_folder("shape_bias", _Probe("level", levels=levels), folder=str(root))
    assert shape_res["all", "shape_bias"] == 1.0 and shape_res["all", "shape_fraction"] == 1.0
    assert texture_res["all", "shape_bias"] == 0.0 and texture_res["all", "texture_fraction"] == 1.0
    assert {v for v, m in shape_res if m == "shape_bias"} == {"all", *CLASSES}


def test_texture_patch_comes_from_inside_the_object():
    img = np.zeros((12, 12, 1))
    img[2:10, 2:10] = 0.7
    mask = img[..., 0] > 0
    patch = texture_patch(img, mask)
    assert patch.shape[0] == patch.shape[1] >= 3 and np.allclose(patch, 0.7)
    assert texture_patch(img).shape == img.shape  # no mask: the whole image is texture


def test_cue_conflict_builder_refuses_bad_masks(tmp_path):
    images, masks, labels = _shapes()
    with pytest.raises(UserError, match="image 2 is 15x16"):
        bad = list(masks)
        bad[2] = bad[2][1:]
        build_cue_conflict_probe(images, bad, labels, images, labels, tmp_path, CLASSES)
    with pytest.raises(UserError, match="empty"):
        build_cue_conflict_probe(images, np.zeros_like(masks), labels, images, labels, tmp_path, CLASSES)


# --- Fashion-MNIST, the demo's domain -----------------------------------------------------------------


def test_fashion_mnist_probes_from_garment_masks_and_skimage_textures(tmp_path):
    from synclone.data.fashion_mnist import load_fashion_mnist

    try:
        ds = load_fashion_mnist("test", download=False)
    except UserError as err:
        pytest.skip(f"Fashion-MNIST not on this machine: {err}")
    y = ds.labels.numpy()
    pick = np.concatenate([np.flatnonzero(y == k)[:2] for k in range(10)])
    images, labels = ds.images[pick, 0].numpy(), y[pick]
    masks = masks_from_threshold(images)
    assert masks.shape == (20, 28, 28) and masks.mean() > 0.2
    classes = ds.label_space.classes
    bg_meta = build_background_probe(images, masks, labels, tmp_path / "bg", classes, backgrounds=natural_textures())
    cc_meta = build_cue_conflict_probe(images, masks, labels, images, labels, tmp_path / "cc", classes,
                                       texture_masks=masks)
    assert len(bg_meta) == 20 * len(IN9_VARIANTS) and len(cc_meta) == 90
    only_fg = _read(tmp_path / "bg" / bg_meta[bg_meta["variant"] == "only_fg"]["file"].iloc[0])
    assert (only_fg[~masks[0]] == 0).all()
    original = _read(tmp_path / "bg" / bg_meta[bg_meta["variant"] == "original"]["file"].iloc[0])
    assert original[~masks[0]].std() > 0.02  # a natural texture, not a flat fill

    class Untrained(torch.nn.Module):  # a real (random) timm-style CNN over 28x28 grey images
        input_size = (1, 28, 28)
        label_space = ds.label_space

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                           torch.nn.Flatten(), torch.nn.Linear(4, 10))

        def forward(self, x):
            return self.net(x)

    sb, counts = probe_on_folder("shape_bias", Untrained(), folder=str(tmp_path / "cc"))
    assert counts["all", "shape_bias"] == 90 and {v for v, _ in sb} == {"all", *ds.label_space.slugs}
    bg, _ = probe_on_folder("background", Untrained(), folder=str(tmp_path / "bg"))
    assert {v for v, m in bg if m == "top1"} == set(IN9_VARIANTS) and -1 <= bg["all", "bg_gap"] <= 1
