"""Datasets the suite evaluates on: built-ins (Fashion-MNIST, OOD sets, noise) and folders.

Every loader returns a :class:`TensorImageSet` shaped like the clean test set (``like``), so one
model reads them all: OOD images are converted to the clean set's channels and size.
"""

from __future__ import annotations

import gzip
import pickle
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from synclone.data.folder import METADATA, load_image_folder_tensors, read_dataset_folder
from synclone.data.imagenet import LAYOUTS, detect_layout, load_imagenet_set
from synclone.data.imageset import ImageSet, TensorImageSet
from synclone.data.sources import BUILTIN, resolve_dataset, streamed_folder
from synclone.errors import UserError
from synclone.labels import LabelSpace

NOISE_IMAGES = 2000


def _fit(images: torch.Tensor, like: TensorImageSet | None) -> torch.Tensor:
    """uint8 (N, C, H, W) converted to ``like``'s channel count and size (bilinear, antialiased)."""
    if like is None:
        return images
    c, h, w = like.image_shape
    x = images
    if x.shape[1] != c:
        x = x.float().mean(1, keepdim=True) if c == 1 else x.float().expand(-1, c, -1, -1)
    if tuple(x.shape[2:]) != (h, w):
        x = F.interpolate(x.float(), size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8) if x.dtype != torch.uint8 else x


def _ood(images: np.ndarray | torch.Tensor, name: str, like: TensorImageSet | None) -> TensorImageSet:
    x = torch.as_tensor(np.asarray(images))
    if x.ndim == 3:
        x = x[:, None]
    x = _fit(x.to(torch.uint8) if x.dtype == torch.uint8 else x, like)
    # OOD images belong to no class of the model's label space: they get a one-class space of their own,
    # so no probe can score them as if they had a label.
    return TensorImageSet(x, torch.zeros(len(x), dtype=torch.long), LabelSpace.from_names(["ood"], name), name)


def load_digits_ood(like: TensorImageSet | None = None) -> TensorImageSet:
    """scikit-learn's 1,797 handwritten digits (8x8, 0-16 ink) scaled to 0-255 and to ``like``'s size."""
    from sklearn.datasets import load_digits

    d = load_digits().images  # float 0..16
    return _ood(torch.from_numpy(d * (255.0 / 16.0)).float(), "digits", like)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain numpy arrays and nothing else: the file is third-party, so no arbitrary code."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a third-party pickle")
        return super().find_class(module, name)


def load_animal_shapes_ood(like: TensorImageSet | None = None) -> TensorImageSet:
    """The 10,000 animal silhouettes (28x28) of PyPI's ``animal-shape-mnist``, read without its TensorFlow loader."""
    try:
        root = resources.files("animal_shape_mnist") / "data" / "Animal Shape"
    except ModuleNotFoundError:
        raise UserError("the OOD set 'animal_shapes' needs `pip install animal-shape-mnist`") from None
    with resources.as_file(root / "animal_data_version_3.gz") as path, gzip.open(path, "rb") as f:
        data = _NumpyOnlyUnpickler(f).load()
    return _ood(np.asarray(data, dtype=np.uint8), "animal_shapes", like)


def noise_ood(kind: str, like: TensorImageSet, n: int = NOISE_IMAGES, seed: int = 0) -> TensorImageSet:
    """Uniform noise in [0, 255] or Gaussian noise (mean 128, std 64, clipped), shaped like ``like``."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, *like.image_shape)
    if kind == "uniform_noise":
        x = torch.randint(0, 256, shape, generator=g, dtype=torch.int64)
    else:
        x = (torch.randn(shape, generator=g) * 64 + 128).round().clamp(0, 255)
    return _ood(x.to(torch.uint8), kind, like)


OOD_BUILTINS = ("digits", "animal_shapes", "uniform_noise", "gaussian_noise")


def load_eval_dataset(spec: str, split: str = "test", data_root: str | None = None,
                      like: ImageSet | None = None, image_size: int | None = None) -> ImageSet:
    """Built-in datasets (``fashion_mnist[:split]`` and the OOD sets above) or a dataset/image folder.

    ImageNet-family folders (val, V2, Sketch, R, A, ObjectNet) are recognised by their layout, or named
    as ``LAYOUT:PATH``; they load as streaming sets (:class:`synclone.data.streaming.FileImageSet`).
    Other folders are decoded into memory at ``like``'s size, or with ``image_size`` streamed at that size.
    """
    name = spec.partition(":")[0]
    if name == "digits":
        return load_digits_ood(like)
    if name == "animal_shapes":
        return load_animal_shapes_ood(like)
    if name in ("uniform_noise", "gaussian_noise"):
        if like is None:
            raise UserError(f"'{name}' needs a clean dataset to copy its image shape from")
        return noise_ood(name, like)

    # ImageNet-family sets stream from disk, read at each model's input size unless the clean set fixes one.
    input_size = getattr(like, "input_size", None)
    if name in LAYOUTS:  # "imagenet-r:PATH" names the layout instead of detecting it
        folder = spec.partition(":")[2]
        if not folder:
            raise UserError(f"dataset '{spec}': give the folder after the layout, e.g. {name}:/data/{name}")
        return load_imagenet_set(folder, name, input_size=input_size)
    if name in BUILTIN:
        return resolve_dataset(spec, split, data_root)
    path = Path(spec)
    if not path.is_dir():
        raise UserError(f"dataset '{spec}' is neither a built-in ({', '.join(sorted([*BUILTIN, *OOD_BUILTINS]))}) "
                        f"nor an existing folder (ImageNet-family folders may be named: {', '.join(LAYOUTS)}:PATH)")
    layout = detect_layout(path)
    if layout is not None:
        return load_imagenet_set(path, layout, input_size=input_size)

    size = like.image_shape[1:] if like is not None else None
    channels = like.image_shape[0] if like is not None else None
    # A generated dataset has only a 'train' split; evaluated as a shifted set, that is the split meant.

    if not (path / split / METADATA).is_file() and (path / "train" / METADATA).is_file():
        split = "train"
    space = _folder_space(path, split, like)
    if image_size is not None:

        return streamed_folder(path, split, image_size, label_space=space)
    return load_image_folder_tensors(path, label_space=space, size=size, channels=channels, split=split)


def _folder_space(path: Path, split: str, like: TensorImageSet | None) -> LabelSpace | None:
    """``like``'s label space when every folder class names one of its classes (by name or slug).

    A plain ``<class>/<image>`` folder lists its classes alphabetically by folder name; mapping them
    by name onto the clean set's space lets any such folder serve as a shifted test set. Otherwise
    the folder keeps its own space and the label-space check names the mismatch.
    """
    if like is None:
        return None

    _, own = read_dataset_folder(path, split)
    try:
        for c in own.classes:
            like.label_space.index(c)
    except UserError:
        return None
    return like.label_space
