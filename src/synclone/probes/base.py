"""The suite runner's contract: result rows, artefacts, the shared evaluation context and the probe registry.

A *probe* is a function ``probe(ctx, settings) -> list[Row]`` registered under a name with the pydantic
model of its settings. It may loop over ``ctx.models``; clean-data logits come from
:meth:`EvalContext.logits`, which runs each (model, dataset) pair through the model once per suite and
caches the result on disk keyed by the model's weights hash and the data's fingerprint, so every probe
that needs the same outputs shares one forward pass. Curves and other non-scalar results go to
:meth:`EvalContext.add_artifact` for the report.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel
from safetensors.torch import load_file, save_file

from synclone.data.eval_sets import load_eval_dataset
from synclone.data.images import load_image
from synclone.data.imageset import ImageSet
from synclone.data.readable import MAX_UNREADABLE, SKIPPED_LIST, UnreadableImages, read_skips, unreadable_in
from synclone.errors import UserError
from synclone.util.files import atomic_path

COLUMNS = ("model", "probe", "dataset", "variant", "metric", "value", "n", "convention")


@dataclass
class Row:
    """One long-format result: ``value`` of ``metric`` for ``model`` under ``probe`` on ``dataset``/``variant``.

    ``convention`` names the choices that change the number (bins, positive class, baseline, eps
    norm, class subset...), so rows from different settings are never compared by accident.
    """
    model: str
    probe: str
    dataset: str
    variant: str
    metric: str
    value: float
    n: int | None = None
    convention: str = ""

    def as_dict(self) -> dict:
        d = asdict(self)
        d["value"] = float(d["value"])
        return d


class NonFiniteOutputs(UserError):
    """A model gave NaN or infinite logits on a dataset; the runner marks its rows and scores the other models."""

    def __init__(self, model: str, dataset: str, count: int, total: int) -> None:
        super().__init__(f"model '{model}' gives non-finite outputs (NaN or infinity) on dataset '{dataset}' for "
                         f"{count} of {total} images; check its weights (a diverged training run?)")
        self.model, self.dataset, self.count, self.total = model, dataset, count, total


def check_finite(model: str, dataset: str, logits: torch.Tensor) -> torch.Tensor:
    """``logits`` if every value is finite, else :class:`NonFiniteOutputs` naming the model and dataset."""
    if logits.is_floating_point() and logits.numel() and not bool(torch.isfinite(logits).all()):
        bad = ~torch.isfinite(logits.reshape(len(logits), -1)).all(dim=1)
        raise NonFiniteOutputs(model, dataset, int(bad.sum()), len(logits))
    return logits


@dataclass
class ModelEntry:
    """A model under evaluation: its display name, folder and a hash of its weights."""
    name: str
    path: Path
    module: torch.nn.Module
    fingerprint: str
    kind: str = "classifier"
    info: dict = field(default_factory=dict)


class EvalContext:
    """What every probe sees: models, the clean (in-distribution) test set, cached logits, artefacts."""

    def __init__(self, models: dict[str, ModelEntry], clean: ImageSet, output: Path, *,
                 cache_dir: Path | None = None, batch_size: int = 256, device: str = "cpu",
                 data_root: str | None = None, max_images: int | None = None, seed: int = 0,
                 progress: bool = True, image_size: int | None = None, executor=None,
                 max_unreadable: float = MAX_UNREADABLE) -> None:
        self.models = models
        self.clean = clean
        self.output = Path(output)
        self.cache_dir = Path(cache_dir) if cache_dir else self.output / "cache" / "logits"
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.data_root = data_root
        self.image_size = image_size  # folders stream at this size when set (EvaluateConfig.image_size)
        self.max_images = max_images
        self.seed = seed
        self.progress = progress
        self.artifacts: list[dict] = []
        self.shift_datasets: list[str] = []  # the shift probe's sets, for probes that also report under shift
        self.forward_passes = 0  # counted so tests can check that probes share outputs
        # Where clean-data logits are computed (synclone.util.executor.ExecutorConfig; None: here).
        self.executor = executor
        self._memo: dict[str, torch.Tensor] = {}
        self._datasets: dict[str, ImageSet] = {}
        # Images left out because they cannot be read, listed in <output>/skipped_images.txt (synclone.data.readable).
        self.unreadable = UnreadableImages(max_unreadable, self.output / SKIPPED_LIST)

    # -- data ------------------------------------------------------------------------------------
    def dataset(self, spec: str, split: str = "test") -> ImageSet:
        """A dataset by spec (built-in name, ``name:split`` or folder), loaded once and capped at ``max_images``."""
        key = f"{spec}|{split}"
        if key not in self._datasets:

            self._datasets[key] = self.readable(load_eval_dataset(spec, split, self.data_root, like=self.clean,
                                                                  image_size=self.image_size))
        return self._datasets[key]

    def readable(self, data: ImageSet) -> ImageSet:
        """``data`` capped (:meth:`cap`) and without the images that cannot be read, each a recorded skip.

        Files the folder reader left out are recorded as they are; a streamed set is decoded once here (the
        result cached by its fingerprint), so a file that fails only when decoded is skipped before any model
        reads the set instead of stopping the run midway. Past ``max_unreadable`` of the set, one error line.
        """
        read = read_skips(data)
        total = len(data) + len(read)
        data = self.cap(data)
        bad: list[str] = []
        if hasattr(data, "iter_batches") and len(data):
            memo = self.cache_dir / f"readable-{data.fingerprint()}.json"
            try:
                found = {int(k): v for k, v in json.loads(memo.read_text(encoding="utf-8")).items()}
            except (OSError, ValueError, AttributeError):
                found = unreadable_in(data)
                memo.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(memo) as tmp:
                    tmp.write_text(json.dumps(found), encoding="utf-8")
            if found:
                bad = list(found.values())
                keep = torch.tensor([i not in found for i in range(len(data))]).nonzero().flatten()
                data = data.subset(keep, data.name)
        self.unreadable.add([f"{data.name}\t{k}: {why}" for k, why in read.items()] +
                            [f"{data.name}\t{e}" for e in bad], total, f"images of dataset '{data.name}'")
        return data

    def cap(self, data: ImageSet, limit: int | None = None) -> ImageSet:
        """A uniformly random subset of at most ``limit`` (default ``max_images``) images, drawn with the
        context's seed and kept in dataset order (:func:`seeded_indices`, the one subsampling rule)."""
        limit = limit if limit is not None else self.max_images
        if limit is None or len(data) <= limit:
            return data
        return data.subset(seeded_indices(len(data), limit, self.seed), data.name)

    # -- outputs ---------------------------------------------------------------------------------
    def logits(self, model: str, data: ImageSet, variant: str = "clean") -> torch.Tensor:
        """Logits of ``model`` on ``data`` (float32, CPU), computed once and cached on disk.

        The cache key joins the weights hash, the data fingerprint (pixels + labels) and ``variant``,
        so a retrained model or changed data never reuses stale outputs. A set with ``iter_batches``
        (:class:`synclone.data.streaming.FileImageSet`) is decoded batch by batch at the model's
        ``input_size``; a set with a ``logit_view`` (ImageNet-R/A masks, ObjectNet's mapping) gets it
        applied to the returned logits, while the cache keeps the raw outputs.
        """
        entry = self.models[model]
        key = hashlib.sha256(f"{entry.fingerprint}|{data.fingerprint()}|{variant}".encode()).hexdigest()[:24]
        view = getattr(data, "logit_view", None) or (lambda z: z)
        if key in self._memo:
            return view(check_finite(model, data.name, self._memo[key]))
        path = self.cache_dir / f"{key}.safetensors"
        if path.is_file():
            out = load_file(str(path))["logits"]
        else:
            if self.executor is not None and self.executor.is_ray:  # Ray workers, same batches, same cache entry
                from synclone.probes.ray_logits import logits_on_ray

                self.forward_passes += 1
                out = logits_on_ray(entry.path, getattr(entry.module, "input_size", None), data, self.batch_size,
                                    self.executor, self.progress, f"{model} on {data.name}")
            else:
                out = self._stream(model, data) if hasattr(data, "iter_batches") else self._batched(model, data.images)
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                save_file({"logits": out.contiguous()}, str(tmp), metadata={"model": model, "data": data.name,
                                                                         "variant": variant})
        self._memo[key] = out
        return view(check_finite(model, data.name, out))

    def forward(self, model: str, images: torch.Tensor) -> torch.Tensor:
        """Logits of ``model`` on raw images (uint8 or float in [0, 1]); no caching (perturbed inputs)."""
        return check_finite(model, "perturbed inputs", self._batched(model, images))

    def _batched(self, model: str, images: torch.Tensor) -> torch.Tensor:
        return self._run(model, (images[s:s + self.batch_size] for s in range(0, len(images), self.batch_size)))

    def _stream(self, model: str, data: ImageSet) -> torch.Tensor:
        """Logits of ``model`` on a streaming set, decoded batch by batch at the model's input size."""
        from tqdm.auto import tqdm

        size = getattr(self.models[model].module, "input_size", None)
        batches = data.iter_batches(self.batch_size, size)  # type: ignore[attr-defined]
        bar = tqdm(total=len(data), desc=f"{model} on {data.name}", unit="img", leave=False,
                   disable=not self.progress)
        with bar:
            return self._run(model, batches, bar.update)

    @torch.no_grad()
    def _run(self, model: str, batches, advance: Callable[[int], Any] | None = None) -> torch.Tensor:
        module = self.models[model].module
        self.forward_passes += 1
        out = []
        for x in batches:
            x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
            out.append(module(x.to(self.device)).float().cpu())
            if advance is not None:
                advance(len(x))
        return torch.cat(out) if out else torch.empty(0)

    def add_artifact(self, model: str, probe: str, dataset: str, kind: str, data: dict[str, Any]) -> None:
        """Record a curve or table for the report (JSON-serialisable ``data``)."""
        self.artifacts.append({"model": model, "probe": probe, "dataset": dataset, "kind": kind,
                               "data": json.loads(json.dumps(data, default=_jsonable))})


def _jsonable(x: Any) -> Any:
    if hasattr(x, "tolist"):
        return x.tolist()
    raise TypeError(f"not JSON-serialisable: {type(x).__name__}")


# -- helpers shared by the probes --------------------------------------------------------------------------------------


def convention(d: dict) -> str:
    """A result row's ``convention`` string from the choices that change the number."""
    return "; ".join(f"{k}={v}" for k, v in d.items())


@cache
def source_hash(*modules: str) -> str:
    """Hash of the source files of ``modules``: part of cache keys, so edited code never reuses stale outputs."""
    import importlib

    h = hashlib.sha256()
    for name in modules:
        h.update(Path(importlib.import_module(name).__file__).read_bytes())
    return h.hexdigest()[:12]


def check_models(ctx: EvalContext, probe: str) -> None:
    """Every model must predict in the clean set's label space (its labels index the model's outputs)."""
    if not ctx.models:
        raise UserError(f"probe '{probe}' has no models to evaluate")
    for name, entry in ctx.models.items():
        space = getattr(entry.module, "label_space", None)
        if space is not None:
            space.check_aligned(ctx.clean.label_space, what=f"model '{name}'", other_what=f"dataset '{ctx.clean.name}'")


def seeded_indices(n: int, limit: int | None, seed: int) -> torch.Tensor:
    """At most ``limit`` of ``range(n)``, drawn with ``seed`` and sorted (the rule of :meth:`EvalContext.cap`)."""
    if limit is None or n <= limit:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:limit].sort().values


def fit_images(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """uint8 (N, C, H, W) to ``shape`` (C, H, W): grey <-> RGB (ITU-R 601 luma) and bilinear antialiased resizing."""
    c, h, w = (int(v) for v in shape)
    if x.shape[1] == c and tuple(x.shape[2:]) == (h, w):
        return x
    y = x.float()
    if y.shape[1] != c:
        luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        y = (y * luma).sum(1, keepdim=True) if c == 1 else y.expand(-1, c, -1, -1)
    if tuple(y.shape[2:]) != (h, w):
        y = F.interpolate(y, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return y.round().clamp(0, 255).to(torch.uint8)


def load_image_files(paths: Sequence[Path], shape: Sequence[int]) -> torch.Tensor:
    """Image files as uint8 (N, C, H, W) at ``shape`` (C, H, W), read with Pillow on a few threads."""
    size = tuple(int(v) for v in shape)
    if not paths:
        return torch.empty((0, *size), dtype=torch.uint8)
    # Pillow releases the GIL while decoding, so threads help and keep the order of ``paths``.
    with ThreadPoolExecutor(max_workers=4) as pool:
        arrays = list(pool.map(lambda p: load_image(Path(p), size), paths, chunksize=64))
    return torch.from_numpy(np.stack(arrays)).mul_(255).round_().to(torch.uint8)


def progress(ctx: EvalContext, items, desc: str):
    """``items`` wrapped in a progress bar when the context shows progress."""
    if not ctx.progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False)


ProbeFn = Callable[[EvalContext, BaseModel], list[Row]]


@dataclass
class ProbeSpec:
    name: str
    settings: type[BaseModel]
    run: ProbeFn
    description: str = ""


PROBES: dict[str, ProbeSpec] = {}


def register_probe(name: str, settings: type[BaseModel], description: str = "") -> Callable[[ProbeFn], ProbeFn]:
    """Decorator adding a probe to the registry (``probes.<name>`` in the evaluate config)."""

    def wrap(fn: ProbeFn) -> ProbeFn:
        PROBES[name] = ProbeSpec(name, settings, fn, description or (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return wrap


def get_probe(name: str) -> ProbeSpec:
    # Complete already: importing this module ran synclone.probes/__init__, which imports every family.
    if name not in PROBES:
        raise UserError(f"unknown probe '{name}': choose from {', '.join(sorted(PROBES))}")
    return PROBES[name]
