"""Shared plumbing for the bias probes: bundled data files, image files, and running a model over them.

The probes read folders of image files (model-vs-human's cue-conflict layout, ImageNet-9's variant
folders, FOCUS-style annotated tables) and feed them to a model that takes pixels in [0, 1] (a
:class:`synclone.models.classifier.Classifier`, or any callable mapping a float tensor (N, C, H, W)
to logits). Images are read with Pillow, converted to the model's channel count and resized to its
input size, so one reader serves 28x28 grey Fashion-MNIST models and 224x224 RGB ImageNet models.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from functools import cache, lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

from synclone.errors import UserError
from synclone.labels import LabelSpace

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


@cache
def read_data_file(relpath: str) -> dict:
    """A JSON file bundled under ``synclone/data/`` (e.g. ``"labelspaces/imagenet16.json"``)."""
    node = resources.files("synclone") / "data"
    for part in relpath.split("/"):
        node = node / part
    try:
        return json.loads(node.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"bundled data file 'synclone/data/{relpath}' is missing; reinstall synclone") from None


@lru_cache(maxsize=1)
def imagenet1k_space() -> LabelSpace:
    """The ImageNet-1k label space (ILSVRC-2012 index order), read from ``data/labelspaces/imagenet1k.json``."""
    return LabelSpace.from_dict(read_data_file("labelspaces/imagenet1k.json"))


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name (hidden files skipped)."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def model_input_size(model, input_size: Sequence[int] | None = None) -> tuple[int, int, int]:
    """(C, H, W) the images are read at: ``input_size`` if given, else the model's ``input_size``."""
    size = input_size if input_size is not None else getattr(model, "input_size", None)
    if size is None or len(size) != 3:
        raise UserError("the model has no input_size (C, H, W); pass input_size=(3, 224, 224) or similar")
    c, h, w = (int(v) for v in size)
    if c not in (1, 3):
        raise UserError(f"input_size {tuple(size)}: only 1 (grey) or 3 (RGB) channels can be read from image files")
    return c, h, w


def load_image(path: Path, size: tuple[int, int, int]) -> np.ndarray:
    """One image file as float32 (C, H, W) in [0, 1], converted to ``size``'s channels and resized to its H x W."""
    from PIL import Image

    c, h, w = size
    try:
        with Image.open(path) as im:
            im = im.convert("L" if c == 1 else "RGB")
            if im.size != (w, h):
                im = im.resize((w, h), Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except OSError as err:
        raise UserError(f"cannot read image '{path}': {err}") from None
    return arr[None] if c == 1 else arr.transpose(2, 0, 1)


def predict_logits(model: Callable, paths: Sequence[Path], input_size: Sequence[int] | None = None,
                   batch_size: int = 64, device: str = "cpu") -> np.ndarray:
    """The model's outputs (N, K) as float64 for the image files ``paths``, read at the model's input size.

    ``model`` is a torch module or any callable taking a float tensor in [0, 1]; modules are put in
    eval mode and run without gradients.
    """
    import torch

    size = model_input_size(model, input_size)
    if isinstance(model, torch.nn.Module):
        model.eval()
    outs = []
    with torch.no_grad():
        for start in range(0, len(paths), batch_size):
            batch = np.stack([load_image(p, size) for p in paths[start:start + batch_size]])
            out = model(torch.from_numpy(batch).to(device))
            outs.append(out.detach().double().cpu().numpy())
    if not outs:
        return np.zeros((0, 0))
    return np.concatenate(outs)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, shifted by the row max so large logits do not overflow."""
    z = np.asarray(logits, dtype=np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def class_lookup(space: LabelSpace) -> dict[str, int]:
    """Every class name, slug and lower-cased name of ``space`` -> its index (to read folder names)."""
    out: dict[str, int] = {}
    for i, (name, slug) in enumerate(zip(space.classes, space.slugs, strict=True)):
        for key in (name, slug, name.lower()):
            out.setdefault(key, i)
    return out
