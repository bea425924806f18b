"""Adapting a diffusers text-to-image pipeline to real images (``synclone generator finetune CONFIG``).

Two methods, as in diffusers' own training scripts (``train_text_to_image_lora.py``, ``train_text_to_image.py``):

- ``lora``: a LoRA adapter (``peft``) on the UNet's attention projections (``to_q``, ``to_k``, ``to_v``,
  ``to_out.0``) while every base weight stays frozen; saved in diffusers' LoRA format (safetensors) with
  ``StableDiffusionPipeline.save_lora_weights``, loaded by ``generate`` through ``generator: {lora: FOLDER}``.
- ``full``: every UNet weight is trained; the output is a whole pipeline folder (``OUTPUT/pipeline``), used by
  ``generate`` as ``generator: {model: OUTPUT/pipeline}``.

Each real image (a plain ``<class>/*.png`` folder or a synclone dataset folder) is captioned by its class's prompt
from any prompt strategy (or by its own ``prompt`` in the folder's metadata), encoded once by the frozen VAE and
text encoder, and the UNet learns to predict the noise (or v) added at a random timestep (mean squared error).

Exact resume: the batch of step ``s`` is a slice of epoch ``s // steps_per_epoch``'s permutation, and its latent
sample, noise, timesteps and dropout come from generators seeded by ``mix_seed(seed, stream, s)``, so nothing
depends on a running random stream; the checkpoint (trainable weights + AdamW state in safetensors, step and
record in JSON) is all a resumed run needs, and a killed-and-resumed run ends with the same weights as an
uninterrupted one. The learning rate is constant after a linear warm-up, so the step budget may grow on resume.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from synclone.config import StrictModel, write_run_info
from synclone.errors import UserError
from synclone.generate.classcond_train import _optimizer_state_from_tensors, _optimizer_state_to_tensors
from synclone.generate.lora import ADAPTER_JSON, LORA_WEIGHTS, adapter_info
from synclone.labels import LabelSpace
from synclone.models.hub import resolve_model
from synclone.prompts import PromptConfig
from synclone.util.files import atomic_path, file_sha256, write_json_atomic
from synclone.util.seeds import derive_seed, derived_rng, mix_seed

CKPT_DIR = "checkpoint"
CKPT_WEIGHTS = "training_state.safetensors"
CKPT_JSON = "training_state.json"
PIPELINE_DIR = "pipeline"
VALIDATION_DIR = "validation"
# Seed streams of one training step (mix_seed(seed, stream, step or epoch)): never renumber, results depend on them.
_EPOCH_STREAM, _STEP_STREAM, _DROPOUT_STREAM, _EVAL_STREAM = 1, 2, 3, 4


class LoraSettings(StrictModel):
    """The adapter's shape: rank, scale numerator ``alpha`` (default: the rank, i.e. scale 1) and the layers."""
    rank: int = Field(4, ge=1, description="LoRA rank r (>= 1)")
    alpha: float | None = Field(None, gt=0, description="lora_alpha; the update is scaled by alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1)
    # None: the base model's default, SD_TARGETS for a text-to-image UNet, CLASSCOND_TARGETS for the built-in one.
    target_modules: list[str] | None = Field(None, min_length=1)

    def resolved(self, default: list[str]) -> dict:
        """The settings as recorded (checkpoint, adapter record), with the target modules filled in."""
        return {**self.model_dump(), "target_modules": list(self.target_modules or default)}


# The attention projections, as diffusers' LoRA training scripts adapt them.
SD_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# The built-in generator has attention only at its lowest resolution, so its adapter also covers the ResNet
# blocks' two convolutions: a domain shift in pixel statistics (inverted images, textures) lives there.
CLASSCOND_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]


class ValidationSettings(StrictModel):
    """Sample images every ``every`` steps (off by default) into ``OUTPUT/validation/step_NNNNNN/``."""
    every: int | None = Field(None, ge=1)
    prompts: list[str] | None = None  # default: the first caption of each class (at most 4 classes)
    steps: int = Field(20, ge=1)
    guidance_scale: float = Field(7.5, ge=0)


class FinetuneConfig(StrictModel):
    """``synclone generator finetune CONFIG``: adapt a text-to-image pipeline to a real image folder."""
    model: str  # base pipeline: hub id or local folder
    revision: str | None = None
    data: str  # real images: <class>/*.png or a synclone dataset folder
    prompts: PromptConfig = PromptConfig()  # captions: the class prompt of each image (any strategy)
    captions: Literal["prompts", "metadata"] = "prompts"  # metadata: each record's own 'prompt'
    method: Literal["lora", "full"] = "lora"
    lora: LoraSettings = LoraSettings()
    # DataDream's second mode: one adapter per class folder, each trained on its class's images only
    # (OUTPUT/<class slug>/); generate then uses each class's own adapter. LoRA only.
    per_class: bool = False
    # Built-in generator only: the share of images whose label is replaced by the null class, so that
    # classifier-free guidance keeps working after fine-tuning (as in its own training).
    p_uncond: float = Field(0.1, ge=0, lt=1)
    resolution: int | None = Field(None, ge=8, description="training size in pixels; default the pipeline's own")
    steps: int = Field(500, ge=1, description="optimiser steps in total (a resumed run counts from its checkpoint)")
    batch_size: int = Field(4, ge=1)
    lr: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(1e-2, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    seed: int = 0
    checkpoint_every: int = Field(100, ge=1)
    resume: bool = True
    validation: ValidationSettings = ValidationSettings()
    device: str = "auto"  # auto: what Accelerate picks
    output: str = "runs/finetune"


@dataclass
class TrainingSet:
    """The real images encoded once: VAE posterior (mean, std) and prompt embeddings, one row per image."""
    mean: torch.Tensor  # (N, 4, h, w) latent posterior mean
    std: torch.Tensor
    text: torch.Tensor  # (N, L, D) text-encoder states of each image's caption
    prompts: list[str]
    labels: list[int]
    label_space: LabelSpace
    fingerprint: str  # the images' content and captions

    def __len__(self) -> int:
        return len(self.prompts)


def load_base_pipeline(cfg: FinetuneConfig):
    """The base pipeline (float32, on the CPU) and its resolved reference; refused when it has no UNet."""
    import diffusers

    ref = resolve_model(cfg.model, cfg.revision, what="generator model")
    kw = {"local_files_only": ref.local_files_only}
    if not ref.local_folder:
        kw["revision"] = ref.revision
    pipe = diffusers.DiffusionPipeline.from_pretrained(ref.location, **kw)
    missing = [c for c in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if getattr(pipe, c, None) is None]
    if missing:
        raise UserError(f"generator model '{cfg.model}' ({type(pipe).__name__}) has no {', '.join(missing)}: "
                        "fine-tuning supports Stable-Diffusion-style UNet text-to-image pipelines")
    pipe.set_progress_bar_config(disable=True)
    return pipe, ref


def _resolution(cfg: FinetuneConfig, pipe) -> int:
    return cfg.resolution or int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


def _captions(cfg: FinetuneConfig, records, space: LabelSpace) -> list[str]:
    if cfg.captions == "metadata":
        missing = [r.file_name for r in records if r.prompt is None]
        if missing:
            raise UserError(f"captions: metadata, but {len(missing)} image(s) of '{cfg.data}' have no 'prompt' in "
                            f"the folder's metadata (first: {missing[0]}): use captions: prompts")
        return [r.prompt for r in records]
    from synclone.prompts import create_strategy

    strategy = create_strategy(cfg.prompts, space, cfg.seed)
    per_class: dict[int, int] = {}
    out = []
    for r in records:
        per_class[r.label] = per_class.get(r.label, 0) + 1
    strategy.prepare(max(per_class.values()))
    seen: dict[int, int] = {}
    for r in records:
        k = seen.get(r.label, 0)
        seen[r.label] = k + 1
        out.append(strategy.prompt(r.label, k, derived_rng(cfg.seed, "finetune-caption", r.id)).text)
    return out


def _pixels(image, size: int) -> torch.Tensor:
    """RGB in [-1, 1], shorter side resized to ``size`` (bicubic) and centre-cropped, as diffusers' scripts do."""
    from PIL import Image, ImageOps

    im = ImageOps.fit(image.convert("RGB"), (size, size), method=Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0
    return x


@dataclass
class RealImages:
    """The decoded real folder: records, label space, images and a content fingerprint."""
    records: list
    label_space: LabelSpace
    images: list
    fingerprint: str
    digests: list[bytes] | None = None  # per image: id + content hash (what the fingerprint hashes)

    def __len__(self) -> int:
        return len(self.records)

    def subset(self, rows: list[int]) -> RealImages:
        """The images at ``rows``, with their own fingerprint (hashed as :func:`read_real_images` does)."""
        digests = [self.digests[i] for i in rows]
        h = hashlib.sha256()
        for d in digests:
            h.update(d)
        return RealImages([self.records[i] for i in rows], self.label_space, [self.images[i] for i in rows],
                          h.hexdigest(), digests)


def read_real_images(cfg: FinetuneConfig) -> RealImages:
    """Decode every image of ``cfg.data``; unreadable images or fewer images than a batch are refused."""
    from synclone.data.folder import read_dataset_folder
    from synclone.data.images import read_and_decode

    records, space = read_dataset_folder(cfg.data)
    images, bad, digests = [], [], []
    h = hashlib.sha256()
    for r in records:
        data, dec = read_and_decode(str(r.path))
        if not dec.ok:
            bad.append(f"{r.file_name} ({dec.error.split(' <')[0]})")
            continue
        images.append(dec.image)
        digests.append(r.id.encode() + b"\0" + hashlib.sha256(data).digest())
        h.update(digests[-1])
    if bad:
        raise UserError(f"real folder '{cfg.data}' has {len(bad)} unreadable image(s), first {bad[0]}: "
                        "remove or replace them")
    if len(images) < cfg.batch_size:
        raise UserError(f"real folder '{cfg.data}' has {len(images)} image(s), fewer than batch_size "
                        f"{cfg.batch_size}: lower batch_size or add images")
    return RealImages(records, space, images, h.hexdigest(), digests)


@torch.no_grad()
def encode_training_set(cfg: FinetuneConfig, pipe, real: RealImages | None = None) -> TrainingSet:
    """Caption the real images and encode them with the pipeline's frozen VAE and text encoder."""
    real = real or read_real_images(cfg)
    records, space, images = real.records, real.label_space, real.images
    h = hashlib.sha256(real.fingerprint.encode())
    prompts = _captions(cfg, records, space)
    h.update(json.dumps(prompts).encode())
    size = _resolution(cfg, pipe)
    x = torch.stack([_pixels(im, size) for im in images])
    means, stds = [], []
    for chunk in x.split(8):
        dist = pipe.vae.encode(chunk).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    tok = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt")
    text = torch.cat([pipe.text_encoder(ids)[0] for ids in tok.input_ids.split(32)])
    return TrainingSet(torch.cat(means), torch.cat(stds), text, prompts, [r.label for r in records], space,
                       h.hexdigest()[:16])


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Images of step ``step``: slice ``step mod E`` of epoch ``step // E``'s seeded permutation (E = n // batch)."""
    per_epoch = n // batch_size
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, _EPOCH_STREAM, epoch)))
    return perm[pos * batch_size:(pos + 1) * batch_size]


def _noised_batch(data: TrainingSet, idx: torch.Tensor, sched, scaling: float, gen: torch.Generator):
    """(noisy latents, timesteps, target) of one batch, every draw from ``gen``."""
    mean, std = data.mean[idx], data.std[idx]
    latents = (mean + std * torch.randn(mean.shape, generator=gen)) * scaling
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.randint(0, sched.config.num_train_timesteps, (len(idx),), generator=gen)
    noisy = sched.add_noise(latents, noise, t)
    pred_type = sched.config.prediction_type
    if pred_type == "epsilon":
        target = noise
    elif pred_type == "v_prediction":
        target = sched.get_velocity(latents, noise, t)
    else:
        raise UserError(f"the base model's scheduler predicts '{pred_type}': fine-tuning supports epsilon and "
                        "v_prediction")
    return noisy, t, target


def _train_scheduler(pipe):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


@torch.no_grad()
def denoising_loss(unet, data: TrainingSet, sched, scaling: float, seed: int = 0, draws: int = 4) -> float:
    """Mean denoising MSE of ``unet`` over every image, with ``draws`` fixed (seeded) noise and timestep draws."""
    losses = []
    device = next(unet.parameters()).device
    for d in range(draws):
        gen = torch.Generator().manual_seed(mix_seed(seed, _EVAL_STREAM, d))
        idx = torch.arange(len(data))
        noisy, t, target = _noised_batch(data, idx, sched, scaling, gen)
        pred = unet(noisy.to(device), t.to(device), data.text[idx].to(device)).sample
        losses.append(F.mse_loss(pred.float().cpu(), target.float()).item())
    return float(np.mean(losses))


def add_lora(unet, settings: LoraSettings, seed: int, default: list[str] = SD_TARGETS) -> None:
    """Freeze ``unet`` and add a trainable LoRA adapter (peft) on ``settings``' target modules."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = list(settings.target_modules or default)
    unet.requires_grad_(False)
    torch.manual_seed(seed)  # the adapter's A matrices (B starts at zero, so the adapter starts as identity)
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha or settings.rank, lora_dropout=settings.dropout,
                        init_lora_weights="gaussian", target_modules=targets)
    try:
        if hasattr(unet, "add_adapter"):  # diffusers' text-to-image UNets (PeftAdapterMixin)
            unet.add_adapter(config)
        else:  # UNet2DModel (the built-in generator) has no adapter mixin: peft injects the layers itself
            inject_adapter_in_model(config, unet)
    except ValueError as err:
        raise UserError(f"lora.target_modules {targets} do not fit this UNet ({err})") from None


def _save_checkpoint(folder: Path, named: dict[str, torch.Tensor], opt, step: int, losses: list[float],
                     run: dict) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"param.{k}": v.detach().cpu().contiguous() for k, v in named.items()}
    opt_tensors, opt_plain = _optimizer_state_to_tensors(opt)
    tensors.update(opt_tensors)
    info = {"step": step, "optimizer": opt_plain, "losses": losses, "run": run}
    # The weights are renamed into place before their record, so a kill mid-write keeps the old pair usable.
    with atomic_path(folder / CKPT_JSON) as tmp_j:
        tmp_j.write_text(json.dumps(info) + "\n", encoding="utf-8")
        with atomic_path(folder / CKPT_WEIGHTS) as tmp_w:
            save_file(tensors, str(tmp_w))


def _load_checkpoint(folder: Path, named: dict[str, torch.Tensor], opt, run: dict) -> tuple[int, list[float]]:
    from safetensors.torch import load_file

    info = json.loads((folder / CKPT_JSON).read_text(encoding="utf-8"))
    if info.get("run") != run:
        changed = sorted(k for k in set(run) | set(info.get("run", {})) if run.get(k) != info.get("run", {}).get(k))
        raise UserError(f"the checkpoint in '{folder}' was made with other settings ({', '.join(changed)}): use "
                        "another output folder or set resume=false to start over")
    tensors = load_file(str(folder / CKPT_WEIGHTS))
    with torch.no_grad():
        for k, p in named.items():
            p.copy_(tensors[f"param.{k}"])
    opt.load_state_dict(_optimizer_state_from_tensors(tensors, info["optimizer"]))
    return int(info["step"]), list(info["losses"])


def _validation_images(pipe, cfg: FinetuneConfig, data: TrainingSet, step: int, out: Path) -> None:
    from synclone.util.files import write_bytes_atomic

    prompts = cfg.validation.prompts
    if not prompts:
        first: dict[int, str] = {}
        for label, p in zip(data.labels, data.prompts, strict=True):
            first.setdefault(label, p)
        prompts = list(first.values())[:4]
    folder = out / VALIDATION_DIR / f"step_{step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    size = _resolution(cfg, pipe)
    for i, prompt in enumerate(prompts):
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "finetune-validation", i))
        image = pipe(prompt, generator=gen, num_inference_steps=cfg.validation.steps, height=size, width=size,
                     guidance_scale=cfg.validation.guidance_scale).images[0]
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        write_bytes_atomic(folder / f"{i:02d}.png", buf.getvalue())


def _replace_dir(tmp: Path, dest: Path) -> None:
    """Put folder ``tmp`` at ``dest`` (the old one removed first)."""
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)


def save_lora(unet, out: Path) -> None:
    """Write ``unet``'s peft adapter to ``out`` in diffusers' LoRA format (``unet.*.lora.down/up.weight``)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    # diffusers' mapping renames only attention projections; name every other adapted layer (the built-in
    # generator's convolutions) the same way, which diffusers' loaders and merge_lora_into_unet map back.
    layers = {k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up."): v for k, v in layers.items()}
    tmp = out / f".lora.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    StableDiffusionPipeline.save_lora_weights(save_directory=str(tmp), unet_lora_layers=layers,
                                              safe_serialization=True, weight_name=LORA_WEIGHTS)
    os.replace(tmp / LORA_WEIGHTS, out / LORA_WEIGHTS)
    shutil.rmtree(tmp, ignore_errors=True)


def _export(pipe, unet, cfg: FinetuneConfig, out: Path) -> None:
    """Write the adapter (diffusers' LoRA format) or the whole fine-tuned pipeline."""
    if cfg.method == "lora":
        save_lora(unet, out)
    else:
        tmp = out / f".{PIPELINE_DIR}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        pipe.unet = unet
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        _replace_dir(tmp, out / PIPELINE_DIR)


def finetune(cfg: FinetuneConfig, progress: bool = True,
             callback: Callable[[int, float], None] | None = None) -> Path:
    """Fine-tune ``cfg.model`` on ``cfg.data`` (LoRA or full UNet); returns the output folder.

    ``cfg.model`` is a diffusers text-to-image pipeline or synclone's class-conditional generator
    (``builtin:fashion_mnist`` or a ``synclone generator train`` folder; see
    :mod:`synclone.generate.classcond_finetune`). The output holds ``pytorch_lora_weights.safetensors`` (LoRA) or
    ``pipeline/`` (full), ``synclone_adapter.json`` (base model, settings, denoising loss before and after on the
    training images), ``checkpoint/`` and optional ``validation/`` images; with ``per_class`` one such folder per
    class (``OUTPUT/<slug>/``) and a record naming them. ``callback(step, loss)`` runs after every step.
    """
    if cfg.per_class and cfg.method != "lora":
        raise UserError("per_class: true trains one LoRA adapter per class; set method: lora (a full copy of the "
                        "UNet per class is not supported)")
    real = read_real_images(cfg)  # bad folders are refused before the model loads and before anything is written
    base = classcond_folder(cfg.model)
    if cfg.per_class:
        return _finetune_per_class(cfg, real, base, progress, callback)
    return _finetune_one(cfg, real, base, progress, callback)


def _finetune_one(cfg: FinetuneConfig, real: RealImages, base: Path | None, progress: bool,
                  callback: Callable[[int, float], None] | None) -> Path:
    if base is not None:
        from synclone.generate.classcond_finetune import finetune_classcond

        return finetune_classcond(cfg, real, base, progress, callback)
    return _finetune_sd(cfg, real, progress, callback)


def classcond_folder(model: str) -> Path | None:
    """The folder of ``model`` when it is synclone's class-conditional generator (``None`` for anything else)."""
    from synclone.generate.classcond import FORMAT, SYNCLONE_JSON
    from synclone.models.hub import BUILTIN_PREFIX, builtin_generator

    path = builtin_generator(model[len(BUILTIN_PREFIX):]) if model.startswith(BUILTIN_PREFIX) else Path(model)
    meta = path / SYNCLONE_JSON
    if not meta.is_file():
        return None
    try:
        return path if json.loads(meta.read_text(encoding="utf-8")).get("format") == FORMAT else None
    except (OSError, ValueError):
        return None


def _finetune_per_class(cfg: FinetuneConfig, real: RealImages, base: Path | None, progress: bool,
                        callback: Callable[[int, float], None] | None) -> Path:
    """DataDream's per-class mode: one adapter per class, trained on that class's images only (resumable per
    class: a class whose adapter is finished is not trained again)."""
    out = Path(cfg.output)
    space = real.label_space
    present = sorted({r.label for r in real.records})
    small = [(space.classes[c], n) for c in present if (n := sum(r.label == c for r in real.records)) < cfg.batch_size]
    if small:
        raise UserError(f"per_class: class '{small[0][0]}' has {small[0][1]} image(s) in '{cfg.data}', fewer than "
                        f"batch_size {cfg.batch_size}: lower batch_size or add images")
    write_run_info(out, cfg)
    classes: dict[str, str] = {}
    records = []
    for c in present:
        slug = space.slugs[c]
        sub = cfg.model_copy(update={"output": str(out / slug), "per_class": False})
        _finetune_one(sub, real.subset([i for i, r in enumerate(real.records) if r.label == c]), base, progress,
                      callback)
        classes[space.classes[c]] = slug
        records.append(adapter_info(out / slug))
    first = records[0]
    record = {
        "format": "synclone-adapter",
        "method": cfg.method,
        "per_class": classes,
        "base_model": first["base_model"],
        "lora": first["lora"],
        "steps": cfg.steps,
        "images": len(real),
        "classes": list(classes),
        "data_fingerprint": real.fingerprint,
        "denoising_loss": {name: rec["denoising_loss"] for name, rec in zip(classes, records, strict=True)},
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json_atomic(out / ADAPTER_JSON, record)
    return out


def _finetune_sd(cfg: FinetuneConfig, real: RealImages, progress: bool,
                 callback: Callable[[int, float], None] | None) -> Path:
    """One adapter (or full UNet) for a diffusers text-to-image pipeline."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    out = Path(cfg.output)
    pipe, ref = load_base_pipeline(cfg)
    data = encode_training_set(cfg, pipe, real)
    write_run_info(out, cfg)
    sched = _train_scheduler(pipe)
    scaling = float(getattr(pipe.vae.config, "scaling_factor", 0.18215))
    unet = pipe.unet
    loss_before = denoising_loss(unet, data, sched, scaling, cfg.seed)
    if cfg.method == "lora":
        add_lora(unet, cfg.lora, cfg.seed)
    else:
        unet.requires_grad_(True)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    named = {k: p for k, p in unet.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(list(named.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    run = {"base_model": ref.revision, "data": data.fingerprint, "method": cfg.method,
           "lora": cfg.lora.resolved(SD_TARGETS) if cfg.method == "lora" else None, "batch_size": cfg.batch_size,
           "lr": cfg.lr, "warmup_steps": cfg.warmup_steps, "weight_decay": cfg.weight_decay, "seed": cfg.seed,
           "resolution": _resolution(cfg, pipe), "mixed_precision": cfg.mixed_precision,
           "max_grad_norm": cfg.max_grad_norm}
    ckpt = out / CKPT_DIR
    step, losses = 0, []
    if cfg.resume and (ckpt / CKPT_JSON).is_file() and (ckpt / CKPT_WEIGHTS).is_file():
        step, losses = _load_checkpoint(ckpt, named, opt, run)

    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.device == "cpu")
    pipe.vae.to(accelerator.device)
    pipe.text_encoder.to(accelerator.device)
    unet, opt = accelerator.prepare(unet, opt)
    bare = accelerator.unwrap_model(unet)
    device = accelerator.device
    bar = tqdm(total=cfg.steps, initial=step, desc="finetune", disable=not progress, mininterval=5, unit="step")
    unet.train()
    while step < cfg.steps:
        idx = batch_indices(len(data), cfg.batch_size, cfg.seed, step)
        gen = torch.Generator().manual_seed(mix_seed(cfg.seed, _STEP_STREAM, step))
        noisy, t, target = _noised_batch(data, idx, sched, scaling, gen)
        torch.manual_seed(mix_seed(cfg.seed, _DROPOUT_STREAM, step))  # LoRA dropout, if any
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        with accelerator.autocast():
            pred = unet(noisy.to(device), t.to(device), data.text[idx].to(device)).sample
        loss = F.mse_loss(pred.float(), target.to(device).float())
        opt.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(list(named.values()), cfg.max_grad_norm)
        opt.step()
        step += 1
        losses.append(loss.item())
        bar.update(1)
        if callback is not None:
            callback(step, losses[-1])
        if accelerator.is_main_process:
            if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                _save_checkpoint(ckpt, named, opt, step, losses, run)
            if cfg.validation.every and step % cfg.validation.every == 0:
                bare.eval()
                _validation_images(pipe, cfg, data, step, out)
                bare.train()
    bar.close()
    bare.eval()
    if not accelerator.is_main_process:
        return out
    _save_checkpoint(ckpt, named, opt, step, losses, run)
    loss_after = denoising_loss(bare, data, sched, scaling, cfg.seed)
    _export(pipe, bare, cfg, out)
    unet_file = f"{PIPELINE_DIR}/unet/diffusion_pytorch_model.safetensors"
    weights = out / (LORA_WEIGHTS if cfg.method == "lora" else unet_file)
    return write_adapter_record(out, cfg, {"source": ref.source, "revision": ref.revision},
                                cfg.lora.resolved(SD_TARGETS) if cfg.method == "lora" else None, weights, step,
                                len(data), list(data.label_space.classes), data.fingerprint, loss_before, loss_after,
                                losses)


def write_adapter_record(out: Path, cfg: FinetuneConfig, base_model: dict, lora: dict | None, weights: Path, step: int,
                         images: int, classes: list[str], fingerprint: str, loss_before: float, loss_after: float,
                         losses: list[float]) -> Path:
    """Write the adapter folder's record (``ADAPTER_JSON``): what was tuned from what, on which images, and the
    denoising loss before and after; the same record for Stable Diffusion and the built-in generator."""
    record = {
        "format": "synclone-adapter",
        "method": cfg.method,
        "base_model": base_model,
        "lora": lora,
        "weights": weights.relative_to(out).as_posix(),
        "weights_sha256": file_sha256(weights),
        "steps": step,
        "images": images,
        "classes": classes,
        "data_fingerprint": fingerprint,
        "denoising_loss": {"before": loss_before, "after": loss_after, "draws": 4, "seed": cfg.seed},
        "train_loss_last": float(np.mean(losses[-20:])) if losses else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json_atomic(out / ADAPTER_JSON, record)
    return out
