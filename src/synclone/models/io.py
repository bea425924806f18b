"""Model folders: ``model.safetensors`` + ``config.json``. Loading never unpickles anything."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from synclone.errors import UserError
from synclone.labels import LabelSpace
from synclone.models.backbones import Backbone, BackboneConfig, ImageEncoder, Preprocess, register_backbone_loader
from synclone.models.classifier import Classifier, create_classifier
from synclone.models.convert import state_mismatch
from synclone.models.feature_classifier import is_feature_classifier, load_feature_classifier
from synclone.util.files import atomic_path, write_text_atomic

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def save_model(model: Classifier, folder: str | Path, extra: dict | None = None) -> Path:
    """Write ``model`` to ``folder`` (created) as safetensors weights and a JSON config."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    cfg = model.config()
    if extra:
        cfg["training"] = extra
    write_text_atomic(folder / CONFIG, json.dumps(cfg, indent=2) + "\n")
    return folder


def read_model_config(folder: str | Path) -> dict:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"model folder '{folder}' does not exist")
    cfg_path = folder / CONFIG
    if not cfg_path.is_file() or not (folder / WEIGHTS).is_file():
        raise UserError(f"'{folder}' is not a synclone model folder: it needs {CONFIG} and {WEIGHTS}")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"'{cfg_path}' is not valid JSON: {err}") from None
    if not isinstance(cfg, dict):
        raise UserError(f"'{cfg_path}' must hold a JSON object (a synclone model config), not a "
                        f"{type(cfg).__name__}; re-save the model with synclone")
    for key in ("arch", "label_space", "input_size", "preprocessing"):
        if key not in cfg:
            raise UserError(f"'{cfg_path}' lacks the key '{key}'; re-save the model with synclone")
    size = cfg["input_size"]
    if (not isinstance(size, list) or len(size) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 65536 for v in size)):
        raise UserError(f"'{cfg_path}': 'input_size' must be [channels, height, width] (positive integers), "
                        f"got {json.dumps(size)[:60]}")
    for key, kind in (("arch", str), ("label_space", dict), ("preprocessing", dict), ("arch_kwargs", dict)):
        if key in cfg and not isinstance(cfg[key], kind):
            raise UserError(f"'{cfg_path}': '{key}' must be a JSON {'string' if kind is str else 'object'}, got "
                            f"{type(cfg[key]).__name__}")
    return cfg


def load_model(folder: str | Path, device: str | torch.device = "cpu", allow_backbone: bool = False) -> torch.nn.Module:
    """Load a model folder into an eval-mode module: pixels in [0, 1] in, logits out, normalisation inside.

    Supervised models come back as a :class:`Classifier`; CLIP classifier-tuning and linear-probe
    folders as a ``FeatureClassifier`` (frozen encoder + head), kNN folders as a ``KnnClassifier``. All carry
    ``label_space`` and ``input_size``. A pre-trained backbone without a trained head (self-supervised
    pre-training) loads only with ``allow_backbone`` (feature extraction, fine-tuning).
    """
    from synclone.models.knn import is_knn_classifier, load_knn_classifier

    if is_feature_classifier(folder):
        return load_feature_classifier(folder, device)
    if is_knn_classifier(folder):
        return load_knn_classifier(folder, device)
    cfg = read_model_config(folder)
    if cfg.get("training", {}).get("backbone_only") and not allow_backbone:
        raise UserError(f"'{folder}' is a pre-trained backbone without a trained classifier head: evaluate it "
                        "through a kNN classifier (synclone train --kind knn) or a linear probe (--kind linear-probe, "
                        "backbone kind synclone), or fine-tune it (model.init with model.init_head=new)")
    pre = cfg["preprocessing"]
    model = create_classifier(cfg["arch"], LabelSpace.from_dict(cfg["label_space"]), tuple(cfg["input_size"]),
                              pre.get("mean"), pre.get("std"), **cfg.get("arch_kwargs", {}))
    try:
        state = load_file(str(Path(folder) / WEIGHTS))
    except (SafetensorError, OSError) as err:
        raise UserError(f"cannot read '{Path(folder) / WEIGHTS}': {err}") from None
    problem = state_mismatch(model.state_dict(), state, "the config's architecture")
    if problem:
        raise UserError(f"weights in '{folder}' don't match its config (arch '{cfg['arch']}'): {problem}")
    model.load_state_dict(state)
    return model.to(device).eval()


def _synclone_backbone(cfg: BackboneConfig) -> Backbone:
    if cfg.pretrained:
        raise UserError("backbone.pretrained is not used with kind 'synclone': the weights come from the folder")
    model = load_model(cfg.name, allow_backbone=True)
    c, h, w = model.input_size
    # The classifier normalises inside, so preprocessing here is only the resize to its input size.
    pre = Preprocess(size=(h, w), mean=(0.0,) * c, std=(1.0,) * c, interpolation="bilinear", resize_mode="squash")
    with torch.no_grad():
        dim = int(model.features(torch.zeros(1, c, h, w)).shape[-1])
    encoder = ImageEncoder(model, lambda trunk, x: trunk.features(x), pre, dim, bool(cfg.normalize),
                           f"synclone:{cfg.name}")
    return Backbone(cfg, encoder, extra={"label_space": model.label_space.to_dict()})


register_backbone_loader("synclone", _synclone_backbone)
