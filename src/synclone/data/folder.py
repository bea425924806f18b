"""Read dataset folders (generated, curated, or plain ``<class>/*.png``) into records or a TensorImageSet.

Formats read:

- **synclone dataset folder** (``synclone generate`` and ``synclone curate`` write these): ``dataset.json``
  (key ``label_space``) and ``train/metadata.jsonl``, one JSON object per image with ``file_name`` (relative to
  ``train/``; a curated folder may point outside it, ``../../gen/train/x.png``, or give an absolute path),
  ``label`` and/or ``class_name``, plus anything else (prompt, seed, scores), kept in ``ImageRecord.meta``.
- **plain image folder**: ``<root>/<class>/*.png`` (any suffix in :data:`IMAGE_EXTENSIONS`), class = folder
  name, classes in sorted order like torchvision's ``ImageFolder``; ``<root>/train/<class>/`` works too.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from synclone.config import read_json
from synclone.data import TensorImageSet
from synclone.data.images import IMAGE_EXTENSIONS, read_and_decode, to_channels
from synclone.errors import UserError
from synclone.labels import LabelSpace

METADATA = "metadata.jsonl"
DATASET_JSON = "dataset.json"
# A curated folder lists every scored image (kept or dropped, with scores and reasons) here.
ALL_ROWS = "curation.jsonl"
# Keys of a metadata row that the reader interprets; all others go to ImageRecord.meta unchanged.
_CORE_KEYS = ("file_name", "label", "class_name", "id")


@dataclass
class ImageRecord:
    """One image of a dataset folder: a stable id, its file, its label and the rest of its metadata."""
    id: str
    path: Path  # absolute
    label: int
    class_name: str
    file_name: str  # as written in the metadata (or relative to the root for plain folders)
    meta: dict = field(default_factory=dict)

    @property
    def prompt(self) -> str | None:
        p = self.meta.get("prompt")
        return p if isinstance(p, str) and p.strip() else None


def read_dataset_folder(path: str | Path, split: str = "train") -> tuple[list[ImageRecord], LabelSpace]:
    """Records and label space of a synclone dataset folder or a plain ``<class>/<image>`` folder."""
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"dataset folder '{root}' does not exist")
    if (root / split / METADATA).is_file():
        return _read_synclone_folder(root, split)
    if root.name == split and (root / METADATA).is_file():
        return _read_synclone_folder(root.parent, split)
    return _read_plain_folder(root, split)


def _read_json(path: Path) -> dict:
    return read_json(path)


def read_dataset_json(root: str | Path) -> dict:
    """The folder's ``dataset.json`` as a dict (empty when it has none)."""
    p = Path(root) / DATASET_JSON
    return _read_json(p) if p.is_file() else {}


def _read_metadata(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"'{path}' line {n} is not valid JSON: {err.msg}") from None
            if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
                raise UserError(f"'{path}' line {n} needs a 'file_name' string")
            rows.append(row)
    return rows


def _read_synclone_folder(root: Path, split: str) -> tuple[list[ImageRecord], LabelSpace]:
    train = root / split
    rows = _read_metadata(train / METADATA)
    info = read_dataset_json(root)
    if "label_space" in info:
        space = LabelSpace.from_dict(info["label_space"])
    else:
        space = _space_from_rows(rows, train / METADATA)
    records, seen = [], set()
    for n, row in enumerate(rows, 1):
        label = _row_label(row, space, train / METADATA, n)
        file_name = row["file_name"]
        p = Path(file_name)
        abs_path = p if p.is_absolute() else Path(os.path.normpath(train / p))
        rid = str(row["id"] if row.get("id") is not None else Path(file_name).with_suffix("").as_posix())
        if rid in seen:
            raise UserError(f"'{train / METADATA}' line {n}: image id '{rid}' appears twice; ids must be unique")
        seen.add(rid)
        meta = {k: v for k, v in row.items() if k not in _CORE_KEYS}
        records.append(ImageRecord(rid, abs_path, label, space.classes[label], file_name, meta))
    return records, space


def _space_from_rows(rows: list[dict], where: Path) -> LabelSpace:
    """A label space from (label, class_name) pairs when the folder has no dataset.json."""
    by_label: dict[int, str] = {}
    for row in rows:
        if "label" in row and "class_name" in row:
            by_label.setdefault(int(row["label"]), str(row["class_name"]))
    if by_label and sorted(by_label) == list(range(len(by_label))):
        return LabelSpace.from_names([by_label[i] for i in range(len(by_label))], name=where.parent.parent.name)
    names = sorted({str(r["class_name"]) for r in rows if "class_name" in r})
    if not names:
        raise UserError(f"'{where}' has no class_name/label columns and the folder has no {DATASET_JSON}")
    return LabelSpace.from_names(names, name=where.parent.parent.name)


def _row_label(row: dict, space: LabelSpace, where: Path, n: int) -> int:
    label = row.get("label")
    name = row.get("class_name")
    if label is not None:
        try:
            label = int(label)
        except (TypeError, ValueError):
            raise UserError(f"'{where}' line {n}: label {label!r} is not an integer") from None
        if not 0 <= label < len(space):
            raise UserError(f"'{where}' line {n}: label {label} is outside 0..{len(space) - 1} of label space "
                            f"'{space.name}'")
        if name is not None and name not in (space.classes[label], space.slugs[label]):
            raise UserError(f"'{where}' line {n}: label {label} is '{space.classes[label]}' in dataset.json but "
                            f"the row says class_name '{name}'")
        return label
    if name is not None:
        return space.index(str(name))
    # No label columns: the class folder of the file (train/<slug>/<id>.png).
    parts = Path(row["file_name"]).parts
    if len(parts) >= 2:
        return space.index(parts[-2])
    raise UserError(f"'{where}' line {n} has neither 'label' nor 'class_name' and its file is not in a class folder")


def _read_plain_folder(root: Path, split: str) -> tuple[list[ImageRecord], LabelSpace]:
    def class_dirs(base: Path) -> list[Path]:
        return sorted(d for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))

    base = root
    dirs = class_dirs(root)
    # <root>/train/<class>/ without metadata: the classes are one level down.
    if [d.name for d in dirs] == [split] and class_dirs(root / split):
        base = root / split
        dirs = class_dirs(base)
    if not dirs:
        raise UserError(f"'{root}' is neither a synclone dataset folder ({split}/{METADATA}) nor an image folder "
                        "with one sub-folder per class")
    space = LabelSpace.from_names([d.name for d in dirs], name=root.name)
    records = []
    for label, d in enumerate(dirs):
        for f in sorted(d.rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith("."):
                rel = f.relative_to(base).as_posix()
                records.append(ImageRecord(str(Path(rel).with_suffix("").as_posix()), f.resolve(), label, d.name, rel))
    if not records:
        raise UserError(f"image folder '{root}' holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return records, space


def load_curated(folder: str | Path, include_dropped: bool = False) -> tuple[list[ImageRecord], LabelSpace]:
    """Records of a curated dataset folder: the kept images, or every scored image with ``include_dropped``.

    Each record's ``meta`` holds the scores and the curation outcome (``kept``, ``drop_reason``, ``dup_of``).
    """
    root = Path(folder)
    info = read_dataset_json(root)
    if "curation" not in info:
        raise UserError(f"'{root}' is not a curated dataset folder (its {DATASET_JSON} has no 'curation' section); "
                        "make one with synclone curate")
    if not include_dropped:
        return read_dataset_folder(root)
    space = LabelSpace.from_dict(info["label_space"])
    rows = _read_metadata(root / ALL_ROWS)
    base = root / "train"
    records = []
    for row in rows:
        p = Path(row["file_name"])
        path = p if p.is_absolute() else Path(os.path.normpath(base / p))
        meta = {k: v for k, v in row.items() if k not in _CORE_KEYS}
        records.append(ImageRecord(str(row["id"]), path, int(row["label"]), space.classes[int(row["label"])],
                                   row["file_name"], meta))
    return records, space


def load_image_folder_tensors(path: str | Path, label_space: LabelSpace | None = None,
                              size: int | tuple[int, int] | None = None, channels: int | None = None,
                              split: str = "train"):
    """Decode every image of a dataset folder (generated, curated or plain) into a ``TensorImageSet``.

    ``label_space``: re-index labels into this space (every dataset class must be in it, by name or slug);
    default the folder's own. ``size``: resize every image to (H, W) (bicubic, antialiased); without it all
    images must already share one size. ``channels``: 1 or 3; default 1 when every image is grey, else 3.
    Unreadable images are skipped with a warning (their ids are in ``.extra["skipped"]``, id -> file and reason
    in ``.extra["skip_reasons"]``).
    Meant for small images (28x28 to 64x64): the whole set lives in memory as uint8.
    """
    records, space = read_dataset_folder(path, split)
    target = label_space or space
    remap = [target.index(c) for c in space.classes] if label_space is not None else list(range(len(space)))
    hw = (size, size) if isinstance(size, int) else (tuple(size) if size is not None else None)
    images: list[Image.Image] = []
    labels: list[int] = []
    reasons: dict[str, str] = {}
    for r in records:
        _, dec = read_and_decode(str(r.path))
        if not dec.ok:
            reasons[r.id] = f"{r.path}: {dec.error}"
            continue
        images.append(dec.image)
        labels.append(remap[r.label])
    skipped = list(reasons)
    if skipped:
        warnings.warn(f"{len(skipped)} unreadable image(s) skipped in '{path}' (first: {reasons[skipped[0]]})",
                      stacklevel=2)
    if not images:
        raise UserError(f"dataset folder '{path}' has no readable images")
    if channels is None:
        channels = 1 if all(im.mode == "L" for im in images) else 3
    if channels not in (1, 3):
        raise UserError(f"channels must be 1 or 3, got {channels}")
    if hw is None:
        sizes = {im.size for im in images}
        if len(sizes) > 1:
            raise UserError(f"images in '{path}' have {len(sizes)} different sizes (e.g. {sorted(sizes)[:3]}); "
                            "pass size=(H, W) to resize them")
    arr = np.empty((len(images), channels, *(hw or images[0].size[::-1])), dtype=np.uint8)
    for i, im in enumerate(images):
        im = to_channels(im, channels)
        if hw is not None and im.size != (hw[1], hw[0]):
            im = im.resize((hw[1], hw[0]), Image.Resampling.BICUBIC)
        a = np.asarray(im)
        arr[i] = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return TensorImageSet(torch.from_numpy(arr), torch.tensor(labels, dtype=torch.int64), target,
                          name=Path(path).name, source=str(path),
                          extra={"skipped": skipped, "skip_reasons": reasons})


def write_image_folder(root: str | Path, images, labels, space: LabelSpace, ids: list[str] | None = None,
                       info: dict | None = None) -> Path:
    """Write uint8 images ((N, 1 or 3, H, W) or (N, H, W)) as a synclone dataset folder this module reads:
    ``train/<slug>/<id>.png``, ``train/metadata.jsonl`` and ``dataset.json`` (label space + ``info``).

    Every file is written atomically and ``dataset.json`` last, so a folder with it is complete.
    """
    import io

    from synclone.util.files import write_bytes_atomic, write_text_atomic

    root = Path(root)
    train = root / "train"
    arr = np.asarray(images)
    rows = []
    for i, label in enumerate(np.asarray(labels).tolist()):
        iid = ids[i] if ids else f"{i:06d}"
        rel = f"{space.slugs[label]}/{iid}.png"
        a = arr[i]
        a = a[0] if a.ndim == 3 and a.shape[0] == 1 else a.transpose(1, 2, 0) if a.ndim == 3 else a
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(a)).save(buf, format="PNG")
        (train / rel).parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(train / rel, buf.getvalue())
        rows.append(json.dumps({"file_name": rel, "id": iid, "label": int(label), "class_name": space.classes[label]}))
    write_text_atomic(train / METADATA, "\n".join(rows) + "\n")
    write_text_atomic(root / DATASET_JSON, json.dumps({"label_space": space.to_dict(), **(info or {})}, indent=2))
    return root
