"""Feature extractors for dataset diagnostics, and their outputs cached by (extractor, dataset fingerprint).

An extractor spec (``--features``) is one of:

- a synclone model folder, or ``model:FOLDER``: the classifier's pooled penultimate features, and its logits
  (which give the classifiability of the synthetic images). The offline default: train a classifier on the
  real data (``synclone train``) and pass its folder;
- ``clip``, ``clip:NAME``, ``clip:NAME@PRETRAINED`` (an open_clip tag or a checkpoint file) or ``clip:FOLDER``
  (open_clip's ``open_clip_config.json`` + weights): CLIP image embeddings; ``clip`` = ViT-B-32 @ openai;
- ``dinov2`` (timm's ``vit_small_patch14_dinov2.lvd142m``), ``timm:NAME`` or ``timm:NAME@CHECKPOINT``:
  a timm backbone's pooled features;
- ``pixels`` or ``pixels:SIZE``: grey pixels resized to SIZE x SIZE (default 16), a model-free baseline.

Weights a hub would provide must already be on disk (``HF_HUB_OFFLINE=1``); when they are not, the error names
the offline default. Features and logits are stored as ``<cache>/<extractor id>/<dataset fingerprint>.safetensors``;
the extractor id hashes the weights files and the preprocessing, so a run over data it has seen loads no model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from synclone.data.imageset import TensorImageSet
from synclone.errors import UserError
from synclone.labels import LabelSpace
from synclone.util.files import atomic_path, file_sha256

OFFLINE_DEFAULT = ("the offline default is --features MODEL_FOLDER, a synclone classifier trained on the real data "
                   "(its penultimate features; e.g. the 'real' model of a recipe run)")
DINOV2 = "vit_small_patch14_dinov2.lvd142m"
_LUMA = (0.299, 0.587, 0.114)


def _file_sha(path: Path) -> str:
    return file_sha256(path)[:16]


def _first_sentence(err: Exception) -> str:
    """The first sentence of an exception's message (library errors can run for paragraphs)."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text.split(". ")[0].rstrip(".")[:200]


def _spec_id(kind: str, spec: dict) -> str:
    return f"{kind}-{hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]}"


def _to_input(x: torch.Tensor, channels: int, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """A [0, 1] batch with ``channels`` channels at ``size`` (grey replicated; RGB -> luma; antialiased resize)."""
    c = x.shape[1]
    if c != channels:
        if c == 1:
            x = x.expand(-1, channels, -1, -1)
        elif c == 3 and channels == 1:
            x = (x * torch.tensor(_LUMA, dtype=x.dtype).view(1, 3, 1, 1)).sum(1, keepdim=True)
        else:
            raise UserError(f"images have {c} channels; the feature extractor takes {channels}")
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode=mode, antialias=True, align_corners=False).clamp_(0.0, 1.0)
    return x


class Extractor:
    """Pixels in [0, 1] -> features (and logits for a classifier), loading its model on first use only."""

    kind = "base"

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.model = None
        self.batches = 0  # forward passes run (a fully cached run runs none)

    @property
    def name(self) -> str:
        return self.spec

    def id(self) -> str:  # pragma: no cover - interface
        raise NotImplementedError

    def label_space(self) -> LabelSpace | None:
        """The classes of the extractor's logits, or None when it has none."""
        return None

    def load(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:  # pragma: no cover
        raise NotImplementedError

    def encode(self, data: TensorImageSet, batch_size: int = 256) -> dict[str, np.ndarray]:
        """``features`` (N, D) float32 and, for a classifier, ``logits`` (N, C) of every image of ``data``."""
        if self.model is None:
            self.load()
        feats, logits = [], []
        with torch.inference_mode():
            for i in range(0, len(data), batch_size):
                x, _ = data.batch(slice(i, i + batch_size))
                f, lg = self._forward(x)
                self.batches += 1
                feats.append(f.float().reshape(len(x), -1).numpy())
                if lg is not None:
                    logits.append(lg.float().numpy())
        out = {"features": np.concatenate(feats)}
        if logits:
            out["logits"] = np.concatenate(logits)
        return out


class ModelFolderExtractor(Extractor):
    """A synclone model folder: penultimate (pre-logit) features and logits in one pass."""

    kind = "model"

    def __init__(self, spec: str, folder: Path) -> None:
        super().__init__(spec)
        from synclone.models.io import CONFIG, WEIGHTS

        self.folder = folder
        if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
            raise UserError(f"'{folder}' is not a synclone model folder (needs {CONFIG} and {WEIGHTS}); "
                            f"{OFFLINE_DEFAULT}")
        try:
            self.config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"cannot read '{folder / CONFIG}': {err}") from None
        self.files = [folder / CONFIG, folder / WEIGHTS]

    @property
    def name(self) -> str:
        p = self.folder
        return f"model:{p.parent.name if p.name in ('model', 'model_last') else p.name}"

    def id(self) -> str:
        return _spec_id("model", {"files": [_file_sha(f) for f in self.files], "resize": "bilinear-aa"})

    def label_space(self) -> LabelSpace | None:
        space = self.config.get("label_space")
        return LabelSpace.from_dict(space) if isinstance(space, dict) else None

    def load(self) -> None:
        from synclone.models import load_model

        self.model = load_model(self.folder)
        c, h, w = (int(v) for v in self.model.input_size)
        self.input = (c, (h, w))

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        m = self.model
        x = _to_input(x, self.input[0], self.input[1])
        if hasattr(m, "net") and hasattr(m.net, "forward_head"):  # Classifier: one trunk pass for both outputs
            fmap = m.net.forward_features(m.normalize(x))
            return m.net.forward_head(fmap, pre_logits=True), m.net.forward_head(fmap)
        if hasattr(m, "encoder") and hasattr(m, "head"):  # frozen encoder + linear head
            f = m.encoder(x)
            return f, m.head(f)
        return m.features(x), m(x)


def _load_backbone(spec: str, **cfg) -> torch.nn.Module:
    """The project's frozen encoder (:mod:`synclone.models.backbones`: its preprocessing, raw embeddings); weights
    that are not on this machine end as one line that names the offline default."""
    from synclone.models.backbones import BackboneConfig, load_backbone

    try:
        return load_backbone(BackboneConfig(normalize=False, **cfg)).encoder
    except Exception as err:  # noqa: BLE001 - hub and file errors of several libraries mean "weights not here"
        raise UserError(f"cannot load the weights for --features {spec} ({_first_sentence(err)}); "
                        f"{OFFLINE_DEFAULT}") from None


class OpenClipExtractor(Extractor):
    """CLIP image embeddings (not normalised) through open_clip."""

    kind = "clip"

    def __init__(self, spec: str, rest: str) -> None:
        super().__init__(spec)
        name, _, pretrained = (rest or "ViT-B-32").partition("@")
        self.local = Path(name) if Path(name).is_dir() else None
        if self.local is not None and not (self.local / "open_clip_config.json").is_file():
            raise UserError(f"'{name}' is not an open_clip model folder (needs open_clip_config.json and weights)")
        self.model_name = f"local-dir:{self.local.resolve()}" if self.local else name
        self.pretrained = None if self.local else (pretrained or ("openai" if name == "ViT-B-32" else None))

    def id(self) -> str:
        spec: dict = {"model": self.model_name, "pretrained": self.pretrained}
        if self.local is not None:
            spec["files"] = [_file_sha(p) for p in sorted(self.local.iterdir()) if p.is_file()]
            spec["model"] = None  # a moved folder keeps its cache
        elif self.pretrained and Path(self.pretrained).is_file():
            spec["pretrained"] = _file_sha(Path(self.pretrained))
        return _spec_id("clip", spec)

    def load(self) -> None:
        self.model = _load_backbone(self.spec, kind="open_clip", name=self.model_name, pretrained=self.pretrained)

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.model(x), None


class TimmExtractor(Extractor):
    """A timm backbone's pooled features, with timm's pretrained weights (local cache) or a checkpoint file."""

    kind = "timm"

    def __init__(self, spec: str, rest: str) -> None:
        super().__init__(spec)
        self.arch, _, self.checkpoint = rest.partition("@")
        if not self.arch:
            raise UserError(f"--features {spec}: name a timm model, e.g. timm:resnet18 or timm:resnet18@weights.pth")

    def id(self) -> str:
        ckpt = self.checkpoint
        return _spec_id("timm", {"arch": self.arch,
                                 "weights": _file_sha(Path(ckpt)) if ckpt and Path(ckpt).is_file() else ckpt})

    def load(self) -> None:
        self.model = _load_backbone(self.spec, kind="timm", name=self.arch, pretrained=self.checkpoint or "default")

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.model(x), None


class PixelExtractor(Extractor):
    """Grey pixels at SIZE x SIZE as features: no model, a floor to compare learnt features against."""

    kind = "pixels"

    def __init__(self, spec: str, rest: str) -> None:
        super().__init__(spec)
        try:
            self.size = int(rest or 16)
        except ValueError:
            raise UserError(f"--features {spec}: give the side in pixels, e.g. pixels:32") from None
        if not 1 <= self.size <= 256:
            raise UserError(f"--features {spec}: the side must be 1..256 pixels")

    def id(self) -> str:
        return _spec_id("pixels", {"size": self.size})

    def load(self) -> None:
        self.model = "pixels"

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return _to_input(x, 1, (self.size, self.size)).flatten(1), None


def create_extractor(spec: str | None) -> Extractor:
    """The extractor for a ``--features`` spec (see the module docstring); bad specs raise :class:`UserError`."""
    if not spec:
        raise UserError(f"no feature extractor given: {OFFLINE_DEFAULT}; or clip / dinov2 when their weights are "
                        "on disk, or pixels")
    kind, sep, rest = spec.partition(":")
    if spec == "clip" or (sep and kind == "clip"):
        return OpenClipExtractor(spec, rest)
    if spec == "dinov2":
        return TimmExtractor(spec, DINOV2)
    if sep and kind == "timm":
        return TimmExtractor(spec, rest)
    if spec == "pixels" or (sep and kind == "pixels"):
        return PixelExtractor(spec, rest)
    path = Path(rest if sep and kind == "model" else spec)
    if path.is_dir():
        if (path / "open_clip_config.json").is_file():
            return OpenClipExtractor(spec, str(path))
        return ModelFolderExtractor(spec, path)
    raise UserError(f"--features '{spec}' is neither an existing model folder nor one of clip[:NAME[@PRETRAINED]], "
                    f"dinov2, timm:NAME[@CHECKPOINT], pixels[:SIZE]; {OFFLINE_DEFAULT}")


class FeatureCache:
    """``<root>/<extractor id>/<dataset fingerprint>.safetensors``: features (and logits) of one dataset."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    def get(self, extractor: Extractor, data: TensorImageSet, batch_size: int = 256) -> dict[str, np.ndarray]:
        """The cached arrays of ``data`` under ``extractor``, computing and storing them on a miss."""
        path = self.root / extractor.id() / f"{data.fingerprint()}.safetensors"
        if path.is_file():
            try:
                arrays = load_file(str(path))
                if len(arrays.get("features", ())) == len(data):
                    self.hits += 1
                    return arrays
            except (SafetensorError, OSError):
                pass  # a damaged file is recomputed
        self.misses += 1
        arrays = extractor.encode(data, batch_size)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()}, str(tmp),
                          metadata={"extractor": extractor.name, "dataset": data.name})
        except OSError as err:
            raise UserError(f"cannot write the feature cache '{path.parent}' ({err.strerror}); "
                            "set --cache-dir to a writable folder") from None
        return arrays
