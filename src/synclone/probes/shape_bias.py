"""Shape vs texture bias on cue-conflict images (Geirhos et al., ICLR 2019), computed as model-vs-human does.

A cue-conflict image has the shape of one category and the texture of another. A model's decision
counts as a *shape hit* when it names the shape category and as a *texture hit* when it names the
texture category; images whose shape and texture agree carry no conflict and are left out of the
hits. Then

    shape_bias       = shape_hits / (shape_hits + texture_hits)
    shape_fraction   = shape_hits / n_images      (n_images counts every image, agreeing ones too,
    texture_fraction = texture_hits / n_images     exactly as model-vs-human's ShapeBias.analysis)

Per-category values group the images by their *shape* category. A 1000-class ImageNet model decides
among the 16 categories by the MEAN of its softmax probabilities over each category's ImageNet
classes (model-vs-human's ImageNetProbabilitiesTo16ClassesMapping); summing instead favours
categories with many classes (dog has 109, knife 1) and is a known way to get wrong numbers.

Folder layout (model-vs-human's ``cue-conflict``): one sub-folder per shape category, files named
``<shape><i>-<texture><j>.png`` (e.g. ``airplane/airplane1-bicycle2.png``; a prefix ending in "_"
is allowed, as in ``XXX_dog10-bird2.png``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from synclone.data.images import list_images
from synclone.errors import UserError
from synclone.labels import LabelSpace, class_lookup, read_data_file
from synclone.probes.arrays import softmax
from synclone.probes.base import EvalContext, Row, register_probe, seeded_indices
from synclone.probes.built import FolderOrBuild, build_once, check_folder, class_index, masked_sources, read_images
from synclone.stimuli.cue_conflict import build_cue_conflict_probe

AGGREGATIONS = ("mean", "sum", "max")


# --- the 16-category decision for ImageNet-1k models -------------------------------------------------


@lru_cache(maxsize=1)
def _imagenet16() -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]:
    data = read_data_file("labelspaces/imagenet16.json")
    cats = tuple(data["classes"])
    return cats, tuple(tuple(data["imagenet1k_indices"][c]) for c in cats)


def imagenet16_categories() -> tuple[str, ...]:
    """The 16 categories in model-vs-human's (sorted) order: airplane, bear, ..., truck."""
    return _imagenet16()[0]


def imagenet16_indices() -> dict[str, tuple[int, ...]]:
    """Category -> its ImageNet-1k class indices (model-vs-human's ``HumanCategories.<category>_indices``)."""
    cats, idx = _imagenet16()
    return dict(zip(cats, idx, strict=True))


def _probs1000(probs1000, from_logits: bool) -> np.ndarray:
    p = np.asarray(probs1000.detach().cpu().double() if hasattr(probs1000, "detach") else probs1000, dtype=np.float64)
    if p.ndim == 1:
        p = p[None]
    if p.ndim != 2 or p.shape[1] != 1000:
        raise UserError(f"expected ImageNet-1k outputs of shape (N, 1000), got {p.shape}")
    if from_logits:
        return softmax(p)
    if p.min() < -1e-9 or p.max() > 1 + 1e-9 or np.abs(p.sum(axis=1) - 1).max() > 1e-3:
        raise UserError("probs1000 are not softmax probabilities (values outside [0, 1] or rows not summing to 1); "
                        "pass from_logits=True for raw model outputs")
    return p


def imagenet16_scores(probs1000, aggregation: str = "mean", *, from_logits: bool = False) -> np.ndarray:
    """(N, 16) scores: each category's ImageNet probabilities aggregated (default: mean, as model-vs-human)."""
    if aggregation not in AGGREGATIONS:
        raise UserError(f"unknown aggregation '{aggregation}': use one of {AGGREGATIONS} (model-vs-human uses mean)")
    p = _probs1000(probs1000, from_logits)
    agg = getattr(np, aggregation)
    return np.stack([agg(p[:, list(ix)], axis=1) for ix in _imagenet16()[1]], axis=1)


def imagenet16_decision(probs1000, aggregation: str = "mean", *, from_logits: bool = False) -> np.ndarray:
    """Index into :func:`imagenet16_categories` of each row's decision: argmax of the aggregated scores."""
    return np.argmax(imagenet16_scores(probs1000, aggregation, from_logits=from_logits), axis=1)


# --- the metric on plain arrays ------------------------------------------------------------------------


@dataclass
class ShapeBiasResult:
    """Shape bias of one model on one cue-conflict set; ``per_category`` has one row per shape category."""
    shape_bias: float
    shape_fraction: float
    texture_fraction: float
    n_images: int
    n_conflict: int
    n_shape_hits: int
    n_texture_hits: int
    per_category: pd.DataFrame = field(repr=False)

    def to_rows(self, probe: str = "shape_bias", **columns) -> pd.DataFrame:
        """Long-format rows (probe, variant, metric, value, n): variant 'all' or a shape category."""
        rows = []
        overall = {"shape_bias": self.shape_bias, "shape_fraction": self.shape_fraction,
                   "texture_fraction": self.texture_fraction}
        for metric, value in overall.items():
            rows.append({"probe": probe, "variant": "all", "metric": metric, "value": value, "n": self.n_images})
        for rec in self.per_category.itertuples(index=False):
            for metric in overall:
                rows.append({"probe": probe, "variant": rec.category, "metric": metric,
                             "value": getattr(rec, metric), "n": rec.n_images})
        df = pd.DataFrame(rows)
        for k, v in columns.items():
            df.insert(0, k, v)
        return df


def _as_names(values, categories: Sequence[str] | None, what: str) -> np.ndarray:
    """Labels given as category names or as indices into ``categories`` -> object array of names (None = none)."""
    arr = np.asarray(values.detach().cpu().numpy() if hasattr(values, "detach") else values)
    if arr.ndim != 1:
        raise UserError(f"{what} must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind in "iu":
        if categories is None:
            raise UserError(f"{what} are indices; pass categories=[...] to name them")
        if arr.size and (arr.max() >= len(categories) or arr.min() < -1):
            raise UserError(f"{what} has indices outside [-1, {len(categories)}) for {len(categories)} categories")
        return np.array([categories[i] if i >= 0 else None for i in arr], dtype=object)
    return np.array([None if v is None else str(v) for v in arr], dtype=object)


def _hits(decisions: np.ndarray, shapes: np.ndarray, textures: np.ndarray) -> tuple[int, int, int, int]:
    conflict = shapes != textures
    shape_hits = int(np.sum(conflict & (decisions == shapes)))
    texture_hits = int(np.sum(conflict & (decisions == textures)))
    return len(shapes), int(conflict.sum()), shape_hits, texture_hits


def _ratios(n: int, shape_hits: int, texture_hits: int) -> tuple[float, float, float]:
    denom = shape_hits + texture_hits
    bias = shape_hits / denom if denom else float("nan")
    return bias, (shape_hits / n if n else float("nan")), (texture_hits / n if n else float("nan"))


def shape_bias(decisions, shape_labels, texture_labels, categories: Sequence[str] | None = None) -> ShapeBiasResult:
    """Shape bias from per-image decisions and the two cue labels.

    All three may be category names or integer indices into ``categories`` (a decision of -1 or None
    names no category and is neither hit). Images whose shape and texture agree are excluded from the
    hits but, as in model-vs-human, still count in the denominators of the hit fractions. The shape
    bias is NaN when the model never names either cue.
    """
    d = _as_names(decisions, categories, "decisions")
    s = _as_names(shape_labels, categories, "shape_labels")
    t = _as_names(texture_labels, categories, "texture_labels")
    if not (len(d) == len(s) == len(t)):
        raise UserError(f"decisions, shape_labels and texture_labels have different lengths ({len(d)}, {len(s)}, "
                        f"{len(t)}); give one entry per image")
    if len(d) == 0:
        raise UserError("no images: shape bias needs at least one cue-conflict image")
    if any(v is None for v in s) or any(v is None for v in t):
        raise UserError("every image needs both a shape and a texture label")
    n, n_conflict, sh, th = _hits(d, s, t)
    if n_conflict == 0:
        raise UserError(f"all {n} images have the same shape and texture category: there is no cue conflict to measure")
    order = list(categories) if categories is not None else sorted(set(s))
    rows = []
    for cat in order:
        m = s == cat
        if not m.any():
            continue
        cn, cc, csh, cth = _hits(d[m], s[m], t[m])
        bias, sf, tf = _ratios(cn, csh, cth)
        rows.append({"category": cat, "n_images": cn, "n_conflict": cc, "shape_hits": csh, "texture_hits": cth,
                     "shape_bias": bias, "shape_fraction": sf, "texture_fraction": tf})
    bias, sf, tf = _ratios(n, sh, th)
    return ShapeBiasResult(bias, sf, tf, n, n_conflict, sh, th, pd.DataFrame(rows))


# --- cue-conflict folders ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CueConflictImage:
    path: Path
    shape: str
    texture: str


def _match(token: str, categories: Sequence[str], allow_prefix: bool) -> str | None:
    """The longest category ``c`` with ``token`` == c + digits (optionally after a prefix ending in '_')."""
    prefix = "(?:.*_)?" if allow_prefix else ""
    hits = [c for c in categories if re.fullmatch(prefix + re.escape(c) + r"\d*", token)]
    return max(hits, key=len) if hits else None


def parse_cue_conflict_name(filename: str, categories: Sequence[str]) -> tuple[str, str]:
    """(shape, texture) from a model-vs-human file name such as ``airplane1-bicycle2.png``.

    Raises a :class:`UserError` naming the file when it does not carry both labels.
    """
    stem = Path(filename).stem
    if "-" not in stem:
        raise UserError(f"cue-conflict file '{filename}' does not name both cues: expected '<shape><i>-<texture><j>"
                        f".png' (e.g. 'cat3-elephant1.png') with categories from {sorted(categories)}")
    left, right = stem.rsplit("-", 1)
    shape, texture = _match(left, categories, allow_prefix=True), _match(right, categories, allow_prefix=False)
    if shape is None or texture is None:
        bad = left if shape is None else right
        raise UserError(f"cue-conflict file '{filename}': '{bad}' is not a category followed by a number; "
                        f"expected '<shape><i>-<texture><j>.png' with categories from {sorted(categories)}")
    return shape, texture


def read_cue_conflict_folder(folder: str | Path, categories: Sequence[str] | None = None) -> list[CueConflictImage]:
    """The images of a cue-conflict folder with their shape (sub-folder) and texture (file name) categories.

    ``categories`` defaults to the sub-folder names. A file whose name lacks either label, or names a
    shape other than its folder's, stops with a :class:`UserError` naming it.
    """
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"cue-conflict folder '{root}' does not exist")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        raise UserError(f"cue-conflict folder '{root}' has no category sub-folders; expected model-vs-human's layout "
                        "<folder>/<shape category>/<shape><i>-<texture><j>.png")
    cats = list(categories) if categories is not None else [p.name for p in subdirs]
    items = []
    for sub in subdirs:
        if sub.name not in cats:
            raise UserError(f"cue-conflict folder '{sub}' is not one of the categories {sorted(cats)}")
        for path in list_images(sub):
            shape, texture = parse_cue_conflict_name(path.name, cats)
            if shape != sub.name:
                raise UserError(f"cue-conflict file '{path}' names shape '{shape}' but lies in folder '{sub.name}'; "
                                "the folder is the shape category")
            items.append(CueConflictImage(path, shape, texture))
    if not items:
        raise UserError(f"cue-conflict folder '{root}' has no images")
    return items


def _direct_columns(space: LabelSpace, categories: Sequence[str], folder: Path,
                    lookup: dict[str, int] | None = None) -> np.ndarray:
    lookup = class_lookup(space) if lookup is None else lookup
    missing = [c for c in categories if c not in lookup]
    if missing:
        raise UserError(f"cue-conflict categories {missing} in '{folder}' are not classes of the model's label space "
                        f"'{space.name}' ({space.describe()})")
    return np.array([lookup[c] for c in categories])


def category_decisions(logits, categories: Sequence[str], decision: str = "auto", aggregation: str = "mean",
                       space: LabelSpace | None = None, where: str | Path = "probe",
                       lookup: dict[str, int] | None = None) -> tuple[np.ndarray, str]:
    """Each image's decided category (a name of ``categories``) from ``logits``, and how it was decided.

    ``decision``: ``"imagenet16"`` (a 1000-class ImageNet model; the aggregated 16-category decision),
    ``"direct"`` (argmax over the outputs of the probe's categories in ``space``, found by ``lookup``,
    default :func:`class_lookup`), or ``"auto"`` (imagenet16 for a 1000-output model on the 16
    categories, else direct).
    """
    logits = np.asarray(logits, dtype=np.float64)
    if decision == "auto":
        # An ImageNet-1k model on the 16 categories takes model-vs-human's decision even when a category
        # happens to share its name with an ImageNet class.
        in16 = logits.shape[1] == 1000 and set(categories) <= set(imagenet16_categories())
        decision = "imagenet16" if in16 else "direct"
    if decision == "imagenet16":
        names16 = imagenet16_categories()
        unknown = [c for c in categories if c not in names16]
        if unknown:
            raise UserError(f"categories {unknown} in '{where}' are not among the 16 ImageNet-16 categories {names16}")
        if logits.shape[1] != 1000:
            raise UserError(f"decision imagenet16 needs a 1000-class ImageNet model; the model has {logits.shape[1]} "
                            "outputs")
        pick = imagenet16_decision(logits, aggregation, from_logits=True)
        return np.array(names16, dtype=object)[pick], f"imagenet16 ({aggregation} of softmax over each category)"
    if decision != "direct":
        raise UserError(f"unknown decision '{decision}': use 'auto', 'imagenet16' or 'direct'")
    if space is None:
        if logits.shape[1] != len(categories):
            raise UserError(f"the model has {logits.shape[1]} outputs and no label space; '{where}' has "
                            f"{len(categories)} categories. Give the model a label_space.")
        cols = np.arange(len(categories))
    else:
        cols = _direct_columns(space, categories, Path(where), lookup)
    # Restricting the argmax to the probe's categories mirrors the 16-way decision for ImageNet models.
    return np.array(categories, dtype=object)[np.argmax(logits[:, cols], axis=1)], "direct (argmax over categories)"


# ----------------------------------------------------------------------------------------------------------------------
# shape_bias
# ----------------------------------------------------------------------------------------------------------------------


class ShapeBiasSettings(FolderOrBuild):
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

    def make(folder: Path) -> None:
        imgs, masks, labels = masked_sources(ctx, s.per_class, s.seed, s.mask_threshold)
        build_cue_conflict_probe(imgs, masks, labels, imgs, labels, folder, ctx.clean.label_space.classes,
                                 texture_masks=masks, per_pair=s.per_pair, seed=s.seed)

    params = {"per_class": s.per_class, "per_pair": s.per_pair, "seed": s.seed, "mask_threshold": s.mask_threshold}
    return build_once(ctx, "cue_conflict", params, ("synclone.stimuli.cue_conflict",
                                                "synclone.stimuli.images"), make)


def _shape_decisions(logits: torch.Tensor, module, categories: list[str], decision: str, aggregation: str,
                     where: Path) -> tuple[np.ndarray, str]:
    space = getattr(module, "label_space", None)
    return category_decisions(logits.double().numpy(), categories, decision, aggregation, space, where,
                              lookup=class_index(space) if space is not None else None)


@register_probe("shape_bias", ShapeBiasSettings)
def shape_bias_probe(ctx: EvalContext, s: ShapeBiasSettings) -> list[Row]:
    """Shape bias on cue-conflict stimuli (shape of one class, texture of another), overall and per category."""
    root = _build_cue_conflict(ctx, s) if s.building else check_folder(s.folder, "cue-conflict")
    items = read_cue_conflict_folder(root)
    categories = sorted({it.shape for it in items} | {it.texture for it in items}
                        | {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")})
    items = [items[i] for i in seeded_indices(len(items), s.max_images, s.seed).tolist()]
    dataset = f"cue_conflict:{'built' if s.building else root.name}"
    data = read_images([it.path for it in items], ctx, dataset)
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
