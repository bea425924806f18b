"""He et al.'s few-shot classifier tuning: one synthetic and one real batch per step, each with its own size and
loss weight, checked against hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from synclone.errors import UserError
from synclone.train.heads import HeadGridConfig, real_batches, train_head_grid, two_batch_loss


def test_two_batch_loss_by_hand():
    # One head, two classes. Synthetic: logits (0, ln 3), label 1 -> p = 3/4, CE = ln(4/3).
    # Real: logits (ln 2, 0), label 1 -> p = 1/3, CE = ln 3. Weights 1 and 0.5.
    syn = torch.tensor([[[0.0, math.log(3)]]])
    real = torch.tensor([[[math.log(2), 0.0]]])
    loss = two_batch_loss(syn, torch.tensor([1]), real, torch.tensor([1]), 1.0, 0.5)
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(math.log(4 / 3) + 0.5 * math.log(3), abs=1e-6)
    # Each CE is a mean over its own batch: doubling the real batch with a copy changes nothing.
    real2 = real.repeat(1, 2, 1)
    assert two_batch_loss(syn, torch.tensor([1]), real2, torch.tensor([1, 1]), 1.0, 0.5).item() == pytest.approx(
        loss.item(), abs=1e-6)


def test_real_batches_walk_seeded_permutations():
    g = torch.Generator().manual_seed(3)
    p1, p2 = torch.randperm(3, generator=g), torch.randperm(3, generator=g)
    it = real_batches(3, 2, torch.Generator().manual_seed(3))
    got = [next(it).tolist() for _ in range(3)]
    assert got == [p1[:2].tolist(), [p1[2].item(), p2[0].item()], p2[1:].tolist()]
    # Fewer real images than the batch: images repeat, the batch keeps its size.
    assert len(next(real_batches(2, 5, torch.Generator().manual_seed(0)))) == 5


def test_one_sgd_step_of_two_batch_tuning_by_hand():
    """Zero-initialised head, SGD (no momentum), lr 0.1, one step; gradients worked out on paper:
    at W = 0 every softmax is (1/2, 1/2), so dCE/dlogits = p - onehot = -/+ 1/2.
      synthetic batch x=(1,0) y=0, x=(0,1) y=1 (weight 1): dW = [[-.25, .25], [.25, -.25]], db = 0
      real batch      x=(1,1) y=0                (weight .5): dW = [[-.25, -.25], [.25, .25]], db = [-.25, .25]
    so W1 = -0.1 * [[-.5, 0], [.5, 0]] and b1 = -0.1 * [-.25, .25]."""
    cfg = HeadGridConfig(lrs=[0.1], weight_decays=[0.0], epochs=1, batch_size=2, optimizer="sgd", momentum=0.0,
                         init="zeros", real_batch_size=1, real_weight=0.5, synthetic_weight=1.0)
    syn_x, syn_y = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
    real_x, real_y = torch.tensor([[1.0, 1.0]]), torch.tensor([0])
    res = train_head_grid(syn_x, syn_y, syn_x, syn_y, 2, cfg, real=(real_x, real_y))
    assert torch.allclose(res.weight, torch.tensor([[0.05, 0.0], [-0.05, 0.0]]), atol=1e-7)
    assert torch.allclose(res.bias, torch.tensor([0.025, -0.025]), atol=1e-7)
    # Without the real batch only the synthetic gradient acts: W1 = -0.1 * [[-.25, .25], [.25, -.25]], b1 = 0.
    alone = train_head_grid(syn_x, syn_y, syn_x, syn_y, 2, cfg)
    assert torch.allclose(alone.weight, torch.tensor([[0.025, -0.025], [-0.025, 0.025]]), atol=1e-7)
    assert torch.allclose(alone.bias, torch.zeros(2), atol=1e-7)
    with pytest.raises(UserError, match="real shots are empty"):
        train_head_grid(syn_x, syn_y, syn_x, syn_y, 2, cfg, real=(real_x[:0], real_y[:0]))
