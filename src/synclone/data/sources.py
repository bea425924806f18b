"""Resolve a dataset spec ("fashion_mnist", "fashion_mnist:test", or a folder) into an :class:`ImageSet`."""

from __future__ import annotations

from pathlib import Path

from synclone.data.fashion_mnist import load_fashion_mnist
from synclone.data.imageset import TensorImageSet
from synclone.errors import UserError

BUILTIN = {"fashion_mnist": load_fashion_mnist}


def resolve_dataset(spec: str, split: str = "train", data_root: str | None = None) -> TensorImageSet:
    """A built-in dataset by name (``name`` or ``name:split``) or a dataset/image folder by path."""
    name, _, explicit_split = spec.partition(":")
    if name in BUILTIN:
        return BUILTIN[name](explicit_split or split, data_root=data_root)
    path = Path(spec)
    if path.is_dir():
        from synclone.curate.folder import load_image_folder_tensors

        return load_image_folder_tensors(path)
    raise UserError(f"dataset '{spec}' is neither a built-in ({', '.join(sorted(BUILTIN))}) nor an existing folder")
