"""Resolve a dataset spec ("fashion_mnist", "fashion_mnist:test", or a folder) into an :class:`ImageSet`."""

from __future__ import annotations

import warnings
from pathlib import Path

from synclone.data.fashion_mnist import load_fashion_mnist
from synclone.data.folder import load_image_folder_tensors, read_dataset_folder
from synclone.data.imagenet import LAYOUTS, detect_layout, load_imagenet_set
from synclone.data.images import check_image_file
from synclone.data.imageset import ImageSet
from synclone.data.shards import ShardImageSet, is_shard_folder, parse_size, write_shards
from synclone.data.streaming import FileImageSet
from synclone.errors import UserError
from synclone.labels import LabelSpace

BUILTIN = {"fashion_mnist": load_fashion_mnist}


def resolve_dataset(spec: str, split: str = "train", data_root: str | None = None,
                    image_size: int | None = None) -> ImageSet:
    """A built-in dataset by name (``name`` or ``name:split``) or a dataset/image folder by path.

    Folders are decoded into memory (small images), unless ``image_size`` is given: then they are
    streamed from disk a batch at a time, resized to ``image_size / 0.875`` and centre-cropped to
    ``image_size`` (ImageNet-sized data that would not fit in memory). ImageNet-family folders (WordNet-id
    class folders, or ``LAYOUT:PATH`` such as ``imagenet-val:/data/imagenet/val``) always stream, with the
    ImageNet-1k label space, at ``image_size`` or 224.
    """
    name, _, rest = spec.partition(":")
    if name in BUILTIN:
        if image_size is not None:
            raise UserError(f"data.image_size applies to folders, not to the built-in '{name}'; remove it")
        return BUILTIN[name](rest or split, data_root=data_root)
    path, layout = (Path(rest), name) if name in LAYOUTS and rest else (Path(spec), None)
    if path.is_dir() and layout is None and is_shard_folder(path):
        size = int(image_size or 224)
        return ShardImageSet(path, (3, size, size))
    if path.is_dir():
        layout = layout or _imagenet_layout(path, split)
        if layout is not None:
            size = int(image_size or 224)
            return load_imagenet_set(path, layout, input_size=(3, size, size), name=path.name)
        if image_size is not None:
            return streamed_folder(path, split, image_size)

        return load_image_folder_tensors(path)
    if layout is not None:
        raise UserError(f"dataset '{spec}': {layout} folder '{path}' does not exist")
    raise UserError(f"dataset '{spec}' is neither a built-in ({', '.join(sorted(BUILTIN))}), an existing folder, "
                    f"nor LAYOUT:PATH with LAYOUT one of {', '.join(LAYOUTS)}")


def _imagenet_layout(path: Path, split: str) -> str | None:
    """The ImageNet-family layout of a folder that is not a synclone dataset folder (None otherwise)."""
    if (path / split / "metadata.jsonl").is_file() or (path / "metadata.jsonl").is_file():
        return None  # a synclone dataset folder (e.g. an ImageNet clone): its own metadata names the labels
    return detect_layout(path)


def streamed_folder(path: Path, split: str, image_size: int, label_space: LabelSpace | None = None) -> ImageSet:
    """The images of a synclone dataset folder or a plain class folder, read from disk a batch at a time at
    ``image_size`` (3 channels); labels in the folder's own space, or re-indexed into ``label_space`` (every
    class of the folder must be in it). ImageNet-family folders go through ``load_imagenet_set`` instead.
    """
    size = (3, int(image_size), int(image_size))
    records, space = read_dataset_folder(path, split)
    if not records:
        raise UserError(f"dataset folder '{path}' has no images")
    target = label_space or space
    remap = [target.index(c) for c in space.classes] if label_space is not None else list(range(len(space)))
    # Files that cannot be images (a row pointing at /dev/zero or a FIFO, an empty file, a bomb's header) are
    # skipped and recorded, as the in-memory reader does; files that fail only when decoded are found by the stage
    # that reads the set (synclone.data.readable: the training loader, evaluation's readability pass).
    reasons = {r.id: f"{r.path}: {why}" for r in records if (why := check_image_file(r.path)) is not None}
    if reasons:
        first = next(iter(reasons))
        warnings.warn(f"{len(reasons)} unreadable image(s) skipped in '{path}' (first: {reasons[first]})",
                      stacklevel=2)
        records = [r for r in records if r.id not in reasons]
        if not records:
            raise UserError(f"dataset folder '{path}' has no readable images")
    return FileImageSet([r.path for r in records], [remap[r.label] for r in records], target, path.name,
                        input_size=size, source=str(path),
                        extra={"skipped": list(reasons), "skip_reasons": dict(reasons)})


def shard_dataset(folder: str | Path, output: str | Path, shard_size: str | int = "1GB", split: str = "train") -> Path:
    """Pack a dataset folder (synclone, plain class folders, or an ImageNet layout) into webdataset shards of at
    most ``shard_size`` (``1GB``, ``500MB``); labels in the folder's label space, the files' bytes unchanged."""
    size = parse_size(shard_size)
    ds = resolve_dataset(str(folder), split, image_size=224)
    if not isinstance(ds, FileImageSet):
        raise UserError(f"'{folder}' is not a folder of image files; synclone shard packs dataset folders")
    root = Path(folder)
    ids = [p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p) for p in ds.paths]
    return write_shards(ds.paths, ds.labels.tolist(), ids, ds.label_space, output, size, source=str(folder))
