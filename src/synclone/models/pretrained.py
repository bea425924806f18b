"""Bring an already-trained classifier into synclone: a timm architecture plus its weights -> a model folder.

Benchmarks of synthetic clones (Singh et al., 2024) and effective-robustness baselines (Bansal & Grover,
2023) compare against models someone else trained: ImageNet ResNets, ViTs, ConvNeXts, or released
synthetic-clone checkpoints. :func:`import_timm` wraps such weights behind synclone's [0, 1]-pixel
:class:`~synclone.models.Classifier` with the normalisation and input size timm records for them, and
writes the usual model folder (``model.safetensors`` + ``config.json``), so every probe treats them
like models trained here.

Weights come from timm's hub (``pretrained: default``; needs the hub or its local cache) or from a
checkpoint file: safetensors, or a PyTorch file read with ``weights_only=True`` (never unpickled).
Checkpoints in other key layouts are converted and matched by :mod:`synclone.models.convert`
(``convert``, ``key_map``); a released linear head (``head``) becomes the classifier.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, field_validator

from synclone.config import StrictModel, write_run_info
from synclone.errors import UserError
from synclone.labels import get_label_space
from synclone.models.classifier import Classifier
from synclone.models.convert import (
    CONVERTERS,
    convert,
    match_keys,
    preprocessing_warnings,
    read_checkpoint,
    read_head,
    recorded_preprocessing,
    state_mismatch,
)
from synclone.models.io import save_model


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
    arch_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra timm.create_model arguments")
    key_map: str = Field("auto", description="auto | order | a JSON file {checkpoint key: model key or null}")
    convert: str = Field("auto", description="checkpoint family: auto, none, " + ", ".join(CONVERTERS))
    head: str | None = Field(None, description="a released linear-head file to use as the classifier")
    head_key: str | None = Field(None, description="which head of a head file holding several")

    @field_validator("convert")
    @classmethod
    def _known_convert(cls, v: str) -> str:
        if v not in ("auto", "none", *CONVERTERS):
            raise ValueError(f"unknown convert '{v}': use auto, none or one of {', '.join(CONVERTERS)}")
        return v

    @field_validator("key_map")
    @classmethod
    def _known_key_map(cls, v: str) -> str:
        if v not in ("auto", "order") and not v.endswith(".json"):
            raise ValueError(f"key_map '{v}' must be auto, order or a .json file of {{checkpoint key: model key}}")
        return v


def import_timm(cfg: PretrainedConfig) -> Path:
    """Write ``<cfg.output>/model`` from timm ``cfg.arch`` with ``cfg.pretrained`` weights; returns the folder.

    A CLIP checkpoint (SynthCLIP's SLIP layout) becomes an open_clip folder ``<cfg.output>/open_clip``
    instead, for ``backbone: {kind: open_clip, name: local-dir:...}`` (zero-shot or classifier tuning).
    """
    import timm

    space = get_label_space(cfg.labels)
    known = timm.list_models()
    if cfg.arch not in known and cfg.arch.split(".")[0] not in known:
        raise UserError(f"unknown timm architecture '{cfg.arch}': use a name from timm.list_models()")
    in_chans = int(cfg.input_size[0]) if cfg.input_size else 3
    record: dict[str, Any] = {"arch": cfg.arch, "pretrained": cfg.pretrained}
    arch, arch_kwargs = cfg.arch, dict(cfg.arch_kwargs)
    if cfg.pretrained == "default":
        if cfg.head:
            raise UserError("head: a head file goes with a checkpoint file as 'pretrained', not timm's weights")
        try:
            net = timm.create_model(cfg.arch, pretrained=True, num_classes=len(space), in_chans=in_chans,
                                    **arch_kwargs)
        except (OSError, RuntimeError) as err:
            raise UserError(f"cannot fetch timm's pretrained weights of '{cfg.arch}': {err}; without internet, "
                            "give a checkpoint file as 'pretrained'") from None
        source_keys: set[str] = set()
        recorded = None
    else:
        ck = read_checkpoint(cfg.pretrained)
        conv = convert(ck, cfg.convert)
        if conv.open_clip_cfg is not None:
            return write_open_clip(conv, Path(cfg.output) / "open_clip", cfg)
        source_keys, recorded = set(ck.state), recorded_preprocessing(ck)
        arch, arch_kwargs, net, notes, how = _build_and_load(cfg, conv, space, in_chans, arch_kwargs)
        record.update({"convert": conv.family, "key_map": how, "notes": conv.notes + notes})
        if cfg.head:
            record["head"] = cfg.head
    pc: dict[str, Any] = dict(getattr(net, "pretrained_cfg", None) or {})
    mean = tuple(cfg.mean or pc.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(cfg.std or pc.get("std", (0.229, 0.224, 0.225)))
    size = tuple(int(v) for v in (cfg.input_size or pc.get("input_size", (3, 224, 224))))
    if cfg.pretrained != "default":
        for line in preprocessing_warnings(cfg.arch, source_keys, recorded,
                                           {"mean": mean, "std": std, "input_size": size}):
            warnings.warn(line, stacklevel=2)
            record.setdefault("warnings", []).append(line)
    model = Classifier(net.eval(), space, mean, std, size, arch, arch_kwargs)
    recorded_cfg = {k: v for k, v in pc.items() if isinstance(v, str | int | float | list | tuple)}
    folder = save_model(model, Path(cfg.output) / "model", extra={
        "imported": {**record, "timm_pretrained_cfg": recorded_cfg}})
    write_run_info(Path(cfg.output), cfg, command="synclone.models.pretrained.import_timm")
    return folder


def _classifier_name(net: torch.nn.Module) -> str | None:
    name = (getattr(net, "pretrained_cfg", None) or {}).get("classifier")
    if isinstance(name, str):
        return name
    head = net.get_classifier() if hasattr(net, "get_classifier") else None
    return next((n for n, m in net.named_modules() if m is head and n), None)


def _build_and_load(cfg: PretrainedConfig, conv: Any, space: Any, in_chans: int,
                    arch_kwargs: dict) -> tuple[str, dict, torch.nn.Module, list[str], str]:
    """Create the timm model the converted tensors need, put the head in, match keys, load."""
    import timm

    arch_kwargs = {**conv.arch_kwargs, **arch_kwargs}
    state = dict(conv.state)
    notes: list[str] = []
    head = None
    if cfg.head:
        w, b, head_notes = read_head(cfg.head, cfg.head_key)
        head, notes = (w, b), notes + head_notes
    net = timm.create_model(cfg.arch, pretrained=False, num_classes=len(space), in_chans=in_chans, **arch_kwargs)
    arch = cfg.arch
    clf = _classifier_name(net)
    width = int(getattr(net, "num_features", 0) or 0)
    if head is not None and head[0].shape[1] == 2 * width and getattr(net, "cls_token", None) is not None:
        # DINOv2's linear heads read [class token, mean patch token]: wrap the ViT with that readout.
        arch_kwargs = {"base": cfg.arch, **arch_kwargs}
        arch = "synclone_token_avg"
        net = timm.create_model(arch, pretrained=False, num_classes=len(space), in_chans=in_chans, **arch_kwargs)
        notes.append("head reads [class token, mean patch token] (DINOv2's linear-head readout)")
        trunk_state = {k: v for k, v in state.items() if not k.startswith(f"{clf}.")} if clf else state
        km = match_keys(net.trunk, trunk_state, cfg.key_map, cfg.arch)
        full = {f"trunk.{k}": v for k, v in km.state.items()}
        full["head.weight"] = head[0]
        full["head.bias"] = head[1] if head[1] is not None else torch.zeros(head[0].shape[0], dtype=head[0].dtype)
        _check_head(net, full, cfg)
        net.load_state_dict(full)
        return arch, arch_kwargs, net, notes + km.notes, km.how
    if clf is None:
        raise UserError(f"timm '{cfg.arch}' has no named classifier; import it without a head file")
    if head is not None:
        state = {k: v for k, v in state.items() if not k.startswith(f"{clf}.")}
        state[f"{clf}.weight"] = head[0]
        if head[1] is not None:
            state[f"{clf}.bias"] = head[1]
    try:
        km = match_keys(net, state, cfg.key_map, cfg.arch, head_bias=f"{clf}.bias")
    except UserError as err:
        want = net.state_dict().get(f"{clf}.weight")
        if head is None and want is not None and not any(tuple(v.shape) == tuple(want.shape) for v in state.values()):
            raise UserError(f"{err}; it has no classifier for {len(space)} classes (a self-supervised backbone?): "
                            "give head: FILE (a released linear head), or train one with --kind linear-probe and "
                            "this file as backbone.pretrained") from None
        raise
    _check_head(net, km.state, cfg)
    net.load_state_dict(km.state)
    return arch, arch_kwargs, net, notes + km.notes, km.how


def _check_head(net: torch.nn.Module, state: dict, cfg: PretrainedConfig) -> None:
    problem = state_mismatch(net.state_dict(), state, f"timm '{cfg.arch}'")
    if problem:
        raise UserError(f"checkpoint '{cfg.pretrained}' does not fit timm '{cfg.arch}' with labels '{cfg.labels}': "
                        f"{problem}")


def write_open_clip(conv: Any, folder: Path, cfg: PretrainedConfig) -> Path:
    """An open_clip model folder (``open_clip_config.json`` + ``open_clip_model.safetensors``) from converted
    CLIP tensors, checked by building the model and loading them strictly."""
    import json

    import open_clip
    from safetensors.torch import save_file

    model_cfg = conv.open_clip_cfg
    pre = {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
           "interpolation": "bicubic", "resize_mode": "shortest"}
    name = f"synclone-import-{conv.family}"
    model = open_clip.CLIP(**model_cfg) if "timm_model_name" not in model_cfg["vision_cfg"] else \
        open_clip.CLIP(embed_dim=model_cfg["embed_dim"], vision_cfg=model_cfg["vision_cfg"],
                       text_cfg=model_cfg["text_cfg"], quick_gelu=model_cfg.get("quick_gelu", False))
    expected = model.state_dict()
    state = {k: v for k, v in conv.state.items() if k in expected or not k.endswith("attn_mask")}
    problem = state_mismatch(expected, state, f"open_clip ({conv.family})")
    if problem:
        raise UserError(f"checkpoint '{cfg.pretrained}' does not convert to open_clip: {problem}")
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": model_cfg, "preprocess_cfg": pre, "synclone_import": {"family": conv.family, "name": name,
                                                                            "notes": conv.notes,
                                                                            "source": cfg.pretrained}},
        indent=2) + "\n", encoding="utf-8")
    write_run_info(Path(cfg.output), cfg, command="synclone.models.pretrained.import_timm")
    return folder
