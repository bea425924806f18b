"""Run a shard of the plan: batches, one generator per image, safety retries, progress, overlap with writing.

Two rules make the output independent of batching, sharding and interruptions:

* every image's noise comes from its own ``torch.Generator`` seeded with its job's seed; and
* every model call has the same batch shape: a short batch (the end of a shard, a resumed run, a
  regeneration) is padded with copies of its last job, whose outputs are dropped. On CPUs a kernel's
  float results can depend on the batch size, so without padding an image could differ in the last
  bit, and after rounding to 8 bits in a pixel, depending on where its batch was cut.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from synclone.generate.backends import Backend, Generated
from synclone.generate.plan import Job, retry_seed
from synclone.generate.writer import DatasetWriter


def batched(items: Iterable, n: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def generate_padded(backend: Backend, jobs: list[Job], seeds: list[int], batch_size: int) -> list[Generated]:
    """``backend.generate`` on ``jobs`` padded to ``batch_size``, one CPU generator per image."""
    n = len(jobs)
    pad = max(0, batch_size - n)
    jobs = jobs + [jobs[-1]] * pad
    seeds = seeds + [seeds[-1]] * pad
    # CPU generators: the same noise whatever the device the model runs on (as diffusers recommends).
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    return backend.generate(jobs, generators)[:n]


@dataclass
class ShardStats:
    images: int = 0
    skipped: int = 0
    regenerated: int = 0
    seconds: float = 0.0


def run_shard(
    jobs: Iterable[Job],
    backend: Backend,
    writer: DatasetWriter,
    batch_size: int,
    safety_retries: int = 3,
    progress=None,
) -> ShardStats:
    """Make every job's image and hand it to ``writer``; ``progress`` is a tqdm bar (or ``None``).

    A flagged image is made again from the derived seed ``retry_seed(seed, attempt)``, up to
    ``safety_retries`` times; if it is still flagged it is recorded as skipped with the reason.
    """
    stats = ShardStats()
    start = time.perf_counter()
    for batch in batched(jobs, batch_size):
        seeds = [j.seed for j in batch]
        attempts = [0] * len(batch)
        results = generate_padded(backend, batch, seeds, batch_size)
        for attempt in range(1, safety_retries + 1):
            redo = [i for i, r in enumerate(results) if r.image is None]
            if not redo:
                break
            new_seeds = [retry_seed(batch[i].seed, attempt) for i in redo]
            again = generate_padded(backend, [batch[i] for i in redo], new_seeds, batch_size)
            for i, s, r in zip(redo, new_seeds, again, strict=True):
                results[i], seeds[i], attempts[i] = r, s, attempt
        for job, r, s, a in zip(batch, results, seeds, attempts, strict=True):
            writer.submit(job, r.image, r.reason, s, a)
            if r.image is None:
                stats.skipped += 1
            else:
                stats.images += 1
                stats.regenerated += a > 0
        if progress is not None:
            progress.update(len(batch))
    stats.seconds = time.perf_counter() - start
    return stats
