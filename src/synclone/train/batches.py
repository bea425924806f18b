"""Deterministic batch indices and batched augmentation for in-memory datasets.

Everything random in a training step is a pure function of (seed, step): the order of every pass
over a source, the augmentation, dropout. A run resumed at step k therefore replays exactly what an
uninterrupted run would have done from step k on, and no sampler state needs saving.
"""

from __future__ import annotations

import torch

from synclone.util.seeds import mix_seed


class CyclingSampler:
    """Take ``n`` indices per step from a source of ``size`` items, passing over it in seeded random orders."""

    def __init__(self, size: int, per_step: int, seed: int, source_id: int) -> None:
        self.size, self.per_step, self.seed, self.source_id = size, per_step, seed, source_id
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.source_id, epoch))
            self._perms[epoch] = torch.randperm(self.size, generator=g)
        return self._perms[epoch]

    def indices(self, step: int) -> torch.Tensor:
        pos = step * self.per_step + torch.arange(self.per_step)
        epochs, offsets = pos // self.size, pos % self.size
        out = torch.empty(self.per_step, dtype=torch.long)
        for e in epochs.unique().tolist():
            m = epochs == e
            out[m] = self._perm(e)[offsets[m]]
        return out


def augment(x: torch.Tensor, step_seed: int, hflip: bool, crop_pad: int) -> torch.Tensor:
    """Random translation (zero pad + crop) and horizontal flip, per image, in one batched op."""
    g = torch.Generator().manual_seed(step_seed)
    b, _, h, w = x.shape
    if crop_pad > 0:
        p = crop_pad
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        oy = torch.randint(0, 2 * p + 1, (b,), generator=g)
        ox = torch.randint(0, 2 * p + 1, (b,), generator=g)
        rows = (oy[:, None] + torch.arange(h))[:, :, None]
        cols = (ox[:, None] + torch.arange(w))[:, None, :]
        x = padded[torch.arange(b)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    if hflip:
        flip = torch.rand(b, generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x.contiguous()


class ShardLocalSampler(CyclingSampler):
    """A :class:`CyclingSampler` whose passes stay local to a few shards at a time (sharded tar datasets).

    Each epoch's order is still a seeded permutation of every image (each seen once): shards are visited in
    a seeded random order, and the images of every ``window`` consecutive shards are shuffled together, so
    a reader streams a handful of shards at once instead of seeking across all of them.
    """

    def __init__(self, groups: torch.Tensor, per_step: int, seed: int, source_id: int, window: int = 4) -> None:
        super().__init__(len(groups), per_step, seed, source_id)
        self.groups, self.window = groups.long(), max(1, window)

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.source_id, epoch, 0x5A4D))
            ids = self.groups.unique()
            shard_order = ids[torch.randperm(len(ids), generator=g)]
            parts = []
            for start in range(0, len(shard_order), self.window):
                members = torch.isin(self.groups, shard_order[start:start + self.window]).nonzero().flatten()
                parts.append(members[torch.randperm(len(members), generator=g)])
            self._perms[epoch] = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
        return self._perms[epoch]
