"""Stimuli for the bias probes (shape, background, context): read a released folder, or build one on demand.

Each bias probe reads a folder of stimuli in the layout of the published probe (model-vs-human's cue-conflict
folder, ImageNet-9's ``bg_challenge`` variants, a FOCUS-style annotated table), or, for ``shape_bias`` and
``background``, builds one from the suite's clean test set with the builders of :mod:`synclone.stimuli` and
writes it under ``<output>/probes/`` first (inspectable, and reused on re-run while the clean set, the settings
and the builder code stay the same). Built probes find each image's foreground by thresholding against a dark
background (``mask_threshold``), which suits objects on black such as Fashion-MNIST garments; for other images
build with :func:`synclone.stimuli.cue_conflict.build_cue_conflict_probe_from_folders` or
:func:`synclone.stimuli.backgrounds.build_background_probe_from_folders` (images plus masks) and point
``folder`` at the result.

Images are read at the clean set's (C, H, W) and go through :meth:`EvalContext.logits`, so every model's outputs
on a probe are cached on disk like clean logits.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from pydantic import model_validator

from synclone.config import StrictModel
from synclone.data.imageset import TensorImageSet
from synclone.errors import UserError
from synclone.labels import LabelSpace, class_lookup, slugify
from synclone.probes.base import EvalContext, load_image_files, source_hash
from synclone.stimuli.images import masks_from_threshold

logger = logging.getLogger(__name__)

BUILD_RECORD = "build.json"


# ----------------------------------------------------------------------------------------------------------------------
# Shared plumbing
# ----------------------------------------------------------------------------------------------------------------------


class FolderOrBuild(StrictModel):
    """``folder`` (a probe in the published layout) or ``build`` (make one from the clean set); not both."""
    folder: str | None = None
    build: bool | None = None  # None: build when no folder is given

    @model_validator(mode="after")
    def _one_source(self):
        if self.folder and self.build:
            raise ValueError("give either folder (a ready probe) or build: true (make one from the clean set), "
                             "not both")
        if not self.folder and self.build is False:
            raise ValueError("build: false needs a folder to evaluate")
        return self

    @property
    def building(self) -> bool:
        return not self.folder


def class_index(space: LabelSpace) -> dict[str, int]:
    """Class names, slugs, lower-cased and slugified names of ``space`` -> index (to read folder and file names)."""
    out = class_lookup(space)
    for i, name in enumerate(space.classes):
        out.setdefault(slugify(name), i)
    return out


def read_images(paths: Sequence[Path], ctx: EvalContext, name: str) -> TensorImageSet:
    """Image files at the clean set's (C, H, W), as a dataset whose fingerprint keys the logits cache.

    Labels are placeholders (zeros): each probe scores decisions against its own cue labels.
    """
    x = load_image_files(paths, ctx.clean.image_shape)
    return TensorImageSet(x, torch.zeros(len(x), dtype=torch.long), ctx.clean.label_space, name)


def masked_sources(ctx: EvalContext, per_class: int, seed: int, threshold: float):
    """``per_class`` seeded clean images per class as (N, H, W, C) uint8, their foreground masks and labels.

    Images whose mask is empty (nothing brighter than ``threshold``) are dropped: they have no shape to use.
    """
    data = ctx.clean
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    picks = [order[data.labels[order] == c][:per_class] for c in range(len(data.label_space))]
    idx = torch.cat(picks).sort().values
    # batch() decodes only the chosen images (a streamed set never loads whole into memory).
    imgs = (data.batch(idx)[0] * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    labels = data.labels[idx].numpy()
    masks = masks_from_threshold(imgs, threshold)
    cover = float(np.median(masks.reshape(len(masks), -1).mean(axis=1))) if len(masks) else 0.0
    if cover > 0.9:
        warnings.warn(f"probe builder: the foreground masks cover {100 * cover:.0f}% of a typical image: the clean "
                      "images have no dark background to separate objects from; build the probe from images with "
                      "masks instead (synclone.probes.probe_*_from_folders) and evaluate it with folder:",
                      stacklevel=2)
    keep = masks.reshape(len(masks), -1).any(axis=1)
    if not keep.all():
        logger.info("probe builder: %d of %d images have no pixel above mask_threshold=%g and are skipped",
                    int((~keep).sum()), len(keep), threshold)
    return imgs[keep], masks[keep], labels[keep]


def build_once(ctx: EvalContext, kind: str, params: dict, code: tuple[str, ...], make: Callable[[Path], None]) -> Path:
    """``<output>/probes/<kind>``, built by ``make(folder)`` unless a build with the same inputs is already there."""
    out = ctx.output / "probes" / kind
    key = hashlib.sha256(json.dumps({"clean": ctx.clean.fingerprint(), "params": params,
                                     "code": source_hash(*code)}, sort_keys=True).encode()).hexdigest()[:16]
    record = out / BUILD_RECORD
    if record.is_file():
        try:
            if json.loads(record.read_text(encoding="utf-8")).get("key") == key:
                return out
        except ValueError:
            pass  # a torn record: build again
    tmp = out.with_name(f".{kind}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    make(tmp)
    (tmp / BUILD_RECORD).write_text(json.dumps({"key": key, "clean": ctx.clean.name, "params": params}, indent=2),
                                    encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)  # our own earlier build, made from other inputs
    tmp.replace(out)
    return out


def check_folder(folder: str, what: str) -> Path:
    root = Path(folder)
    if not root.exists():
        raise UserError(f"{what} folder '{root}' does not exist")
    return root
