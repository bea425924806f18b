"""A grid of linear heads trained together in one pass over cached features (dinov2's linear-eval pattern).

Every head in the grid (one per learning rate x weight decay) sees the same batches in the same order;
their weights are stacked into one (H, C, D) tensor per step so the whole grid costs one batched matmul.
Each head is its own parameter in its own optimiser group, so its learning rate and weight decay act on
it alone, exactly as if it had been trained by a separate run on the same batches.

Heads start from the zero-shot text weights (CLIP classifier tuning, He et al. 2023), from zeros, or
from small random values (linear probe), and can be pulled towards a teacher (the zero-shot head) by a
distillation term: ``loss = CE(head, y) + w * T^2 * KL(softmax(teacher / T) || softmax(head / T))``.
The best head is the one with the highest top-1 on a validation split; the split's name is recorded.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from synclone.config import StrictModel
from synclone.errors import UserError


class HeadGridConfig(StrictModel):
    """The grid (every learning rate with every weight decay) and how each head is trained."""

    lrs: list[float] = Field(default_factory=lambda: [1e-4, 3e-4, 1e-3, 3e-3, 1e-2])
    weight_decays: list[float] = Field(default_factory=lambda: [0.0, 1e-4, 1e-2])
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(256, ge=1)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    # zeroshot: start from the text weights (classifier tuning); zeros / random: a plain linear probe.
    init: Literal["zeroshot", "zeros", "random"] = "zeros"
    distill_weight: float = Field(0.0, ge=0.0)
    distill_temperature: float = Field(1.0, gt=0.0)
    seed: int = 0
    # Two batches per step (He et al.'s few-shot tuning, when real shots are given apart from the synthetic
    # data): ``batch_size`` synthetic + ``real_batch_size`` real images, loss = synthetic_weight * CE(synthetic)
    # + real_weight * CE(real). The paper's sizes are 512 + 32.
    real_batch_size: int = Field(32, ge=1)
    real_weight: float = Field(1.0, ge=0.0)
    synthetic_weight: float = Field(1.0, ge=0.0)

    @field_validator("lrs", "weight_decays")
    @classmethod
    def _non_empty(cls, v: list[float], info) -> list[float]:
        if not v:
            raise ValueError(f"{info.field_name} needs at least one value")
        if any((not math.isfinite(x)) or x < 0 for x in v):
            raise ValueError(f"{info.field_name} must be finite and >= 0")
        return v

    def grid(self) -> list[dict[str, float]]:
        return [{"lr": lr, "weight_decay": wd} for lr in self.lrs for wd in self.weight_decays]


class LinearHeadGrid(nn.Module):
    """H linear heads over D-dim features: ``logits[h] = scale * x @ W[h].T + b[h]`` as one batched matmul."""

    def __init__(self, n_heads: int, dim: int, n_classes: int, scale: float = 1.0,
                 init: Literal["zeroshot", "zeros", "random"] = "zeros", init_weight: torch.Tensor | None = None,
                 seed: int = 0) -> None:
        super().__init__()
        if init == "zeroshot":
            if init_weight is None or tuple(init_weight.shape) != (n_classes, dim):
                got = None if init_weight is None else tuple(init_weight.shape)
                raise UserError(f"zero-shot init needs text weights of shape ({n_classes}, {dim}), got {got}")
            w0 = init_weight.detach().float()
        elif init == "random":
            # dinov2's linear-eval init: N(0, 0.01), zero bias.
            g = torch.Generator().manual_seed(seed)
            w0 = torch.randn(n_classes, dim, generator=g) * 0.01
        else:
            w0 = torch.zeros(n_classes, dim)
        self.scale = float(scale)
        self.weights = nn.ParameterList([nn.Parameter(w0.clone()) for _ in range(n_heads)])
        self.biases = nn.ParameterList([nn.Parameter(torch.zeros(n_classes)) for _ in range(n_heads)])

    def __len__(self) -> int:
        return len(self.weights)

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.stack(list(self.weights)), torch.stack(list(self.biases))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D) features -> (H, B, C) logits."""
        w, b = self.stacked()
        # baddbmm: b + scale * (x @ W^T) for every head at once; x is shared, so expand costs no copy.
        return torch.baddbmm(b.unsqueeze(1), x.unsqueeze(0).expand(len(w), -1, -1), w.transpose(1, 2),
                             alpha=self.scale)


def grid_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each head: logits (H, B, C), labels (B,) -> (H,)."""
    h = logits.shape[0]
    return F.cross_entropy(logits.flatten(0, 1), labels.repeat(h), reduction="none").view(h, -1).mean(dim=1)


def two_batch_loss(syn_logits: torch.Tensor, syn_labels: torch.Tensor, real_logits: torch.Tensor,
                   real_labels: torch.Tensor, synthetic_weight: float, real_weight: float) -> torch.Tensor:
    """Each head's loss on one synthetic and one real batch: ``w_syn * CE(syn) + w_real * CE(real)`` (each CE a
    mean over its own batch, so the weights, not the batch sizes, set the balance)."""
    return (synthetic_weight * grid_cross_entropy(syn_logits, syn_labels)
            + real_weight * grid_cross_entropy(real_logits, real_labels))


def real_batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless real batches: seeded permutations of ``0..n-1`` one after another, cut into ``batch_size`` pieces
    (a batch may span two permutations; with fewer images than the batch, images repeat)."""
    buf = torch.empty(0, dtype=torch.long)
    while True:
        while len(buf) < batch_size:
            buf = torch.cat([buf, torch.randperm(n, generator=gen)])
        yield buf[:batch_size]
        buf = buf[batch_size:]


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)) * T^2, averaged over the batch (Hinton et al., 2015).

    ``student`` may carry a leading head axis (H, B, C); the result is then one value per head.
    """
    t = temperature
    log_p_s = F.log_softmax(student / t, dim=-1)
    log_p_t = F.log_softmax(teacher / t, dim=-1).expand_as(log_p_s)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)  # (..., B)
    return kl.mean(dim=-1) * (t * t)


@dataclass
class GridResult:
    """What the grid training found; ``history`` has one row per epoch of per-head validation top-1."""

    grid: list[dict[str, float]]
    val_top1: list[float]
    val_loss: list[float]
    best: int
    selected_on: str
    weight: torch.Tensor
    bias: torch.Tensor
    scale: float
    init_val_top1: list[float]
    history: list[list[float]] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)

    @property
    def best_hparams(self) -> dict[str, float]:
        return self.grid[self.best]

    def to_dict(self) -> dict:
        return {
            "selected_on": self.selected_on,
            "metric": "top1",
            "best": {"index": self.best, **self.best_hparams, "val_top1": self.val_top1[self.best],
                     "val_loss": self.val_loss[self.best]},
            "grid": [{**hp, "val_top1": a, "val_loss": loss} for hp, a, loss in
                     zip(self.grid, self.val_top1, self.val_loss, strict=True)],
            "init_val_top1": self.init_val_top1[0] if len(set(self.init_val_top1)) == 1 else self.init_val_top1,
            "val_top1_per_epoch": self.history,
            "train_loss_per_epoch": self.train_loss,
        }


@torch.no_grad()
def evaluate_heads(heads: LinearHeadGrid, feats: torch.Tensor, labels: torch.Tensor,
                   chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-head top-1 and mean cross-entropy on (feats, labels)."""
    correct = torch.zeros(len(heads))
    loss = torch.zeros(len(heads))
    for s in range(0, len(feats), chunk):
        logits = heads(feats[s:s + chunk])
        y = labels[s:s + chunk]
        correct += (logits.argmax(-1) == y).sum(dim=1).float()
        loss += F.cross_entropy(logits.flatten(0, 1), y.repeat(len(heads)), reduction="none").view(
            len(heads), -1).sum(dim=1)
    n = max(1, len(feats))
    return (correct / n).tolist(), (loss / n).tolist()


def build_optimizer(heads: LinearHeadGrid, cfg: HeadGridConfig) -> torch.optim.Optimizer:
    """One optimiser over the grid with a parameter group per head (its own learning rate and weight decay)."""
    groups = []
    for h, hp in enumerate(cfg.grid()):
        groups.append({"params": [heads.weights[h]], "lr": hp["lr"], "weight_decay": hp["weight_decay"]})
        # No decay on biases (the usual convention); same learning rate.
        groups.append({"params": [heads.biases[h]], "lr": hp["lr"], "weight_decay": 0.0})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=cfg.momentum)
    return torch.optim.AdamW(groups)


def cosine_schedule(opt: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay from each group's learning rate to 0 over ``total_steps`` (stepped once per batch)."""
    total = max(1, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))


# Below this many multiply-adds per step (about 5 ms of one core) the grid runs on one thread.
_SMALL_STEP_FLOPS = 2e8


@contextlib.contextmanager
def _threads_for(flops_per_step: float) -> Iterator[None]:
    """One intra-op thread while the steps are tiny, restored afterwards.

    A head step is a few small kernels; splitting each across threads buys nothing, and when the cores are
    shared the threads wait on each other at every kernel: measured on a 2-core machine under load, a
    2-head grid over 54k Fashion-MNIST features took 50 s with 2 threads and 0.56 s with one.
    """
    before = torch.get_num_threads()
    if flops_per_step < _SMALL_STEP_FLOPS and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_head_grid(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
                    val_labels: torch.Tensor, n_classes: int, cfg: HeadGridConfig, scale: float = 1.0,
                    init_weight: torch.Tensor | None = None, teacher: tuple[torch.Tensor, float] | None = None,
                    val_name: str = "val", log: bool = False,
                    real: tuple[torch.Tensor, torch.Tensor] | None = None) -> GridResult:
    """Train every head of ``cfg``'s grid on the cached features; choose the best on the validation split.

    ``teacher`` = (weights (C, D), logit scale) of the zero-shot head, for distillation; features given to
    the teacher are L2-normalised (it is a cosine classifier). ``real`` = (features, labels) of real shots:
    every step then adds a real batch of ``cfg.real_batch_size`` (:func:`two_batch_loss`); epochs and the
    schedule still count synthetic batches, and distillation applies to the synthetic batch.
    """
    flops = 2.0 * len(cfg.grid()) * min(cfg.batch_size, len(train_feats)) * train_feats.shape[-1] * n_classes
    with _threads_for(flops):
        return _train_head_grid(train_feats, train_labels, val_feats, val_labels, n_classes, cfg, scale, init_weight,
                                teacher, val_name, log, real)


def _train_head_grid(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
                     val_labels: torch.Tensor, n_classes: int, cfg: HeadGridConfig, scale: float,
                     init_weight: torch.Tensor | None, teacher: tuple[torch.Tensor, float] | None, val_name: str,
                     log: bool, real: tuple[torch.Tensor, torch.Tensor] | None = None) -> GridResult:
    if len(val_feats) == 0:
        raise UserError("the validation split is empty: the best head must be chosen on held-out data; "
                        "raise data.val_fraction or give a validation dataset")
    if len(train_feats) == 0:
        raise UserError("the training split is empty")
    if cfg.distill_weight > 0 and teacher is None:
        raise UserError("distillation needs a teacher (the zero-shot head of a CLIP backbone); "
                        "set heads.distill_weight=0 for this backbone")
    if cfg.init == "zeroshot" and init_weight is None:
        raise UserError("heads.init 'zeroshot' needs a CLIP backbone with a text tower; use 'zeros' or 'random'")
    grid = cfg.grid()
    dim = train_feats.shape[1]
    heads = LinearHeadGrid(len(grid), dim, n_classes, scale, cfg.init, init_weight, cfg.seed)
    opt = build_optimizer(heads, cfg)
    sched = cosine_schedule(opt, cfg.epochs * math.ceil(len(train_feats) / cfg.batch_size))
    if teacher is not None:
        t_w, t_scale = teacher
        teacher_logits_all = t_scale * F.normalize(train_feats, dim=-1) @ t_w.T.float()
    init_acc, _ = evaluate_heads(heads, val_feats, val_labels)
    history: list[list[float]] = []
    train_losses: list[float] = []
    g = torch.Generator().manual_seed(cfg.seed)
    if real is not None:
        if len(real[0]) == 0:
            raise UserError("the real shots are empty: give at least one real image per class")
        real_iter = real_batches(len(real[0]), cfg.real_batch_size, torch.Generator().manual_seed(cfg.seed + 1))
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(train_feats), generator=g)
        epoch_loss, seen = 0.0, 0
        for s in range(0, len(order), cfg.batch_size):
            idx = order[s:s + cfg.batch_size]
            x, y = train_feats[idx], train_labels[idx]
            logits = heads(x)  # (H, B, C)
            if real is None:
                per_head = grid_cross_entropy(logits, y)
            else:
                r = next(real_iter)
                per_head = two_batch_loss(logits, y, heads(real[0][r]), real[1][r], cfg.synthetic_weight,
                                          cfg.real_weight)
            if cfg.distill_weight > 0:
                per_head = per_head + cfg.distill_weight * distillation_loss(
                    logits, teacher_logits_all[idx].unsqueeze(0), cfg.distill_temperature)
            if not torch.isfinite(per_head).all():
                bad = [grid[h] for h in range(len(grid)) if not torch.isfinite(per_head[h])]
                raise UserError(f"loss became non-finite at epoch {epoch + 1} for heads {bad}; lower those "
                                "learning rates")
            # Summed, not averaged: each head's gradient is then exactly that of its own loss.
            opt.zero_grad(set_to_none=True)
            per_head.sum().backward()
            opt.step()
            sched.step()
            epoch_loss += float(per_head.detach().mean()) * len(idx)
            seen += len(idx)
        acc, _ = evaluate_heads(heads, val_feats, val_labels)
        history.append(acc)
        train_losses.append(epoch_loss / seen)
        if log:
            print(f"epoch {epoch + 1}/{cfg.epochs}: train loss {epoch_loss / seen:.4f}, best val top1 {max(acc):.4f}")
    val_acc, val_loss = evaluate_heads(heads, val_feats, val_labels)
    # Highest top-1; ties go to the lower validation loss, then to the earlier grid entry.
    best = min(range(len(grid)), key=lambda h: (-val_acc[h], val_loss[h], h))
    w, b = heads.stacked()
    return GridResult(grid=grid, val_top1=val_acc, val_loss=val_loss, best=best, selected_on=val_name,
                      weight=w[best].detach().clone(), bias=b[best].detach().clone(), scale=heads.scale,
                      init_val_top1=init_acc, history=history, train_loss=train_losses)
