"""CLIP classifier tuning and linear probes: a head grid over cached frozen features, saved as a model folder.

``classifier_tuning(cfg)`` (He et al., 2023, "Is synthetic data from generative models ready for image
recognition?"): a CLIP image encoder stays frozen, a linear head starts from the zero-shot text weights
and is tuned on (synthetic) images, optionally distilled towards the zero-shot head.
``linear_probe(cfg)``: the same over any frozen backbone, with the head started from zeros.

Either way the features are computed once and cached (:mod:`synclone.train.features`), every head of
the grid is trained in one pass (:mod:`synclone.train.heads`), and the best head is chosen on a
validation split held out from the training source (or a validation dataset the user names), never
on the test set. The model folder holds ``model.safetensors`` (the head) and ``config.json`` (the
backbone reference, label space, preprocessing and the selection record);
:func:`load_feature_classifier` turns it back into a module that maps pixels in [0, 1] to logits.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from synclone.config import StrictModel, write_run_info
from synclone.data.readable import SKIPPED_LIST, UnreadableImages, max_unreadable_field, read_skips, readable_sets
from synclone.data.sources import resolve_dataset
from synclone.data.streaming import concat_sets
from synclone.errors import UserError
from synclone.labels import LabelSpace
from synclone.models.backbones import BackboneConfig, load_backbone
from synclone.models.feature_classifier import LinearHead, save_feature_classifier
from synclone.train.clip_zeroshot import zeroshot_logits, zeroshot_weights
from synclone.train.features import FeatureSet, cached_features, default_feature_cache
from synclone.train.heads import GridResult, HeadGridConfig, train_head_grid
from synclone.util.accuracy import top1
from synclone.util.files import write_text_atomic

FORMAT = "synclone-feature-classifier/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
RESULTS = "results.json"


class ProbeDataConfig(StrictModel):
    """Where the images come from: a built-in name (``fashion_mnist``, ``fashion_mnist:test``) or a dataset
    folder, resolved by :func:`synclone.data.sources.resolve_dataset` like the supervised loop's data."""

    # One source, or several joined (e.g. synthetic images + the few real shots, as He et al. do few-shot).
    train: str | list[str] = "fashion_mnist"
    # Real shots kept apart from ``train`` (He et al.'s few-shot tuning): every step then takes one batch of
    # ``train`` and one of these (heads.real_batch_size), each with its own loss weight (heads.real_weight).
    real: str | None = None
    # A separate validation dataset; when None, ``val_fraction`` of the training source is held out.
    val: str | None = None
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    # Cap on validation images (encoding them costs as much as encoding training images).
    val_max: int | None = Field(5000, ge=1)
    test: str | None = "fashion_mnist:test"
    # Images per class taken from the training source after the hold-out (None = all): fair-size comparisons.
    train_per_class: int | None = Field(None, ge=2)
    test_per_class: int | None = Field(None, ge=1)
    data_root: str | None = None
    # Stream folders from disk at this size instead of decoding them into memory (large downstream sets);
    # the encoder still applies its own preprocessing.
    image_size: int | None = Field(None, ge=8)
    seed: int = 0
    max_unreadable: float = max_unreadable_field("images (training, validation, test, real shots)")


class _ProbeConfig(StrictModel):
    backbone: BackboneConfig
    data: ProbeDataConfig = Field(default_factory=ProbeDataConfig)
    output: str = "runs/probe"
    # Feature cache folder; "auto" = $XDG_CACHE_HOME/synclone/features (~/.cache/...); None = no cache.
    cache_dir: str | None = "auto"
    encode_batch_size: int = Field(64, ge=1)
    device: str = "cpu"


class TuningHeadsConfig(HeadGridConfig):
    """The head grid of classifier tuning: as a linear probe's, but started from the zero-shot weights."""
    init: Literal["zeroshot", "zeros", "random"] = "zeroshot"


class ClassifierTuningConfig(_ProbeConfig):
    """CLIP classifier tuning: the head grid starts from the zero-shot text weights."""
    heads: TuningHeadsConfig = Field(default_factory=TuningHeadsConfig)
    # A template-set name (openai_imagenet, simple_imagenet, photo, classname) or a list of '{}' strings.
    templates: str | list[str] = "openai_imagenet"


class LinearProbeConfig(_ProbeConfig):
    """Linear probe of any frozen backbone: the head grid starts from zeros (or small random values)."""
    heads: HeadGridConfig = Field(default_factory=HeadGridConfig)


@dataclass
class ProbeResult:
    """What a run produced: the model folder, the grid's record and the headline numbers."""
    folder: Path
    grid: GridResult
    metrics: dict[str, Any]
    cache_hits: dict[str, bool]


# --- data ---------------------------------------------------------------------------------------------


def _datasets(cfg: _ProbeConfig, train: Any, val: Any, test: Any, real: Any = None,
              load_real: bool = False) -> tuple[Any, Any, Any, str, Any, UnreadableImages]:
    """Load, split and subset the data the way the supervised loop does (synclone.train.loop.load_sources):
    the validation split is held out from the whole training source first, then the per-class budget is
    taken from the rest, so probe and supervised runs of the same config see the same images.

    ``load_real``: read ``data.real`` when ``real`` is not given (the separate real shots of a two-batch probe).
    Returns (train, val, test, val_name, real, unreadable): every set without its unreadable images, which are
    listed in ``<output>/skipped_images.txt``; past ``data.max_unreadable`` of the images read, one error line.
    """
    d = cfg.data
    left_out: list[str] = []  # what the folder readers already dropped

    def resolve(spec: str, split: str, what: str) -> Any:
        ds = resolve_dataset(spec, split, d.data_root, d.image_size)
        left_out.extend(f"{what} read\t{k}: {why}" for k, why in read_skips(ds).items())
        return ds

    if train is None:
        specs = [d.train] if isinstance(d.train, str) else list(d.train)
        if not specs:
            raise UserError("data.train is an empty list: give at least one dataset")
        parts = [resolve(s, "train", "training") for s in specs]
        for s, part in zip(specs[1:], parts[1:], strict=True):
            parts[0].label_space.check_aligned(part.label_space, what=f"training data '{specs[0]}'",
                                               other_what=f"training data '{s}'")
        train = concat_sets(parts, "+".join(p.name for p in parts))
    if val is None and d.val is not None:
        val = resolve(d.val, "train", "validation")
    if val is None:
        source = getattr(train, "name", d.train)
        train, val = train.split(d.val_fraction, seed=d.seed)
        val_name = f"{val.name} (held out {d.val_fraction:g} of {source}, seed {d.seed})"
    else:
        val_name = getattr(val, "name", d.val or "val")
    if d.val_max is not None and len(val) > d.val_max:
        g = torch.Generator().manual_seed(d.seed)
        val = val.subset(torch.randperm(len(val), generator=g)[: d.val_max].sort().values, val.name)
        val_name += f", {d.val_max} of them"
    if d.train_per_class is not None:
        train = train.per_class_subset(d.train_per_class, seed=d.seed)
    if test is None and d.test is not None:
        test = resolve(d.test, "test", "test")
        if d.test_per_class is not None:
            test = test.per_class_subset(d.test_per_class, seed=d.seed)
    if real is None and load_real and d.real is not None:
        real = resolve(d.real, "train", "real shots")
    train, val, test, real, unreadable = _without_unreadable(cfg, left_out, train, val, test, real)
    for other, what in ((val, "validation"), (test, "test")):
        if other is not None:
            train.label_space.check_aligned(other.label_space, what="training data", other_what=f"{what} data")
    for ds, what in ((train, "training"), (val, "validation")):
        counts = torch.bincount(torch.as_tensor(ds.labels), minlength=len(ds.label_space))
        empty = [ds.label_space.classes[i] for i in range(len(counts)) if counts[i] == 0]
        if empty:
            raise UserError(f"the {what} split of '{ds.name}' has no images of class(es) {', '.join(empty[:5])}; "
                            "every class needs examples (raise the per-class size or the validation fraction)")
    return train, val, test, val_name, real, unreadable


def _without_unreadable(cfg: _ProbeConfig, left_out: list[str], *sets: Any) -> tuple[Any, ...]:
    """``sets`` less the images that fail to decode (a streamed set would fail mid-encoding), and the record.

    Every image is decoded once beforehand (:func:`synclone.data.readable.readable_subset`; in-memory sets are
    already decoded and cost nothing), so a truncated file is a listed skip rather than a crash after an hour
    of encoding, and a folder that is largely unreadable stops the run instead of quietly shrinking its data.
    """
    unreadable = UnreadableImages(cfg.data.max_unreadable, Path(cfg.output) / SKIPPED_LIST, "data.max_unreadable")
    checked, bad = readable_sets(dict(zip(("training", "validation", "test", "real shots"), sets, strict=True)))
    failed = left_out + bad
    unreadable.add(failed, sum(len(ds) for ds in checked.values() if ds is not None) + len(failed))
    return (*checked.values(), unreadable)


# --- the run ------------------------------------------------------------------------------------------


def classifier_tuning(cfg: ClassifierTuningConfig, train: Any = None, val: Any = None, test: Any = None,
                      log: bool = False, real: Any = None) -> ProbeResult:
    """Tune a CLIP zero-shot head on ``cfg.data.train`` over cached frozen features; write the model folder.

    ``train``/``val``/``test``/``real`` (ImageSets) override the dataset references in ``cfg.data``.
    """
    return _run(cfg, "classifier_tuning", train, val, test, log, real)


def linear_probe(cfg: LinearProbeConfig, train: Any = None, val: Any = None, test: Any = None,
                 log: bool = False) -> ProbeResult:
    """Train a grid of linear heads on a frozen backbone's cached features; write the model folder."""
    return _run(cfg, "linear_probe", train, val, test, log)


def _run(cfg: _ProbeConfig, mode: str, train: Any, val: Any, test: Any, log: bool, real: Any = None) -> ProbeResult:
    t0 = time.perf_counter()
    heads_cfg: HeadGridConfig = cfg.heads
    backbone = load_backbone(cfg.backbone, cfg.device)
    if mode == "classifier_tuning" and not backbone.is_clip:
        raise UserError(f"classifier tuning needs a CLIP backbone (kind open_clip or hf_clip), got "
                        f"'{cfg.backbone.kind}'; use linear_probe for other backbones")
    train, val, test, val_name, real, unreadable = _datasets(cfg, train, val, test, real, load_real=True)
    label_space: LabelSpace = train.label_space

    cache_dir = default_feature_cache() if cfg.cache_dir == "auto" else cfg.cache_dir

    def feats(ds: Any) -> FeatureSet:  # cached, and checked finite there
        return cached_features(backbone.encoder, ds, cache_dir, cfg.encode_batch_size, cfg.device)

    if real is not None:
        label_space.check_aligned(real.label_space, what="training data",
                                  other_what=f"real shots '{getattr(real, 'name', cfg.data.real)}'")
    t_enc = time.perf_counter()
    f_train, f_val = feats(train), feats(val)
    f_real = feats(real) if real is not None else None
    f_test = feats(test) if test is not None else None
    encode_s = time.perf_counter() - t_enc

    text_w, scale, teacher = None, 1.0, None
    if backbone.is_clip and (heads_cfg.init == "zeroshot" or heads_cfg.distill_weight > 0):
        text_w = zeroshot_weights(backbone, label_space.classes, getattr(cfg, "templates", "openai_imagenet"),
                                  cfg.device)
        teacher = (text_w, float(backbone.logit_scale))
    if heads_cfg.init == "zeroshot":
        if text_w is None:
            raise UserError("heads.init 'zeroshot' needs a CLIP backbone; use 'zeros' or 'random' for "
                            f"'{cfg.backbone.kind}'")
        # The head is a cosine classifier at CLIP's temperature, so its starting logits are the zero-shot ones.
        scale = float(backbone.logit_scale)
    t_fit = time.perf_counter()
    grid = train_head_grid(f_train.features, f_train.labels, f_val.features, f_val.labels, len(label_space),
                           heads_cfg, scale=scale, init_weight=text_w, teacher=teacher, val_name=val_name, log=log,
                           real=(f_real.features, f_real.labels) if f_real is not None else None)
    fit_s = time.perf_counter() - t_fit

    head = LinearHead(grid.weight, grid.bias, grid.scale)
    metrics: dict[str, Any] = {"mode": mode, "val_top1": grid.val_top1[grid.best], "selected_on": val_name,
                               "n_train": len(f_train.labels), "n_val": len(f_val.labels),
                               "skipped_images": len(unreadable)}
    if f_real is not None:
        metrics["n_real"] = len(f_real.labels)
        metrics["two_batch"] = {"synthetic": heads_cfg.batch_size, "real": heads_cfg.real_batch_size,
                                "synthetic_weight": heads_cfg.synthetic_weight, "real_weight": heads_cfg.real_weight}
    if text_w is not None:
        metrics["zeroshot_val_top1"] = top1(zeroshot_logits(f_val.features, text_w, teacher[1]), f_val.labels)
    if f_test is not None:
        with torch.no_grad():
            metrics["test_top1"] = top1(head(f_test.features), f_test.labels)
        metrics["n_test"] = len(f_test.labels)
        metrics["test_dataset"] = f_test.dataset
        if text_w is not None:
            metrics["zeroshot_test_top1"] = top1(zeroshot_logits(f_test.features, text_w, teacher[1]), f_test.labels)
    cache_hits = {"train": f_train.cache_hit, "val": f_val.cache_hit}
    if f_test is not None:
        cache_hits["test"] = f_test.cache_hit
    metrics["seconds"] = {"encode": encode_s, "fit": fit_s, "total": time.perf_counter() - t0}

    folder = save_feature_classifier(
        Path(cfg.output), backbone.encoder, cfg.backbone, head, label_space, tuple(train.image_shape),
        training={"mode": mode, "selection": grid.to_dict(), "metrics": metrics, "cache_hits": cache_hits,
                  "heads": heads_cfg.model_dump(mode="json"), "train_dataset": f_train.dataset,
                  "templates": getattr(cfg, "templates", None)})
    write_text_atomic(folder / RESULTS, json.dumps({"metrics": metrics, "selection": grid.to_dict(),
                                              "cache_hits": cache_hits}, indent=2) + "\n")
    write_run_info(folder, cfg, command=f"synclone.train.probe.{mode}")
    return ProbeResult(folder, grid, metrics, cache_hits)
