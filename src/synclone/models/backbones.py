"""Frozen image encoders behind one interface: open_clip, Hugging Face CLIP, timm and synclone model folders.

:func:`load_backbone` turns a :class:`BackboneConfig` into an :class:`ImageEncoder` that takes pixels in [0, 1]
and does its own resize and normalisation (:class:`Preprocess`), so feature caches, linear probes and
classifier tuning treat every family alike.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.v2 import functional as TF

from synclone.config import StrictModel
from synclone.errors import UserError
from synclone.util.checkpoints import check_checkpoint_file

# Part of every encoder's cache key: bump it when the meaning of cached features changes.
CACHE_FORMAT = "synclone-features/1"
# PIL's "L" conversion weights (ITU-R 601-2 luma), used when a grey-scale encoder meets RGB images.
_LUMA = (0.299, 0.587, 0.114)


class BackboneConfig(StrictModel):
    """Which frozen encoder to use. ``name`` means a model name, a folder or a config file by ``kind``."""

    kind: Literal["open_clip", "hf_clip", "synclone", "timm"] = "open_clip"
    name: str
    # open_clip: a pretrained tag or a checkpoint file; timm: a checkpoint file, or "default" for timm's own
    # pretrained weights (downloads, so only for users with internet); None = random initialisation.
    pretrained: str | None = None
    # Seeds random initialisation, so a backbone without weights gives the same features every time.
    seed: int = 0
    # L2-normalise features; None = yes for CLIP (cosine similarity is what its heads expect), no otherwise.
    normalize: bool | None = None
    # open_clip with a checkpoint file: was it trained with QuickGELU? None = read it from the checkpoint's
    # metadata, and refuse when it records nothing (synclone.models.convert.open_clip_variant).
    quick_gelu: bool | None = None
    # timm with a checkpoint file of another layout (SynCLR, MoCo v3, MAE, DINOv2 ...): its converter and how keys
    # are matched (synclone.models.convert).
    convert: str = "auto"
    key_map: str = "auto"


# --- preprocessing on batches --------------------------------------------------------------------------


@dataclass(frozen=True)
class Preprocess:
    """Resize + crop + normalise done on a (N, C, H, W) batch in [0, 1], like the model's own PIL transform."""

    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    resize_mode: Literal["shortest", "longest", "squash"] = "shortest"
    fill: float = 0.0
    # timm's eval transform: resize the shorter side to size / crop_pct, then centre-crop to size.
    crop_pct: float = 1.0

    @property
    def channels(self) -> int:
        return len(self.mean)

    def to_dict(self) -> dict[str, Any]:
        return {"size": list(self.size), "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation, "resize_mode": self.resize_mode, "fill": self.fill,
                "crop_pct": self.crop_pct, "range": [0.0, 1.0]}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = _match_channels(x, self.channels)
        h, w = x.shape[-2:]
        th, tw = self.size
        if (h, w) != (th, tw) or self.crop_pct != 1.0:
            mode = _INTERPOLATION.get(self.interpolation)
            if mode is None:
                raise UserError(f"unknown interpolation '{self.interpolation}': use one of {sorted(_INTERPOLATION)}")
            if self.resize_mode == "squash":
                x = TF.resize(x, [th, tw], interpolation=mode, antialias=True)
            elif self.resize_mode == "shortest":
                # torchvision's Resize(int) semantics: the shorter side becomes the target, then a centre crop.
                short = math.floor(max(th, tw) / self.crop_pct)
                x = TF.resize(x, [short], interpolation=mode, antialias=True)
                x = TF.center_crop(x, [th, tw])
            else:  # longest: fit inside, pad the rest with the fill colour (open_clip's ResizeKeepRatio + pad)
                scale = min(th / h, tw / w)
                nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
                x = TF.resize(x, [nh, nw], interpolation=mode, antialias=True)
                top, left = (th - nh) // 2, (tw - nw) // 2
                x = F.pad(x, (left, tw - nw - left, top, th - nh - top), value=self.fill)
            # Bicubic overshoots; PIL clamps to the 0..255 range, so clamp too to match the PIL pipeline.
            x = x.clamp_(0.0, 1.0)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std


_INTERPOLATION = {
    "bicubic": TF.InterpolationMode.BICUBIC,
    "bilinear": TF.InterpolationMode.BILINEAR,
    "nearest": TF.InterpolationMode.NEAREST,
}


def _match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    if x.ndim != 4:
        raise UserError(f"images must be a (N, C, H, W) batch, got shape {tuple(x.shape)}")
    c = x.shape[1]
    if c == channels:
        return x
    if c == 1:
        return x.expand(-1, channels, -1, -1)
    if c == 3 and channels == 1:
        w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x * w).sum(dim=1, keepdim=True)
    raise UserError(f"images have {c} channels but the encoder takes {channels}; convert them first")


# --- encoders ----------------------------------------------------------------------------------------


class ImageEncoder(nn.Module):
    """Pixels in [0, 1] (any size, 1 or 3 channels) -> features (N, D), preprocessing inside.

    ``trunk`` holds the weights that matter (their hash keys the cache); ``embed(trunk, x)`` maps a
    preprocessed batch to features.
    """

    def __init__(self, trunk: nn.Module, embed: Callable[[nn.Module, torch.Tensor], torch.Tensor],
                 preprocess: Preprocess, feature_dim: int, normalize: bool, description: str) -> None:
        super().__init__()
        self.trunk = trunk.eval().requires_grad_(False)
        self._embed = embed
        self.preprocess = preprocess
        self.feature_dim = int(feature_dim)
        self.normalize = bool(normalize)
        self.description = description
        self._hash: str | None = None

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (self.preprocess.channels, *self.preprocess.size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._embed(self.trunk, self.preprocess(x))
        out = out.float()
        return F.normalize(out, dim=-1) if self.normalize else out

    def train(self, mode: bool = True) -> ImageEncoder:
        # Frozen means frozen: BatchNorm statistics and dropout stay in eval mode whatever the caller does.
        super().train(False)
        return self

    def weights_hash(self) -> str:
        """Hash of the trunk's weights (names, shapes, dtypes, bytes): two encoders agree iff their weights do."""
        if self._hash is None:
            h = hashlib.blake2b(digest_size=16)
            for name, t in sorted(self.trunk.state_dict().items()):
                t = t.detach().cpu().contiguous().reshape(-1)
                h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            self._hash = h.hexdigest()
        return self._hash

    def cache_key(self) -> str:
        """Weights + preprocessing + output normalisation: what decides the features of an image."""
        spec = {"weights": self.weights_hash(), "pre": self.preprocess.to_dict(), "normalize": self.normalize,
                "format": CACHE_FORMAT}
        if getattr(self, "variant", ""):  # same weights, other function (QuickGELU): other features
            spec["variant"] = self.variant
        spec = json.dumps(spec, sort_keys=True)
        return hashlib.sha1(spec.encode()).hexdigest()[:20]


@dataclass
class Backbone:
    """A loaded backbone: the image encoder, plus the CLIP model and tokenizer when it has a text tower."""

    config: BackboneConfig
    encoder: ImageEncoder
    clip_model: nn.Module | None = None
    tokenizer: Any = None
    logit_scale: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def is_clip(self) -> bool:
        return self.clip_model is not None


# kind -> loader. The "synclone" kind (a synclone model folder as the encoder) is registered by
# :mod:`synclone.models.io`, which sits above this module because it also loads feature classifiers.
_LOADERS: dict[str, Callable[[BackboneConfig], Backbone]] = {}


def register_backbone_loader(kind: str, loader: Callable[[BackboneConfig], Backbone]) -> None:
    """Make ``load_backbone`` build backbones of ``kind`` with ``loader``."""
    _LOADERS[kind] = loader


def load_backbone(cfg: BackboneConfig, device: str | torch.device = "cpu") -> Backbone:
    """Build the frozen encoder ``cfg`` names (never downloads unless the user asked for hub weights)."""
    if cfg.kind not in _LOADERS:
        raise UserError(f"backbone kind '{cfg.kind}' has no loader; import synclone.models to register them all")
    # Random initialisation must not depend on what ran before in the process.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        bb = _LOADERS[cfg.kind](cfg)
    bb.encoder.to(device)
    if bb.clip_model is not None:
        bb.clip_model.to(device).eval().requires_grad_(False)
    return bb


def _load_open_clip(cfg: BackboneConfig) -> Backbone:
    import open_clip

    name, pretrained = cfg.name, cfg.pretrained
    tokenizer_name = name
    if name.startswith("local-dir:"):
        folder = Path(name[len("local-dir:"):])
        if not (folder / "open_clip_config.json").is_file():
            raise UserError(f"'{folder}' is not an open_clip model folder: it needs open_clip_config.json "
                            "(with 'model_cfg') and a weights file")
        if pretrained:
            raise UserError("backbone.pretrained is ignored with 'local-dir:': the weights come from the folder; "
                            "remove backbone.pretrained")
        for f in sorted(folder.iterdir()):  # open_clip loads a folder's pickled weights with torch.load
            if f.suffix in (".bin", ".pth", ".pt"):
                check_checkpoint_file(f)
    elif name.endswith(".json"):
        path = Path(name)
        if not path.is_file():
            raise UserError(f"open_clip model config '{path}' does not exist")
        data = json.loads(path.read_text(encoding="utf-8"))
        model_cfg = data.get("model_cfg", data)
        if not all(k in model_cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
            raise UserError(f"'{path}' is not an open_clip model config: it needs embed_dim, vision_cfg and text_cfg")
        # open_clip's documented way to use a custom config: register its file, then use its stem as the name.
        open_clip.add_model_config(path)
        name = tokenizer_name = path.stem
        if open_clip.get_model_config(name) != model_cfg:
            raise UserError(f"open_clip already has a different model config named '{name}'; rename '{path}'")
    elif name not in open_clip.list_models():
        raise UserError(f"unknown open_clip model '{name}': use a name from open_clip.list_models(), "
                        "'local-dir:PATH', or the path of a model-config .json file")
    if pretrained and not name.startswith("local-dir:") and not name.endswith(".json"):
        from synclone.models.convert import open_clip_variant

        name = tokenizer_name = open_clip_variant(name, pretrained, cfg.quick_gelu)
    if pretrained and not name.startswith("local-dir:"):
        is_file = Path(pretrained).is_file()
        if not is_file and pretrained not in open_clip.list_pretrained_tags_by_model(name):
            raise UserError(f"backbone.pretrained '{pretrained}' is neither a file nor a pretrained tag of '{name}' "
                            f"(tags: {', '.join(open_clip.list_pretrained_tags_by_model(name)) or 'none'})")
    if pretrained and Path(pretrained).is_file():
        check_checkpoint_file(pretrained)
    try:
        model = open_clip.create_model(name, pretrained=pretrained or None)
    except (RuntimeError, ValueError, FileNotFoundError) as err:
        raise UserError(f"cannot build open_clip model '{cfg.name}': {err}") from None
    model.eval()
    pp = dict(model.visual.preprocess_cfg)
    size = pp.get("size", 224)
    size = (size, size) if isinstance(size, int) else tuple(size)
    pre = Preprocess(size=tuple(int(s) for s in size), mean=tuple(pp["mean"]), std=tuple(pp["std"]),
                     interpolation=pp.get("interpolation", "bicubic"), resize_mode=pp.get("resize_mode", "shortest"),
                     fill=float(pp.get("fill_color", 0)) / 255.0)
    dim = int(model.text_projection.shape[-1]) if getattr(model, "text_projection", None) is not None \
        else int(model.visual.output_dim)
    encoder = ImageEncoder(model.visual, lambda trunk, x: trunk(x), pre, dim,
                           True if cfg.normalize is None else cfg.normalize, f"open_clip:{cfg.name}")
    if name.endswith("-quickgelu"):
        encoder.variant = "quickgelu"
    tokenizer = open_clip.get_tokenizer(tokenizer_name)
    return Backbone(cfg, encoder, clip_model=model, tokenizer=tokenizer,
                    logit_scale=float(model.logit_scale.detach().exp()))


def _hf_image_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model.get_image_features(pixel_values=x)
    # transformers >= 5 returns a ModelOutput whose pooler_output holds the projected embedding.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class _HFImageTower(nn.Module):
    """The image half of a transformers CLIPModel (its weights are what the cache key hashes)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.vision_model = model.vision_model
        self.visual_projection = model.visual_projection
        self._model = [model]  # a list so the whole model is not registered (and hashed) twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _hf_image_features(self._model[0], x)


def _load_hf_clip(cfg: BackboneConfig) -> Backbone:
    from transformers import CLIPModel

    folder = Path(cfg.name)
    if not (folder / "config.json").is_file():
        raise UserError(f"'{folder}' is not a transformers CLIP folder (no config.json); save one with "
                        "CLIPModel.save_pretrained(folder) (hub names are not fetched: download the folder first)")
    if cfg.pretrained:
        raise UserError("backbone.pretrained is not used with kind 'hf_clip': the weights come from the folder")
    try:
        model = CLIPModel.from_pretrained(str(folder), local_files_only=True).eval()
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load CLIPModel from '{folder}': {err}") from None
    size = int(model.config.vision_config.image_size)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # OpenAI CLIP's
    crop = (size, size)
    proc_file = folder / "preprocessor_config.json"
    if proc_file.is_file():
        proc = json.loads(proc_file.read_text(encoding="utf-8"))
        mean = tuple(proc.get("image_mean", mean))
        std = tuple(proc.get("image_std", std))
        cs = proc.get("crop_size", size)
        crop = (cs["height"], cs["width"]) if isinstance(cs, dict) else (int(cs), int(cs))
    pre = Preprocess(size=crop, mean=mean, std=std, interpolation="bicubic", resize_mode="shortest")
    tower = _HFImageTower(model)
    encoder = ImageEncoder(tower, lambda trunk, x: trunk(x), pre, int(model.config.projection_dim),
                           True if cfg.normalize is None else cfg.normalize, f"hf_clip:{folder}")
    tokenizer = _hf_tokenizer(folder, int(model.config.text_config.max_position_embeddings))
    return Backbone(cfg, encoder, clip_model=model, tokenizer=tokenizer,
                    logit_scale=float(model.logit_scale.detach().exp()))


def _hf_tokenizer(folder: Path, context_length: int) -> Any:
    """The folder's own tokenizer, else open_clip's bundled copy of the same OpenAI CLIP BPE (offline)."""
    if any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)

        def encode(texts: list[str]) -> torch.Tensor:
            return tok(texts, padding="max_length", truncation=True, max_length=context_length,
                       return_tensors="pt")["input_ids"]

        return encode
    import open_clip

    return open_clip.SimpleTokenizer(context_length=context_length)


def _load_timm(cfg: BackboneConfig) -> Backbone:
    import timm
    from timm.data import resolve_data_config

    kwargs: dict[str, Any] = {"num_classes": 0}
    pretrained = cfg.pretrained == "default"
    if cfg.pretrained and not pretrained and not Path(cfg.pretrained).is_file():
        raise UserError(f"timm checkpoint '{cfg.pretrained}' does not exist (use a file path, or 'default' for "
                        "timm's own weights)")
    try:
        net = timm.create_model(cfg.name, pretrained=pretrained, **kwargs)
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise UserError(f"unknown timm model '{cfg.name}': use a name from timm.list_models()") from None
        raise
    if cfg.pretrained and not pretrained:
        from synclone.models.convert import load_backbone_weights

        # Released checkpoints (SynCLR, MoCo v3, MAE, DINOv2 ...) are converted and matched as an import's are.
        load_backbone_weights(net, cfg.pretrained, cfg.name, cfg.convert, cfg.key_map)
    dc = resolve_data_config({}, model=net)
    _, h, w = dc["input_size"]
    pre = Preprocess(size=(int(h), int(w)), mean=tuple(dc["mean"]), std=tuple(dc["std"]),
                     interpolation=str(dc.get("interpolation", "bicubic")), resize_mode="shortest",
                     crop_pct=float(dc.get("crop_pct") or 1.0))
    dim = int(net.num_features)
    encoder = ImageEncoder(net, lambda trunk, x: trunk(x), pre, dim, bool(cfg.normalize), f"timm:{cfg.name}")
    return Backbone(cfg, encoder)


for _kind, _loader in (("open_clip", _load_open_clip), ("hf_clip", _load_hf_clip), ("timm", _load_timm)):
    register_backbone_loader(_kind, _loader)
