"""Decoding every image mode the same documented way, and reading dataset folders into records or tensors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from _tiny_clip import write_dataset_folder, write_png16  # noqa: E402
from synclone.data.folder import load_image_folder_tensors, read_dataset_folder
from synclone.data.images import STAT_NAMES, decode_image, read_and_decode
from synclone.errors import UserError
from synclone.labels import LabelSpace


def _png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    from io import BytesIO

    buf = BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def test_modes_convert_as_documented(tmp_path):
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    d = decode_image(_png_bytes(Image.fromarray(grey)))
    assert d.ok and d.image.mode == "L" and np.array_equal(np.asarray(d.image), grey)
    stats = dict(zip(STAT_NAMES, d.stats, strict=True))
    assert stats["px_min"] == 0 and stats["px_max"] == 252 and stats["px_mean"] == pytest.approx(grey.mean())

    # 16-bit grey: value / 257, not Pillow's clipping convert("L") (which would make almost everything 255).
    g16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    d = decode_image(write_png16(tmp_path / "g16.png", g16).read_bytes())
    assert d.ok and d.image.mode == "L" and d.mode.startswith("I")
    assert np.array_equal(np.asarray(d.image), np.rint(g16 / 257).astype(np.uint8))

    # 16-bit RGB: Pillow keeps the high byte of each channel.
    rgb16 = np.stack([g16, g16 // 2, 65535 - g16], axis=-1)
    d = decode_image(write_png16(tmp_path / "rgb16.png", rgb16).read_bytes())
    assert d.ok and d.image.mode == "RGB"
    assert np.abs(np.asarray(d.image).astype(int) - (rgb16 >> 8)).max() <= 1

    # RGBA: composited over the background grey level; a fully transparent pixel becomes the background.
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[0, 0, 3] = 255
    rgba[0, 1, 3] = 0
    for bg in (0, 255):
        d = decode_image(_png_bytes(Image.fromarray(rgba, "RGBA")), alpha_background=bg)
        a = np.asarray(d.image)
        assert d.image.mode == "RGB" and tuple(a[0, 0]) == (200, 0, 0) and tuple(a[0, 1]) == (bg, bg, bg)

    # CMYK (a JPEG: PNG has no CMYK) becomes RGB.
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    d = decode_image(_png_bytes(cmyk, "JPEG"))
    assert d.ok and d.mode == "CMYK" and d.image.mode == "RGB"
    r, g, b = np.asarray(d.image).reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 60 and b < 60

    # Float images with NaN: NaN share recorded, pixels set to 0.
    f = np.full((4, 4), 0.5, dtype=np.float32)
    f[0, 0] = np.nan
    d = decode_image(_png_bytes(Image.fromarray(f, "F"), "TIFF"))
    assert d.ok and d.stats[STAT_NAMES.index("px_nan")] == pytest.approx(1 / 16)
    assert np.asarray(d.image)[0, 0] == 0 and np.asarray(d.image)[1, 1] == 128


def test_broken_files_do_not_raise(tmp_path):
    good = _png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)))
    for data, what in ((b"", "empty"), (good[: len(good) // 2], "truncated"), (b"not an image at all", "cannot")):
        d = decode_image(data)
        assert not d.ok and d.image is None and np.isnan(d.stats).all()
        assert what in d.error.lower() or what == "cannot" and "UnidentifiedImageError" in d.error
    _, d = read_and_decode(str(tmp_path / "missing.png"))
    assert not d.ok and "FileNotFoundError" in d.error


def _space():
    return LabelSpace.from_names(["cat", "dog house", "bird"], name="toy")


def test_read_generated_and_plain_folders(tmp_path):
    space = _space()
    imgs = [np.full((6, 6), 10 * i, dtype=np.uint8) for i in range(6)]
    root = write_dataset_folder(tmp_path / "gen", imgs, [0, 1, 2, 0, 1, 2], space,
                                prompts=["p"] * 6, ids=[f"id{i}" for i in range(6)])
    records, sp = read_dataset_folder(root)
    assert sp == space and [r.id for r in records] == [f"id{i}" for i in range(6)]
    assert records[1].class_name == "dog house" and records[1].path == root / "train" / "dog_house" / "id1.png"
    assert records[0].prompt == "p" and records[0].meta["seed"] == 0

    # A label that disagrees with class_name is an error, not a silent pick.
    meta = root / "train" / "metadata.jsonl"
    rows = [json.loads(line) for line in meta.read_text().splitlines()]
    rows[0]["class_name"] = "bird"
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match="class_name 'bird'"):
        read_dataset_folder(root)

    plain = tmp_path / "plain"
    for cls, n in (("zebra", 2), ("ant", 3)):
        (plain / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.zeros((5, 5), np.uint8)).save(plain / cls / f"{i}.png")
    (plain / ".curate_cache").mkdir()  # hidden folders are not classes
    (plain / "ant" / "notes.txt").write_text("x")
    records, sp = read_dataset_folder(plain)
    assert sp.classes == ("ant", "zebra") and len(records) == 5 and records[0].id == "ant/0"
    with pytest.raises(UserError, match="does not exist"):
        read_dataset_folder(tmp_path / "nope")


def test_load_image_folder_tensors(tmp_path):
    space = _space()
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (8, 8), dtype=np.uint8) for _ in range(4)]
    root = write_dataset_folder(tmp_path / "gen", imgs, [2, 0, 1, 2], space)
    ds = load_image_folder_tensors(root)
    assert ds.images.shape == (4, 1, 8, 8) and ds.images.dtype.is_floating_point is False
    assert ds.labels.tolist() == [2, 0, 1, 2] and ds.label_space == space
    assert np.array_equal(ds.images[0, 0].numpy(), imgs[0])
    # Re-indexed into a bigger space, resized, as RGB.
    big = LabelSpace.from_names(["bird", "fish", "cat", "dog house"])
    ds = load_image_folder_tensors(root, label_space=big, size=4, channels=3)
    assert ds.images.shape == (4, 3, 4, 4) and ds.labels.tolist() == [0, 2, 3, 0]
    with pytest.raises(UserError, match="cat"):
        load_image_folder_tensors(root, label_space=LabelSpace.from_names(["bird", "fish"]))
    # A broken file is skipped with a warning; different sizes need size=.
    (root / "train" / "cat" / "00001.png").write_bytes(b"")
    with pytest.warns(UserWarning, match="unreadable"):
        ds = load_image_folder_tensors(root)
    assert len(ds) == 3 and ds.extra["skipped"] == ["00001"]
    Image.fromarray(np.zeros((5, 7), np.uint8)).save(root / "train" / "bird" / "00000.png")
    with pytest.raises(UserError, match="size"), pytest.warns(UserWarning):
        load_image_folder_tensors(root)
