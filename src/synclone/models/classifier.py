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
    except TypeError as err:  # a keyword the constructor does not take
        raise UserError(f"model.arch_kwargs for arch '{arch}': {err}") from None
    _check_arch_kwargs(arch, net, arch_kwargs)
    mean = tuple(mean) if mean is not None else (0.5,) * in_chans
    std = tuple(std) if std is not None else (0.5,) * in_chans
    if len(mean) != in_chans or len(std) != in_chans:
        raise UserError(f"normalisation mean/std need {in_chans} values (one per channel), got {mean} / {std}")
    return Classifier(net, label_space, mean, std, input_size, arch, arch_kwargs)


# Keywords timm's create_model / build_model_with_cfg consume themselves (not passed to the model class).
_TIMM_KWARGS = {"pretrained_cfg", "pretrained_cfg_overlay", "pretrained_strict", "features_only", "feature_cfg",
                "feature_cls", "cache_dir", "scriptable", "exportable", "no_jit", "checkpoint_path"}


def _check_arch_kwargs(arch: str, net: nn.Module, arch_kwargs: dict[str, Any]) -> None:
    """Refuse ``arch_kwargs`` the model class does not name: timm constructors take ``**kwargs`` and would
    silently ignore a misspelt or foreign option (``{nonsense: 1}``)."""
    import inspect

    if not arch_kwargs:
        return
    known: set[str] = set(_TIMM_KWARGS)
    # A wrapper (synclone_token_avg) forwards its **kwargs to the timm model it holds as ``trunk``.
    trunk = getattr(net, "trunk", None)
    classes = [*type(net).__mro__, *(type(trunk).__mro__ if isinstance(trunk, nn.Module) else ())]
    for cls in classes:
        init = cls.__dict__.get("__init__")
        if init is None:
            continue
        try:
            known |= {n for n, p in inspect.signature(init).parameters.items()
                      if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and n != "self"}
        except (TypeError, ValueError):
            continue
    unknown = sorted(k for k in arch_kwargs if k not in known)
    if unknown:
        raise UserError(f"unknown model.arch_kwargs '{unknown[0]}' for arch '{arch}' (its constructor takes "
                        f"{', '.join(sorted(known - _TIMM_KWARGS)[:12]) or 'none'}); remove it")
