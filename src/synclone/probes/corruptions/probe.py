"""The ``corruptions`` probe: common corruptions generated on the fly, or read from released folders.

It works on the suite's clean test set (``ctx.clean``), capped to a seeded subset with :meth:`EvalContext.cap`,
so the subset and its clean logits are the ones every other probe with the same cap sees.

``corruptions``: every image of the subset is corrupted once per (corruption, severity) with the batched torch
engine of :mod:`synclone.probes.corruptions.engine`, stored at 8 bits (as the released ImageNet-C and CIFAR-10-C
files are), and handed to every model in turn. The logits go to the suite's disk cache under a key made of the
clean subset's fingerprint, the corruption, the severity, the seed, the size rule and a hash of the engine's
source; a re-run therefore costs neither a corruption nor a forward pass, and an edited engine never reuses
stale outputs. With ``folder`` the released images are read instead (``<corruption>/<severity>/<class>/*``,
optionally below a group folder such as ``noise/``, or CIFAR-10-C's ``<corruption>.npy`` + ``labels.npy``).

Metric conventions (CE, mCE, relative mCE): ``docs/metrics-api.md``.
"""

from __future__ import annotations

import hashlib
import math
import re
import warnings
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from synclone.config import StrictModel
from synclone.data.images import list_images
from synclone.data.imageset import TensorImageSet
from synclone.errors import UserError
from synclone.labels import class_lookup, imagenet1k_space, read_data_file
from synclone.probes.base import (
    EvalContext,
    Row,
    check_models,
    fit_images,
    load_image_files,
    progress,
    register_probe,
    seeded_indices,
    source_hash,
)
from synclone.probes.corruptions.engine import ALL_CORRUPTIONS, CORRUPTIONS, REFERENCE_SIZE, SEVERITIES, corrupt
from synclone.probes.corruptions.metrics import (
    ALEXNET_ERRORS,
    IMAGENET_C_CORRUPTIONS,
    corruption_error,
    mce,
    normalise_name,
    relative_mce,
)
from synclone.util.accuracy import top1

# AlexNet's clean ImageNet top-1 error as used for relative mCE: Hendrycks & Dietterich, "Benchmarking Neural
# Network Robustness to Common Corruptions and Perturbations", ICLR 2019, Table 1 (AlexNet: error 43.5%).
ALEXNET_CLEAN_ERROR = 0.435
ALEXNET = "alexnet"



# ----------------------------------------------------------------------------------------------------------------------
# Helpers shared with the bias probes
# ----------------------------------------------------------------------------------------------------------------------



# ----------------------------------------------------------------------------------------------------------------------
# corruptions
# ----------------------------------------------------------------------------------------------------------------------


class CorruptionSettings(StrictModel):
    """Settings of the ``corruptions`` probe.

    ``reference_size``: the image side the published corruption parameters are meant for; lengths (blur radii,
    glass displacements, snowflakes, frost scale) are multiplied by ``min(H, W) / reference_size``. ``None`` uses
    the engine's default, 224: a 28x28 Fashion-MNIST image is corrupted as a 224x224 image would look after
    shrinking it 8 times (a severity-5 defocus radius of 10 px becomes 1.25 px). ``"unscaled"`` applies the
    published pixel lengths as they are, which at 28x28 blurs most images beyond recognition.

    ``folder``: released corrupted images, evaluated instead of synthesising them; the clean error that relative
    mCE subtracts is still measured on the suite's clean test set (capped the same way), which for ImageNet-C is
    the ImageNet validation set the corrupted images were made from.

    ``baseline``: the model whose errors normalise CE and mCE: a model name of this suite, ``"alexnet"`` (the
    published ImageNet-C errors; needs all five severities), or ``None``: AlexNet for an ImageNet-1k label space
    evaluated on all five severities, else the first model of the suite.
    """
    names: list[str] = Field(default_factory=lambda: list(CORRUPTIONS))
    severities: list[int] = Field(default_factory=lambda: list(SEVERITIES))
    max_images: int | None = Field(default=1000, ge=1)
    seed: int = 0
    reference_size: float | Literal["unscaled"] | None = None
    baseline: str | None = None
    folder: str | None = None

    @field_validator("names")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("give at least one corruption name")
        v = [normalise_name(n) for n in v]  # "JPEG Compression" is jpeg_compression
        unknown = [n for n in v if n not in ALL_CORRUPTIONS]
        if unknown:
            raise ValueError(f"unknown corruption {unknown[0]!r}; valid names: {', '.join(ALL_CORRUPTIONS)}")
        if len(set(v)) != len(v):
            raise ValueError(f"a corruption is listed twice: {v}")
        return v

    @field_validator("severities")
    @classmethod
    def _severities(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("give at least one severity (1-5)")
        bad = [s for s in v if s not in SEVERITIES]
        if bad:
            raise ValueError(f"severities must lie in 1-5, got {bad[0]}")
        if len(set(v)) != len(v):
            raise ValueError(f"a severity is listed twice: {v}")
        return sorted(v)

    @field_validator("reference_size")
    @classmethod
    def _reference_size(cls, v):
        if isinstance(v, float) and not (math.isfinite(v) and v > 0):
            raise ValueError(f"reference_size must be a positive number, 'unscaled' or null, got {v}")
        return v


class _Corrupted:
    """The capped clean set under one corruption, corrupted on first access to ``images`` only.

    Duck-types the part of :class:`TensorImageSet` that :meth:`EvalContext.logits` reads (``name``,
    ``fingerprint()``, ``images``): when every model's logits are cached, nothing is corrupted at all.
    """

    def __init__(self, clean: TensorImageSet, name: str, severity: int, seed: int, reference_size, chunk: int,
                 device: torch.device):
        self.clean, self.corruption, self.severity = clean, name, severity
        self.seed, self.reference_size, self.chunk, self.device = seed, reference_size, chunk, device
        self.name = f"{clean.name}|{name}@{severity}"

    def fingerprint(self) -> str:
        engine = source_hash("synclone.probes.corruptions.engine", "synclone.probes.corruptions.ops")
        key = (f"{self.clean.fingerprint()}|{self.corruption}@{self.severity}|seed={self.seed}"
               f"|ref={self.reference_size}|uint8|engine={engine}")
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    @cached_property
    def images(self) -> torch.Tensor:
        x = self.clean.images
        out = torch.empty_like(x)
        for start in range(0, len(x), self.chunk):
            batch = x[start:start + self.chunk].to(self.device).float().div_(255)
            # Global indices make each image's noise independent of the chunking (and of the device: the engine
            # draws its random numbers on the CPU).
            y = corrupt(batch, self.corruption, self.severity, self.seed, range(start, start + len(batch)),
                        self.reference_size)
            out[start:start + len(batch)] = y.mul_(255).round_().to(torch.uint8).cpu()
        return out


def _imagenet1k(space) -> bool:
    return tuple(space.classes) == imagenet1k_space().classes


def _resolve_baseline(ctx: EvalContext, s: CorruptionSettings) -> str:
    full = tuple(s.severities) == SEVERITIES
    if s.baseline is None:
        return ALEXNET if _imagenet1k(ctx.clean.label_space) and full else next(iter(ctx.models))
    if s.baseline.lower() == ALEXNET and s.baseline not in ctx.models:
        if not full:
            raise UserError(f"baseline 'alexnet' gives mean errors over severities 1-5; evaluate all five "
                            f"(severities: {list(s.severities)}) or name a model of the suite as baseline")
        return ALEXNET
    if s.baseline not in ctx.models:
        raise UserError(f"corruptions baseline '{s.baseline}' is not a model of this suite; choose one of "
                        f"{', '.join(ctx.models)} or 'alexnet'")
    return s.baseline


def _or_nan(fn, *args, **kwargs) -> float:
    """A (relative) CE from :mod:`corruption_metrics`, NaN where the baseline makes it undefined."""
    try:
        return float(fn(*args, **kwargs))
    except UserError as err:
        warnings.warn(f"corruptions: {str(err).rstrip('.')}; reporting NaN", stacklevel=2)
        return float("nan")


@register_probe("corruptions", CorruptionSettings)
def corruptions_probe(ctx: EvalContext, s: CorruptionSettings) -> list[Row]:
    """Top-1 accuracy per corruption and severity, error per corruption, CE, mCE and relative mCE."""
    check_models(ctx, "corruptions")
    data = ctx.cap(ctx.clean, s.max_images)
    ref = REFERENCE_SIZE if s.reference_size is None else (None if s.reference_size == "unscaled" else s.reference_size)
    baseline = _resolve_baseline(ctx, s)
    acc: dict[str, dict[str, dict[int, float]]] = {m: {c: {} for c in s.names} for m in ctx.models}
    counts: dict[tuple[str, int], int] = {}

    if s.folder:
        dataset = Path(s.folder).name
        reader = _CorruptionFolder(Path(s.folder), ctx.clean, s.max_images, s.seed)
        reader.check(s.names, s.severities)
        source = f"released images in folder {Path(s.folder).name}"
        for c, sev in progress(ctx, [(c, v) for c in s.names for v in s.severities], "corruptions (folder)"):
            ds = reader.load(c, sev)
            counts[c, sev] = len(ds)
            for m in ctx.models:
                acc[m][c][sev] = top1(ctx.logits(m, ds, f"{c}@{sev}"), ds.labels)
    else:
        dataset = ctx.clean.name
        h, w = data.image_shape[1:]
        scale = "unscaled" if ref is None else f"reference_size={ref:g} (lengths x{min(h, w) / ref:.3g})"
        source = f"synclone engine; seed={s.seed}; {scale}; 8-bit images"
        for c, sev in progress(ctx, [(c, v) for c in s.names for v in s.severities], "corruptions"):
            corrupted = _Corrupted(data, c, sev, s.seed, ref, ctx.batch_size, ctx.device)
            counts[c, sev] = len(data)
            for m in ctx.models:
                acc[m][c][sev] = top1(ctx.logits(m, corrupted, f"{c}@{sev}|seed={s.seed}"), data.labels)
            del corrupted  # frees the corrupted images before the next corruption

    n_all = sum(counts.values())
    clean_acc = {m: top1(ctx.logits(m, data), data.labels) for m in ctx.models}
    rows: list[Row] = []
    for m in ctx.models:
        for c in s.names:
            for sev in s.severities:
                rows.append(Row(m, "corruptions", dataset, f"{c}@{sev}", "top1", acc[m][c][sev], counts[c, sev],
                                source))
            rows.append(Row(m, "corruptions", dataset, c, "error", 1.0 - float(np.mean(list(acc[m][c].values()))),
                            sum(counts[c, v] for v in s.severities), f"mean over severities {s.severities}; {source}"))
        mean_top1 = float(np.mean([a for c in s.names for a in acc[m][c].values()]))
        rows.append(Row(m, "corruptions", dataset, "all", "mean_top1", mean_top1, n_all,
                        f"mean over {len(s.names)} corruptions x severities {s.severities}; {source}"))
        rows.append(Row(m, "corruptions", ctx.clean.name, "clean", "top1", clean_acc[m], len(data),
                        f"the {len(data)} clean images the corruptions start from (seeded subset, seed {ctx.seed})"))
        ctx.add_artifact(m, "corruptions", dataset, "corruption_curve",
                         {c: {str(v): acc[m][c][v] for v in s.severities} for c in s.names})
    rows += _mce_rows(ctx, s, acc, clean_acc, baseline, dataset, source, n_all)
    return rows


def _one_ce(errs, base, name: str) -> float:
    return corruption_error(errs, base, [name])[name]


def _mce_rows(ctx, s: CorruptionSettings, acc, clean_acc, baseline: str, dataset: str, source: str,
              n_all: int) -> list[Row]:
    """CE per corruption, mCE over the chosen ImageNet-C corruptions, relative mCE; all against ``baseline``."""
    errs_of = {m: {c: {v: 1.0 - a for v, a in acc[m][c].items()} for c in s.names} for m in ctx.models}
    if baseline == ALEXNET:
        # Published means over severities 1-5, paired by name; corruption_metrics averages our five severities.
        base, base_clean = {c: ALEXNET_ERRORS[c] for c in s.names if c in ALEXNET_ERRORS}, ALEXNET_CLEAN_ERROR
        label = "AlexNet (published ImageNet-C errors, Hendrycks & Dietterich 2019; clean error 43.5%)"
    else:
        base, base_clean = errs_of[baseline], 1.0 - clean_acc[baseline]
        label = f"model '{baseline}' of this suite"
    # Sorted: neither CE nor the means depend on the order the corruptions were listed in.
    in_mce = sorted(c for c in s.names if c in IMAGENET_C_CORRUPTIONS and c in base)
    convention = (f"baseline={baseline}: {label}; CE_c = 100 * sum_s err / sum_s err_baseline; "
                  f"mCE over {len(in_mce)} of the 15 ImageNet-C corruptions (held-out ones excluded); "
                  f"severities {s.severities}; {source}")
    rel_convention = convention.replace("CE_c = 100 * sum_s err / sum_s err_baseline",
                                        "relative CE_c = 100 * sum_s (err - clean err) / sum_s (err_baseline - "
                                        "clean err_baseline)")
    rows = []
    for m in ctx.models:
        errs, clean_err = errs_of[m], 1.0 - clean_acc[m]
        for c in s.names:
            if c in base:
                ce = _or_nan(_one_ce, errs, base, c)
                rows.append(Row(m, "corruptions", dataset, c, "ce", ce, None, convention))
        if not in_mce:
            continue
        value = _or_nan(mce, errs, base, in_mce)
        rows.append(Row(m, "corruptions", dataset, "all", "mce", value, n_all, convention))
        value = _or_nan(relative_mce, errs, clean_err, base, base_clean, in_mce)
        rows.append(Row(m, "corruptions", dataset, "all", "relative_mce", value, n_all, rel_convention))
    return rows


class _CorruptionFolder:
    """Released corruption sets: ``<root>[/<group>]/<corruption>/<severity>/<class>/<image>`` or CIFAR-10-C's
    ``<root>/<corruption>.npy`` (the five severities stacked, 10,000 images each) with ``<root>/labels.npy``."""

    def __init__(self, root: Path, clean: TensorImageSet, limit: int | None, seed: int):
        if not root.is_dir():
            raise UserError(f"corruption folder '{root}' does not exist; give a released ImageNet-C / CIFAR-10-C "
                            "folder (<corruption>/<severity>/<class>/<image> or <corruption>.npy + labels.npy)")
        self.root, self.space, self.shape = root, clean.label_space, clean.image_shape
        self.limit, self.seed = limit, seed
        self.npy = (root / "labels.npy").is_file()

    def _dir(self, name: str) -> Path | None:
        hits = [self.root / name] + sorted(self.root.glob(f"*/{name}"))
        return next((p for p in hits if p.is_dir()), None)

    def check(self, names: Sequence[str], severities: Sequence[int]) -> None:
        """Every (corruption, severity) is present, before any image is read."""
        for c in names:
            if self.npy:
                if not (self.root / f"{c}.npy").is_file():
                    raise UserError(f"corruption folder '{self.root}' has no '{c}.npy'; drop '{c}' from names")
                continue
            d = self._dir(c)
            if d is None:
                raise UserError(f"corruption folder '{self.root}' has no '{c}/' (nor '<group>/{c}/'); drop '{c}' "
                                "from names or give the full ImageNet-C folder")
            missing = [v for v in severities if not (d / str(v)).is_dir()]
            if missing:
                raise UserError(f"corruption folder '{d}' lacks severities {missing} (expected sub-folders "
                                f"{', '.join(str(v) for v in severities)})")

    def load(self, name: str, severity: int) -> TensorImageSet:
        if self.npy:
            return self._load_npy(name, severity)
        folder = self._dir(name) / str(severity)
        lookup = _folder_lookup(self.space)
        paths, labels = [], []
        for d in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            label = _class_of(d.name, lookup, len(self.space))
            if label is None:
                raise UserError(f"class folder '{d}' matches no class of the label space '{self.space.name}' "
                                f"({self.space.describe()}); name folders by class name, slug, WordNet id or index")

            files = list_images(d)
            paths += files
            labels += [label] * len(files)
        if not paths:
            raise UserError(f"corruption folder '{folder}' has no images")
        idx = seeded_indices(len(paths), self.limit, self.seed)
        images = load_image_files([paths[i] for i in idx.tolist()], self.shape)
        return TensorImageSet(images, torch.tensor(labels)[idx], self.space, f"{self.root.name}/{name}/{severity}")

    def _load_npy(self, name: str, severity: int) -> TensorImageSet:
        labels = np.load(self.root / "labels.npy")
        arr = np.load(self.root / f"{name}.npy", mmap_mode="r")
        n = len(labels)
        if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
            raise UserError(f"'{self.root / (name + '.npy')}' must hold images (N, H, W, C), got shape {arr.shape}")
        if len(arr) == 5 * n:
            part, lab = arr[(severity - 1) * n:severity * n], labels
        elif len(arr) == len(labels) and n % 5 == 0:  # labels stacked for the five severities too
            k = n // 5
            part, lab = arr[(severity - 1) * k:severity * k], labels[(severity - 1) * k:severity * k]
        else:
            raise UserError(f"'{self.root / (name + '.npy')}' has {len(arr)} images for {n} labels; expected the "
                            "five severities stacked (5 x the number of labels)")
        idx = seeded_indices(len(part), self.limit, self.seed).numpy()
        x = torch.from_numpy(np.ascontiguousarray(part[idx])).permute(0, 3, 1, 2)
        y = torch.from_numpy(np.asarray(lab)[idx].astype(np.int64))
        if x.dtype != torch.uint8:
            raise UserError(f"'{self.root / (name + '.npy')}' must hold uint8 images, got {x.dtype}")
        return TensorImageSet(fit_images(x, self.shape), y, self.space, f"{self.root.name}/{name}/{severity}")


def _folder_lookup(space) -> dict[str, int]:
    lookup = class_lookup(space)
    if _imagenet1k(space):  # ImageNet-C names class folders by WordNet id
        for i, wnid in enumerate(read_data_file("labelspaces/imagenet1k.json")["wnids"]):
            lookup.setdefault(wnid, i)
    return lookup


def _class_of(folder: str, lookup: dict[str, int], n: int) -> int | None:
    if folder in lookup:
        return lookup[folder]
    m = re.fullmatch(r"(\d+)(?:_(.+))?", folder)  # "3", "03_dress"
    if m:
        if m.group(2) in lookup:
            return lookup[m.group(2)]
        if int(m.group(1)) < n:
            return int(m.group(1))
    return None
