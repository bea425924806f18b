"""Scorers: models that embed images (and, for CLIP, texts) for curation. One registry, three kinds.

- ``openclip``: CLIP through open_clip; zero-shot class embeddings from open_clip's own
  ``build_zero_shot_classifier`` (normalised mean of normalised template embeddings) and templates from
  ``open_clip.zero_shot_metadata``.
- ``hf_clip``: CLIP through transformers (``CLIPModel``), same zero-shot recipe via the same function.
- ``teacher``: any synclone model folder; logits are its own, the embedding its pooled pre-logit features.

A scorer loads its model lazily, on the first image or text it must encode: a run whose every image,
prompt and class embedding is in the cache never builds a model. ``cache_id`` names what decides the
embeddings (weights, preprocessing) without loading anything.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from synclone.curate.cache import FileKeys
from synclone.curate.config import ScorerConfig
from synclone.data.images import read_and_decode, to_channels
from synclone.errors import UserError
from synclone.labels import LabelSpace
from synclone.models import load_model
from synclone.models.io import CONFIG, WEIGHTS, read_model_config
from synclone.util.checkpoints import check_checkpoint_file

CACHE_FORMAT = "synclone-curate-cache/1"
SCORERS: dict[str, type[Scorer]] = {}


def register_scorer(name: str) -> Callable[[type[Scorer]], type[Scorer]]:
    """Class decorator: make a :class:`Scorer` subclass available as ``scorer.kind: name``."""

    def deco(cls: type[Scorer]) -> type[Scorer]:
        cls.kind = name
        SCORERS[name] = cls
        return cls

    return deco


def create_scorer(cfg: ScorerConfig, alpha_background: int = 0) -> Scorer:
    """The scorer ``cfg.kind`` names, not yet loaded."""
    if cfg.kind not in SCORERS:
        raise UserError(f"unknown scorer kind '{cfg.kind}': use one of {', '.join(sorted(SCORERS))}")
    return SCORERS[cfg.kind](cfg, alpha_background)


def resolve_templates(spec: str | Sequence[str]) -> list[Callable[[str], str]]:
    """Template callables: 'openai' (80) or 'simple' (7) from open_clip, or strings with '{c}' or '{}'."""
    if isinstance(spec, str):
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

        sets = {"openai": OPENAI_IMAGENET_TEMPLATES, "simple": SIMPLE_IMAGENET_TEMPLATES}
        if spec not in sets:
            raise UserError(f"unknown template set '{spec}': use 'openai', 'simple' or a list of strings with '{{c}}'")
        return list(sets[spec])
    out = []
    for t in spec:
        if not isinstance(t, str) or ("{c}" not in t and "{}" not in t):
            raise UserError(f"template {t!r} needs '{{c}}' where the class name goes, e.g. 'a photo of a {{c}}.'")
        out.append(lambda c, t=t: t.replace("{c}", c).replace("{}", c))
    if not out:
        raise UserError("scorer.templates is empty: give at least one template, e.g. ['a photo of a {c}.']")
    return out


def templates_key(templates: Sequence[Callable[[str], str]]) -> list[str]:
    """The templates as text (rendered with the placeholder '{c}'), for cache keys."""
    return [t("{c}") for t in templates]


class Scorer:
    """Base class. Subclasses set ``has_text`` and implement ``_spec``, ``_load`` and ``_encode_images``."""
    kind = "base"
    has_text = False

    def __init__(self, cfg: ScorerConfig, alpha_background: int = 0) -> None:
        self.cfg = cfg
        self.alpha_background = int(alpha_background)
        self.device = torch.device(cfg.device)
        self.loaded = False
        # Counters the tests and the run summary read: how often a model actually ran.
        self.image_batches = 0
        self.images_encoded = 0
        self.text_batches = 0

    # --- identity, without loading ---------------------------------------------------------------
    def _spec(self, files: FileKeys) -> dict:
        raise NotImplementedError

    def cache_id(self, files: FileKeys) -> str:
        """``<kind>-<hash of what decides the embeddings>``: weights (content hashes of local files, or the
        model name and pretrained tag), preprocessing settings, cache format. Moving a model folder keeps it."""
        spec = {"format": CACHE_FORMAT, "kind": self.kind, "alpha_background": self.alpha_background,
                **self._spec(files)}
        return f"{self.kind}-{hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]}"

    def label_space(self) -> LabelSpace | None:
        """The scorer's own fixed label space (a teacher's), or None when it can score any class names."""
        return None

    # --- model work ------------------------------------------------------------------------------
    def load(self) -> None:
        if not self.loaded:
            self._load()
            self.loaded = True

    def _load(self) -> None:
        raise NotImplementedError

    def encode_images(self, images: list[Image.Image]) -> dict[str, np.ndarray]:
        """``embedding`` (n, d) float32 (not normalised) and, for a teacher, ``logits`` (n, K)."""
        self.load()
        self.image_batches += 1
        self.images_encoded += len(images)
        with torch.inference_mode():
            out = self._encode_images(images)
        return {k: v.float().cpu().numpy() for k, v in out.items()}

    def _encode_images(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Unit-norm text embeddings (n, d)."""
        raise UserError(f"scorer '{self.kind}' has no text encoder")

    def zero_shot_weights(self, classnames: Sequence[str], templates: Sequence[Callable[[str], str]]) -> np.ndarray:
        """Unit-norm class embeddings (C, d): normalised mean of the normalised template embeddings."""
        raise UserError(f"scorer '{self.kind}' has no text encoder")

    def logit_scale(self) -> float:
        raise UserError(f"scorer '{self.kind}' has no logit scale")


# --- CLIP through open_clip ----------------------------------------------------------------------------



def encode_files(scorer: Scorer, keys: Sequence[str], paths: Sequence[str],
                 on_batch: Callable[[int], object] | None = None) -> tuple[list[str], dict[str, np.ndarray],
                                                                            dict[str, str]]:
    """Decode the image files ``paths`` and encode the readable ones in batches of the scorer's batch size.

    Returns the keys encoded, their arrays (the scorer's outputs plus ``stats``, row for row) and the reason
    for each unreadable key. The local scoring loop and the Ray workers both encode through this.
    """
    ok_keys, images, stats, errors = [], [], [], {}
    for k, p in zip(keys, paths, strict=True):
        _, dec = read_and_decode(p, scorer.alpha_background)
        if dec.ok:
            ok_keys.append(k)
            images.append(dec.image)
            stats.append(dec.stats)
        else:
            errors[k] = dec.error
    bs = scorer.cfg.batch_size
    outs: dict[str, list[np.ndarray]] = {}
    for b in range(0, len(images), bs):
        for name, arr in scorer.encode_images(images[b : b + bs]).items():
            outs.setdefault(name, []).append(arr)
        if on_batch is not None:
            on_batch(min(bs, len(images) - b))
    arrays = {name: np.concatenate(parts) for name, parts in outs.items()}
    if ok_keys:
        arrays["stats"] = np.stack(stats)
    return ok_keys, arrays, errors


def _file_identity(files: FileKeys, path: Path) -> str:
    key = files.key_of(path)
    if key is None:
        raise UserError(f"cannot read '{path}'")
    return key


@register_scorer("openclip")
class OpenClipScorer(Scorer):
    has_text = True

    def _resolve(self) -> tuple[str, str | None, Path | None]:
        """(open_clip model name, pretrained, local folder or config file)."""
        import open_clip

        model, pretrained = self.cfg.model, self.cfg.pretrained
        if model.startswith("local-dir:") or Path(model).is_dir():
            folder = Path(model.removeprefix("local-dir:"))
            if not (folder / "open_clip_config.json").is_file():
                raise UserError(f"'{folder}' is not an open_clip model folder: it needs open_clip_config.json "
                                "(with 'model_cfg') and a weights file")
            # The folder holds its weights; a pretrained tag from the defaults does not apply.
            return f"local-dir:{folder.resolve()}", None, folder
        if model.endswith(".json"):
            path = Path(model)
            if not path.is_file():
                raise UserError(f"open_clip model config '{path}' does not exist")
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as err:
                raise UserError(f"cannot read open_clip model config '{path}': {err}") from None
            if "model_cfg" in data:
                raise UserError(f"'{path}' is an open_clip folder config (it has 'model_cfg'): pass its folder as "
                                "scorer.model instead")
            if not all(k in data for k in ("embed_dim", "vision_cfg", "text_cfg")):
                raise UserError(f"'{path}' is not an open_clip model config: it needs embed_dim, vision_cfg, text_cfg")
            # open_clip's documented way to use a custom config: register the file, use its stem as the name.
            if pretrained and not Path(pretrained).is_file():
                raise UserError(f"with a model-config .json, scorer.pretrained must be a checkpoint file, got "
                                f"'{pretrained}' (or null for random weights)")
            open_clip.add_model_config(path)
            if open_clip.get_model_config(path.stem) != data:
                raise UserError(f"open_clip already has another model config named '{path.stem}'; rename '{path}'")
            return path.stem, pretrained, path
        if model not in open_clip.list_models():
            raise UserError(f"unknown open_clip model '{model}': use a name from open_clip.list_models(), a folder "
                            "with open_clip_config.json, or a model-config .json file")
        if pretrained and not Path(pretrained).is_file():
            tags = open_clip.list_pretrained_tags_by_model(model)
            if pretrained not in tags:
                raise UserError(f"scorer.pretrained '{pretrained}' is neither a file nor a pretrained tag of "
                                f"'{model}' (tags: {', '.join(tags) or 'none'})")
        return model, pretrained, None

    def _spec(self, files: FileKeys) -> dict:
        name, pretrained, local = self._resolve()
        spec: dict = {"model": name if local is None else None, "pretrained": pretrained}
        if local is not None and local.is_dir():
            cfg_file = local / "open_clip_config.json"
            weights = sorted(p for p in local.iterdir() if p.suffix in (".safetensors", ".bin", ".pth", ".pt"))
            spec["config"] = _file_identity(files, cfg_file)
            spec["weights"] = [_file_identity(files, w) for w in weights]
        elif local is not None:
            spec["config"] = _file_identity(files, local)
        if pretrained and Path(pretrained).is_file():
            spec["pretrained"] = _file_identity(files, Path(pretrained))
        return spec

    def _load(self) -> None:
        import open_clip

        name, pretrained, local = self._resolve()
        files = [Path(pretrained)] if pretrained and Path(pretrained).is_file() else []
        if local is not None and local.is_dir():  # open_clip loads a folder's pickled weights with torch.load
            files += [p for p in local.iterdir() if p.suffix in (".bin", ".pth", ".pt")]
        for f in files:
            check_checkpoint_file(f)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained,
                                                                         device=self.device)
        except (RuntimeError, ValueError, FileNotFoundError, OSError) as err:
            raise UserError(f"cannot load open_clip model '{self.cfg.model}' (pretrained {pretrained!r}): "
                            f"{str(err).splitlines()[0]}; without internet use a local checkpoint file or folder"
                            ) from None
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(name)

    def _encode_images(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        x = torch.stack([self.preprocess(to_channels(im, 3)) for im in images]).to(self.device)
        return {"embedding": self.model.encode_image(x)}

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        self.load()
        self.text_batches += 1
        with torch.inference_mode():
            emb = self.model.encode_text(self.tokenizer(texts).to(self.device), normalize=True)
        return emb.float().cpu().numpy()

    def zero_shot_weights(self, classnames: Sequence[str], templates: Sequence[Callable[[str], str]]) -> np.ndarray:
        from open_clip import build_zero_shot_classifier

        self.load()
        self.text_batches += 1
        w = build_zero_shot_classifier(self.model, self.tokenizer, list(classnames), list(templates),
                                       num_classes_per_batch=10, device=self.device)
        return w.T.float().cpu().numpy()

    def logit_scale(self) -> float:
        self.load()
        return float(self.model.logit_scale.detach().exp())


# --- CLIP through transformers ---------------------------------------------------------------------------


def hf_clip_tokenizer_offline():
    """A transformers ``CLIPTokenizer`` built from open_clip's bundled copy of OpenAI's CLIP BPE merges.

    Same vocabulary and merges as OpenAI's CLIP tokenizer, so token ids match open_clip's (and the hub's
    ``openai/clip-*`` tokenizers) without a download. transformers 5 ignores ``vocab_file=`` on this class,
    so vocab and merges are passed as objects. The recipe is open_clip's ``SimpleTokenizer.__init__``.
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    with gzip.open(default_bpe()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={v: i for i, v in enumerate(vocab)}, merges=merges)


class _HFTextAdapter:
    """Gives a transformers CLIPModel open_clip's ``encode_text(tokens, normalize)`` for build_zero_shot_classifier."""

    def __init__(self, model) -> None:
        self.model = model

    def encode_text(self, tokens, normalize: bool = False) -> torch.Tensor:
        out = self.model.get_text_features(**tokens)
        emb = out if isinstance(out, torch.Tensor) else out.pooler_output
        return torch.nn.functional.normalize(emb, dim=-1) if normalize else emb


@register_scorer("hf_clip")
class HFClipScorer(Scorer):
    has_text = True

    def _spec(self, files: FileKeys) -> dict:
        folder = Path(self.cfg.model)
        if not folder.is_dir():
            return {"model": self.cfg.model}  # a hub id: the name (and its cached revision) decide
        if not (folder / "config.json").is_file():
            raise UserError(f"'{folder}' is not a transformers model folder (no config.json); save one with "
                            "CLIPModel.save_pretrained(folder)")
        weights = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
        if not weights:
            raise UserError(f"'{folder}' has no weights (model.safetensors or pytorch_model.bin)")
        spec = {"config": _file_identity(files, folder / "config.json"),
                "weights": [_file_identity(files, w) for w in weights]}
        pre = folder / "preprocessor_config.json"
        if pre.is_file():
            spec["preprocessor"] = _file_identity(files, pre)
        return spec

    def _load(self) -> None:
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        src = self.cfg.model
        try:
            model = CLIPModel.from_pretrained(src)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot load a transformers CLIPModel from '{src}': {str(err).splitlines()[0]}") from None
        self.model = model.to(self.device).eval()
        try:
            self.processor = CLIPImageProcessor.from_pretrained(src)
        except (OSError, ValueError):
            # No preprocessor_config.json: OpenAI CLIP's preprocessing at the model's input size.
            size = int(model.config.vision_config.image_size)
            self.processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(src)
        except (OSError, ValueError):
            self.tokenizer = hf_clip_tokenizer_offline()
        self.context_length = int(model.config.text_config.max_position_embeddings)

    def _tokenize(self, texts: list[str]):
        return self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.context_length,
                              return_tensors="pt").to(self.device)

    def _encode_images(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        pixels = self.processor(images=[to_channels(im, 3) for im in images], return_tensors="pt")["pixel_values"]
        out = self.model.get_image_features(pixel_values=pixels.to(self.device))
        # transformers >= 5 returns a ModelOutput whose pooler_output is the projected embedding; 4.x a tensor.
        return {"embedding": out if isinstance(out, torch.Tensor) else out.pooler_output}

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        self.load()
        self.text_batches += 1
        with torch.inference_mode():
            emb = _HFTextAdapter(self.model).encode_text(self._tokenize(texts), normalize=True)
        return emb.float().cpu().numpy()

    def zero_shot_weights(self, classnames: Sequence[str], templates: Sequence[Callable[[str], str]]) -> np.ndarray:
        from open_clip import build_zero_shot_classifier

        self.load()
        self.text_batches += 1
        w = build_zero_shot_classifier(_HFTextAdapter(self.model), self._tokenize, list(classnames), list(templates),
                                       num_classes_per_batch=10, device=self.device)
        return w.T.float().cpu().numpy()

    def logit_scale(self) -> float:
        self.load()
        return float(self.model.logit_scale.detach().exp())


# --- a synclone classifier as teacher -------------------------------------------------------------------


@register_scorer("teacher")
class TeacherScorer(Scorer):
    """Logits from the teacher itself; embedding = its pooled pre-logit features (``Classifier.features``).

    Images are converted to the teacher's channels (grey by ITU-R 601-2 luma, or grey replicated to RGB)
    and resized to its input size (bicubic, antialiased, aspect ratio not kept) when they differ.
    """

    def _config(self) -> dict:
        return read_model_config(self.cfg.model)

    def _spec(self, files: FileKeys) -> dict:
        self._config()  # validates the folder
        folder = Path(self.cfg.model)
        return {"config": _file_identity(files, folder / CONFIG), "weights": _file_identity(files, folder / WEIGHTS)}

    def label_space(self) -> LabelSpace:
        return LabelSpace.from_dict(self._config()["label_space"])

    def _load(self) -> None:
        self.model = load_model(self.cfg.model, device=self.device)
        self.input_size = tuple(self.model.input_size)

    def _encode_images(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        c, h, w = self.input_size
        arrs = []
        for im in images:
            im = to_channels(im, c)
            if im.size != (w, h):
                im = im.resize((w, h), Image.Resampling.BICUBIC)
            a = np.asarray(im, dtype=np.float32) / 255.0
            arrs.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
        x = torch.from_numpy(np.stack(arrs)).to(self.device)
        net = self.model.net
        # One trunk pass gives both outputs (Classifier.features and forward share forward_features).
        feats = net.forward_features(self.model.normalize(x))
        return {"embedding": net.forward_head(feats, pre_logits=True), "logits": net.forward_head(feats)}


__all__ = ["SCORERS", "Scorer", "create_scorer", "hf_clip_tokenizer_offline", "register_scorer", "resolve_templates",
           "templates_key"]
