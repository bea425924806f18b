"""Small CNNs for 28x28-scale images, registered in timm's model registry.

Registering them in timm (instead of a side registry) means ``timm.create_model("synclone_cnn_tiny")``
works like any timm name, and the rest of synclone treats every architecture the same way.
"""

from __future__ import annotations

import torch
from timm.models import register_model
from torch import nn


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """conv-BN-ReLU stages with max-pooling between them, global average pooling and a linear head.

    The first stage runs at full resolution with few channels and the widest one after two poolings:
    on a 2-core CPU this is where a small net gets its accuracy per second.
    """

    def __init__(self, widths: tuple[int, ...], convs_per_stage: tuple[int, ...], num_classes: int = 10,
                 in_chans: int = 1, drop_rate: float = 0.1, **_: object) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_chans
        for i, (w, n) in enumerate(zip(widths, convs_per_stage, strict=True)):
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            for _j in range(n):
                layers += _block(cin, w)
                cin = w
        self.features = nn.Sequential(*layers)
        self.num_features = cin
        self.num_classes = num_classes
        self.drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(cin, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3))
        return x if pre_logits else self.head(self.drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, **_: object) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes)


def _strip_timm_kwargs(kwargs: dict) -> dict:
    # timm passes these to every model constructor; ours has no pretrained weights to fetch.
    for k in ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(k, None)
    return kwargs


@register_model
def synclone_cnn_tiny(pretrained: bool = False, **kwargs) -> SmallCNN:
    """About 0.1M parameters; ~6k training images/s on 2 CPU cores at 28x28."""
    return SmallCNN((24, 48, 96), (1, 1, 1), **_strip_timm_kwargs(kwargs))


@register_model
def synclone_cnn_small(pretrained: bool = False, **kwargs) -> SmallCNN:
    """About 0.3M parameters; ~2.7k training images/s on 2 CPU cores at 28x28."""
    return SmallCNN((32, 64, 128), (1, 1, 2), **_strip_timm_kwargs(kwargs))
