"""Bias probes of the suite runner: shape vs texture, background and context.

Probes ``shape_bias``, ``background`` and ``context``.

Each reads a folder of stimuli in the layout of the published probe (model-vs-human's cue-conflict folder,
ImageNet-9's ``bg_challenge`` variants, a FOCUS-style annotated table), or, for ``shape_bias`` and
``background``, builds one from the suite's clean test set with the builders of :mod:`synclone.robustness`
and writes it under ``<output>/probes/`` first (inspectable, and reused on re-run while the clean set, the
settings and the builder code stay the same). Built probes find each image's foreground by thresholding
against a dark background (``mask_threshold``), which suits objects on black such as Fashion-MNIST garments;
for other images build with :func:`synclone.robustness.probe_cue_conflict.build_cue_conflict_probe_from_folders`
or :func:`synclone.robustness.probe_backgrounds.build_background_probe_from_folders` (images plus masks) and
point ``folder`` at the result.

Images are read at the clean set's (C, H, W) and go through :meth:`EvalContext.logits`, so every model's outputs
on a probe are cached on disk like clean logits. Decisions follow the published conventions (metrics.md):
a 1000-class ImageNet model decides among the 16 cue-conflict categories by the mean of each category's
softmax probabilities, and among the 9 ImageNet-9 classes by its 1000-way argmax mapped to the 9 (outside
the 9 = wrong); a model whose label space names the probe's classes decides among them directly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field, field_validator, model_validator

from synclone.config import StrictModel
from synclone.data.imageset import TensorImageSet
from synclone.errors import UserError
from synclone.evaluate.base import EvalContext, Row, register_probe
from synclone.evaluate.probes.perturb import load_image_files, seeded_indices, source_hash
from synclone.labels import LabelSpace, slugify
from synclone.robustness.background import IN9_VARIANTS

logger = logging.getLogger(__name__)

BUILD_RECORD = "build.json"


# ----------------------------------------------------------------------------------------------------------------------
# Shared plumbing
# ----------------------------------------------------------------------------------------------------------------------


class _FolderOrBuild(StrictModel):
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


def _lookup(space: LabelSpace) -> dict[str, int]:
    """Class names, slugs, lower-cased and slugified names of ``space`` -> index (to read folder and file names)."""
    from synclone.robustness.probe_io import class_lookup

    out = class_lookup(space)
    for i, name in enumerate(space.classes):
        out.setdefault(slugify(name), i)
    return out


def _images(paths: Sequence[Path], ctx: EvalContext, name: str) -> TensorImageSet:
    """Image files at the clean set's (C, H, W), as a dataset whose fingerprint keys the logits cache.

    Labels are placeholders (zeros): each probe scores decisions against its own cue labels.
    """
    x = load_image_files(paths, ctx.clean.image_shape)
    return TensorImageSet(x, torch.zeros(len(x), dtype=torch.long), ctx.clean.label_space, name)


def _sources(ctx: EvalContext, per_class: int, seed: int, threshold: float):
    """``per_class`` seeded clean images per class as (N, H, W, C) uint8, their foreground masks and labels.

    Images whose mask is empty (nothing brighter than ``threshold``) are dropped: they have no shape to use.
    """
    from synclone.robustness.probe_images import masks_from_threshold

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
                      "masks instead (synclone.robustness.probe_*_from_folders) and evaluate it with folder:",
                      stacklevel=2)
    keep = masks.reshape(len(masks), -1).any(axis=1)
    if not keep.all():
        logger.info("probe builder: %d of %d images have no pixel above mask_threshold=%g and are skipped",
                    int((~keep).sum()), len(keep), threshold)
    return imgs[keep], masks[keep], labels[keep]


def _built(ctx: EvalContext, kind: str, params: dict, code: tuple[str, ...], make: Callable[[Path], None]) -> Path:
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


def _check_folder(folder: str, what: str) -> Path:
    root = Path(folder)
    if not root.exists():
        raise UserError(f"{what} folder '{root}' does not exist")
    return root


# ----------------------------------------------------------------------------------------------------------------------
# shape_bias
# ----------------------------------------------------------------------------------------------------------------------


class ShapeBiasSettings(_FolderOrBuild):
    """Settings of the ``shape_bias`` probe.

    ``folder``: a cue-conflict folder in model-vs-human's layout (``<shape>/<shape><i>-<texture><j>.png``).
    Building (``build: true``, or no folder): ``per_class`` clean images per class serve as shapes and
    textures; every ordered pair of different classes gets ``per_pair`` stimuli (a class's silhouette filled
    with another class's texture), so 10 classes give 90 * per_pair images. ``max_images`` caps the stimuli
    evaluated (seeded). ``aggregation`` is how a 1000-class model's probabilities form the 16 categories'
    scores; model-vs-human uses the mean (a sum favours categories with many ImageNet classes).
    """

    per_class: int = Field(default=20, ge=1)
    per_pair: int = Field(default=2, ge=1)
    max_images: int | None = Field(default=None, ge=1)
    mask_threshold: float = Field(default=0.05, gt=0, lt=1)
    decision: Literal["auto", "imagenet16", "direct"] = "auto"
    aggregation: Literal["mean", "sum", "max"] = "mean"
    seed: int = 0


def _build_cue_conflict(ctx: EvalContext, s: ShapeBiasSettings) -> Path:
    from synclone.robustness.probe_cue_conflict import build_cue_conflict_probe

    def make(folder: Path) -> None:
        imgs, masks, labels = _sources(ctx, s.per_class, s.seed, s.mask_threshold)
        build_cue_conflict_probe(imgs, masks, labels, imgs, labels, folder, ctx.clean.label_space.classes,
                                 texture_masks=masks, per_pair=s.per_pair, seed=s.seed)

    params = {"per_class": s.per_class, "per_pair": s.per_pair, "seed": s.seed, "mask_threshold": s.mask_threshold}
    return _built(ctx, "cue_conflict", params, ("synclone.robustness.probe_cue_conflict",
                                                "synclone.robustness.probe_images"), make)


def _shape_decisions(logits: torch.Tensor, module, categories: list[str], decision: str, aggregation: str,
                     where: Path) -> tuple[np.ndarray, str]:
    from synclone.robustness.shape_bias import category_decisions

    space = getattr(module, "label_space", None)
    return category_decisions(logits.double().numpy(), categories, decision, aggregation, space, where,
                              lookup=_lookup(space) if space is not None else None)


@register_probe("shape_bias", ShapeBiasSettings)
def shape_bias_probe(ctx: EvalContext, s: ShapeBiasSettings) -> list[Row]:
    """Shape bias on cue-conflict stimuli (shape of one class, texture of another), overall and per category."""
    from synclone.robustness.shape_bias import read_cue_conflict_folder, shape_bias

    root = _build_cue_conflict(ctx, s) if s.building else _check_folder(s.folder, "cue-conflict")
    items = read_cue_conflict_folder(root)
    categories = sorted({it.shape for it in items} | {it.texture for it in items}
                        | {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")})
    items = [items[i] for i in seeded_indices(len(items), s.max_images, s.seed).tolist()]
    dataset = f"cue_conflict:{'built' if s.building else root.name}"
    data = _images([it.path for it in items], ctx, dataset)
    shapes = np.array([it.shape for it in items], dtype=object)
    textures = np.array([it.texture for it in items], dtype=object)
    shape_cats = [c for c in categories if c in set(shapes)]
    source = (f"built from {ctx.clean.name} (per_class={s.per_class}, per_pair={s.per_pair}, seed={s.seed}, "
              f"mask_threshold={s.mask_threshold:g})" if s.building else f"folder {root.name}")
    rows: list[Row] = []
    for m, entry in ctx.models.items():
        logits = ctx.logits(m, data, "cue_conflict")
        dec, how = _shape_decisions(logits, entry.module, categories, s.decision, s.aggregation, root)
        result = shape_bias(dec, shapes, textures, categories=shape_cats)
        convention = (f"decision={how}; agreeing shape/texture pairs excluded from hits; fractions over all images; "
                      f"{source}")
        for metric in ("shape_bias", "shape_fraction", "texture_fraction"):
            rows.append(Row(m, "shape_bias", dataset, "all", metric, getattr(result, metric), result.n_images,
                            convention))
        for rec in result.per_category.itertuples(index=False):
            for metric in ("shape_bias", "shape_fraction", "texture_fraction"):
                rows.append(Row(m, "shape_bias", dataset, rec.category, metric, getattr(rec, metric), rec.n_images,
                                convention))
        per_cat = result.per_category
        ctx.add_artifact(m, "shape_bias", dataset, "shape_bias",
                         {"categories": list(per_cat["category"]), "shape_bias": list(per_cat["shape_bias"]),
                          "shape_fraction": list(per_cat["shape_fraction"]),
                          "texture_fraction": list(per_cat["texture_fraction"]), "overall": result.shape_bias})
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# background
# ----------------------------------------------------------------------------------------------------------------------


class BackgroundSettings(_FolderOrBuild):
    """Settings of the ``background`` probe.

    ``folder``: an ImageNet-9 root in the ``bg_challenge`` layout (``<variant>/val/<NN_class>/<image>``).
    Building (``build: true``, or no folder): ``per_class`` clean images per class (at least 2, for
    ``mixed_same``) are pasted on scikit-image's bundled ``textures`` (class y on texture y mod T, a random
    window of ``texture_scale`` of the texture's side per image) and every variant is made from them.
    ``max_images`` caps the images read per variant of a folder (seeded).
    """

    variants: list[str] = Field(default_factory=lambda: list(IN9_VARIANTS))
    per_class: int = Field(default=20, ge=2)
    textures: list[str] = Field(default_factory=lambda: ["brick", "grass", "gravel"])
    texture_scale: float = Field(default=0.25, gt=0, le=1)
    mask_threshold: float = Field(default=0.05, gt=0, lt=1)
    max_images: int | None = Field(default=None, ge=1)
    decision: Literal["auto", "in9", "direct"] = "auto"
    seed: int = 0

    @field_validator("variants")
    @classmethod
    def _variants(cls, v: list[str]) -> list[str]:
        unknown = [x for x in v if x not in IN9_VARIANTS]
        if unknown or not v:
            raise ValueError(f"unknown background variant {unknown[0] if unknown else '(none given)'}; "
                             f"choose from {', '.join(IN9_VARIANTS)}")
        return [x for x in IN9_VARIANTS if x in v]


def _build_backgrounds(ctx: EvalContext, s: BackgroundSettings) -> Path:
    from synclone.robustness.probe_backgrounds import build_background_probe
    from synclone.robustness.probe_images import natural_textures

    def make(folder: Path) -> None:
        imgs, masks, labels = _sources(ctx, s.per_class, s.seed, s.mask_threshold)
        build_background_probe(imgs, masks, labels, folder, ctx.clean.label_space.classes,
                               backgrounds=natural_textures(s.textures), variants=s.variants, seed=s.seed,
                               texture_scale=s.texture_scale)

    params = {"per_class": s.per_class, "seed": s.seed, "variants": s.variants, "textures": s.textures,
              "texture_scale": s.texture_scale, "mask_threshold": s.mask_threshold}
    return _built(ctx, "backgrounds", params, ("synclone.robustness.probe_backgrounds",
                                               "synclone.robustness.probe_images"), make)


def _background_labels(items, module, logits_classes: int, decision: str, where: Path) -> tuple[np.ndarray, str]:
    """Each image's label in the decision's space (by class folder name, else its NN index) and the decision."""
    from synclone.robustness.background import in9_classes

    space = getattr(module, "label_space", None)
    names = {it.name for it in items}
    if decision == "auto":
        decision = "direct" if space is not None and names <= set(_lookup(space)) else "in9"
    if decision == "in9":
        if logits_classes != 1000:
            raise UserError(f"class folders {sorted(names - set(_lookup(space)) if space else names)[:5]} in "
                            f"'{where}' are not classes of the model, and only a 1000-class ImageNet model can be "
                            "scored through the 9 ImageNet-9 classes")
        classes = in9_classes()
        lookup = _lookup(LabelSpace("in9", classes))
    elif decision == "direct":
        if space is None:
            raise UserError("decision direct needs a model with a label space")
        classes, lookup = space.classes, _lookup(space)
    else:
        raise UserError(f"unknown decision '{decision}'")
    from synclone.robustness.background import labels_for

    return labels_for(items, classes, lookup, where), decision


@register_probe("background", BackgroundSettings)
def background_probe(ctx: EvalContext, s: BackgroundSettings) -> list[Row]:
    """Top-1 accuracy on ImageNet-9-style background variants and the BG-gap (mixed_same - mixed_rand)."""
    from synclone.robustness.background import background_bias, in9_decision, read_variant_folder

    root = _build_backgrounds(ctx, s) if s.building else _check_folder(s.folder, "ImageNet-9")
    per_variant = {v: read_variant_folder(root, v) for v in s.variants}  # every folder checked before any model
    dataset = f"backgrounds:{'built' if s.building else root.name}"
    sets = {}
    for v, items in per_variant.items():
        idx = seeded_indices(len(items), s.max_images, s.seed).tolist()
        per_variant[v] = [items[i] for i in idx]
        sets[v] = _images([it.path for it in per_variant[v]], ctx, f"{dataset}/{v}")
    source = (f"built from {ctx.clean.name} on textures {'/'.join(s.textures)} (per_class={s.per_class}, "
              f"texture_scale={s.texture_scale:g}, seed={s.seed})" if s.building else f"folder {root.name}")
    rows: list[Row] = []
    for m, entry in ctx.models.items():
        correct, how = {}, ""
        for v, items in per_variant.items():
            logits = ctx.logits(m, sets[v], f"background:{v}")
            labels, how = _background_labels(items, entry.module, logits.shape[1], s.decision, root / v)
            pred = in9_decision(logits.numpy()) if how == "in9" else logits.argmax(1).numpy()
            correct[v] = pred == labels
        result = background_bias(correct)
        decision = "in9 (1000-way argmax mapped to the 9; outside = wrong)" if how == "in9" else "direct argmax"
        convention = f"decision={decision}; {source}"
        for v, acc in result.accuracy.items():
            rows.append(Row(m, "background", dataset, v, "top1", acc, result.n[v], convention))
        if not np.isnan(result.bg_gap):
            n = min(result.n["mixed_same"], result.n["mixed_rand"])
            rows.append(Row(m, "background", dataset, "all", "bg_gap", result.bg_gap, n,
                            f"top1(mixed_same) - top1(mixed_rand); {convention}"))
        ctx.add_artifact(m, "background", dataset, "background", dict(result.accuracy))
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# context
# ----------------------------------------------------------------------------------------------------------------------


class ContextSettings(StrictModel):
    """Settings of the ``context`` probe.

    ``folder``: a FOCUS-style annotated probe (a table per :func:`synclone.robustness.context.read_context_table`)
    or a dataset folder made by ``synclone generate`` with the ``contexts`` prompt strategy, whose
    ``train/metadata.jsonl`` records each image's context under ``attributes`` (``n_uncommon`` and the
    ``*_uncommon`` flags). ``max_images`` caps the images (seeded). ``decision``: ``direct`` (the model's
    own classes, by class name or label), ``focus`` (a 1000-class ImageNet model on the FOCUS categories),
    or ``auto``.
    """

    folder: str
    max_images: int | None = Field(default=None, ge=1)
    decision: Literal["auto", "direct", "focus"] = "auto"
    seed: int = 0


def _generated_table(root: Path) -> Path | None:
    """The metadata.jsonl of a generated dataset folder, if ``root`` is (or is inside) one."""
    for cand in (root / "train" / "metadata.jsonl", root / "metadata.jsonl"):
        if cand.is_file():
            return cand
    return root if root.is_file() and root.name.endswith(".jsonl") else None


def read_context_probe(folder: str | Path) -> pd.DataFrame:
    """A context probe as a table with ``path``, ``class_name`` and/or ``label``, and ``n_uncommon``.

    Reads FOCUS-style tables with :func:`synclone.robustness.context.read_context_table`; a generated dataset
    folder nests the context of each image under ``attributes``, which is lifted to columns first.
    """
    from synclone.robustness.context import FLAG_COLUMNS, read_context_table

    root = Path(folder)
    table = _generated_table(root)
    if table is not None:
        try:
            df = pd.read_json(table, lines=True)
        except ValueError as err:
            raise UserError(f"cannot read '{table}': {err}") from None
        if "attributes" in df.columns:
            attrs = pd.json_normalize([a if isinstance(a, dict) else {} for a in df["attributes"]])
            for col in attrs.columns:
                if col not in df.columns:
                    df[col] = attrs[col].to_numpy()
            if "n_uncommon" not in df.columns and all(c in df.columns for c in FLAG_COLUMNS):
                df["n_uncommon"] = sum(df[c].astype(bool).astype(int) for c in FLAG_COLUMNS)
            if "n_uncommon" not in df.columns or df["n_uncommon"].isna().any():
                raise UserError(f"'{table}' records no context per image (attributes.n_uncommon): generate the probe "
                                "with the contexts prompt strategy (prompts.strategy: contexts)")
            if "path" not in df.columns:
                df["path"] = [str(table.parent / f) for f in df["file_name"]]
            df.attrs["table"] = str(table)
            return df
    return read_context_table(root)


@register_probe("context", ContextSettings)
def context_probe(ctx: EvalContext, s: ContextSettings) -> list[Row]:
    """Top-1 accuracy P_k on images with k uncommon context attributes (time, weather, location) and P_k / P0."""
    from synclone.robustness.context import context_accuracy
    from synclone.robustness.probe_io import read_data_file

    root = _check_folder(s.folder, "context probe")
    df = read_context_probe(root)
    table = df.attrs.get("table", str(root))
    df = df.iloc[seeded_indices(len(df), s.max_images, s.seed).numpy()].reset_index(drop=True)
    missing = [p for p in df["path"] if not Path(p).is_file()]
    if missing:
        raise UserError(f"{len(missing)} image(s) listed in '{table}' do not exist, e.g. '{missing[0]}'")
    dataset = f"context:{root.name}"
    where = Path(table).relative_to(root.parent) if Path(table).is_relative_to(root.parent) else Path(table).name
    data = _images([Path(p) for p in df["path"]], ctx, dataset)
    n_uncommon = df["n_uncommon"].to_numpy()
    contexts = read_data_file("contexts.json")
    rows: list[Row] = []
    for m, entry in ctx.models.items():
        logits = ctx.logits(m, data, "context")
        correct, how = _context_correct(df, logits, entry.module, s.decision, contexts, table)
        result = context_accuracy(correct, n_uncommon)
        convention = f"decision={how}; k = number of uncommon attributes among time, weather, location; {where}"
        for k in sorted(result.accuracy):
            rows.append(Row(m, "context", dataset, f"P{k}", "top1", result.accuracy[k], result.n[k], convention))
            if k > 0:
                rows.append(Row(m, "context", dataset, f"P{k}", "ratio_to_P0", result.ratio_to_p0[k], result.n[k],
                                convention))
        rows.append(Row(m, "context", dataset, "all", "top1", result.overall, len(df), convention))
        ctx.add_artifact(m, "context", dataset, "context",
                         {"P": {f"P{k}": v for k, v in result.accuracy.items()},
                          "n": {f"P{k}": v for k, v in result.n.items()},
                          "ratio_to_P0": {f"P{k}": v for k, v in result.ratio_to_p0.items()}})
    return rows


def _context_correct(df: pd.DataFrame, logits: torch.Tensor, module, decision: str, contexts: dict,
                     table: str) -> tuple[np.ndarray, str]:
    space = getattr(module, "label_space", None)
    pred = logits.argmax(1).numpy()
    names = list(df["class_name"]) if "class_name" in df.columns else None
    if decision == "auto":
        known = space is not None and (names is None or all(n in _lookup(space) for n in names))
        decision = "direct" if known or logits.shape[1] != 1000 else "focus"
    if decision == "direct":
        if space is None:
            raise UserError("decision direct needs a model with a label space")
        lookup = _lookup(space)
        if names is not None:
            unknown = sorted({n for n in names if n not in lookup})
            if unknown:
                raise UserError(f"classes {unknown[:5]} of '{table}' are not in the model's label space "
                                f"'{space.name}' ({space.describe()})")
            labels = np.array([lookup[n] for n in names])
        else:
            labels = df["label"].to_numpy().astype(np.int64)
            if labels.min() < 0 or labels.max() >= len(space):
                raise UserError(f"labels of '{table}' fall outside the model's {len(space)} classes")
        return pred == labels, "direct argmax"
    if decision != "focus":
        raise UserError(f"unknown decision '{decision}'")
    if names is None:
        raise UserError(f"decision focus needs a class_name column in '{table}'")
    focus, aliases = contexts["focus"], contexts["aliases"]
    keys = [aliases.get(slugify(n), slugify(n)) for n in names]
    unknown = sorted({n for n, k in zip(names, keys, strict=True) if k not in focus["imagenet1k_indices"]})
    if unknown:
        raise UserError(f"classes {unknown[:5]} of '{table}' are not FOCUS categories {focus['categories']}")
    ok = np.array([int(p) in set(focus["imagenet1k_indices"][k]) for p, k in zip(pred, keys, strict=True)])
    return ok, "focus (1000-way argmax within the category's ImageNet classes)"
