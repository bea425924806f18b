"""Checkpoints from elsewhere into timm's key layout: read safely, convert known families, match keys.

Released checkpoints rarely use the key names of the timm architecture that computes the same
function: EfficientNet-PyTorch writes ``_blocks.3._depthwise_conv.weight`` where timm has
``blocks.1.0.conv_dw.weight``; SynCLR and StableRep nest the ViT under ``module.visual.``; MoCo v3
keeps two encoders and a predictor; linear-probe checkpoints put a frozen BatchNorm in front of the
linear layer. This module turns such a checkpoint into the state dict of a timm model:

1. :func:`read_checkpoint`: safetensors, or a PyTorch file read with ``weights_only=True``, so a
   pickle that carries code is refused before anything in it runs;
2. a *converter* for the families Singh et al. (2024) evaluate (:data:`CONVERTERS`; ``convert: auto``
   recognises them by their keys): it unwraps, drops what is not the classifier (projection heads,
   momentum encoders, decoders) and folds frozen BatchNorm heads into plain linear ones;
3. :func:`match_keys` with ``key_map``: ``auto`` tries the exact names, then timm's own checkpoint
   filter for the architecture, then a one-to-one match by order and shape that must be the only
   possible one; ``order`` goes straight to the last; a JSON file maps names explicitly. Anything
   else is refused with the first mismatches named.

A classifier head without a bias (the ImageNet-SD ResNet-50 clones' ``fc``) gets a zero bias, which
computes the same logits, and the import records it.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from synclone.errors import UserError
from synclone.util.checkpoints import load_tensors

# Leaves whose names say what a tensor is: an order match may pair two tensors only if these agree.
_TYPED_LEAVES = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
# Wrappers training scripts put around a state dict, tried in this order.
_WRAPPERS = ("state_dict", "model", "module", "model_state", "net", "network")


@dataclass
class Checkpoint:
    """Tensors of a checkpoint file plus what else it recorded (non-tensor entries, safetensors metadata)."""

    path: Path
    state: dict[str, torch.Tensor]
    top: dict[str, Any] = field(default_factory=dict)  # the file's top-level object when it was a dict
    meta: dict[str, str] = field(default_factory=dict)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _data_only_globals() -> list:
    """Types training scripts pickle next to the weights that hold data only and run no code when rebuilt:
    ``argparse.Namespace`` (the ``args`` of SLIP/SynthCLIP, MAE and DeiT-style checkpoints) and numpy scalars."""
    import argparse

    import numpy as np

    out: list = [argparse.Namespace, np.dtype]
    core = getattr(np, "_core", None) or getattr(np, "core", None)
    scalar = getattr(getattr(core, "multiarray", None), "scalar", None)
    if scalar is not None:
        out.append(scalar)
    out += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    return out


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read ``path`` without running code from it: safetensors, or ``torch.load(weights_only=True)``.

    A pickle that would need code (a custom class, ``argparse.Namespace``, a ``numpy`` scalar, or worse)
    is refused in one line; nothing in it has run when the error is raised.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint '{path}' does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
        except (SafetensorError, OSError) as err:
            raise UserError(f"cannot read '{path}' as safetensors: {_first_line(err)}") from None
        return Checkpoint(path, state, {}, meta)
    # The one checkpoint loader (weights_only; one line naming the file on refusal), with the plain-data
    # classes released training scripts store next to their tensors.
    obj = load_tensors(path, _data_only_globals())
    top = obj if isinstance(obj, dict) else {}
    state = unwrap(obj)
    if not state:
        raise UserError(f"checkpoint '{path}' holds no tensors (top-level keys: "
                        f"{', '.join(map(str, list(top)[:8])) or 'none'})")
    return Checkpoint(path, state, top, {})


def unwrap(obj: Any) -> dict[str, torch.Tensor]:
    """The tensor dict inside a training script's checkpoint (``state_dict``/``model``/... wrappers)."""
    for _ in range(3):
        if not isinstance(obj, dict):
            return {}
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            break  # already a state dict
        inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), dict) and obj[k]), None)
        if inner is None:
            break
        obj = inner
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Keys under ``prefix`` with it removed; other keys dropped."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def fold_bn_linear(weight: torch.Tensor, bias: torch.Tensor | None, mean: torch.Tensor, var: torch.Tensor,
                   eps: float = 1e-6, bn_weight: torch.Tensor | None = None,
                   bn_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``Linear(BatchNorm1d(x))`` (eval mode) as one linear layer: the same logits, a plain head.

    MAE, SynCLR and StableRep linear probes put a BatchNorm without affine parameters (eps 1e-6)
    before the linear classifier; its running statistics are constants at test time.
    """
    scale = 1.0 / torch.sqrt(var.double() + eps)
    shift = -mean.double() * scale
    if bn_weight is not None:
        scale = scale * bn_weight.double()
        shift = shift * bn_weight.double()
    if bn_bias is not None:
        shift = shift + bn_bias.double()
    w = weight.double()
    b = bias.double() if bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    return (w * scale[None, :]).to(weight.dtype).contiguous(), (b + w @ shift).to(weight.dtype).contiguous()


# --- converters of released checkpoint families --------------------------------------------------------


@dataclass
class Converted:
    """A converter's result: timm-layout tensors, arch settings they need, and what was done."""

    state: dict[str, torch.Tensor]
    family: str
    notes: list[str] = field(default_factory=list)
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    # open_clip model config when the checkpoint is a CLIP model (written as an open_clip folder).
    open_clip_cfg: dict[str, Any] | None = None


def _fold_seq_head(state: dict[str, torch.Tensor], prefix: str, notes: list[str]) -> dict[str, torch.Tensor]:
    """``<prefix>0`` = BatchNorm1d(affine=False), ``<prefix>1`` = Linear -> ``head.weight``/``head.bias``."""
    w, b = state.pop(f"{prefix}1.weight"), state.pop(f"{prefix}1.bias", None)
    mean, var = state.pop(f"{prefix}0.running_mean"), state.pop(f"{prefix}0.running_var")
    bn_w, bn_b = state.pop(f"{prefix}0.weight", None), state.pop(f"{prefix}0.bias", None)
    state.pop(f"{prefix}0.num_batches_tracked", None)
    state["head.weight"], state["head.bias"] = fold_bn_linear(w, b, mean, var, 1e-6, bn_w, bn_b)
    notes.append("BatchNorm1d + linear head folded into one linear head (same logits)")
    return state


def _vit_visual(ck: Checkpoint, family: str) -> Converted:
    """SynCLR / StableRep: the ViT under ``module.visual.`` (timm layout); a linear-probe file adds heads."""
    state = dict(ck.state)
    prefix = next((p for p in ("module.visual.", "visual.") if f"{p}cls_token" in state), "")
    notes = [f"kept the image encoder under '{prefix}'"] if prefix else []
    state = strip_prefix(state, prefix) if prefix else state
    dropped = [k for k in state if k.startswith("head.")]
    for k in dropped:  # the pre-training projection head, not a classifier
        del state[k]
    lin = ck.top.get("linear_classifiers")
    if isinstance(lin, dict) and lin:
        state.update(_pick_probe_head(lin, notes))
    return Converted(state, family, notes)


def _pick_probe_head(lin: dict[str, torch.Tensor], notes: list[str], key: str | None = None) -> dict:
    """SynCLR/StableRep ``linear_classifiers``: one BN+linear head per learning rate; the one Singh et al. used
    (``classifier_lr_0_0050``) unless ``key`` names another."""
    lin = {k.removeprefix("module."): v for k, v in lin.items() if isinstance(v, torch.Tensor)}
    lin = {k.removeprefix("classifiers_dict."): v for k, v in lin.items()}
    heads = sorted({k.split(".")[0] for k in lin})
    key = key or ("classifier_lr_0_0050" if "classifier_lr_0_0050" in heads else heads[0])
    if key not in heads:
        raise UserError(f"the checkpoint has no linear head '{key}'; it has {', '.join(heads)}")
    sub = strip_prefix(lin, f"{key}.")
    notes.append(f"linear head '{key}' of {len(heads)} released")
    if "0.running_mean" in sub:
        return _fold_seq_head(sub, "", notes)
    return {"head.weight": sub["weight"], "head.bias": sub["bias"]}


def _mae(ck: Checkpoint) -> Converted:
    state = {k: v for k, v in ck.state.items() if not k.startswith(("decoder_", "mask_token"))}
    notes = ["dropped MAE's decoder"] if len(state) < len(ck.state) else []
    kwargs: dict[str, Any] = {}
    if "fc_norm.weight" in state and "norm.weight" not in state:
        kwargs["global_pool"] = "avg"  # MAE fine-tuning: mean of patch tokens + fc_norm
        notes.append("global average pooling with fc_norm (MAE's global_pool=True)")
    if "head.1.weight" in state and "head.0.running_mean" in state:
        state = _fold_seq_head(state, "head.", notes)
    return Converted(state, "mae", notes, kwargs)


def _mocov3(ck: Checkpoint) -> Converted:
    state = dict(ck.state)
    prefix = next((p for p in ("module.base_encoder.", "base_encoder.") if any(k.startswith(p) for k in state)), None)
    notes = []
    if prefix:  # pre-training checkpoint: the base encoder, without its projection MLP
        state = {k: v for k, v in strip_prefix(state, prefix).items() if not k.startswith("head.")}
        notes.append("kept the base encoder (momentum encoder, predictor and projection head dropped)")
    else:
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return Converted(state, "mocov3", notes)


def _imagenet_sd(ck: Checkpoint) -> Converted:
    state = {k.removeprefix("module."): v for k, v in ck.state.items()}
    return Converted(state, "imagenet_sd", ["torchvision ResNet-50 keys (timm uses the same names)"])


def _dinov2(ck: Checkpoint) -> Converted:
    # The key renames (register_tokens, mask_token, SwiGLU w12/w3) are timm's own checkpoint filter's job.
    return Converted(dict(ck.state), "dinov2", ["DINOv2 keys, renamed by timm's checkpoint filter"])


def _synthclip(ck: Checkpoint) -> Converted:
    """SynthCLIP (SLIP-style CLIP: a timm ViT-B/16 image tower with GELU, OpenAI's text tower with QuickGELU,
    ``image_projection``/``text_projection`` matrices) -> an open_clip model with a timm trunk."""
    state = {k.removeprefix("module."): v for k, v in ck.state.items()}
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k.startswith("visual."):
            if not k.startswith("visual.head."):
                out["visual.trunk." + k[len("visual."):]] = v
        elif k == "image_projection":
            out["visual.head.proj.weight"] = v.t().contiguous()
        else:
            out[k] = v
    width = int(state["image_projection"].shape[0])
    embed = int(state["image_projection"].shape[1])
    text_w = int(state["token_embedding.weight"].shape[1])
    layers = len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")})
    timm_name = {768: "vit_base_patch16_224", 1024: "vit_large_patch16_224", 384: "vit_small_patch16_224"}.get(width)
    if timm_name is None:
        raise UserError(f"SynthCLIP checkpoint with an image width of {width} is not a known ViT (B/16 has 768)")
    cfg = {"embed_dim": embed, "quick_gelu": True,
           "vision_cfg": {"timm_model_name": timm_name, "timm_model_pretrained": False, "timm_pool": "",
                          "timm_proj": "linear", "timm_proj_bias": False, "image_size": 224},
           "text_cfg": {"context_length": int(state["positional_embedding"].shape[0]),
                        "vocab_size": int(state["token_embedding.weight"].shape[0]), "width": text_w,
                        "heads": max(1, text_w // 64), "layers": layers}}
    return Converted(out, "synthclip", ["SLIP-style CLIP -> open_clip (timm image tower; QuickGELU text tower)"],
                     open_clip_cfg=cfg)


def _has(state: dict, *keys: str) -> bool:
    return all(k in state for k in keys)


def _any_prefix(state: dict, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in state)


# name -> (recognise(checkpoint), convert(checkpoint)); ``convert: auto`` takes the first that recognises.
CONVERTERS: dict[str, tuple[Callable[[Checkpoint], bool], Callable[[Checkpoint], Converted]]] = {
    "synthclip": (lambda ck: _has({k.removeprefix("module."): 0 for k in ck.state}, "image_projection",
                                  "token_embedding.weight"), _synthclip),
    "synclr": (lambda ck: _any_prefix(ck.state, "module.visual.") or _any_prefix(ck.state, "visual.cls_token")
               or "linear_classifiers" in ck.top, lambda ck: _vit_visual(ck, "synclr")),
    "stablerep": (lambda ck: False, lambda ck: _vit_visual(ck, "stablerep")),  # same layout as SynCLR
    "mocov3": (lambda ck: _any_prefix(ck.state, "module.base_encoder.") or _any_prefix(ck.state, "base_encoder."),
               _mocov3),
    "mae": (lambda ck: _any_prefix(ck.state, "decoder_blocks.") or _has(ck.state, "head.0.running_mean",
                                                                           "head.1.weight")
            or (_has(ck.state, "cls_token", "fc_norm.weight") and "norm.weight" not in ck.state), _mae),
    "dinov2": (lambda ck: _has(ck.state, "mask_token") and _any_prefix(ck.state, "blocks.0.ls1."), _dinov2),
    "imagenet_sd": (lambda ck: False, _imagenet_sd),
}


def convert(ck: Checkpoint, name: str = "auto") -> Converted:
    """Apply converter ``name`` (``auto``: the first family whose keys it recognises; ``none``: as read)."""
    if name == "none":
        return Converted({k.removeprefix("module."): v for k, v in ck.state.items()}, "none")
    if name == "auto":
        for recognise, fn in CONVERTERS.values():
            if recognise(ck):
                return fn(ck)
        return Converted({k.removeprefix("module."): v for k, v in ck.state.items()}, "none")
    if name not in CONVERTERS:
        raise UserError(f"unknown convert '{name}': use auto, none or one of {', '.join(CONVERTERS)}")
    try:
        return CONVERTERS[name][1](ck)
    except KeyError as err:
        raise UserError(f"checkpoint '{ck.path}' is not a {name} checkpoint: it has no tensor {err}") from None


# --- key matching ----------------------------------------------------------------------------------------


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _leaf(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _compatible(src_key: str, src: torch.Tensor, dst_key: str, dst: torch.Tensor) -> bool:
    if _shape(src) != _shape(dst):
        return False
    a, b = _leaf(src_key), _leaf(dst_key)
    return a == b or (a not in _TYPED_LEAVES and b not in _TYPED_LEAVES)


def _fits(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> bool:
    return set(expected) == set(state) and all(_shape(expected[k]) == _shape(state[k]) for k in expected)


def _timm_filter(arch: str) -> Callable | None:
    import importlib

    import timm

    try:
        fn = timm.models.model_entrypoint(arch.split(".")[0])
    except (RuntimeError, KeyError):
        return None
    mod = importlib.import_module(fn.__module__)
    return getattr(mod, "checkpoint_filter_fn", None) or getattr(mod, "_filter_fn", None)


@dataclass
class KeyMatch:
    """The tensors to load, how they were matched, and what had to be filled in."""

    state: dict[str, torch.Tensor]
    how: str
    notes: list[str] = field(default_factory=list)


def _fill_defaults(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], head_bias: str | None,
                   notes: list[str]) -> dict[str, torch.Tensor]:
    """BatchNorm step counters and a missing classifier bias carry no information: fill them in."""
    state = dict(state)
    for k, v in expected.items():
        if k not in state and _leaf(k) == "num_batches_tracked":
            state[k] = torch.zeros_like(v)
    if head_bias and head_bias not in state and head_bias in expected and head_bias[:-4] + "weight" in state:
        state[head_bias] = torch.zeros_like(expected[head_bias])
        notes.append(f"the checkpoint's classifier has no bias: '{head_bias}' set to zero (same logits)")
    return state


def match_keys(net: torch.nn.Module, state: dict[str, torch.Tensor], key_map: str, arch: str,
               head_bias: str | None = None) -> KeyMatch:
    """Map ``state`` onto ``net``'s state dict by ``key_map`` (auto | order | path of a JSON name map)."""
    expected = net.state_dict()
    notes: list[str] = []
    if key_map not in ("auto", "order"):
        return KeyMatch(_by_file(expected, state, Path(key_map), arch, head_bias, notes), f"file:{key_map}", notes)
    if key_map == "auto":
        exact = _fill_defaults(expected, state, head_bias, notes)
        if _fits(expected, exact):
            return KeyMatch(exact, "exact", notes)
        filt = _timm_filter(arch)
        if filt is not None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    filtered = filt(dict(state), net)
            except Exception:  # noqa: BLE001 - a filter meeting foreign keys may fail any way; then it does not apply
                filtered = None
            if filtered is not None:
                notes = []
                filtered = _fill_defaults(expected, filtered, head_bias, notes)
                if _fits(expected, filtered):
                    return KeyMatch(filtered, "timm_filter", notes)
        notes = []
        shared = len(set(expected) & set(state))
        if shared * 2 >= len(expected):
            # Mostly the same names: the layout is timm's own, so what differs is the architecture's settings
            # (pooling, depth, classes), and pairing the rest by order would hide that.

            raise UserError(f"checkpoint uses timm's names for '{arch}' but does not fit it: "
                            f"{state_mismatch(expected, state, f'timm {arch!r}')} (check arch_kwargs and labels)")
    return KeyMatch(_by_order(expected, state, arch, head_bias, notes), "order", notes)


def _by_file(expected: dict, state: dict, path: Path, arch: str, head_bias: str | None, notes: list[str]) -> dict:
    if not path.is_file():
        raise UserError(f"key_map '{path}' is neither auto, order nor an existing JSON file")
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"key_map '{path}' is not valid JSON: {err}") from None
    if not isinstance(mapping, dict):
        raise UserError(f"key_map '{path}' must be a JSON object {{checkpoint key: model key or null}}")
    unknown = [k for k in mapping if k not in state]
    if unknown:
        raise UserError(f"key_map '{path}' names {len(unknown)} key(s) the checkpoint lacks (e.g. '{unknown[0]}')")
    out = {}
    for k, v in state.items():
        dst = mapping.get(k, k)
        if dst is not None:
            out[str(dst)] = v
    out = _fill_defaults(expected, out, head_bias, notes)

    problem = state_mismatch(expected, out, f"timm '{arch}'")
    if problem:
        raise UserError(f"after key_map '{path}' the checkpoint does not fit timm '{arch}': {problem}")
    return out


def _count_alignments(src: list[tuple[str, torch.Tensor]], dst: list[tuple[str, torch.Tensor]]) -> int:
    """Order-preserving one-to-one pairings of every ``dst`` tensor with a compatible ``src`` one (capped at 2)."""
    m = len(dst)
    ways = [1] + [0] * m  # ways[j]: pairings of the first j targets within the sources seen so far
    for sk, sv in src:
        for j in range(m, 0, -1):
            if ways[j - 1] and _compatible(sk, sv, *dst[j - 1]):
                ways[j] = min(2, ways[j] + ways[j - 1])
    return ways[m]


def _by_order(expected: dict, state: dict, arch: str, head_bias: str | None, notes: list[str]) -> dict:
    """One-to-one by order and shape; refused unless exactly one such pairing exists."""
    skip = {k for k in expected if _leaf(k) == "num_batches_tracked"}
    src = [(k, v) for k, v in state.items() if _leaf(k) != "num_batches_tracked"]
    targets = [k for k in expected if k not in skip]
    attempts = [targets]
    if head_bias and head_bias in targets:
        attempts.append([k for k in targets if k != head_bias])  # a bias-free head
    for tk in attempts:
        dst = [(k, expected[k]) for k in tk]
        n = _count_alignments(src, dst) if len(src) >= len(dst) else 0
        if n == 1:
            if len(src) == len(dst):
                out = {dk: sv for (_, sv), (dk, _) in zip(src, dst, strict=True)}
            else:  # the unique embedding: greedy from the end is forced when only one exists
                out = _unique_embedding(src, dst)
            extra = len(src) - len(dst)
            if extra:
                notes.append(f"{extra} checkpoint tensor(s) matched nothing and were left out")
            return _fill_defaults(expected, out, head_bias, notes)
        if n >= 2:
            raise UserError(f"checkpoint tensors match timm '{arch}' by order and shape in more than one way "
                            f"({len(src)} tensors for {len(dst)}): the match is ambiguous; give key_map as a JSON "
                            "file {checkpoint key: model key}")
    raise UserError(f"checkpoint does not fit timm '{arch}' by name, timm's filter, or order and shape: "
                    + _first_mismatches(src, [(k, expected[k]) for k in targets]))


def _unique_embedding(src: list, dst: list) -> dict:
    # Latest-possible positions from the end, then earliest from the start: equal iff the embedding is unique,
    # which _count_alignments has established, so the earliest greedy one is it.
    out, i = {}, 0
    for dk, dv in dst:
        while not _compatible(src[i][0], src[i][1], dk, dv):
            i += 1
        out[dk] = src[i][1]
        i += 1
    return out


def _first_mismatches(src: list, dst: list, limit: int = 3) -> str:
    parts = []
    for i, ((sk, sv), (dk, dv)) in enumerate(zip(src, dst, strict=False)):
        if not _compatible(sk, sv, dk, dv):
            parts.append(f"#{i} checkpoint '{sk}' {_shape(sv)} vs model '{dk}' {_shape(dv)}")
            if len(parts) == limit:
                break
    counts = f"{len(src)} checkpoint tensors for {len(dst)} model tensors"
    return f"{counts}; first mismatches: " + ("; ".join(parts) if parts else "none in the common length")


# --- preprocessing --------------------------------------------------------------------------------------

# Key layouts whose origin fixes how images were preprocessed, whatever the user names as arch.
_LAYOUT_ORIGINS = (
    # EfficientNet-PyTorch (lukemelas) ports TensorFlow weights: "same" padding, the TF models' mean/std.
    (lambda s: "_conv_stem.weight" in s and any(k.startswith("_blocks.") for k in s),
     "EfficientNet-PyTorch (a port of TensorFlow weights, trained with TF 'same' padding)", "tf_"),
)


def preprocessing_warnings(arch: str, source_keys: set[str], recorded: dict[str, Any] | None,
                           used: dict[str, Any]) -> list[str]:
    """Reasons to doubt the preprocessing an import will record, as warning lines (empty when none).

    ``recorded``: what the checkpoint itself says (a sidecar config or safetensors metadata); ``used``:
    the mean/std/input size the imported model will normalise with.
    """
    import timm

    out = []
    base = arch.split(".")[0]
    known_origin = False
    for recognise, origin, want_prefix in _LAYOUT_ORIGINS:
        if not recognise(source_keys):
            continue
        known_origin = True
        if not base.startswith(want_prefix) and f"{want_prefix}{base}" in timm.list_models():
            out.append(f"the checkpoint's layout is {origin}: timm builds that as '{want_prefix}{base}'; '{arch}' "
                       "pads and normalises differently, so its outputs will be off")
    twin = base[3:] if base.startswith("tf_") else f"tf_{base}"
    if not known_origin and twin in timm.list_models() and not recorded:
        other = timm.models.get_pretrained_cfg(twin)
        if other is not None and (tuple(other.mean) != tuple(used["mean"]) or tuple(other.std) != tuple(used["std"])
                                  or base.startswith("tf_") != twin.startswith("tf_")):
            out.append(f"timm has '{twin}' with the same tensors but other padding/normalisation (mean "
                       f"{tuple(other.mean)}); the checkpoint does not record which one it was trained as: check "
                       f"that '{arch}' is right")
    if recorded:
        for key in ("mean", "std"):
            rv = recorded.get(key)
            if rv is not None and not _close(rv, used[key]):
                out.append(f"the checkpoint records {key} {tuple(rv)} but the import uses {tuple(used[key])} "
                           f"('{arch}''s default); set {key}: {list(rv)} if the checkpoint is right")
        size = recorded.get("input_size")
        if size is not None and tuple(size)[-2:] != tuple(used["input_size"])[-2:]:
            out.append(f"the checkpoint records input size {tuple(size)} but the import uses "
                       f"{tuple(used['input_size'])}")
    return out


def _close(a: Any, b: Any) -> bool:
    a, b = list(a), list(b)
    return len(a) == len(b) and all(math.isclose(float(x), float(y), abs_tol=1e-4) for x, y in zip(a, b, strict=True))


def recorded_preprocessing(ck: Checkpoint) -> dict[str, Any] | None:
    """Preprocessing the checkpoint states: safetensors metadata, or a timm/HF/open_clip config beside it."""
    for key in ("preprocessing", "pretrained_cfg"):
        if key in ck.meta:
            try:
                d = json.loads(ck.meta[key])
                return {k: d[k] for k in ("mean", "std", "input_size") if k in d} or None
            except (json.JSONDecodeError, TypeError):
                pass
    folder = ck.path.parent
    for name in ("config.json", "preprocessor_config.json", "open_clip_config.json"):
        p = folder / name
        if not p.is_file():
            continue
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        d = d.get("pretrained_cfg") or d.get("preprocess_cfg") or d
        mean = d.get("mean", d.get("image_mean"))
        std = d.get("std", d.get("image_std"))
        if mean is not None and std is not None:
            out = {"mean": mean, "std": std}
            if d.get("input_size"):
                out["input_size"] = d["input_size"]
            return out
    return None


# --- released linear heads ------------------------------------------------------------------------------


def read_head(path: str | Path, key: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    """A released linear classifier file -> (weight (C, D), bias (C,) or None, notes).

    Accepts a bare ``{weight, bias}`` (DINOv2's ``*_linear_head.pth``), ``head.weight``/``fc.weight``
    style names, a BatchNorm + linear pair (folded), or a SynCLR/StableRep ``linear_classifiers`` grid.
    """
    ck = read_checkpoint(path)
    notes: list[str] = []
    lin = ck.top.get("linear_classifiers")
    if isinstance(lin, dict) and lin:
        sub = _pick_probe_head(lin, notes, key)
        return sub["head.weight"], sub.get("head.bias"), notes
    state = {k.removeprefix("module."): v for k, v in ck.state.items()}
    if "0.running_mean" in state and "1.weight" in state:
        sub = _fold_seq_head(dict(state), "", notes)
        return sub["head.weight"], sub["head.bias"], notes
    weights = [k for k, v in state.items() if _leaf(k) == "weight" and v.ndim == 2]
    if key is not None:
        weights = [k for k in weights if k.startswith(key)]
    if len(weights) != 1:
        raise UserError(f"head file '{path}' should hold one linear layer (a 2-D weight); found "
                        f"{len(weights)}: {', '.join(weights[:5]) or 'none'} (name one with head_key)")
    w = state[weights[0]]
    b = state.get(weights[0][: -len("weight")] + "bias")
    return w, b, notes


# --- open_clip variants -----------------------------------------------------------------------------------


def _quick_gelu_from_metadata(path: Path) -> tuple[bool | None, str]:
    """What files next to an open_clip checkpoint say about QuickGELU: (flag or None, where it was read)."""
    if path.suffix == ".safetensors":
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            if "quick_gelu" in meta:
                return meta["quick_gelu"].strip().lower() in ("1", "true", "yes"), f"{path.name} metadata"
        except Exception:  # noqa: BLE001 - unreadable here is reported when the weights are loaded
            pass
    cfg_file = path.parent / "open_clip_config.json"
    if cfg_file.is_file():
        try:
            model_cfg = json.loads(cfg_file.read_text(encoding="utf-8")).get("model_cfg", {})
            return bool(model_cfg.get("quick_gelu", False)), str(cfg_file.name)
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            pass
    # open_clip's training script writes params.txt (every argument) in the run folder, checkpoints below it.
    for folder in (path.parent, path.parent.parent):
        params = folder / "params.txt"
        if params.is_file():
            for line in params.read_text(encoding="utf-8", errors="replace").splitlines():
                key, _, value = line.partition(":")
                if key.strip() == "force_quick_gelu":
                    return value.strip().lower() == "true", "params.txt"
    return None, ""


def open_clip_variant(name: str, pretrained: str | None, quick_gelu: bool | None) -> str:
    """The open_clip model name to build for ``pretrained``: ``name`` or its ``-quickgelu`` twin.

    The two share every tensor, so a checkpoint file loads into either and only the outputs differ
    (OpenAI's CLIPs, SynthCLIP's text tower and Fan et al.'s synthetic-data CLIPs use QuickGELU). The
    choice comes from ``quick_gelu`` when given, else from the checkpoint's metadata (safetensors
    metadata, an ``open_clip_config.json`` beside it, or open_clip's ``params.txt`` of the training run);
    a checkpoint that records nothing is refused rather than guessed.
    """
    import open_clip

    if not pretrained or not Path(pretrained).is_file():
        return name  # a pretrained tag: open_clip's own config for it is authoritative
    base = name.removesuffix("-quickgelu")
    twin = f"{base}-quickgelu"
    if twin not in open_clip.list_models():
        return name
    named = name.endswith("-quickgelu")
    found, where = _quick_gelu_from_metadata(Path(pretrained))
    want = quick_gelu if quick_gelu is not None else found
    if want is None:
        if named:
            return name
        raise UserError(f"cannot tell whether '{pretrained}' was trained with QuickGELU: open_clip '{base}' and "
                        f"'{twin}' share every tensor but compute different outputs, and the checkpoint records "
                        f"neither; name '{twin}' or set backbone.quick_gelu: false")
    if found is not None and quick_gelu is not None and found != quick_gelu:
        raise UserError(f"backbone.quick_gelu is {quick_gelu} but {where} of '{pretrained}' says "
                        f"{'QuickGELU' if found else 'GELU'}; remove one of them")
    if named and not want:
        raise UserError(f"'{name}' uses QuickGELU but {where or 'backbone.quick_gelu'} says '{pretrained}' was "
                        f"trained without it; use '{base}'")
    return twin if want else base


# --- frozen backbones -----------------------------------------------------------------------------------


def load_backbone_weights(net: torch.nn.Module, path: str | Path, arch: str, convert_name: str = "auto",
                          key_map: str = "auto") -> list[str]:
    """Load a released checkpoint into a headless timm model (``num_classes=0``) for linear probes.

    The checkpoint goes through the same converters and key matching as an import; its classifier or
    projection head, which a headless model has no place for, is left out. Returns the notes.
    """
    ck = read_checkpoint(path)
    conv = convert(ck, convert_name)
    if conv.open_clip_cfg is not None:
        raise UserError(f"'{path}' is a CLIP checkpoint: import it (synclone import) and use the open_clip folder "
                        "as backbone kind open_clip")
    expected = net.state_dict()
    clf = (getattr(net, "pretrained_cfg", None) or {}).get("classifier")
    prefixes = tuple(f"{c}." for c in ((clf,) if isinstance(clf, str) else tuple(clf or ())) + ("head", "fc"))
    state = {k: v for k, v in conv.state.items() if k in expected or not k.startswith(prefixes)}
    km = match_keys(net, state, key_map, arch)
    net.load_state_dict(km.state)
    return conv.notes + km.notes + ([f"keys matched by {km.how}"] if km.how != "exact" else [])


def state_mismatch(expected: dict, state: dict, needs: str) -> str | None:
    """How the tensors of ``state`` fail to fit ``expected`` (a module's state dict), or None when they fit.

    ``needs`` names the receiving side in the message (e.g. "the config's architecture").
    """
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    parts = []
    if wrong:
        k = wrong[0]
        parts.append(f"'{k}' has shape {tuple(state[k].shape)}, {needs} needs {tuple(expected[k].shape)}"
                     + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""))
    if missing:
        parts.append(f"{len(missing)} tensors missing (e.g. '{missing[0]}')")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensors (e.g. '{unexpected[0]}')")
    return "; ".join(parts) or None
