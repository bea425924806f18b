"""Unreadable images: finding them in a streamed set before it is read, listing them, and the one limit on them.

Every stage that reads images (training in memory or streamed, curation, evaluation) turns an image it cannot
use into a *recorded skip*: one line ``<where>\\t<file or key>: <reason>`` in ``skipped_images.txt`` in the
stage's output folder (:data:`SKIPPED_LIST`), counted in the stage's records. One setting, ``max_unreadable``
(:func:`max_unreadable_field`, default :data:`MAX_UNREADABLE`), bounds them: a share of the images read
(< 1) or a count (>= 1). Past it the stage stops with one line naming the count, the share, the limit and the
list file (:class:`UnreadableImages`): a few bad files in a million are noise, a tenth of a folder unreadable is
a broken disk or copy that must not quietly shrink the data.

A streamed set (:class:`~synclone.data.streaming.FileImageSet`, :class:`~synclone.data.shards.ShardImageSet`)
decodes its images only when a batch is read, so a file whose header is fine but whose data is not (a
truncated JPEG or PNG, garbage after a valid header) would fail mid-run. :func:`readable_subset` decodes every
image once beforehand (JPEGs in draft mode at 1/8 scale: the whole file is still read and entropy-decoded, so a
truncated one fails, at a fraction of a full decode) and returns the set without the ones that fail.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import AliasChoices, Field

from synclone.data.decode import BadImage, decode_rgb, read_bytes
from synclone.data.imageset import ImageSet, TensorImageSet
from synclone.data.shards import ShardImageSet
from synclone.errors import UserError
from synclone.util.files import write_text_atomic

SKIPPED_LIST = "skipped_images.txt"
MAX_UNREADABLE = 0.001


def max_unreadable_field(what: str = "images"):  # noqa: ANN201 - a pydantic FieldInfo
    """The ``max_unreadable`` setting every stage config shares (same name, default and meaning)."""
    return Field(MAX_UNREADABLE, ge=0, validation_alias=AliasChoices("max_unreadable", "max_bad_images"),
                 description=f"unreadable {what} skipped (and listed in {SKIPPED_LIST}) before the run stops: a "
                 "share of the images read (< 1, e.g. 0.001) or a count (>= 1)")


def allowed_unreadable(limit: float, total: int) -> int:
    """How many unreadable images ``limit`` allows among ``total``: a count (>= 1) or a share (< 1), rounded down."""
    return int(limit) if limit >= 1 else math.floor(limit * total + 1e-9)


@dataclass
class UnreadableImages:
    """Unreadable images met by one stage, written to ``list_file`` as they come, and the limit past which it stops.

    ``setting`` is the config key users raise (``data.max_unreadable`` in training); ``list_file`` None (a
    training process other than the main one) keeps the list in memory only.
    """

    limit: float
    list_file: Path | None
    setting: str = "max_unreadable"
    entries: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, lines: Iterable[str], total: int, group: str = "images") -> None:
        """Record ``lines`` (one per image) against ``group`` of ``total`` images; raise past the limit."""
        lines = [ln.replace("\n", " ") for ln in lines]
        if not lines:
            return
        self.entries += lines
        self.counts[group] = self.counts.get(group, 0) + len(lines)
        if self.list_file is not None:
            self.list_file.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.list_file, "".join(e + "\n" for e in self.entries))
        n = self.counts[group]
        allowed = allowed_unreadable(self.limit, total)
        if n > allowed:
            where = f"listed in '{self.list_file}'" if self.list_file is not None else f"first: {lines[0]}"
            share = f"{100 * n / total:.3g}%" if total else "all"
            raise UserError(f"{n} of {total:,} {group} could not be read ({share}), more than {self.setting}="
                            f"{self.limit:g} allows ({allowed}); they are {where}: fix or remove them, or raise "
                            f"{self.setting}")

    def __len__(self) -> int:
        return len(self.entries)


def read_skips(ds: ImageSet) -> dict[str, str]:
    """Files a folder reader already left out of ``ds`` (id -> reason): empty, not a regular file, undecodable."""
    extra = getattr(ds, "extra", None) or {}
    reasons = dict(extra.get("skip_reasons") or {})
    for key in extra.get("skipped") or []:
        reasons.setdefault(str(key), "unreadable")
    return reasons


def unreadable_in(ds: ImageSet, threads: int = 4) -> dict[int, str]:
    """Index -> reason for every image of a streamed set that cannot be decoded ({} for an in-memory set)."""
    if isinstance(ds, TensorImageSet) or not len(ds) or not isinstance(ds, ShardImageSet) and not hasattr(ds, "paths"):
        return {}

    def check(i: int) -> str | None:
        try:
            if isinstance(ds, ShardImageSet):
                decode_rgb(ds.read_bytes(i), decoder="pillow", min_side=8, name=ds.describe(i))
            else:
                path = str(ds.paths[i])  # type: ignore[attr-defined]
                decode_rgb(read_bytes(path), decoder="pillow", min_side=8, name=path)
        except BadImage as err:
            return str(err)
        return None

    with ThreadPoolExecutor(threads) as pool:
        errors = list(pool.map(check, range(len(ds))))
    return {i: e for i, e in enumerate(errors) if e is not None}


def readable_subset(ds: ImageSet, threads: int = 4) -> tuple[ImageSet, list[str]]:
    """``ds`` without the images that cannot be decoded, and one message per dropped image (see the module)."""
    bad = unreadable_in(ds, threads)
    if not bad:
        return ds, []
    keep = torch.tensor([i not in bad for i in range(len(ds))]).nonzero().flatten()
    return ds.subset(keep, ds.name), list(bad.values())


def readable_sets(sets: dict[str, ImageSet | None]) -> tuple[dict[str, ImageSet | None], list[str]]:
    """Each named set (None stays None) without its undecodable images (:func:`readable_subset`), and one
    ``<name>\t<reason>`` line per image dropped, ready for :meth:`UnreadableImages.add`."""
    checked: dict[str, ImageSet | None] = {}
    lines: list[str] = []
    for name, ds in sets.items():
        if ds is not None:
            ds, bad = readable_subset(ds)
            lines += [f"{name}\t{e}" for e in bad]
        checked[name] = ds
    return checked, lines


__all__ = ["MAX_UNREADABLE", "SKIPPED_LIST", "UnreadableImages", "allowed_unreadable", "max_unreadable_field",
           "read_skips", "readable_sets", "readable_subset", "unreadable_in"]
