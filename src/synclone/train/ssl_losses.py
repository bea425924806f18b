"""Self-supervised contrastive losses: NT-Xent (SimCLR), multi-positive (StableRep), MoCo v2.

Each is a few lines over a similarity matrix, written here rather than pulled from ``lightly`` (whose
install brings pytorch-lightning and hydra into the core); ``tests/test_pretrain.py`` checks them
against ``lightly`` and against the papers' formulas written out directly.

- :func:`nt_xent` (Chen et al., 2020): two views of N images; for each of the 2N embeddings the other
  view of its image is the positive and the remaining 2N - 2 are negatives.
- :func:`multi_positive` (Tian et al., 2023, StableRep): M embeddings with group ids (images generated
  from one prompt share a group); the target of anchor i is uniform over the other members of its
  group, the prediction a softmax over all j != i. With groups of exactly two (two views of one image)
  it *is* NT-Xent.
- :func:`moco_loss`, :func:`momentum_update`, :class:`KeyQueue` (He et al., 2020; Chen et al., 2020 v2):
  queries against their key and a queue of past keys, a momentum (EMA) key encoder, a FIFO queue.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """SimCLR's normalised-temperature cross-entropy over two views ``z1``, ``z2`` of shape (N, D).

    Mean over all 2N anchors of ``-log(exp(s_ip / t) / sum_{j != i} exp(s_ij / t))`` with cosine
    similarities ``s`` and ``p`` the other view of anchor i's image.
    """
    n = z1.shape[0]
    groups = torch.arange(n, device=z1.device).repeat(2)
    return multi_positive(torch.cat([z1, z2]), groups, temperature)


def multi_positive(z: torch.Tensor, groups: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """StableRep's multi-positive contrastive loss over embeddings ``z`` (M, D) with group ids ``groups`` (M,).

    For anchor i: logits ``s_ij / t`` over all j != i (cosine similarities), target ``p_ij`` uniform over
    the j != i of the same group; the loss is the mean cross-entropy ``-sum_j p_ij log softmax_j``. Every
    anchor needs at least one other member of its group (the caller builds batches that way).
    """
    z = F.normalize(z.float(), dim=1)
    m = z.shape[0]
    eye = torch.eye(m, dtype=torch.bool, device=z.device)
    logits = (z @ z.T / temperature).masked_fill(eye, float("-inf"))
    pos = (groups[:, None] == groups[None, :]) & ~eye
    n_pos = pos.sum(1)
    if bool((n_pos == 0).any()):
        raise ValueError(f"{int((n_pos == 0).sum())} anchor(s) have no positive in the batch")
    log_prob = logits.log_softmax(dim=1).masked_fill(eye, 0.0)
    return -((log_prob * pos).sum(1) / n_pos).mean()


def moco_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """MoCo's InfoNCE: each query ``q`` (N, D) against its key ``k`` (N, D, no gradient) and the ``queue`` (K, D).

    Logits ``[q.k, q.queue^T] / t`` with the positive at index 0; all vectors L2-normalised.
    """
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.float(), dim=1).detach()
    l_pos = (q * k).sum(1, keepdim=True)
    l_neg = q @ queue.detach().float().T
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


@torch.no_grad()
def momentum_update(online: nn.Module, target: nn.Module, momentum: float) -> None:
    """``target <- m * target + (1 - m) * online`` for every parameter.

    Buffers (BatchNorm statistics) are left alone, as in MoCo's reference code: the key encoder keeps
    the statistics of its own forward passes.
    """
    for p_t, p_o in zip(target.parameters(), online.parameters(), strict=True):
        p_t.mul_(momentum).add_(p_o.detach(), alpha=1.0 - momentum)


class KeyQueue(nn.Module):
    """MoCo's FIFO queue of L2-normalised keys; buffers, so it lives in the model's state dict and checkpoint."""

    def __init__(self, size: int, dim: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("keys", F.normalize(torch.randn(size, dim, generator=g), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, k: torch.Tensor) -> None:
        """Replace the oldest ``len(k)`` keys by ``k`` (normalised); the size must divide the queue length."""
        n, size = k.shape[0], self.keys.shape[0]
        if size % n:
            raise ValueError(f"queue size {size} is not a multiple of the {n} keys enqueued per step")
        p = int(self.ptr)
        self.keys[p:p + n] = F.normalize(k.detach().float(), dim=1)
        self.ptr.fill_((p + n) % size)
