"""A ViT read out the way DINOv2's released linear heads read it: [class token, mean of patch tokens] -> linear.

DINOv2's ``*_linear_head.pth`` files take the final norm's class token concatenated with the mean of
the patch tokens (registers excluded), so their weights are (classes, 2 x width). timm's ViTs pool
one or the other, not both; this registered model wraps any timm ViT as ``trunk`` and adds that
readout, so ``timm.create_model("synclone_token_avg", base=...)`` rebuilds it like any other arch.
"""

from __future__ import annotations

import timm
import torch
from timm.models import register_model
from torch import nn


class TokenAvgClassifier(nn.Module):
    """``trunk`` (a timm ViT, unpooled) + a linear head over [class token, mean patch token]."""

    def __init__(self, base: str, num_classes: int = 1000, in_chans: int = 3, **kwargs: object) -> None:
        super().__init__()
        self.trunk = timm.create_model(base, pretrained=False, num_classes=0, global_pool="", in_chans=in_chans,
                                       **kwargs)
        width = int(self.trunk.num_features)
        self.num_features = 2 * width
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
        self.pretrained_cfg = {**dict(getattr(self.trunk, "pretrained_cfg", {}) or {}), "classifier": "head"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk.forward_features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        n = int(getattr(self.trunk, "num_prefix_tokens", 1))
        feats = torch.cat([x[:, 0], x[:, n:].mean(dim=1)], dim=-1)
        return feats if pre_logits else self.head(feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, **_: object) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()


@register_model
def synclone_token_avg(pretrained: bool = False, base: str = "vit_base_patch14_reg4_dinov2", **kwargs) -> nn.Module:
    """Any timm ViT ``base`` with DINOv2's linear-head readout (class token + mean patch token)."""
    for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(k, None)
    return TokenAvgClassifier(base, **kwargs)
