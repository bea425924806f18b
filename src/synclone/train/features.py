"""Frozen image encoders behind one interface, and their features computed once and cached on disk.

Classifier tuning and linear probes train only a linear head, so the encoder's output for a given
image never changes: encoding it every epoch (as He et al.'s classifier-tuning code does) repeats the
expensive part for nothing. Here every backbone becomes an :class:`ImageEncoder` that takes pixels in
[0, 1] and does its own preprocessing on whole batches, and :func:`cached_features` stores its output
in a safetensors file keyed by (encoder weights + preprocessing, dataset fingerprint).

Backbones (``BackboneConfig.kind``):

- ``open_clip``: a built-in model name with a pretrained tag or a checkpoint file, ``local-dir:PATH``
  (open_clip's own folder format: ``open_clip_config.json`` + weights), or the path of a model-config
  JSON file with ``pretrained`` naming a local checkpoint.
- ``hf_clip``: a transformers ``CLIPModel`` folder (``save_pretrained`` layout).
- ``synclone``: a synclone model folder; features are the classifier's pooled pre-logit features.
- ``timm``: a timm model name, randomly initialised, or with weights from a local checkpoint file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from synclone.errors import UserError
from synclone.models.backbones import CACHE_FORMAT, ImageEncoder
from synclone.util.files import atomic_path

# --- encoding and the on-disk cache ---------------------------------------------------------------------


@dataclass
class FeatureSet:
    """Features (N, D) float32 and labels (N,) of one dataset under one encoder."""

    features: torch.Tensor
    labels: torch.Tensor
    dataset: str
    cache_hit: bool
    path: Path | None = None


def encode_dataset(encoder: ImageEncoder, dataset: Any, batch_size: int = 64,
                   device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``encoder`` over ``dataset`` in order; returns (features, labels)."""
    feats, labels = [], []
    n = len(dataset)
    with torch.inference_mode():
        if hasattr(dataset, "batch"):
            for start in range(0, n, batch_size):
                x, y = dataset.batch(slice(start, min(start + batch_size, n)))
                feats.append(encoder(x.to(device)).cpu())
                labels.append(y.cpu())
        else:
            loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
            for x, y in loader:
                feats.append(encoder(x.to(device)).cpu())
                labels.append(torch.as_tensor(y).cpu())
    if not feats:
        raise UserError(f"dataset '{getattr(dataset, 'name', '?')}' is empty: nothing to encode")
    return torch.cat(feats).float().contiguous(), torch.cat(labels).long().contiguous()


def default_feature_cache() -> Path:
    """``$XDG_CACHE_HOME/synclone/features`` (``~/.cache/synclone/features`` by default)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "synclone" / "features"


def cache_path(cache_dir: str | Path, encoder: ImageEncoder, dataset: Any) -> Path:
    """``<cache>/<encoder key>/<dataset fingerprint>.safetensors``."""
    return Path(cache_dir) / encoder.cache_key() / f"{dataset.fingerprint()}.safetensors"


def cached_features(encoder: ImageEncoder, dataset: Any, cache_dir: str | Path | None, batch_size: int = 64,
                    device: str | torch.device = "cpu") -> FeatureSet:
    """Features of ``dataset``: read from the cache when present, else encoded once and written there.

    ``cache_dir=None`` disables the cache. A cached file whose labels or size disagree with the dataset
    is treated as stale and rewritten rather than trusted. Non-finite features end the run in one line
    (:func:`check_finite`) and are never written to the cache.
    """
    name = getattr(dataset, "name", "dataset")
    if cache_dir is None:
        feats, labels = encode_dataset(encoder, dataset, batch_size, device)
        return check_finite(FeatureSet(feats, labels, name, cache_hit=False))
    path = cache_path(cache_dir, encoder, dataset)
    if path.is_file():
        try:
            data = load_file(str(path))
            feats, labels = data["features"], data["labels"]
            if len(labels) == len(dataset) and feats.shape == (len(dataset), encoder.feature_dim) and (
                    not hasattr(dataset, "labels") or torch.equal(labels, dataset.labels.long())):
                return check_finite(FeatureSet(feats, labels, name, cache_hit=True, path=path))
        except (SafetensorError, OSError, KeyError):
            pass  # unreadable or partial: fall through and rebuild it
    feats, labels = encode_dataset(encoder, dataset, batch_size, device)
    check_finite(FeatureSet(feats, labels, name, cache_hit=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": CACHE_FORMAT, "encoder": encoder.description, "dataset": str(name), "n": str(len(labels)),
            "dim": str(feats.shape[1]), "preprocess": json.dumps(encoder.preprocess.to_dict())}
    with atomic_path(path) as tmp:  # a reader never sees half a file
        save_file({"features": feats, "labels": labels}, str(tmp), metadata=meta)
    return FeatureSet(feats, labels, name, cache_hit=False, path=path)


def check_finite(fs: FeatureSet) -> FeatureSet:
    """``fs`` itself when every feature is finite; one line naming the dataset otherwise."""
    if not torch.isfinite(fs.features).all():
        bad = int((~torch.isfinite(fs.features)).any(dim=1).sum())
        raise UserError(f"the encoder gave non-finite features for {bad} images of '{fs.dataset}'; "
                        "check the backbone weights")
    return fs

