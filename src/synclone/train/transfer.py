"""Transfer by fine-tuning: a pre-trained backbone under a fresh head for another label space.

``model.init: FOLDER`` with ``model.init_head: new`` keeps every weight of the folder's network except
its classifier head, which is created anew (seeded) for the training data's classes. Two standard
refinements are options of the supervised loop: a warm-up with the backbone frozen
(``model.freeze_steps``: its learning rate is 0, so only the new head learns while its gradients would
otherwise wreck the features; BatchNorm statistics still follow the new data) and layer-wise learning
rate decay (``optim.layer_decay``, timm's BEiT-style grouping: layer i of L gets ``decay ** (L - i)``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from synclone.errors import UserError
from synclone.labels import LabelSpace
from synclone.models import Classifier, create_classifier, load_model


def _head_params(net: nn.Module) -> list[nn.Parameter]:
    head = net.get_classifier() if hasattr(net, "get_classifier") else None
    if not isinstance(head, nn.Module):
        raise UserError(f"architecture {type(net).__name__} has no classifier head timm can name (get_classifier); "
                        "model.init_head=new needs one")
    return list(head.parameters())


def transfer_model(folder: str | Path, label_space: LabelSpace, input_size: tuple[int, ...], seed: int) -> Classifier:
    """The network of ``folder`` with a new, seeded head for ``label_space`` (the rest of the weights copied)."""
    src = load_model(folder, allow_backbone=True)
    if not isinstance(src, Classifier):
        raise UserError(f"model.init '{folder}' is a {type(src).__name__} (a frozen-encoder model): fine-tuning needs "
                        "a model folder written by synclone train or synclone train --kind pretrain")
    if tuple(src.input_size) != tuple(input_size):
        raise UserError(f"model.init '{folder}' takes images of {tuple(src.input_size)}, the training data are "
                        f"{tuple(input_size)}; resize the data (data.image_size) or pre-train at this size")
    torch.manual_seed(seed)
    model = create_classifier(src.arch, label_space, input_size, src.mean.flatten().tolist(),
                              src.std.flatten().tolist(), **src.arch_kwargs)
    head_ids = {id(p) for p in _head_params(model.net)}
    head_keys = {f"net.{n}" for n, p in model.net.named_parameters() if id(p) in head_ids}
    state = {k: v for k, v in src.state_dict().items() if k not in head_keys}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if set(missing) != head_keys or unexpected:
        raise UserError(f"cannot move the weights of '{folder}' under a new head: missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]}")
    return model


def transfer_param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None,
                          frozen: bool) -> list[dict]:
    """Optimiser parameter groups split into head and backbone, with timm's ``lr_scale`` (layer decay, freezing)."""
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    net = model.net if isinstance(model, Classifier) else model
    no_decay = net.no_weight_decay() if hasattr(net, "no_weight_decay") else ()
    if layer_decay is not None:
        groups = param_groups_layer_decay(net, weight_decay, no_weight_decay_list=no_decay, layer_decay=layer_decay)
    else:
        groups = param_groups_weight_decay(net, weight_decay, no_weight_decay_list=no_decay)
    head_ids = {id(p) for p in _head_params(net)}
    out = []
    for g in groups:
        for is_head in (True, False):
            ps = [p for p in g["params"] if (id(p) in head_ids) == is_head]
            if ps:
                scale = float(g.get("lr_scale", 1.0))
                out.append({**g, "params": ps, "base_scale": scale, "backbone": not is_head,
                            "lr_scale": 0.0 if frozen and not is_head else scale})
    return out


def set_frozen(optimizer: torch.optim.Optimizer, frozen: bool) -> None:
    """Set the backbone groups' ``lr_scale`` to 0 (frozen) or back; the scheduler applies it at its next step."""
    for g in optimizer.param_groups:
        if g.get("backbone"):
            g["lr_scale"] = 0.0 if frozen else g["base_scale"]
