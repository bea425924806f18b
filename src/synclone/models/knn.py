"""The kNN classifier as a model: a frozen encoder plus a labelled reference set of its features.

``knn_logits`` is the weighted vote of Wu et al. (2018) as DINO uses it: the k most cosine-similar
reference features vote for their labels with weight ``exp(s / T)``; the class scores, normalised to
sum to one, are returned as log-probabilities so the rest of synclone (top-1, calibration, OOD scores)
treats a kNN classifier like any model. The folder is written by :mod:`synclone.train.knn`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from synclone.errors import UserError
from synclone.labels import LabelSpace

FORMAT = "synclone-knn-classifier/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def knn_logits(queries: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor, n_classes: int, k: int = 20,
               temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Log of the normalised weighted vote of the ``k`` nearest (cosine) reference features for each query."""
    reference = F.normalize(reference.float(), dim=1)
    k = min(k, len(reference))
    out = []
    for start in range(0, len(queries), chunk):
        q = F.normalize(queries[start:start + chunk].float(), dim=1)
        sims, idx = (q @ reference.T).topk(k, dim=1)
        w = (sims / temperature).exp()
        votes = torch.zeros(len(q), n_classes, dtype=w.dtype).scatter_add_(1, labels[idx].long(), w)
        out.append((votes / votes.sum(1, keepdim=True)).clamp_min(1e-12).log())
    return torch.cat(out) if out else torch.empty(0, n_classes)


class KnnClassifier(nn.Module):
    """A frozen encoder and a labelled reference set: pixels in [0, 1] -> kNN log-probabilities."""

    def __init__(self, encoder: nn.Module, reference: torch.Tensor, labels: torch.Tensor, label_space: LabelSpace,
                 input_size: tuple[int, ...], k: int, temperature: float) -> None:
        super().__init__()
        self.encoder = encoder
        self.register_buffer("reference", F.normalize(reference.float(), dim=1))
        self.register_buffer("ref_labels", labels.long())
        self.label_space = label_space
        self.input_size = tuple(int(v) for v in input_size)
        self.k, self.temperature = int(k), float(temperature)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return knn_logits(self.encoder(x), self.reference, self.ref_labels, len(self.label_space), self.k,
                          self.temperature).to(x.device)


def is_knn_classifier(folder: str | Path) -> bool:
    p = Path(folder) / CONFIG
    try:
        cfg = json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None
        return isinstance(cfg, dict) and cfg.get("format") == FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def load_knn_classifier(folder: str | Path, device: str | torch.device = "cpu") -> KnnClassifier:
    """Rebuild a kNN model folder; the backbone must still have the weights the reference was encoded with."""
    from synclone.models.backbones import BackboneConfig, load_backbone

    folder = Path(folder)
    cfg = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    backbone = load_backbone(BackboneConfig.model_validate(cfg["backbone"]), device)
    if backbone.encoder.weights_hash() != cfg.get("backbone_weights_hash"):
        raise UserError(f"the backbone '{cfg['backbone']['name']}' no longer has the weights the reference set in "
                        f"'{folder}' was encoded with; restore them or rebuild the kNN classifier")
    try:
        state = load_file(str(folder / WEIGHTS))
    except (SafetensorError, OSError) as err:
        raise UserError(f"cannot read '{folder / WEIGHTS}': {err}") from None
    knn = cfg.get("knn", {})
    model = KnnClassifier(backbone.encoder, state["reference"], state["labels"],
                          LabelSpace.from_dict(cfg["label_space"]), tuple(cfg["input_size"]), knn.get("k", 20),
                          knn.get("temperature", 0.07))
    return model.to(device).eval()
