"""Fashion-MNIST from whichever source this machine has, never silently from the internet in tests.

Sources, in order: ``data_root`` (or the ``SYNCLONE_DATA`` environment variable); Debian's package
``dataset-fashion-mnist`` (IDX ``.gz`` files under /usr/share/datasets/fashion-mnist); torchvision's
download into the user cache, for users with internet. When none works the error says how to get it.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch

from synclone.data.imageset import TensorImageSet
from synclone.errors import UserError
from synclone.labels import FASHION_MNIST

DEBIAN_PACKAGE = "dataset-fashion-mnist"
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
HOW_TO_GET = (
    "install Debian's package (sudo apt-get install dataset-fashion-mnist), or put the four IDX files "
    "(train-images-idx3-ubyte.gz, ...) in a folder and pass --data-root DIR or set SYNCLONE_DATA=DIR"
)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array; the format is Yann LeCun's MNIST format."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise UserError(f"cannot read IDX file '{path}': {err}; {HOW_TO_GET}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UserError(f"'{path}' is not an unsigned-byte IDX file; {HOW_TO_GET}")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(data) - offset != expected:
        raise UserError(f"'{path}' is truncated: {len(data) - offset} bytes for shape {dims}; {HOW_TO_GET}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _find_in(folder: Path, split: str) -> tuple[Path, Path] | None:
    """The images and labels files of ``split`` in ``folder`` (also in torchvision's FashionMNIST/raw layout)."""
    for base in (folder, folder / "fashion-mnist", folder / "FashionMNIST" / "raw"):
        found = []
        for stem in _FILES[split]:
            cands = [base / f"{stem}.gz", base / stem]
            hit = next((c for c in cands if c.is_file()), None)
            if hit is None:
                break
            found.append(hit)
        if len(found) == 2:
            return found[0], found[1]
    return None


def debian_dir() -> Path | None:
    """The Debian package's data folder, from ``dpkg -L`` when dpkg knows it, else the usual path."""
    if shutil.which("dpkg"):
        try:
            res = subprocess.run(["dpkg", "-L", DEBIAN_PACKAGE], capture_output=True, text=True, timeout=10)
            for line in res.stdout.splitlines():
                if line.endswith("train-images-idx3-ubyte.gz"):
                    return Path(line).parent
        except (OSError, subprocess.SubprocessError):
            pass
    return DEBIAN_DIR if DEBIAN_DIR.is_dir() else None


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "synclone" / "fashion-mnist"


def locate(split: str, data_root: str | Path | None = None, download: bool = True) -> tuple[tuple[Path, Path], str]:
    """Find the IDX files of ``split``; return them with the name of the source that had them."""
    if split not in _FILES:
        raise UserError(f"unknown Fashion-MNIST split '{split}': use 'train' or 'test'")
    root = data_root or os.environ.get("SYNCLONE_DATA")
    if root:
        hit = _find_in(Path(root), split)
        if hit:
            return hit, f"data root {root}"
        # An explicit root that lacks the files is a mistake to report, not a reason to look elsewhere.
        raise UserError(f"no Fashion-MNIST {split} files in '{root}' (looked for {_FILES[split][0]}.gz); {HOW_TO_GET}")
    deb = debian_dir()
    if deb is not None:
        hit = _find_in(deb, split)
        if hit:
            return hit, f"Debian package {DEBIAN_PACKAGE}"
    cache = default_cache()
    hit = _find_in(cache, split)
    if hit:
        return hit, f"cache {cache}"
    if download:
        try:
            from torchvision.datasets import FashionMNIST

            FashionMNIST(str(cache), train=(split == "train"), download=True)
        except Exception as err:  # any network failure lands here; the message names the remedy
            raise UserError(
                f"Fashion-MNIST not found locally and the download failed ({type(err).__name__}); {HOW_TO_GET}"
            ) from None
        hit = _find_in(cache, split)
        if hit:
            return hit, "torchvision download"
    raise UserError(f"Fashion-MNIST not found; {HOW_TO_GET}")


def load_fashion_mnist(
    split: str = "train", data_root: str | Path | None = None, download: bool = True
) -> TensorImageSet:
    """Fashion-MNIST ``split`` ('train' or 'test') as a :class:`TensorImageSet` of uint8 (N, 1, 28, 28) images."""
    (img_path, lbl_path), source = locate(split, data_root, download)
    images = read_idx(img_path)
    labels = read_idx(lbl_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise UserError(f"Fashion-MNIST files in '{img_path.parent}' are inconsistent: "
                        f"{images.shape} vs {labels.shape}")
    return TensorImageSet(
        images=torch.from_numpy(images.copy()).unsqueeze(1),
        labels=torch.from_numpy(labels.astype(np.int64)),
        label_space=FASHION_MNIST,
        name=f"fashion_mnist_{split}",
        source=source,
    )
