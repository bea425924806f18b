"""Image sets read from files a batch at a time, so 50,000 ImageNet-sized test images never sit in memory at once.

A :class:`FileImageSet` holds paths and labels only. :meth:`FileImageSet.iter_batches` decodes and
preprocesses one batch on a thread pool while the model runs on the previous one (Pillow releases the
GIL while it decodes and resizes). :class:`synclone.probes.base.EvalContext` streams any set that has
``iter_batches``; code written for in-memory sets still works through ``images``/``batch()``, which
decode on demand (meant for capped subsets).

Preprocessing is the ImageNet evaluation convention of torchvision's reference scripts and timm:
resize the shorter side to ``floor(size / crop_pct)`` (256 for 224 at the default ``crop_pct`` 0.875,
bilinear, antialiased), then centre-crop to the input size. A set made with ``input_size=None`` reads
at each model's own ``input_size`` (the logits cache key holds the model's config, so sizes never mix).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from synclone.data.images import open_image
from synclone.data.imageset import ImageSet, TensorImageSet
from synclone.errors import UserError
from synclone.labels import LabelSpace

DEFAULT_INPUT_SIZE = (3, 224, 224)
CROP_PCT = 0.875


@dataclass(frozen=True)
class Preprocess:
    """Remove ``border`` pixels on every side, resize to ``size / crop_pct`` and centre-crop to ``size``."""

    crop_pct: float = CROP_PCT
    border: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.crop_pct <= 1.0:
            raise UserError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.border < 0:
            raise UserError(f"border must be >= 0 pixels, got {self.border}")

    def describe(self, size: Sequence[int] | None) -> str:
        if size is None:
            target = "the model's input size"
            resize = f"input size / {self.crop_pct:g}"
        else:
            h, w = int(size[1]), int(size[2])
            target = f"{h}x{w}"
            resize = f"{math.floor(h / self.crop_pct)}" if h == w else \
                f"{math.floor(h / self.crop_pct)}x{math.floor(w / self.crop_pct)}"
        crop = f"{self.border}-px border removed, " if self.border else ""
        return f"{crop}resize {resize} (bilinear) + centre crop {target}"

    def __call__(self, path: Path, size: Sequence[int]) -> torch.Tensor:
        """The image at ``path`` as uint8 (C, H, W) of ``size``."""
        import torchvision.transforms.functional as TF
        from PIL import ImageOps

        c, h, w = (int(v) for v in size)
        with open_image(path) as im:
            im = im.convert("L" if c == 1 else "RGB")
        if self.border:
            if min(im.size) <= 2 * self.border:
                raise UserError(f"image '{path}' ({im.size[0]}x{im.size[1]}) is too small to remove a "
                                f"{self.border}-px border")
            im = ImageOps.crop(im, self.border)
        # Square inputs resize the shorter side (aspect kept); other shapes resize to both sides, as timm does.
        scale = math.floor(h / self.crop_pct) if h == w else [math.floor(h / self.crop_pct),
                                                                math.floor(w / self.crop_pct)]
        im = TF.resize(im, scale, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        return TF.pil_to_tensor(TF.center_crop(im, [h, w]))


LogitView = Callable[[torch.Tensor], torch.Tensor]


class FileImageSet(ImageSet):
    """Labelled image files decoded batch by batch; the streaming counterpart of ``TensorImageSet``.

    ``logit_view`` (optional) maps the model's raw logits on this set to the logits its labels are
    scored against (e.g. ImageNet-R's mask to 200 classes); :meth:`EvalContext.logits` applies it after
    the cache, so the cached outputs stay raw. ``convention`` says in words what the set's scoring does.
    """

    def __init__(self, paths: Sequence[Path], labels: Sequence[int] | torch.Tensor, label_space: LabelSpace,
                 name: str, *, input_size: Sequence[int] | None = None, preprocess: Preprocess | None = None,
                 logit_view: LogitView | None = None, convention: str = "", source: str = "files",
                 extra: dict | None = None, workers: int | None = None) -> None:
        self.paths = [Path(p) for p in paths]
        self.labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        self.label_space = label_space
        self.name = name
        self.input_size = tuple(int(v) for v in input_size) if input_size is not None else None
        self.preprocess = preprocess or Preprocess()
        self.logit_view = logit_view
        self.convention = convention
        self.source = source
        self.extra = dict(extra or {})
        self.workers = workers or min(4, os.cpu_count() or 1)
        self._fingerprint: str | None = None
        if len(self.paths) != len(self.labels):
            raise UserError(f"dataset '{name}': {len(self.paths)} images but {len(self.labels)} labels")
        if len(self.labels) and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(label_space)):
            raise UserError(f"dataset '{name}': labels outside 0..{len(label_space) - 1}")
        if self.input_size is not None and (len(self.input_size) != 3 or self.input_size[0] not in (1, 3)):
            raise UserError(f"dataset '{name}': input_size must be (1 or 3, H, W), got {self.input_size}")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.preprocess(self.paths[i], self.image_shape).float() / 255.0, int(self.labels[i])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """The size images are read at when no model names one (``input_size`` or 3x224x224)."""
        return self.input_size or DEFAULT_INPUT_SIZE  # type: ignore[return-value]

    def resolve_size(self, model_size: Sequence[int] | None = None) -> tuple[int, int, int]:
        """The fixed ``input_size`` if set, else the model's (``model_size``), else 3x224x224."""
        if self.input_size is not None:
            return self.input_size  # type: ignore[return-value]
        if model_size is not None and len(model_size) == 3 and int(model_size[0]) in (1, 3):
            return tuple(int(v) for v in model_size)  # type: ignore[return-value]
        return DEFAULT_INPUT_SIZE

    def iter_batches(self, batch_size: int, input_size: Sequence[int] | None = None,
                     indices: Sequence[int] | None = None) -> Iterator[torch.Tensor]:
        """uint8 (B, C, H, W) batches in order; the next batch decodes while the caller uses this one."""
        size = self.resolve_size(input_size)
        order = list(range(len(self.paths))) if indices is None else [int(i) for i in indices]
        with ThreadPoolExecutor(self.workers) as pool:
            pending = None
            for start in range(0, len(order), max(1, batch_size)):
                futures = [pool.submit(self.preprocess, self.paths[i], size) for i in order[start:start + batch_size]]
                if pending is not None:
                    yield torch.stack([f.result() for f in pending])
                pending = futures
            if pending:
                yield torch.stack([f.result() for f in pending])

    def batch(self, idx: torch.Tensor | slice | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images in [0, 1] and labels for ``idx``, decoded now (like ``TensorImageSet.batch``)."""
        chosen = torch.arange(len(self))[idx] if isinstance(idx, slice) else torch.as_tensor(idx).reshape(-1)
        x = torch.cat(list(self.iter_batches(max(1, len(chosen)), indices=chosen.tolist())) or
                      [torch.empty((0, *self.image_shape), dtype=torch.uint8)])
        return x.float().div_(255.0), self.labels[chosen]

    @property
    def images(self) -> torch.Tensor:
        """All images as one uint8 tensor, decoded now: for capped subsets; stream large sets instead."""
        return self.materialize().images

    def materialize(self):
        """A ``TensorImageSet`` with every image decoded at :attr:`image_shape` (small sets only)."""
        parts = list(self.iter_batches(256))
        x = torch.cat(parts) if parts else torch.empty((0, *self.image_shape), dtype=torch.uint8)
        return TensorImageSet(x, self.labels.clone(), self.label_space, self.name, self.source, dict(self.extra))

    def subset(self, idx: torch.Tensor, name: str | None = None) -> FileImageSet:
        idx = torch.as_tensor(idx).reshape(-1)
        return FileImageSet([self.paths[int(i)] for i in idx], self.labels[idx], self.label_space, name or self.name,
                            input_size=self.input_size, preprocess=self.preprocess, logit_view=self.logit_view,
                            convention=self.convention, source=self.source, extra=self.extra, workers=self.workers)

    def class_counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=len(self.label_space)).tolist()

    def fingerprint(self) -> str:
        """Hash of file paths, sizes and modification times, labels, label space and preprocessing.

        Hashing 6 GB of pixels would cost more than the forward pass it saves; a changed or replaced
        file changes its size or mtime, which is what the logits cache needs to notice.
        """
        if self._fingerprint is None:
            h = hashlib.sha1()
            h.update(self.label_space.fingerprint.encode())
            h.update(repr((self.input_size, self.preprocess)).encode())
            for p in self.paths:
                try:
                    st = p.stat()
                except OSError as err:
                    raise UserError(f"dataset '{self.name}': cannot read '{p}': {err}") from None
                h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
            h.update(self.labels.numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint


def concat_sets(sets: list[ImageSet], name: str) -> ImageSet:
    """One set holding ``sets`` in order (same label space): tensors stay tensors, file sets stay streamed."""
    if len(sets) == 1:
        return sets[0]
    if all(isinstance(s, TensorImageSet) for s in sets):
        return TensorImageSet(torch.cat([s.images for s in sets]), torch.cat([s.labels for s in sets]),
                              sets[0].label_space, name)
    if all(isinstance(s, FileImageSet) for s in sets):
        first = sets[0]
        if any(s.input_size != first.input_size or s.preprocess != first.preprocess for s in sets):
            raise UserError(f"cannot join {', '.join(s.name for s in sets)}: they are read at different sizes")
        return FileImageSet([p for s in sets for p in s.paths], torch.cat([s.labels for s in sets]),
                            first.label_space, name, input_size=first.input_size, preprocess=first.preprocess,
                            source="+".join(s.source for s in sets))
    raise UserError(f"cannot join in-memory and streamed datasets ({', '.join(s.name for s in sets)}): set "
                    "data.image_size so every source is streamed at that size")
