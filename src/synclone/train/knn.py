"""kNN classification over a frozen encoder: the cheap transfer measure of self-supervised learning.

The vote (:func:`synclone.models.knn.knn_logits`) is Wu et al.'s (2018) as DINO uses it.

``knn_classifier(cfg)`` (``synclone train --kind knn``) encodes a labelled reference set with any
backbone (``BackboneConfig``, e.g. ``kind: synclone`` for a pre-trained model folder), caches the
features like the linear probe, reports validation and test top-1, and writes a model folder holding
the reference features and labels (safetensors) and the backbone reference: ``load_model`` turns it
into a module from pixels in [0, 1] to logits, so ``synclone evaluate`` runs every probe on it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pydantic import Field
from safetensors.torch import save_file

from synclone.config import StrictModel, write_run_info
from synclone.labels import LabelSpace
from synclone.models.feature_classifier import _portable_backbone
from synclone.models.knn import CONFIG, FORMAT, WEIGHTS, knn_logits
from synclone.train.probe import _datasets, _ProbeConfig
from synclone.util.accuracy import top1


class KnnSettings(StrictModel):
    k: int = Field(20, ge=1)
    temperature: float = Field(0.07, gt=0)


class KnnConfig(_ProbeConfig):
    """A kNN classifier over a frozen backbone; the data section is the linear probe's (train = reference)."""

    knn: KnnSettings = Field(default_factory=KnnSettings)


def knn_classifier(cfg: KnnConfig, train: Any = None, val: Any = None, test: Any = None) -> Path:
    """Encode the reference (training) set, score validation and test, write the model folder; returns it."""
    from synclone.models.backbones import load_backbone
    from synclone.train.features import cached_features, default_feature_cache
    t0 = time.perf_counter()
    backbone = load_backbone(cfg.backbone, cfg.device)
    train, val, test, val_name, _, unreadable = _datasets(cfg, train, val, test)
    space: LabelSpace = train.label_space
    cache_dir = default_feature_cache() if cfg.cache_dir == "auto" else cfg.cache_dir

    def feats(ds: Any) -> Any:  # cached, and checked finite there
        return cached_features(backbone.encoder, ds, cache_dir, cfg.encode_batch_size, cfg.device)

    f_train, f_val = feats(train), feats(val)
    metrics: dict[str, Any] = {"mode": "knn", "k": cfg.knn.k, "temperature": cfg.knn.temperature,
                               "n_reference": len(f_train.labels), "selected_on": val_name,
                               "skipped_images": len(unreadable)}

    def knn_top1(fs: Any) -> float:
        logits = knn_logits(fs.features, f_train.features, f_train.labels, len(space), cfg.knn.k, cfg.knn.temperature)
        return top1(logits, fs.labels)

    metrics["val_top1"] = knn_top1(f_val)
    if test is not None:
        f_test = feats(test)
        metrics["test_top1"], metrics["n_test"], metrics["test_dataset"] = knn_top1(f_test), len(f_test.labels), \
            f_test.dataset
    metrics["seconds"] = time.perf_counter() - t0
    folder = Path(cfg.output)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (WEIGHTS + ".tmp")
    save_file({"reference": f_train.features.contiguous(), "labels": f_train.labels.contiguous()}, str(tmp),
              metadata={"format": "pt"})
    tmp.replace(folder / WEIGHTS)
    enc = backbone.encoder
    config = {"format": FORMAT, "arch": f"knn:{cfg.backbone.kind}", "backbone": _portable_backbone(cfg.backbone),
              "backbone_weights_hash": enc.weights_hash(), "feature_dim": enc.feature_dim,
              "num_classes": len(space), "input_size": list(train.image_shape), "label_space": space.to_dict(),
              "knn": cfg.knn.model_dump(mode="json"),
              "preprocessing": {**enc.preprocess.to_dict(), "note": "inputs are pixels in [0, 1]; the model converts "
                                                                   "channels, resizes and normalises inside"},
              "training": {"mode": "knn", "metrics": metrics, "reference_dataset": f_train.dataset}}
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (folder / "results.json").write_text(json.dumps({"metrics": metrics}, indent=2) + "\n", encoding="utf-8")
    write_run_info(folder, cfg, command="synclone.train.knn.knn_classifier")
    return folder


