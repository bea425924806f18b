"""Background bias on ImageNet-9 and its variants (Xiao, Engstrom, Ilyas & Madry, ICLR 2021).

Each variant keeps or replaces the foreground and the background of the same test images:

    original    foreground and background unmodified
    only_bg_b   foreground bounding box blacked out          only_bg_t  box filled with tiled background
    no_fg       foreground (segmentation) blacked out        only_fg    background blacked out
    mixed_same  foreground on the background of another image of the same class
    mixed_rand  foreground on the background of an image of a random class
    mixed_next  foreground on the background of an image of the next class (y + 1 mod 9)

BG-gap = acc(mixed_same) - acc(mixed_rand): how much accuracy the model loses when the background
stops agreeing with the (unchanged) foreground. A 1000-class ImageNet model is scored with an argmax
over all 1000 classes mapped to the 9 classes; predictions outside the 9 count as wrong (the
released ``in9_eval.py`` does the same).

Folder layout (the released ``bg_challenge`` data, and what :mod:`.probe_backgrounds` writes):
``<root>/<variant>/val/<NN_class>/<image>``, where ``NN`` is the class index (00_dog ... 08_fish).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from synclone.data.images import list_images
from synclone.errors import UserError
from synclone.labels import LabelSpace, read_data_file
from synclone.probes.base import EvalContext, Row, register_probe, seeded_indices
from synclone.probes.built import FolderOrBuild, build_once, check_folder, class_index, masked_sources, read_images
from synclone.stimuli.backgrounds import IN9_VARIANTS, build_background_probe
from synclone.stimuli.images import natural_textures

_CLASS_DIR = re.compile(r"^(\d+)_(.+)$")


@lru_cache(maxsize=1)
def _in9() -> tuple[tuple[str, ...], tuple[tuple[int, ...], ...]]:
    data = read_data_file("labelspaces/imagenet9.json")
    classes = tuple(data["classes"])
    return classes, tuple(tuple(data["imagenet1k_indices"][c]) for c in classes)


def in9_classes() -> tuple[str, ...]:
    """The 9 ImageNet-9 classes in label order: dog, bird, wheeled vehicle, ..., fish."""
    return _in9()[0]


def in9_indices() -> dict[str, tuple[int, ...]]:
    """IN-9 class -> its ImageNet-1k class indices (see ``data/labelspaces/imagenet9.json`` for the derivation)."""
    classes, idx = _in9()
    return dict(zip(classes, idx, strict=True))


def in9_map() -> np.ndarray:
    """(1000,) array: the IN-9 label of each ImageNet-1k class, -1 for classes outside the 9."""
    out = np.full(1000, -1, dtype=np.int64)
    for label, idx in enumerate(_in9()[1]):
        out[list(idx)] = label
    return out


def load_in9_map(path: str | Path) -> np.ndarray:
    """The official ``in_to_in9.json`` of MadryLab/backgrounds_challenge ({"<imagenet idx>": <in9 label or -1>})."""
    p = Path(path)
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the ImageNet -> IN-9 mapping '{p}': {err}") from None
    try:
        mapping = {int(k): int(v) for k, v in raw.items()}
    except (AttributeError, TypeError, ValueError):
        raise UserError(f"'{p}' is not an in_to_in9.json mapping ({{\"0\": -1, \"1\": 8, ...}})") from None
    if set(mapping) != set(range(1000)) or not set(mapping.values()) <= set(range(-1, 9)):
        raise UserError(f"'{p}' must map every ImageNet index 0..999 to an IN-9 label 0..8 or -1")
    return np.array([mapping[i] for i in range(1000)], dtype=np.int64)


def in9_decision(outputs1000, mapping: np.ndarray | None = None) -> np.ndarray:
    """IN-9 label of each row's argmax over the 1000 ImageNet classes (-1 when it lies outside the 9)."""
    z = np.asarray(outputs1000.detach().cpu().numpy() if hasattr(outputs1000, "detach") else outputs1000)
    if z.ndim != 2 or z.shape[1] != 1000:
        raise UserError(f"expected ImageNet-1k outputs of shape (N, 1000), got {z.shape}")
    m = in9_map() if mapping is None else np.asarray(mapping)
    return m[np.argmax(z, axis=1)]


def bg_gap(acc_mixed_same: float, acc_mixed_rand: float) -> float:
    """BG-gap = acc(mixed_same) - acc(mixed_rand), in the accuracies' own units."""
    return float(acc_mixed_same) - float(acc_mixed_rand)


@dataclass
class BackgroundResult:
    """Accuracy per variant (fractions), the number of images per variant, and the BG-gap (NaN if not measured)."""
    accuracy: dict[str, float]
    n: dict[str, int]
    bg_gap: float = float("nan")
    per_class: pd.DataFrame = field(default_factory=pd.DataFrame, repr=False)

    def to_rows(self, probe: str = "background", **columns) -> pd.DataFrame:
        """Long-format rows: (probe, variant, metric='accuracy', value, n) per variant, plus variant 'all' bg_gap."""
        rows = [{"probe": probe, "variant": v, "metric": "accuracy", "value": a, "n": self.n[v]}
                for v, a in self.accuracy.items()]
        if not math.isnan(self.bg_gap):
            n = min(self.n["mixed_same"], self.n["mixed_rand"])
            rows.append({"probe": probe, "variant": "all", "metric": "bg_gap", "value": self.bg_gap, "n": n})
        df = pd.DataFrame(rows)
        for k, v in columns.items():
            df.insert(0, k, v)
        return df


def background_bias(correct_by_variant: dict[str, Sequence[bool]]) -> BackgroundResult:
    """Accuracies and BG-gap from per-image correctness, one boolean sequence per variant."""
    acc, n = {}, {}
    for variant, correct in correct_by_variant.items():
        c = np.asarray(correct, dtype=bool)
        if c.size == 0:
            raise UserError(f"variant '{variant}' has no images")
        acc[variant], n[variant] = float(c.mean()), int(c.size)
    gap = bg_gap(acc["mixed_same"], acc["mixed_rand"]) if {"mixed_same", "mixed_rand"} <= set(acc) else float("nan")
    return BackgroundResult(acc, n, gap)


@dataclass(frozen=True)
class VariantImage:
    path: Path
    class_dir: str
    index: int | None  # the NN of an "NN_name" folder, None for a plain name
    name: str  # the class name part of the folder


def read_variant_folder(root: str | Path, variant: str) -> list[VariantImage]:
    """The images of ``<root>/<variant>/val/<class folder>/``; a missing variant stops naming its folder."""
    folder = Path(root) / variant / "val"
    if not folder.is_dir():
        alt = Path(root) / variant
        hint = f" ('{alt}' exists but has no val/ sub-folder)" if alt.is_dir() else ""
        raise UserError(f"ImageNet-9 variant '{variant}' is missing: no folder '{folder}'{hint}; expected the "
                        f"bg_challenge layout <root>/<variant>/val/<NN_class>/<image>, or pass variants=[...] "
                        "to evaluate fewer variants")
    items = []
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise UserError(f"ImageNet-9 variant folder '{folder}' has no class folders (expected 00_dog ... 08_fish)")
    for d in class_dirs:
        m = _CLASS_DIR.match(d.name)
        index, name = (int(m.group(1)), m.group(2)) if m else (None, d.name)
        items.extend(VariantImage(p, d.name, index, name) for p in list_images(d))
    if not items:
        raise UserError(f"ImageNet-9 variant folder '{folder}' has no images")
    return items


def labels_for(items: list[VariantImage], classes: Sequence[str], lookup: dict[str, int], where: Path) -> np.ndarray:
    """Label of each image in the decision's space: by folder name when it is known, else by its NN index."""
    out = []
    for it in items:
        if it.name in lookup:
            out.append(lookup[it.name])
        elif it.index is not None and it.index < len(classes):
            out.append(it.index)
        else:
            raise UserError(f"class folder '{it.class_dir}' in '{where}' matches no class of {list(classes)[:9]}")
    return np.array(out)


# ----------------------------------------------------------------------------------------------------------------------
# background
# ----------------------------------------------------------------------------------------------------------------------


class BackgroundSettings(FolderOrBuild):
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

    def make(folder: Path) -> None:
        imgs, masks, labels = masked_sources(ctx, s.per_class, s.seed, s.mask_threshold)
        build_background_probe(imgs, masks, labels, folder, ctx.clean.label_space.classes,
                               backgrounds=natural_textures(s.textures), variants=s.variants, seed=s.seed,
                               texture_scale=s.texture_scale)

    params = {"per_class": s.per_class, "seed": s.seed, "variants": s.variants, "textures": s.textures,
              "texture_scale": s.texture_scale, "mask_threshold": s.mask_threshold}
    return build_once(ctx, "backgrounds", params, ("synclone.stimuli.backgrounds",
                                               "synclone.stimuli.images"), make)


def _background_labels(items, module, logits_classes: int, decision: str, where: Path) -> tuple[np.ndarray, str]:
    """Each image's label in the decision's space (by class folder name, else its NN index) and the decision."""
    space = getattr(module, "label_space", None)
    names = {it.name for it in items}
    if decision == "auto":
        decision = "direct" if space is not None and names <= set(class_index(space)) else "in9"
    if decision == "in9":
        if logits_classes != 1000:
            raise UserError(f"class folders {sorted(names - set(class_index(space)) if space else names)[:5]} in "
                            f"'{where}' are not classes of the model, and only a 1000-class ImageNet model can be "
                            "scored through the 9 ImageNet-9 classes")
        classes = in9_classes()
        lookup = class_index(LabelSpace("in9", classes))
    elif decision == "direct":
        if space is None:
            raise UserError("decision direct needs a model with a label space")
        classes, lookup = space.classes, class_index(space)
    else:
        raise UserError(f"unknown decision '{decision}'")
    return labels_for(items, classes, lookup, where), decision


@register_probe("background", BackgroundSettings)
def background_probe(ctx: EvalContext, s: BackgroundSettings) -> list[Row]:
    """Top-1 accuracy on ImageNet-9-style background variants and the BG-gap (mixed_same - mixed_rand)."""
    root = _build_backgrounds(ctx, s) if s.building else check_folder(s.folder, "ImageNet-9")
    per_variant = {v: read_variant_folder(root, v) for v in s.variants}  # every folder checked before any model
    dataset = f"backgrounds:{'built' if s.building else root.name}"
    sets = {}
    for v, items in per_variant.items():
        idx = seeded_indices(len(items), s.max_images, s.seed).tolist()
        per_variant[v] = [items[i] for i in idx]
        sets[v] = read_images([it.path for it in per_variant[v]], ctx, f"{dataset}/{v}")
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
