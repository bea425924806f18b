"""The training data path for big folders and shards: DataLoader worker processes, pinned memory, prefetch.

The loop's samplers decide which images every step uses (a pure function of seed and step), so the loader
is fed *keys*, never a running shuffle: :class:`StepBatches` yields, for each step from the resumed one on,
this process's share of the step's global batch as ``(step, slot, source, index)`` keys, and
:class:`TrainItems` turns one key into one image. Each image is decoded (``data.decode``: libjpeg-turbo or
Pillow with JPEG draft mode) and, for the timm presets, transformed under ``mix_seed(seed, step, slot)``;
so the pixels of a step do not depend on the worker count, the prefetch depth or a resume.

An image that cannot be read is dropped from its batch and reported: the loop records it
(:class:`synclone.data.readable.UnreadableImages`, listed in ``skipped_images.txt``) and stops only once more
than ``data.max_unreadable`` were skipped.
"""

from __future__ import annotations

import os
import warnings

import torch

from synclone.data.decode import BadImage, decode_rgb, read_bytes, resize_center_crop
from synclone.data.imageset import ImageSet, TensorImageSet
from synclone.data.shards import ShardImageSet
from synclone.data.streaming import FileImageSet
from synclone.train.augment import Aug, build_transform, resolution_at, seeded
from synclone.train.batches import CyclingSampler
from synclone.util.seeds import mix_seed

Key = tuple[int, int, int, int]  # (step, slot in the global batch, source id, index in the source)


class StepBatches(torch.utils.data.Sampler):
    """Keys of this process's share of every step's global batch, for steps ``start .. total - 1``."""

    def __init__(self, samplers: list[CyclingSampler], start: int, total: int, rank: int = 0, world: int = 1) -> None:
        self.samplers, self.start, self.total, self.rank, self.world = samplers, start, total, rank, world

    def __len__(self) -> int:
        return max(0, self.total - self.start)

    def keys(self, step: int) -> list[Key]:
        out: list[Key] = []
        offset = 0
        for sid, s in enumerate(self.samplers):
            idx = s.indices(step).tolist()
            out += [(step, offset + j, sid, idx[j]) for j in range(self.rank, len(idx), self.world)]
            offset += len(idx)
        return out

    def __iter__(self):
        for step in range(self.start, self.total):
            yield self.keys(step)


class TrainItems(torch.utils.data.Dataset):
    """One training image per key: decoded, resized or timm-transformed; (pixels, label, key, error)."""

    def __init__(self, sources: list[ImageSet], aug: Aug, seed: int, size: int, total_steps: int,
                 decoder: str = "auto", channels: int = 3) -> None:
        self.sources, self.aug, self.seed, self.size = sources, aug, seed, size
        self.total_steps, self.decoder, self.channels = total_steps, decoder, channels
        self._tfs: dict[int, object] = {}

    def __len__(self) -> int:  # pragma: no cover - keys come from the batch sampler
        return sum(len(s) for s in self.sources)

    def _image(self, ds: ImageSet, i: int, min_side: int | None):
        from PIL import Image

        if isinstance(ds, TensorImageSet):
            a = ds.images[i]
            return Image.fromarray(a[0].numpy(), "L") if a.shape[0] == 1 else \
                Image.fromarray(a.permute(1, 2, 0).numpy())
        if isinstance(ds, ShardImageSet):
            return decode_rgb(ds.read_bytes(i), decoder=self.decoder, min_side=min_side, name=ds.describe(i))
        if isinstance(ds, FileImageSet):
            path = str(ds.paths[i])
            return decode_rgb(read_bytes(path), decoder=self.decoder, min_side=min_side, name=path)
        raise TypeError(f"cannot stream {type(ds).__name__}")

    def __getitem__(self, key: Key):
        step, slot, sid, i = key
        ds = self.sources[sid]
        y = int(ds.labels[i])
        try:
            if not self.aug.per_image:
                if isinstance(ds, TensorImageSet):
                    return ds.images[i], y, key, None
                x = resize_center_crop(self._image(ds, i, int(self.size / 0.875)), self.size)
            else:
                res = resolution_at(self.aug, self.size, step, self.total_steps)
                if res not in self._tfs:
                    self._tfs[res] = build_transform(self.aug, res)
                im = self._image(ds, i, None).convert("RGB")
                with seeded(mix_seed(self.seed, step, slot, 0x7F)):
                    x = self._tfs[res](im)
        except BadImage as err:
            return None, y, key, str(err)
        if self.channels == 1 and x.shape[0] == 3:
            x = x.float().mean(0, keepdim=True) if x.is_floating_point() else \
                x.float().mean(0, keepdim=True).round().to(torch.uint8)
        return x, y, key, None


def collate(items: list) -> tuple[torch.Tensor | None, torch.Tensor, list[Key], list[tuple[Key, str]]]:
    """Stack the readable images of a batch; the unreadable ones come back as (key, message)."""
    good = [it for it in items if it[3] is None]
    bad = [(it[2], it[3]) for it in items if it[3] is not None]
    x = torch.stack([it[0] for it in good]) if good else None
    return x, torch.tensor([it[1] for it in good], dtype=torch.long), [it[2] for it in good], bad


def default_workers(processes_on_node: int = 1) -> int:
    """Worker processes per training process: the CPUs left after the training processes, at most 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus // max(1, processes_on_node) - 1))


def clamp_workers(workers: int) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if workers > cpus:
        warnings.warn(f"data.workers={workers} is more than the {cpus} CPUs of this machine; using {cpus}",
                      stacklevel=3)
        return cpus
    return workers


def make_loader(items: TrainItems, batches: StepBatches, workers: int, prefetch: int,
                pin_memory: bool) -> torch.utils.data.DataLoader:
    """A DataLoader over ``batches`` (one element per step, in step order) with persistent worker processes."""
    kw = {"prefetch_factor": prefetch, "persistent_workers": True} if workers > 0 else {}
    return torch.utils.data.DataLoader(items, batch_sampler=batches, num_workers=workers, collate_fn=collate,
                                       pin_memory=pin_memory, **kw)
