"""Pre-training on (synthetic) images: SimCLR, MoCo v2, StableRep's multi-positive loss, or supervised.

He et al. (2023, Section 5) ask whether generated images can replace ImageNet for *pre-training*;
StableRep (Tian et al., 2023) showed that images generated from one prompt make good positives for
each other. ``pretrain(cfg)`` trains an encoder that way and writes a model folder with the backbone
(``model.safetensors`` + ``config.json``) that ``linear-probe`` (backbone kind ``synclone``), ``knn``
and fine-tuning (``model.init: FOLDER`` with ``model.init_head: new``) read.

The self-supervised methods run inside the supervised Accelerate loop (:func:`synclone.train.loop.train`
with an :class:`SSLTask`): same checkpoints, exact resume, NaN stop, multi-process batches and mixed
precision. The task holds what differs: the module (encoder + projection head, and for MoCo the momentum
encoder and the key queue, so both are in every checkpoint), the batches (items and their groups), the
loss over embeddings gathered from all processes (so negatives span the global batch and the loss is
the same for any process count), and a kNN monitor on the validation split instead of accuracy.

Batches are lists of *items*, each one augmented view of one image, with a group id; items of one
group are positives for each other. SimCLR and MoCo take ``batch_size`` images and two views of each;
``multipositive`` takes ``batch_size / group_size`` groups (images sharing a prompt) and
``group_size`` items of each (other images of the group first, extra views when it has fewer). On data
without prompts (real images) every image is its own group, which is SimCLR.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from synclone.config import StrictModel, validate
from synclone.data.imageset import ImageSet, TensorImageSet
from synclone.data.sources import resolve_dataset
from synclone.data.streaming import concat_sets
from synclone.errors import UserError
from synclone.labels import LabelSpace
from synclone.models import Classifier, create_classifier, load_model
from synclone.train.batches import CyclingSampler
from synclone.train.config import TrainConfig
from synclone.train.ssl_losses import KeyQueue, moco_loss, momentum_update, multi_positive
from synclone.train.ssl_views import ViewConfig, ViewSpec, ssl_views
from synclone.util.accuracy import top1
from synclone.util.seeds import mix_seed

METHODS = ("simclr", "moco_v2", "multipositive", "supervised")
_DEFAULT_T = {"simclr": 0.2, "moco_v2": 0.2, "multipositive": 0.1}


class SSLConfig(StrictModel):
    """Settings of the self-supervised objectives."""

    temperature: float | None = Field(None, gt=0, description="default 0.2 (SimCLR, MoCo v2), 0.1 (multipositive)")
    proj_dim: int = Field(128, ge=1, description="output size of the projection head")
    proj_hidden: int | None = Field(None, ge=1, description="hidden size of the 2-layer MLP head (default: "
                                    "the encoder's feature size)")
    proj_norm: Literal["batch", "none"] = Field(
        "batch", description="BatchNorm in the projection head (SimCLR, MoCo v2); 'none' makes a run independent of "
        "how the batch is split over processes when the encoder has no BatchNorm either")
    momentum: float = Field(0.99, ge=0, lt=1, description="MoCo: EMA factor of the key encoder")
    queue_size: int = Field(4096, ge=1, description="MoCo: keys in the queue (a multiple of the batch size)")
    group_size: int = Field(4, ge=2, description="multipositive: items per group in a batch")
    group_by: str = Field("prompt", description="multipositive: the metadata field whose equal values are positives")
    knn_k: int = Field(20, ge=1, description="kNN monitor on the validation split: neighbours")
    knn_reference_max: int = Field(5000, ge=1, description="kNN monitor: training images used as the reference")


class PretrainConfig(TrainConfig):
    """A supervised training config plus the pre-training method, its settings and the view augmentation."""

    method: Literal["simclr", "moco_v2", "multipositive", "supervised"] = "simclr"
    ssl: SSLConfig = Field(default_factory=SSLConfig)
    views: ViewConfig = Field(default_factory=ViewConfig)


def pretrain(cfg: PretrainConfig, resume: bool = False, progress: bool = True) -> Path:
    """Pre-train the encoder ``cfg`` describes; returns the model folder (``<output>/model``)."""
    from synclone.train.loop import train

    if cfg.method == "supervised":
        # He et al.'s supervised pre-training is the supervised loop on the generated labels; its model folder
        # (backbone + head) is what fine-tuning with init_head=new and the probes read.
        d = cfg.model_dump(mode="json")
        for k in ("method", "ssl", "views"):
            d.pop(k)
        sup = validate(TrainConfig, d, source="supervised pre-training")
        _check_supervised_batch(sup)
        return train(sup, resume=resume, progress=progress)
    return train(cfg, resume=resume, progress=progress, task=SSLTask(cfg))


def _check_supervised_batch(cfg: TrainConfig) -> None:
    d = cfg.data
    spec = d.synthetic or d.real
    ds = resolve_dataset(spec, "train", d.data_root, d.image_size)
    n_classes = len(ds.label_space)
    if cfg.optim.batch_size < n_classes:
        raise UserError(f"optim.batch_size {cfg.optim.batch_size} is smaller than the {n_classes} classes of "
                        f"'{spec}': a batch cannot show every class; use a batch of at least {n_classes}")


# --- the module ------------------------------------------------------------------------------------------


def projection_head(dim_in: int, hidden: int, dim_out: int, norm: str = "batch") -> nn.Module:
    """SimCLR / MoCo v2's 2-layer MLP head (Linear-BN-ReLU-Linear; without BN: Linear-ReLU-Linear)."""
    if norm == "none":
        return nn.Sequential(nn.Linear(dim_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim_out))
    return nn.Sequential(nn.Linear(dim_in, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, dim_out))


class SSLModule(nn.Module):
    """The encoder (a :class:`Classifier`, normalisation inside), its projection head and, for MoCo, the
    momentum encoder + head and the key queue. ``forward`` maps pixels to projections."""

    def __init__(self, encoder: Classifier, proj_hidden: int | None, proj_dim: int, moco_queue: int = 0,
                 seed: int = 0, proj_norm: str = "batch") -> None:
        super().__init__()
        self.encoder = encoder
        # The classifier head is not part of the objective: frozen, it stays out of the optimiser and of DDP's
        # gradient reduction (which would otherwise wait for gradients that never come).
        head = encoder.net.get_classifier() if hasattr(encoder.net, "get_classifier") else None
        if isinstance(head, nn.Module):
            head.requires_grad_(False)
        c, h, w = encoder.input_size
        with torch.no_grad():
            was = encoder.training
            dim = int(encoder.eval().features(torch.zeros(2, c, h, w)).shape[-1])
            encoder.train(was)
        self.projector = projection_head(dim, proj_hidden or dim, proj_dim, proj_norm)
        self.moco = moco_queue > 0
        if self.moco:
            self.key_encoder = copy.deepcopy(encoder).requires_grad_(False)
            self.key_projector = copy.deepcopy(self.projector).requires_grad_(False)
            self.queue = KeyQueue(moco_queue, proj_dim, seed=seed)

    def forward(self, x: torch.Tensor, chunks: int = 1) -> torch.Tensor:
        # Two passes of N beat one of 2N on a CPU (the activations of a pass stay in cache; measured in
        # bench/bench_pretrain.py); each pass normalises its own batch, as with model(x1), model(x2).
        if chunks > 1 and len(x) >= chunks:
            return torch.cat([self.projector(self.encoder.features(c)) for c in x.chunk(chunks)])
        return self.projector(self.encoder.features(x))

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        return self.key_projector(self.key_encoder.features(x))

    @torch.no_grad()
    def update_key_encoder(self, m: float) -> None:
        momentum_update(self.encoder, self.key_encoder, m)
        momentum_update(self.projector, self.key_projector, m)


# --- groups of positives --------------------------------------------------------------------------------


@dataclass
class _GroupedSet(TensorImageSet):
    """An in-memory set that carries a group id per image through splits and subsets."""

    groups: torch.Tensor | None = None

    def subset(self, idx: torch.Tensor, name: str | None = None) -> _GroupedSet:
        return _GroupedSet(self.images[idx], self.labels[idx], self.label_space, name or self.name, self.source,
                           groups=self.groups[idx])


def _prompt_groups(spec: str, split: str, field: str) -> tuple[dict[str, int], dict[str, str]] | None:
    """For a dataset folder whose metadata has ``field``: (image id -> group id, image path -> image id)."""
    path = Path(spec)
    if not path.is_dir():
        return None
    from synclone.data.folder import read_dataset_folder

    records, _ = read_dataset_folder(path, split)
    values = [r.meta.get(field) for r in records]
    if not records or any(v is None for v in values):
        return None
    ids: dict[Any, int] = {}
    by_id = {r.id: ids.setdefault(v, len(ids)) for r, v in zip(records, values, strict=True)}
    return by_id, {str(r.path): r.id for r in records}


class SSLTask:
    """What the self-supervised methods add to the supervised loop (see the module docstring)."""

    select_last = True  # no labels choose the model: the end of the budget is the result, as in SSL practice

    def __init__(self, cfg: PretrainConfig) -> None:
        self.cfg = cfg
        self.method = cfg.method
        self.t = cfg.ssl.temperature or _DEFAULT_T[cfg.method]
        self.grouped = False  # set once the data are known
        self._group_note = ""
        self._file_groups: dict[str, int] = {}

    def build_module(self, label_space: LabelSpace, input_size: tuple[int, ...]) -> SSLModule:
        """The module the loop trains: the encoder wrapped with its projection (and momentum) heads."""
        return build_ssl_module(self.cfg, label_space, input_size)

    # -- data --

    def resolve(self, spec: str, split: str, data_root: str | None, image_size: int | None) -> ImageSet:
        """resolve_dataset, keeping each image's group (its prompt) when the method needs one."""
        ds = resolve_dataset(spec, split, data_root, image_size)
        if self.method != "multipositive":
            return ds
        found = _prompt_groups(spec, split, self.cfg.ssl.group_by)
        if found is None:
            return ds
        by_id, by_path = found
        if isinstance(ds, TensorImageSet):
            skipped = set(ds.extra.get("skipped", []))
            from synclone.data.folder import read_dataset_folder

            records, _ = read_dataset_folder(Path(spec), split)
            groups = torch.tensor([by_id[r.id] for r in records if r.id not in skipped], dtype=torch.long)
            if len(groups) != len(ds):
                return ds
            return _GroupedSet(ds.images, ds.labels, ds.label_space, ds.name, ds.source, ds.extra, groups=groups)
        self._file_groups.update({p: by_id[i] for p, i in by_path.items()})
        return ds

    def prepare(self, src: Any, world: int) -> None:
        """Join the training sources, assign groups, check the batch against the method; called once."""
        cfg, o = self.cfg, self.cfg.optim
        parts = [s for s in (src.real, src.synthetic) if s is not None]
        self.data = concat_sets(parts, "train")
        groups, offset, prompted = [], 0, []
        for s in parts:
            g = getattr(s, "groups", None)
            if g is None and self._file_groups and hasattr(s, "paths"):
                got = [self._file_groups.get(str(p)) for p in s.paths]
                g = torch.tensor(got) if all(v is not None for v in got) else None
            if g is None:  # no prompts: every image its own group (two views of one image are the positives)
                g = torch.arange(len(s))
            else:
                prompted.append((s, g))
            groups.append(g + offset)
            offset = int(groups[-1].max()) + 1 if len(groups[-1]) else offset
        self.groups = torch.cat(groups)
        spec = ViewSpec.resolve(cfg.views, tuple(self.data.image_shape))
        self.view_spec = spec
        if o.batch_size % world:
            raise UserError(f"optim.batch_size {o.batch_size} does not split evenly over {world} processes; use a "
                            f"multiple of {world}")
        if self.method == "multipositive":
            for s, g in prompted:
                n_groups = int(g.unique().numel())
                if n_groups == len(g):
                    raise UserError(f"method multipositive needs several images per {cfg.ssl.group_by}, but "
                                    f"'{s.name}' has {len(g)} images and {n_groups} distinct {cfg.ssl.group_by}s "
                                    "(one each); generate several images per prompt, or use method: simclr")
            if not prompted:
                self._group_note = (f"no '{cfg.ssl.group_by}' metadata in the data: every image is its own group "
                                    "(two views of one image, as SimCLR)")
            k = cfg.ssl.group_size if prompted else 2
            if o.batch_size % k or o.batch_size // k < 2:
                raise UserError(f"optim.batch_size {o.batch_size} must be a multiple of ssl.group_size {k} holding "
                                f"at least 2 groups (positives and negatives); use a batch of at least {2 * k}")
            self.k = k
            _, inverse = self.groups.unique(return_inverse=True)
            self.groups = inverse
            self._build_group_table()
            self.sampler = CyclingSampler(self.n_groups, o.batch_size // k, cfg.seed, 0)
        else:
            if o.batch_size < 2:
                raise UserError(f"optim.batch_size {o.batch_size} is too small for {self.method}: each image needs at "
                                "least one other image in the batch as a negative; use 2 or more (SimCLR uses 256+)")
            if self.method == "moco_v2" and cfg.ssl.queue_size % o.batch_size:
                raise UserError(f"ssl.queue_size {cfg.ssl.queue_size} must be a multiple of optim.batch_size "
                                f"{o.batch_size} (whole batches of keys enter and leave the queue), e.g. "
                                f"{max(1, cfg.ssl.queue_size // o.batch_size) * o.batch_size}")
            self.sampler = CyclingSampler(len(self.data), o.batch_size, cfg.seed, 0)
        self.world = world

    def _build_group_table(self) -> None:
        order = torch.argsort(self.groups, stable=True)
        counts = torch.bincount(self.groups)
        self.n_groups = len(counts)
        width = int(counts.max())
        table = torch.full((self.n_groups, width), -1, dtype=torch.long)
        starts = torch.cumsum(counts, 0) - counts
        rank_in_group = torch.arange(len(order)) - starts[self.groups[order]]
        table[self.groups[order], rank_in_group] = order
        self.table, self.counts = table, counts

    def note(self) -> dict:
        return {"method": self.method, "temperature": self.t, "groups": self._group_note or None}

    def items(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(image index, group) of every item of the global batch at ``step``; a pure function of (seed, step)."""
        if self.method != "multipositive":
            idx = self.sampler.indices(step)
            n = len(idx)
            return idx.repeat(2), torch.arange(n).repeat(2)
        gids = self.sampler.indices(step)
        g = torch.Generator().manual_seed(mix_seed(self.cfg.seed, step, 0x6D70))
        members = self.table[gids]
        scores = torch.rand(members.shape, generator=g).masked_fill(members < 0, 2.0)
        perm = members.gather(1, scores.argsort(1))
        m = self.counts[gids]
        take = torch.arange(self.k)[None, :] % m[:, None]  # other images first; extra views when fewer than k
        idx = perm.gather(1, take)
        # The real group ids: when there are fewer groups than a batch holds (a class-conditional generator's
        # "prompt" is its class), a group filling two slots still has all its items as positives.
        return idx.reshape(-1), gids.repeat_interleave(self.k)

    def batch(self, step: int, rank: int, world: int) -> dict:
        """This process's items of the global batch, augmented; the group ids of the whole batch."""
        idx, groups = self.items(step)
        total = len(idx)
        if self.method == "moco_v2":
            # Queries and their keys stay on one process: images rank::world and both their views.
            n = total // 2
            mine = torch.arange(rank, n, world)
            pos = torch.cat([mine, mine + n])
        else:
            pos = torch.arange(rank, total, world)
        x, _ = self.data.batch(idx[pos])
        x = ssl_views(x, self.view_spec, mix_seed(self.cfg.seed, step, 0x5E1F), positions=pos, total=total)
        return {"x": x, "pos": pos, "groups": groups, "total": total}

    # -- loss --

    def loss(self, model: nn.Module, raw: SSLModule, batch: dict, accelerator: Any) -> torch.Tensor:
        x, pos = batch["x"], batch["pos"]
        if self.method == "moco_v2":
            half = len(x) // 2
            q = model(x[:half])
            raw.update_key_encoder(self.cfg.ssl.momentum)
            k = raw.keys(x[half:])
            q_all = _gather_ordered(q, pos[:half], batch["total"] // 2, accelerator, grad=True)
            k_all = _gather_ordered(k, pos[:half], batch["total"] // 2, accelerator, grad=False)
            self._pending_keys = k_all
            return moco_loss(q_all, k_all, raw.queue.keys, self.t)
        z = _gather_ordered(model(x, 2), pos, batch["total"], accelerator, grad=True)
        return multi_positive(z, batch["groups"].to(z.device), self.t)

    def after_step(self, raw: SSLModule) -> None:
        if self.method == "moco_v2":
            raw.queue.enqueue(self._pending_keys)
            self._pending_keys = None

    # -- monitor and export --

    def validate(self, raw: SSLModule, val: ImageSet, device: torch.device) -> tuple[float, float]:
        """kNN top-1 of the encoder's features on the validation split, the training images as reference."""
        if not len(val):
            return float("nan"), float("nan")
        ref = self.data
        n_ref = min(len(ref), self.cfg.ssl.knn_reference_max)
        if n_ref < len(ref):
            g = torch.Generator().manual_seed(self.cfg.seed)
            ref = ref.subset(torch.randperm(len(ref), generator=g)[:n_ref].sort().values)
        from synclone.models.knn import knn_logits

        enc = raw.encoder
        f_ref, y_ref = _features(enc, ref, device)
        f_val, y_val = _features(enc, val, device)
        logits = knn_logits(f_val, f_ref, y_ref, len(val.label_space), k=self.cfg.ssl.knn_k)
        return top1(logits, y_val), float("nan")

    def model_note(self, cfg: PretrainConfig, src: Any, step: int, val_acc: float) -> dict:
        """The ``training`` record of the model folder: a backbone without a trained head, and how it was made."""
        return {"backbone_only": True, "selected_by": "last", "step": step, "knn_val_acc": val_acc,
                "validation": src.val_desc, "data": cfg.data.model_dump(mode="json"), "seed": cfg.seed,
                "pretraining": {**self.note(), "ssl": cfg.ssl.model_dump(mode="json"),
                                "views": cfg.views.model_dump(mode="json")}}

    def export(self, raw: SSLModule) -> Classifier:
        """The encoder as a model folder's classifier; its head is zeros (it was never trained)."""
        enc = copy.deepcopy(raw.encoder).eval()
        head = enc.net.get_classifier() if hasattr(enc.net, "get_classifier") else None
        if isinstance(head, nn.Module):
            with torch.no_grad():
                for p in head.parameters():
                    p.zero_()
        return enc


def build_ssl_module(cfg: PretrainConfig, label_space: LabelSpace, input_size: tuple[int, ...]) -> SSLModule:
    """The encoder (fresh, or ``model.init``'s weights to continue from) wrapped with its heads."""
    if cfg.model.init:
        encoder = load_model(cfg.model.init, allow_backbone=True)
        if tuple(encoder.input_size) != tuple(input_size):
            raise UserError(f"model.init '{cfg.model.init}' takes images of {tuple(encoder.input_size)}, the data are "
                            f"{tuple(input_size)}")
    else:
        torch.manual_seed(mix_seed(cfg.seed, 0x1417))
        encoder = create_classifier(cfg.model.arch, label_space, input_size, cfg.model.mean, cfg.model.std,
                                    **cfg.model.arch_kwargs)
    torch.manual_seed(mix_seed(cfg.seed, 0x9A0))
    return SSLModule(encoder, cfg.ssl.proj_hidden, cfg.ssl.proj_dim,
                     moco_queue=cfg.ssl.queue_size if cfg.method == "moco_v2" else 0, seed=mix_seed(cfg.seed, 7),
                     proj_norm=cfg.ssl.proj_norm)


@torch.no_grad()
def _features(enc: Classifier, data: ImageSet, device: torch.device, batch_size: int = 512) -> tuple[torch.Tensor,
                                                                                                    torch.Tensor]:
    was = enc.training
    enc.eval()
    fs, ys = [], []
    for start in range(0, len(data), batch_size):
        x, y = data.batch(slice(start, start + batch_size))
        fs.append(enc.features(x.to(device)).float().cpu())
        ys.append(y)
    enc.train(was)
    return F.normalize(torch.cat(fs), dim=1), torch.cat(ys)


def _gather_ordered(z: torch.Tensor, pos: torch.Tensor, total: int, accelerator: Any, grad: bool) -> torch.Tensor:
    """The rows of every process in global-batch order; ``grad`` keeps the graph (torch.distributed.nn)."""
    if accelerator.num_processes == 1:
        return z  # a single process holds the whole batch in order
    if grad:
        import torch.distributed.nn.functional as dnn

        parts = dnn.all_gather(z.contiguous())
    else:
        parts = [torch.empty_like(z) for _ in range(accelerator.num_processes)]
        torch.distributed.all_gather(parts, z.contiguous())
    # Process r holds positions r, r + world, ... of the batch (by index in its own slice): interleave back.
    stacked = torch.stack(parts, 1)  # (n_local, world, ...)
    return stacked.reshape(total, *z.shape[1:])


def read_note(folder: str | Path) -> dict:
    """The pre-training record of a model folder (``{}`` when it has none)."""
    p = Path(folder) / "config.json"
    try:
        return json.loads(p.read_text(encoding="utf-8")).get("training", {}).get("pretraining", {})
    except (OSError, json.JSONDecodeError):
        return {}
