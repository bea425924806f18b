"""A classifier that takes pixels in [0, 1] and normalises inside.

Keeping the normalisation in the module means attacks, corruptions and users all work on plain
pixels: an eps of 8/255 means 8 grey levels, whatever mean and std the backbone was trained with.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn

import synclone.models.small_cnn  # noqa: F401  (registers the small CNNs in timm)
import synclone.models.token_avg  # noqa: F401  (registers the DINOv2-style readout in timm)
from synclone.errors import UserError
from synclone.labels import LabelSpace


class Classifier(nn.Module):
    """``net`` (any timm-style model) behind a fixed normalisation; carries its label space and input size."""

    def __init__(self, net: nn.Module, label_space: LabelSpace, mean: tuple[float, ...], std: tuple[float, ...],
                 input_size: tuple[int, int, int], arch: str, arch_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.net = net
        self.label_space = label_space
        self.input_size = tuple(int(v) for v in input_size)
        self.arch = arch
        self.arch_kwargs = dict(arch_kwargs or {})
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled pre-logit features (for linear probes and embeddings)."""
        net = self.net
        feats = net.forward_features(self.normalize(x))
        return net.forward_head(feats, pre_logits=True)

    def config(self) -> dict[str, Any]:
        return {
            "format": "synclone-model/1",
            "arch": self.arch,
            "arch_kwargs": self.arch_kwargs,
            "num_classes": len(self.label_space),
            "input_size": list(self.input_size),
            "label_space": self.label_space.to_dict(),
            "preprocessing": {
                "range": [0.0, 1.0],
                "mean": self.mean.flatten().tolist(),
                "std": self.std.flatten().tolist(),
                "note": "inputs are pixels in [0, 1]; the model normalises inside",
            },
        }


def create_classifier(arch: str, label_space: LabelSpace, input_size: tuple[int, int, int],
                      mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                      **arch_kwargs: Any) -> Classifier:
    """A fresh (randomly initialised) timm model ``arch`` wrapped with normalisation."""
    in_chans = int(input_size[0])
    try:
        net = timm.create_model(arch, pretrained=False, num_classes=len(label_space), in_chans=in_chans, **arch_kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise UserError(f"unknown architecture '{arch}': use a timm model name (timm.list_models()) "
                            "or synclone_cnn_tiny / synclone_cnn_small") from None
        raise
    mean = tuple(mean) if mean is not None else (0.5,) * in_chans
    std = tuple(std) if std is not None else (0.5,) * in_chans
    if len(mean) != in_chans or len(std) != in_chans:
        raise UserError(f"normalisation mean/std need {in_chans} values (one per channel), got {mean} / {std}")
    return Classifier(net, label_space, mean, std, input_size, arch, arch_kwargs)
