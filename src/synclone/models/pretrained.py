"""Bring an already-trained classifier into synclone: a timm architecture plus its weights -> a model folder.

Benchmarks of synthetic clones (Singh et al., 2024) and effective-robustness baselines (Bansal & Grover,
2023) compare against models someone else trained: ImageNet ResNets, ViTs, ConvNeXts, or released
synthetic-clone checkpoints. :func:`import_timm` wraps such weights behind synclone's [0, 1]-pixel
:class:`~synclone.models.Classifier` with the normalisation and input size timm records for them, and
writes the usual model folder (``model.safetensors`` + ``config.json``), so every probe treats them
like models trained here.

Weights come from timm's hub (``pretrained: default``; needs the hub or its local cache) or from a
checkpoint file: safetensors, or a PyTorch file read with ``weights_only=True`` (never unpickled).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from synclone.config import StrictModel, write_run_info
from synclone.errors import UserError
from synclone.labels import get_label_space
from synclone.models.classifier import Classifier
from synclone.models.io import save_model, state_mismatch
from synclone.util.checkpoints import load_tensors


class PretrainedConfig(StrictModel):
    """A trained timm classifier to import: ``arch``, where its weights are, and its label space."""

    arch: str
    # "default": timm's own pretrained weights for ``arch`` (hub or local cache); else a checkpoint file.
    pretrained: str = "default"
    labels: str = Field("imagenet1k", description="label space of the classifier's outputs (built-in or file)")
    output: str = "runs/pretrained"
    # Override timm's recorded preprocessing (e.g. for a checkpoint trained with other statistics).
    mean: list[float] | None = None
    std: list[float] | None = None
    input_size: list[int] | None = None


def import_timm(cfg: PretrainedConfig) -> Path:
    """Write ``<cfg.output>/model`` from timm ``cfg.arch`` with ``cfg.pretrained`` weights; returns the folder."""
    import timm

    space = get_label_space(cfg.labels)
    known = timm.list_models()
    if cfg.arch not in known and cfg.arch.split(".")[0] not in known:
        raise UserError(f"unknown timm architecture '{cfg.arch}': use a name from timm.list_models()")
    in_chans = int(cfg.input_size[0]) if cfg.input_size else 3
    if cfg.pretrained == "default":
        try:
            net = timm.create_model(cfg.arch, pretrained=True, num_classes=len(space), in_chans=in_chans)
        except (OSError, RuntimeError) as err:
            raise UserError(f"cannot fetch timm's pretrained weights of '{cfg.arch}': {err}; without internet, "
                            "give a checkpoint file as 'pretrained'") from None
    else:
        net = timm.create_model(cfg.arch, pretrained=False, num_classes=len(space), in_chans=in_chans)
        _load_checkpoint(net, Path(cfg.pretrained), cfg.arch)
    pc: dict[str, Any] = dict(getattr(net, "pretrained_cfg", None) or {})
    mean = tuple(cfg.mean or pc.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(cfg.std or pc.get("std", (0.229, 0.224, 0.225)))
    size = tuple(int(v) for v in (cfg.input_size or pc.get("input_size", (3, 224, 224))))
    model = Classifier(net.eval(), space, mean, std, size, cfg.arch)
    recorded = {k: v for k, v in pc.items() if isinstance(v, str | int | float | list | tuple)}
    folder = save_model(model, Path(cfg.output) / "model", extra={
        "imported": {"arch": cfg.arch, "pretrained": cfg.pretrained, "timm_pretrained_cfg": recorded}})
    write_run_info(Path(cfg.output), cfg, command="synclone.models.pretrained.import_timm")
    return folder


def _load_checkpoint(net: torch.nn.Module, path: Path, arch: str) -> None:
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' does not exist")
    state = load_tensors(path)  # safetensors, or weights_only: a checkpoint from elsewhere must not run code
    for key in ("state_dict", "model", "module"):  # common wrappers of training scripts
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise UserError(f"checkpoint '{path}' does not hold a state dict of tensors; export the model's state_dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    problem = state_mismatch(net.state_dict(), state, f"timm '{arch}'")
    if problem:
        raise UserError(f"checkpoint '{path}' does not fit timm '{arch}': {problem}")
    net.load_state_dict(state)
