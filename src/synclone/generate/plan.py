"""The plan: a deterministic job table, one row per image, written before any image is made.

Ids interleave the classes (``id = k * n_classes + label`` for image ``k`` of class ``label``), so
the plan, read in order, visits every class before the next round: a run stopped early has a
balanced dataset, and adding images per class later keeps every existing id (and so its seed and
prompt). An image's seed and its prompt's random stream depend on (run seed, id) only.

A *top-up* plan (``ranges``) holds only images ``start .. start + count - 1`` of some classes, with the
same ids, seeds and prompts those images would have in a larger plan; ``synclone curate`` refills short
classes this way, starting after the last image of the source plan, so no id or seed is ever reused.

The plan is produced and read as a stream, so memory does not grow with its length.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from synclone.errors import UserError
from synclone.labels import LabelSpace
from synclone.prompts.base import PromptStrategy, fill
from synclone.util.files import atomic_path
from synclone.util.seeds import derive_seed, derived_rng

PLAN_FILE = "plan.jsonl"


@dataclass(frozen=True)
class Job:
    """One image to make. ``reference`` is a real image (relative to the references folder) for img2img."""

    id: int
    label: int
    class_name: str
    slug: str
    prompt: str
    negative_prompt: str | None
    seed: int
    strategy: str
    reference: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def file_name(self) -> str:
        """Path of the image relative to the ``train`` folder."""
        return f"{self.slug}/{image_stem(self.id)}.png"

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, sort_keys=False)

    @classmethod
    def from_json(cls, line: str) -> Job:
        return cls(**json.loads(line))


def image_stem(job_id: int) -> str:
    """File stem of an image: the id zero-padded to 8 digits, so names sort like ids."""
    return f"{job_id:08d}"


def image_seed(run_seed: int, job_id: int) -> int:
    """The seed of image ``job_id``: a hash of (run seed, id), nothing else."""
    return derive_seed(run_seed, "image", job_id)


def retry_seed(seed: int, attempt: int) -> int:
    """The seed of a regeneration (after the safety checker flagged an image): a hash of (seed, attempt)."""
    return seed if attempt == 0 else derive_seed(seed, "retry", attempt)


def build_plan(
    label_space: LabelSpace,
    strategy: PromptStrategy,
    images_per_class: int,
    seed: int,
    negative_prompt: str | None = None,
    references: dict[int, list[str]] | None = None,
    ranges: dict[int, tuple[int, int]] | None = None,
) -> Iterator[Job]:
    """Yield the jobs in id order; call ``strategy.prepare`` first.

    ``ranges`` (label -> (start, count)): make only images ``start .. start + count - 1`` of the listed
    classes instead of images ``0 .. images_per_class - 1`` of every class (a top-up plan).
    """
    n = len(label_space)
    if ranges is None:
        spans = [(0, images_per_class)] * n
    else:
        spans = [(ranges[label][0], ranges[label][0] + ranges[label][1]) if label in ranges else (0, 0)
                 for label in range(n)]
    live = [s for s in spans if s[1] > s[0]]
    first = min((s[0] for s in live), default=0)
    end = max((s[1] for s in live), default=0)
    for k in range(first, end):
        for label, class_name in enumerate(label_space.classes):
            if not spans[label][0] <= k < spans[label][1]:
                continue
            job_id = k * n + label
            p = strategy.prompt(label, k, derived_rng(seed, "prompt", job_id))
            refs = references.get(label) if references else None
            yield Job(
                id=job_id,
                label=label,
                class_name=class_name,
                slug=label_space.slugs[label],
                prompt=p.text,
                negative_prompt=fill(negative_prompt, class_name) if negative_prompt else None,
                seed=image_seed(seed, job_id),
                strategy=strategy.name,
                # He et al. reuse each real image for several synthetic ones: take them in turn.
                reference=refs[k % len(refs)] if refs else None,
                attributes=p.attributes,
            )


@dataclass
class PlanSummary:
    """What a written plan holds: the number of jobs, the count per class and the file's sha256."""

    jobs: int
    per_class: dict[str, int]
    sha256: str
    # 1 + the largest id; only differs from ``jobs`` (and only then recorded) in a top-up plan, whose ids
    # don't start at 0.
    id_end: int | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["id_end"] is None or d["id_end"] == self.jobs:
            del d["id_end"]
        return d


def write_plan(path: str | Path, jobs: Iterable[Job]) -> PlanSummary:
    """Stream jobs to ``path`` as JSON lines, atomically (a temporary file, then ``os.replace``)."""
    h = hashlib.sha256()
    per_class: dict[str, int] = {}
    count = 0
    id_end = 0
    with atomic_path(path, fsync=True) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for job in jobs:
            line = job.to_json() + "\n"
            f.write(line)
            h.update(line.encode("utf-8"))
            per_class[job.class_name] = per_class.get(job.class_name, 0) + 1
            count += 1
            id_end = max(id_end, job.id + 1)
    return PlanSummary(count, per_class, h.hexdigest(), id_end)


def read_plan(path: str | Path) -> Iterator[Job]:
    """Stream the jobs of a plan file in order."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"plan '{path}' does not exist")
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield Job.from_json(line)


def shard(jobs: Iterable[Job], rank: int, world: int) -> Iterator[Job]:
    """The jobs of one process: plan positions ``i`` with ``i % world == rank``."""
    for i, job in enumerate(jobs):
        if i % world == rank:
            yield job
