"""ImageNet-family test sets recognised from the folder a user points at, with their class subsets built in.

Layouts (as each dataset is distributed):

========================  =====================================================  =================================
layout                    folder                                                 scored on
========================  =====================================================  =================================
``imagenet-val``          ``<wnid>/*.JPEG`` (1000 WordNet-id folders), or the     all 1000 classes
                          flat ``ILSVRC2012_val_*.JPEG`` + the devkit's ground
                          truth (or Kaggle's ``LOC_val_solution.csv``)
``imagenet-v2``           ``0/ .. 999/`` (folder name = class index)             all 1000 classes
``imagenet-sketch``       ``<wnid>/`` (1000 folders)                             all 1000 classes
``imagenet-r``            ``<wnid>/`` (200 folders)                              logits masked to the 200 classes
``imagenet-a``            ``<wnid>/`` (200 folders)                              logits masked to the 200 classes
``objectnet``             ``images/<class>/`` (313 folders)                      the 113 classes that overlap
                                                                                 ImageNet-1k (125 ImageNet classes)
========================  =====================================================  =================================

ImageNet-R and -A: the argmax runs over the subset's 200 logits only (a mask, not a remap of the
1000-way prediction; Hendrycks et al.'s eval code and imagenet-testbed). ObjectNet follows
imagenet-testbed (``objectnet_accuracy``) and wise-ft (``project_logits``): logits masked to the 125
ImageNet classes that map to ObjectNet, the argmax mapped to its ObjectNet class; images of the 200
ObjectNet classes without an ImageNet counterpart are skipped. ``objectnet_mask=False`` gives the
ObjectNet paper's unmasked variant (argmax over all 1000; a class outside the overlap counts wrong).
ObjectNet images carry a 1-px red border; like imagenet-testbed and wise-ft we crop 2 px from every
side before resizing.

Every set keeps the ImageNet-1k label space (labels are ILSVRC-2012 indices), so a 1000-class model
aligns with it, and carries a ``logit_view`` that turns raw logits into the ones its labels are scored
against: columns outside the subset are set far below the row's smallest kept logit (finite, so every
metric still accepts them; their softmax probability is exactly 0 in float64). For ObjectNet each
class's column (its lowest ImageNet index, which is also its label) holds the max over its ImageNet
classes. The tables are data files under ``synclone/data/labelspaces/`` with their sources.
"""

from __future__ import annotations

import csv
import os
import re
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch

from synclone.data.images import IMAGE_EXTENSIONS
from synclone.data.streaming import CROP_PCT, FileImageSet, Preprocess
from synclone.errors import UserError
from synclone.labels import imagenet1k_space, read_data_file

LAYOUTS = ("imagenet-val", "imagenet-v2", "imagenet-sketch", "imagenet-r", "imagenet-a", "objectnet")
WNID = re.compile(r"n\d{8}")
VAL_FILE = re.compile(r"ILSVRC2012_val_(\d{8})\.[A-Za-z]+")
OBJECTNET_BORDER = 2  # imagenet-testbed crop_image(border=2); wise-ft / model-soups crop (2, 2, w - 2, h - 2)
MASK_MARGIN = 1e4  # masked logits sit this far below the row's smallest kept logit: exp(-1e4) == 0.0

# Folder-name hints, tried in this order (V2's folder names end in "-format-val", so V2 goes before val).
_HINTS = (
    ("objectnet", re.compile(r"objectnet")),
    ("imagenet-v2", re.compile(r"imagenet[-_ ]?v2")),
    ("imagenet-sketch", re.compile(r"sketch")),
    ("imagenet-r", re.compile(r"imagenet[-_ ]?(r|rendition)($|[^a-z])")),
    ("imagenet-a", re.compile(r"(imagenet[-_ ]?(a|adversarial)($|[^a-z]))|natural[-_ ]?adv")),
    ("imagenet-val", re.compile(r"(^|[^a-z])val($|[^a-z])")),
)


# --- tables --------------------------------------------------------------------------------------------------------


def _read(name: str) -> dict:
    return read_data_file(f"labelspaces/{name}")


@cache
def imagenet1k_wnids() -> tuple[str, ...]:
    """The 1000 ILSVRC-2012 WordNet ids in class-index order."""
    wnids = tuple(_read("imagenet1k.json")["wnids"])
    if len(wnids) != 1000:
        raise UserError("bundled imagenet1k.json does not list 1000 wnids; reinstall synclone")
    return wnids


def _subset_indices(file: str) -> np.ndarray:
    d = _read(file)
    index = {w: i for i, w in enumerate(imagenet1k_wnids())}
    idx = np.array([index[w] for w in d["wnids"]], dtype=np.int64)
    if not np.array_equal(idx, np.asarray(d["indices"])):  # the file's two columns must agree
        raise UserError(f"bundled {file} is inconsistent; reinstall synclone")
    return idx


@cache
def imagenet_r_indices() -> np.ndarray:
    """ILSVRC-2012 indices (sorted) of the 200 ImageNet-R classes."""
    return _subset_indices("imagenet_r_wnids.json")


@cache
def imagenet_a_indices() -> np.ndarray:
    """ILSVRC-2012 indices (sorted) of the 200 ImageNet-A classes."""
    return _subset_indices("imagenet_a_wnids.json")


@dataclass(frozen=True)
class ObjectNetClass:
    """One of the 113 ObjectNet classes with ImageNet counterparts: its folder, label and ImageNet indices."""
    folder: str
    label: str
    indices: tuple[int, ...]

    @property
    def column(self) -> int:
        """The ImageNet index that stands for this class (its lowest): the label and the projected logit's column."""
        return min(self.indices)


@dataclass(frozen=True)
class ObjectNetTable:
    """ObjectNet's 313 folders and the 113 classes that map to ImageNet-1k."""
    folders: dict[str, str]
    classes: tuple[ObjectNetClass, ...]

    @property
    def sublist(self) -> np.ndarray:
        """The 125 ImageNet-1k indices that map to an ObjectNet class, sorted."""
        return np.array(sorted(i for c in self.classes for i in c.indices), dtype=np.int64)

    @property
    def columns(self) -> np.ndarray:
        return np.array([c.column for c in self.classes], dtype=np.int64)

    def by_folder(self) -> dict[str, ObjectNetClass]:
        return {c.folder: c for c in self.classes}

    def class_of_imagenet(self) -> np.ndarray:
        """For each of the 1000 ImageNet classes, the position of its ObjectNet class in :attr:`classes`, or -1."""
        out = np.full(1000, -1, dtype=np.int64)
        for k, c in enumerate(self.classes):
            out[list(c.indices)] = k
        return out


@cache
def objectnet_table() -> ObjectNetTable:
    """ObjectNet's folder names and ImageNet mapping, from ``labelspaces/objectnet_to_imagenet.json``."""
    d = _read("objectnet_to_imagenet.json")
    classes = tuple(ObjectNetClass(c["folder"], c["label"], tuple(int(i) for i in c["indices"])) for c in d["classes"])
    return ObjectNetTable(dict(d["folders"]), classes)


# --- scoring on arrays ---------------------------------------------------------------------------------------------


def _as_tensor(logits) -> tuple[torch.Tensor, bool]:
    if isinstance(logits, torch.Tensor):
        return logits, True
    return torch.as_tensor(np.asarray(logits)), False


def _back(x: torch.Tensor, was_tensor: bool):
    return x if was_tensor else x.numpy()


def _check_logits(z: torch.Tensor, n_classes: int = 1000) -> None:
    if z.ndim != 2 or z.shape[1] != n_classes:
        raise UserError(f"expected logits of shape (N, {n_classes}) over ImageNet-1k, got {tuple(z.shape)}")
    if not z.is_floating_point():
        raise UserError(f"logits must be floating point, got {z.dtype}")


def mask_logits(logits, class_indices):
    """``logits`` (N, K) with every column outside ``class_indices`` pushed below the row's kept minimum.

    The argmax of the result is :func:`synclone.probes.shift.masked_argmax`; its softmax is the
    softmax over the kept columns (the masked ones get probability exactly 0 in float64). Values stay
    finite. Returns the same type it is given (torch tensor or numpy array).
    """
    z, was_tensor = _as_tensor(logits)
    if z.ndim != 2 or not z.is_floating_point():
        raise UserError(f"logits must be a float (N, K) array, got {z.dtype} {tuple(z.shape)}")
    idx = torch.as_tensor(np.asarray(class_indices, dtype=np.int64))
    if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= z.shape[1]:
        raise UserError(f"class_indices must be a non-empty list of indices in [0, {z.shape[1]})")
    kept = z[:, idx]
    fill = kept.min(dim=1, keepdim=True).values - MASK_MARGIN if len(z) else kept[:, :1]
    out = fill.expand_as(z).clone()
    out[:, idx] = kept
    return _back(out, was_tensor)


def project_objectnet(logits, mask: bool = True):
    """ImageNet-1k logits (N, 1000) -> ObjectNet logits (N, 113): each class's max over its ImageNet classes.

    The argmax of the projection is imagenet-testbed's ObjectNet prediction (argmax over the 125 mapped
    ImageNet classes, mapped to its ObjectNet class). With ``mask=False`` a 114th column holds the max
    over the 875 unmapped ImageNet classes, so an argmax there is a prediction outside ObjectNet (the
    ObjectNet paper's unmasked scoring; it is always wrong).
    """
    z, was_tensor = _as_tensor(logits)
    _check_logits(z)
    table = objectnet_table()
    cols = [z[:, list(c.indices)].max(dim=1).values for c in table.classes]
    if not mask:
        outside = np.setdiff1d(np.arange(1000), table.sublist)
        cols.append(z[:, torch.as_tensor(outside)].max(dim=1).values)
    return _back(torch.stack(cols, dim=1) if cols else z[:, :0], was_tensor)


def objectnet_view(logits, mask: bool = True):
    """(N, 1000) logits whose argmax is the ObjectNet class's column (:attr:`ObjectNetClass.column`).

    Column ``c.column`` of each class holds :func:`project_objectnet`'s value; with ``mask=True`` every
    other column is masked as in :func:`mask_logits`; with ``mask=False`` the unmapped classes keep their
    logits (an argmax there matches no label).
    """
    z, was_tensor = _as_tensor(logits)
    _check_logits(z)
    table = objectnet_table()
    proj = project_objectnet(z, mask=True)
    members = torch.as_tensor(table.sublist)
    cols = torch.as_tensor(table.columns)
    if mask:
        out = mask_logits(z, table.columns)
    else:
        out = z.clone()
        out[:, members] = out[:, members].min(dim=1, keepdim=True).values - MASK_MARGIN
    out[:, cols] = proj.to(out.dtype)
    return _back(out, was_tensor)


# --- layout detection ----------------------------------------------------------------------------------------------


def _subdirs(root: Path) -> list[str]:
    return sorted(e.name for e in root.iterdir() if e.is_dir() and not e.name.startswith("."))


def _images_in(folder: Path) -> list[Path]:
    return sorted(Path(e.path) for e in _scandir(folder)
                  if e.is_file() and not e.name.startswith(".") and Path(e.name).suffix.lower() in IMAGE_EXTENSIONS)


def _scandir(folder: Path):
    with os.scandir(folder) as it:
        return list(it)


def _images_root(path: Path) -> Path:
    """ObjectNet's release folder holds ``images/`` next to ``mappings/``: read the images folder."""
    if (path / "images").is_dir() and (path / "mappings").is_dir():
        return path / "images"
    return path


def _hint(root: Path) -> str | None:
    names = [root.name.lower()] + ([root.parent.name.lower()] if root.name.lower() == "images" else [])
    for layout, pattern in _HINTS:
        if any(pattern.search(n) for n in names):
            return layout
    return None


def detect_layout(path: str | Path) -> str | None:
    """The ImageNet-family layout of ``path`` (one of :data:`LAYOUTS`), or None when it looks like none of them.

    WordNet-id folders are always claimed (a wnid outside ImageNet-1k, or a mix of wnid and other
    folders, is an error); numbered folders are ImageNet-V2 when there are 1000 of them or the folder
    is named so; ObjectNet class folders when there are at least 100 of them or the folder is named so.
    A few wnid folders that fit both ImageNet-R and -A, with no telling folder name, are an error
    asking for the layout by name (``imagenet-r:PATH``).
    """
    root = _images_root(Path(path))
    if not root.is_dir():
        return None
    dirs = _subdirs(root)
    hint = _hint(root)
    wnid_dirs = [d for d in dirs if WNID.fullmatch(d)]
    if not wnid_dirs and _flat_val(root):
        return "imagenet-val"  # other folders here (e.g. the devkit) are not classes
    if not dirs:
        return None
    if wnid_dirs:
        _check_wnid_dirs(root, dirs, "an ImageNet-style folder")
        return _wnid_layout(root, set(dirs), hint)
    if all(d.isdigit() for d in dirs):
        if hint == "imagenet-v2" or len(dirs) == 1000:
            _check_v2_dirs(root, dirs)
            return "imagenet-v2"
        return None
    known = objectnet_table().folders
    if hint == "objectnet" or (len(dirs) >= 100 and all(d in known for d in dirs)):
        _check_objectnet_dirs(root, dirs)
        return "objectnet"
    return None


def _flat_val(root: Path) -> list[Path]:
    return sorted((Path(e.path) for e in _scandir(root) if e.is_file() and VAL_FILE.fullmatch(e.name)),
                  key=lambda p: p.name)


def _check_wnid_dirs(root: Path, dirs: list[str], what: str) -> None:
    other = [d for d in dirs if not WNID.fullmatch(d)]
    if len(other) == len(dirs):
        raise UserError(f"'{root}' has no WordNet-id class folders (n01440764/ ...), so it is not {what}")
    if other:
        raise UserError(f"'{root}' mixes WordNet-id class folders with other folders ({', '.join(other[:3])}); "
                        f"{what} holds only n########/ class folders")
    unknown = sorted(set(dirs) - set(imagenet1k_wnids()))
    if unknown:
        raise UserError(f"'{root}': class folder(s) {', '.join(unknown[:3])} are not ImageNet-1k classes "
                        f"({len(unknown)} of {len(dirs)}); only the 1000 ILSVRC-2012 wnids can be scored")


def _wnid_layout(root: Path, dirs: set[str], hint: str | None) -> str:
    wnids = imagenet1k_wnids()
    r = {wnids[i] for i in imagenet_r_indices()}
    a = {wnids[i] for i in imagenet_a_indices()}
    in_r, in_a = dirs <= r, dirs <= a
    fits = {"imagenet-val": True, "imagenet-sketch": True, "imagenet-r": in_r, "imagenet-a": in_a}
    if hint is not None and fits.get(hint, False):
        return hint  # type: ignore[return-value]
    if dirs == r:
        return "imagenet-r"
    if dirs == a:
        return "imagenet-a"
    if not (in_r or in_a):
        return "imagenet-val"
    if in_r and in_a:
        raise UserError(f"'{root}': its {len(dirs)} class folders are among both the ImageNet-R and the ImageNet-A "
                        "classes; name the layout: imagenet-r:PATH, imagenet-a:PATH or imagenet-val:PATH")
    layout = "imagenet-r" if in_r else "imagenet-a"
    warnings.warn(f"'{root}' read as {layout}: all its {len(dirs)} class folders are {layout} classes (logits "
                  f"masked to its 200); write imagenet-val:{root} to score all 1000 classes", stacklevel=3)
    return layout


def _check_v2_dirs(root: Path, dirs: list[str]) -> None:
    bad = [d for d in dirs if not d.isdigit() or not 0 <= int(d) <= 999]
    if bad:
        raise UserError(f"'{root}': ImageNet-V2 class folders are named 0..999 (the class index); found "
                        f"{', '.join(bad[:3])}")


def _check_objectnet_dirs(root: Path, dirs: list[str]) -> None:
    known = objectnet_table().folders
    bad = [d for d in dirs if d not in known]
    if bad:
        raise UserError(f"'{root}': {', '.join(bad[:3])} {'is' if len(bad) == 1 else 'are'} not ObjectNet class "
                        f"folder(s) ({len(bad)} of {len(dirs)}); point at ObjectNet's images/ folder "
                        "(e.g. alarm_clock/, banana/, ...)")


# --- loading -------------------------------------------------------------------------------------------------------


def load_imagenet_set(path: str | Path, layout: str | None = None, *, input_size=None, crop_pct: float = CROP_PCT,
                      objectnet_mask: bool = True, name: str | None = None) -> FileImageSet:
    """A streaming test set for the ImageNet-family folder ``path``; ``layout`` is detected when not given.

    ``input_size`` (C, H, W) fixes the size images are read at; by default each model reads them at
    its own ``input_size``. Images are resized to ``size / crop_pct`` and centre-cropped. The set's
    ``convention`` names its class subset and preprocessing; its ``logit_view`` applies the subset.
    """
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"ImageNet-style dataset folder '{path}' does not exist")
    root = _images_root(root)
    if layout is not None and layout not in LAYOUTS:
        raise UserError(f"unknown ImageNet layout '{layout}'; choose from {', '.join(LAYOUTS)}")
    if layout is None:
        layout = detect_layout(root)
        if layout is None:
            raise UserError(f"'{root}' is not an ImageNet-family folder ({', '.join(LAYOUTS)}): expected WordNet-id "
                            "class folders (n01440764/...), folders 0..999 (ImageNet-V2) or ObjectNet's class folders")

    space = imagenet1k_space()
    pre = Preprocess(crop_pct=crop_pct, border=OBJECTNET_BORDER if layout == "objectnet" else 0)
    how = pre.describe(input_size)
    view = None
    extra: dict = {"layout": layout, "root": str(root)}
    if layout == "objectnet":
        paths, labels, skipped = _objectnet_files(root)
        view = _ObjectNetView(objectnet_mask)
        scoring = ("logits masked to the 125 mapped ImageNet classes, argmax mapped to its ObjectNet class "
                   "(imagenet-testbed)" if objectnet_mask else
                   "argmax over all 1000 logits mapped to its ObjectNet class; unmapped classes count wrong "
                   "(ObjectNet paper)")
        conv = (f"classes=113 (ObjectNet classes overlapping ImageNet-1k); {scoring}; {skipped} image(s) of the 200 "
                f"other ObjectNet classes skipped; labels = each class's lowest ImageNet index")
        extra.update(skipped=skipped, class_subset=objectnet_table().sublist.tolist())
    elif layout in ("imagenet-r", "imagenet-a"):
        subset = imagenet_r_indices() if layout == "imagenet-r" else imagenet_a_indices()
        paths, labels = _wnid_files(root, layout, allowed=set(subset.tolist()))
        view = _MaskView(subset)
        title = "ImageNet-R" if layout == "imagenet-r" else "ImageNet-A"
        conv = f"classes=200 ({title} subset); logits masked before argmax"
        extra["class_subset"] = subset.tolist()
    elif layout == "imagenet-v2":
        paths, labels = _v2_files(root)
        conv = "classes=1000 (ImageNet-1k); argmax over all 1000 logits; folder name = class index"
    elif layout == "imagenet-val" and _flat_val(root) and not any(WNID.fullmatch(d) for d in _subdirs(root)):
        paths, labels, source = _flat_val_files(root)
        conv = f"classes=1000 (ImageNet-1k); argmax over all 1000 logits; labels from {source}"
    else:
        paths, labels = _wnid_files(root, layout, allowed=None)
        conv = "classes=1000 (ImageNet-1k); argmax over all 1000 logits"
    if not paths:
        raise UserError(f"'{root}' ({layout}) holds no images to score")
    label = name or (layout if layout != "imagenet-v2" or "v2" not in root.name.lower() else f"imagenet-v2:{root.name}")
    return FileImageSet(paths, labels, space, label, input_size=input_size, preprocess=pre, logit_view=view,
                        convention=f"{conv}; {how}", source=str(root), extra=extra)


class _MaskView:
    """Picklable logit view masking to ``indices`` (see :func:`mask_logits`)."""

    def __init__(self, indices: np.ndarray) -> None:
        self.indices = np.asarray(indices, dtype=np.int64)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return mask_logits(logits, self.indices)


class _ObjectNetView:
    def __init__(self, mask: bool) -> None:
        self.mask = mask

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return objectnet_view(logits, self.mask)


def _wnid_files(root: Path, layout: str, allowed: set[int] | None) -> tuple[list[Path], list[int]]:
    dirs = _subdirs(root)
    _check_wnid_dirs(root, dirs, f"an {layout} folder")
    index = {w: i for i, w in enumerate(imagenet1k_wnids())}
    if allowed is not None:
        outside = [d for d in dirs if index[d] not in allowed]
        if outside:
            raise UserError(f"'{root}' read as {layout}: class folder(s) {', '.join(outside[:3])} are not among its "
                            f"200 classes ({len(outside)} of {len(dirs)}); check the folder or name another layout")
    paths, labels = [], []
    for d in dirs:
        files = _images_in(root / d)
        paths += files
        labels += [index[d]] * len(files)
    return paths, labels


def _v2_files(root: Path) -> tuple[list[Path], list[int]]:
    dirs = _subdirs(root)
    _check_v2_dirs(root, dirs)
    paths, labels = [], []
    for d in sorted(dirs, key=int):
        files = _images_in(root / d)
        paths += files
        labels += [int(d)] * len(files)
    return paths, labels


def _objectnet_files(root: Path) -> tuple[list[Path], list[int], int]:
    dirs = _subdirs(root)
    _check_objectnet_dirs(root, dirs)
    mapped = objectnet_table().by_folder()
    paths, labels, skipped = [], [], 0
    for d in dirs:
        files = _images_in(root / d)
        if d in mapped:
            paths += files
            labels += [mapped[d].column] * len(files)
        else:
            skipped += len(files)
    return paths, labels, skipped


# --- the flat ImageNet val folder ----------------------------------------------------------------------------------

DEVKIT_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
KAGGLE_TRUTH = "LOC_val_solution.csv"


def _flat_val_files(root: Path) -> tuple[list[Path], list[int], str]:
    files = _flat_val(root)
    truth, source = _val_truth(root)
    index = {w: i for i, w in enumerate(imagenet1k_wnids())}
    labels = []
    for p in files:
        number = int(VAL_FILE.fullmatch(p.name).group(1))  # type: ignore[union-attr]
        wnid = truth.get(number)
        if wnid is None:
            raise UserError(f"{source} has no label for '{p.name}'")
        if wnid not in index:
            raise UserError(f"{source} labels '{p.name}' as {wnid}, which is not an ImageNet-1k class")
        labels.append(index[wnid])
    return files, labels, source


def _val_truth(root: Path) -> tuple[dict[int, str], str]:
    """Image number -> wnid from the devkit (ground truth + meta.mat) or Kaggle's LOC_val_solution.csv.

    Looked for in the folder and its ancestors: Kaggle keeps the CSV four levels up
    (``LOC_val_solution.csv`` next to ``ILSVRC/Data/CLS-LOC/val/``).
    """
    for base in [root, *list(root.parents)[:4]]:
        for data in (base, base / "data", base / "ILSVRC2012_devkit_t12" / "data"):
            if (data / DEVKIT_TRUTH).is_file():
                return _devkit_truth(data), str(data / DEVKIT_TRUTH)
        if (base / KAGGLE_TRUTH).is_file():
            return _kaggle_truth(base / KAGGLE_TRUTH), str(base / KAGGLE_TRUTH)
    raise UserError(f"'{root}' holds flat ImageNet val images (ILSVRC2012_val_*.JPEG) but no labels: put the devkit's "
                    f"ILSVRC2012_devkit_t12/data/ ({DEVKIT_TRUTH} + meta.mat) or Kaggle's {KAGGLE_TRUTH} next to "
                    "it, or sort the images into wnid folders")


def _devkit_truth(data: Path) -> dict[int, str]:
    """The devkit's ground truth holds ILSVRC2012_IDs (meta.mat's numbering, not the sorted-wnid class index)."""
    meta = data / "meta.mat"
    if not meta.is_file():
        raise UserError(f"'{data}' has {DEVKIT_TRUTH} but no meta.mat to turn its ILSVRC2012_IDs into classes")
    from scipy.io import loadmat

    try:
        synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
        id_to_wnid = {int(i): str(w) for i, w, n in zip(synsets["ILSVRC2012_ID"], synsets["WNID"],
                                                        synsets["num_children"], strict=True) if int(n) == 0}
    except (OSError, KeyError, ValueError) as err:
        raise UserError(f"cannot read the devkit's '{meta}': {err}") from None
    truth = {}
    for k, line in enumerate((data / DEVKIT_TRUTH).read_text().split(), start=1):
        if int(line) not in id_to_wnid:
            raise UserError(f"{data / DEVKIT_TRUTH} line {k}: ILSVRC2012_ID {line} is not a leaf class in meta.mat")
        truth[k] = id_to_wnid[int(line)]
    return truth


def _kaggle_truth(path: Path) -> dict[int, str]:
    truth = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            m = re.fullmatch(r"ILSVRC2012_val_(\d{8})", (row.get("ImageId") or "").strip())
            words = (row.get("PredictionString") or "").split()
            if m is None or not words:
                raise UserError(f"{path}: expected ImageId,PredictionString rows like "
                                "'ILSVRC2012_val_00000001,n01751748 ...'")
            truth[int(m.group(1))] = words[0]
    return truth
