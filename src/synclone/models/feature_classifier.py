"""Feature classifiers: a frozen encoder and a linear head, saved as a model folder that names its encoder.

Written by classifier tuning and linear probes (:mod:`synclone.train.probe`); :func:`load_feature_classifier`
turns the folder back into a module that maps pixels in [0, 1] to logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from synclone.errors import UserError
from synclone.labels import LabelSpace
from synclone.models.backbones import BackboneConfig, ImageEncoder, load_backbone
from synclone.util.files import atomic_path, write_text_atomic

FORMAT = "synclone-feature-classifier/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class LinearHead(nn.Module):
    """The chosen head: ``scale * x @ W.T + b``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, scale: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().float().clone(), requires_grad=False)
        self.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.register_buffer("scale", torch.tensor(float(scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x, self.weight.T, alpha=float(self.scale))


# --- the model folder ---------------------------------------------------------------------------------


def _portable_backbone(cfg: BackboneConfig) -> dict:
    """The backbone reference with local paths made absolute, so the folder loads from any working directory."""
    d = cfg.model_dump(mode="json")
    name = d["name"]
    if name.startswith("local-dir:"):
        d["name"] = "local-dir:" + str(Path(name[len("local-dir:"):]).resolve())
    elif cfg.kind in ("hf_clip", "synclone") or name.endswith(".json"):
        d["name"] = str(Path(name).resolve())
    if d.get("pretrained") and Path(d["pretrained"]).is_file():
        d["pretrained"] = str(Path(d["pretrained"]).resolve())
    return d


def save_feature_classifier(folder: Path, encoder: ImageEncoder, backbone_cfg: BackboneConfig, head: LinearHead,
                            label_space: LabelSpace, input_size: tuple[int, ...], training: dict | None = None) -> Path:
    """Write the head (safetensors) and a config that names the frozen encoder instead of copying it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {"head.weight": head.weight.detach().contiguous(), "head.bias": head.bias.detach().contiguous(),
             "head.scale": head.scale.detach().reshape(1).contiguous()}
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    pre = encoder.preprocess.to_dict()
    cfg = {
        "format": FORMAT,
        "arch": f"feature_classifier:{backbone_cfg.kind}",
        "backbone": _portable_backbone(backbone_cfg),
        "backbone_weights_hash": encoder.weights_hash(),
        "feature_dim": encoder.feature_dim,
        "feature_normalize": encoder.normalize,
        "num_classes": len(label_space),
        # What callers feed: images shaped like the training data; the encoder resizes to its own size inside.
        "input_size": list(input_size),
        "encoder_input_size": list(encoder.input_size),
        "label_space": label_space.to_dict(),
        "preprocessing": {**pre, "note": "inputs are pixels in [0, 1]; the model converts channels, resizes and "
                                         "normalises inside"},
    }
    if training:
        cfg["training"] = training
    write_text_atomic(folder / CONFIG, json.dumps(cfg, indent=2) + "\n")
    return folder


class FeatureClassifier(nn.Module):
    """A frozen encoder and a linear head: pixels in [0, 1] -> logits, normalisation inside."""

    def __init__(self, encoder: ImageEncoder, head: LinearHead, label_space: LabelSpace,
                 input_size: tuple[int, ...]) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.label_space = label_space
        self.input_size = tuple(int(v) for v in input_size)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def is_feature_classifier(folder: str | Path) -> bool:
    """True when ``folder`` holds a model written by :func:`save_feature_classifier`."""
    p = Path(folder) / CONFIG
    if not p.is_file():
        return False
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
        return isinstance(cfg, dict) and cfg.get("format") == FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def load_feature_classifier(folder: str | Path, device: str | torch.device = "cpu",
                            check_weights: bool = True) -> FeatureClassifier:
    """Rebuild a classifier-tuning / linear-probe model folder into an eval-mode :class:`FeatureClassifier`.

    With ``check_weights`` the encoder's weights must hash to the value recorded at training time, so a
    checkpoint replaced since then is an error rather than a silently different model.
    """
    folder = Path(folder)
    if not is_feature_classifier(folder) or not (folder / WEIGHTS).is_file():
        raise UserError(f"'{folder}' is not a feature-classifier folder (needs {CONFIG} with format '{FORMAT}' "
                        f"and {WEIGHTS})")
    cfg = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    try:
        bb_cfg = BackboneConfig.model_validate(cfg["backbone"])
    except Exception as err:  # pydantic's ValidationError: the config was edited by hand
        raise UserError(f"'{folder / CONFIG}': bad backbone entry: {err}") from None
    backbone = load_backbone(bb_cfg, device)
    if check_weights and backbone.encoder.weights_hash() != cfg.get("backbone_weights_hash"):
        raise UserError(f"the backbone '{bb_cfg.name}' no longer has the weights the head in '{folder}' was trained "
                        "on (weights hash differs); restore them or retrain the head")
    try:
        state = load_file(str(folder / WEIGHTS))
    except (SafetensorError, OSError) as err:
        raise UserError(f"cannot read '{folder / WEIGHTS}': {err}") from None
    w = state.get("head.weight")
    if w is None or tuple(w.shape) != (int(cfg["num_classes"]), backbone.encoder.feature_dim):
        raise UserError(f"'{folder / WEIGHTS}': head shape {None if w is None else tuple(w.shape)} does not match "
                        f"{cfg['num_classes']} classes x {backbone.encoder.feature_dim} features")
    head = LinearHead(w, state["head.bias"], float(state["head.scale"].reshape(-1)[0]))
    model = FeatureClassifier(backbone.encoder, head, LabelSpace.from_dict(cfg["label_space"]),
                              tuple(cfg["input_size"]))
    return model.to(device).eval()
