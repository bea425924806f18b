"""Labelled image collections: one type every stage (training, evaluation, curation) reads.

Small datasets (Fashion-MNIST, generated 28x28 sets) live in memory as a uint8 tensor, which lets
training and evaluation slice batches directly instead of decoding files item by item.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from synclone.errors import UserError
from synclone.labels import LabelSpace


class ImageSet(torch.utils.data.Dataset):
    """Images with integer labels in a :class:`LabelSpace`; items are (float CxHxW in [0, 1], label).

    Subclasses hold ``labels`` (int64) and implement ``subset``; splits and per-class subsets are built on them.
    """

    label_space: LabelSpace
    name: str
    labels: torch.Tensor

    def fingerprint(self) -> str:  # pragma: no cover - interface
        raise NotImplementedError

    def subset(self, idx: torch.Tensor, name: str | None = None) -> ImageSet:  # pragma: no cover - interface
        raise NotImplementedError

    def per_class_subset(self, per_class: int, seed: int = 0, name: str | None = None) -> ImageSet:
        """The first ``per_class`` images of every class in a seeded random order (fair size comparisons)."""
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self), generator=g)
        picks = []
        for c in range(len(self.label_space)):
            cls_idx = order[self.labels[order] == c]
            if len(cls_idx) < per_class:
                raise UserError(f"dataset '{self.name}': class '{self.label_space.classes[c]}' has {len(cls_idx)} "
                                f"images, fewer than the {per_class} asked for")
            picks.append(cls_idx[:per_class])
        idx = torch.cat(picks).sort().values
        return self.subset(idx, name or f"{self.name}_{per_class}pc")

    def split(self, fraction: float, seed: int = 0) -> tuple[ImageSet, ImageSet]:
        """A seeded, class-stratified split into (rest, held-out ``fraction``)."""
        if not 0.0 < fraction < 1.0:
            raise UserError(f"split fraction must be in (0, 1), got {fraction}")
        g = torch.Generator().manual_seed(seed)
        held = []
        for c in range(len(self.label_space)):
            cls_idx = (self.labels == c).nonzero().flatten()
            cls_idx = cls_idx[torch.randperm(len(cls_idx), generator=g)]
            held.append(cls_idx[: max(1, round(len(cls_idx) * fraction))] if len(cls_idx) > 1 else cls_idx[:0])
        mask = torch.zeros(len(self), dtype=torch.bool)
        mask[torch.cat(held)] = True
        rest = self.subset((~mask).nonzero().flatten(), f"{self.name}_train")
        return rest, self.subset(mask.nonzero().flatten(), f"{self.name}_val")


@dataclass
class TensorImageSet(ImageSet):
    """An in-memory dataset: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    label_space: LabelSpace
    name: str = "tensors"
    source: str = "memory"
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise UserError(f"dataset '{self.name}': images must be uint8 (N, C, H, W), got {self.images.dtype} "
                            f"{tuple(self.images.shape)}")
        if len(self.images) != len(self.labels):
            raise UserError(f"dataset '{self.name}': {len(self.images)} images but {len(self.labels)} labels")
        self.labels = self.labels.long()
        if len(self.labels) and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.label_space)):
            raise UserError(f"dataset '{self.name}': labels outside 0..{len(self.label_space) - 1}")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i].float() / 255.0, int(self.labels[i])

    def batch(self, idx: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images in [0, 1] and labels for the given indices, without a per-item loop."""
        return self.images[idx].float().div_(255.0), self.labels[idx]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, idx: torch.Tensor, name: str | None = None) -> TensorImageSet:
        return TensorImageSet(self.images[idx], self.labels[idx], self.label_space, name or self.name, self.source)

    def class_counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=len(self.label_space)).tolist()

    def fingerprint(self) -> str:
        """Hash of pixels, labels and label space: the key of cached logits."""
        h = hashlib.sha1()
        h.update(self.label_space.fingerprint.encode())
        h.update(self.images.contiguous().numpy().tobytes())
        h.update(self.labels.numpy().tobytes())
        return h.hexdigest()[:16]
