"""``synclone generator finetune`` with the built-in class-conditional generator as the base model.

The same command, config and output as for a diffusers text-to-image pipeline (:mod:`synclone.generate.finetune`),
on synclone's pixel-space ``UNet2DModel`` (:mod:`synclone.generate.classcond`):

- ``method: lora``: a peft LoRA adapter on the UNet (by default its attention projections and the ResNet blocks'
  convolutions, :data:`~synclone.generate.finetune.CLASSCOND_TARGETS`), every base weight frozen; saved in
  diffusers' LoRA format (``pytorch_lora_weights.safetensors``, keys ``unet.<module>.lora.down/up.weight``) with
  ``synclone_adapter.json``; ``generate`` loads it with ``generator: {backend: classcond, lora: FOLDER}``.
- ``method: full``: every UNet weight is trained; ``OUTPUT/pipeline`` is a generator folder like the base's.

Each real image is read at the generator's size and channel count and labelled by its class folder (classes by
the generator's names or slugs); the loss is the generator's own (epsilon MSE at a uniform timestep, labels
replaced by the null class with probability ``p_uncond`` so classifier-free guidance keeps working).
Exact resume as in the text-to-image path: every draw of step ``s`` comes from ``mix_seed(seed, stream, s)``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from synclone.config import write_run_info
from synclone.errors import UserError
from synclone.generate.classcond import (
    ClassCondPipeline,
    encode_images,
    load_classcond_pipeline,
    save_classcond,
)
from synclone.generate.finetune import (
    _DROPOUT_STREAM,
    _EVAL_STREAM,
    _STEP_STREAM,
    CKPT_DIR,
    CKPT_JSON,
    CKPT_WEIGHTS,
    CLASSCOND_TARGETS,
    PIPELINE_DIR,
    FinetuneConfig,
    RealImages,
    _load_checkpoint,
    _save_checkpoint,
    add_lora,
    batch_indices,
    save_lora,
    write_adapter_record,
)
from synclone.generate.lora import LORA_WEIGHTS
from synclone.util.seeds import mix_seed


def generator_labels(pipe: ClassCondPipeline, real: RealImages, data: str) -> torch.Tensor:
    """Each real image's label in the generator's label space (its class by name, else by slug)."""
    own = pipe.label_space
    cols, missing = {}, []
    for c, (name, slug) in enumerate(zip(real.label_space.classes, real.label_space.slugs, strict=True)):
        if name in own.classes:
            cols[c] = own.classes.index(name)
        elif slug in own.slugs:
            cols[c] = own.slugs.index(slug)
        else:
            missing.append(name)
    used = {r.label for r in real.records}
    missing = [m for m in missing if real.label_space.classes.index(m) in used]
    if missing:
        raise UserError(f"real folder '{data}' has class(es) {', '.join(map(repr, missing[:5]))} that the generator "
                        f"does not know ({own.describe()}): name the class folders by the generator's classes")
    return torch.tensor([cols[r.label] for r in real.records], dtype=torch.long)


def generator_pixels(pipe: ClassCondPipeline, images: list) -> torch.Tensor:
    """PIL images -> uint8 (N, C, H, W) at the generator's size and channels (bicubic fit, centre crop)."""
    from PIL import Image, ImageOps

    pre = pipe.preprocessing
    h, w = pre["image_size"]
    mode = "L" if pre["channels"] == 1 else "RGB"
    out = []
    for im in images:
        a = np.asarray(ImageOps.fit(im.convert(mode), (w, h), method=Image.Resampling.BICUBIC), dtype=np.uint8)
        out.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    return torch.from_numpy(np.stack(out).copy())


def _noised(x0: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, alphas_cumprod: torch.Tensor, null: int,
            p_uncond: float, gen: torch.Generator):
    """(noisy images, timesteps, labels with dropout, noise) of one batch; every draw from ``gen``."""
    x = x0[idx]
    t = torch.randint(0, len(alphas_cumprod), (len(idx),), generator=gen)
    noise = torch.randn(x.shape, generator=gen)
    labels = y[idx].clone()
    labels[torch.rand(len(idx), generator=gen) < p_uncond] = null
    a = alphas_cumprod[t].float().view(-1, 1, 1, 1)
    return a.sqrt() * x + (1 - a).sqrt() * noise, t, labels, noise


@torch.no_grad()
def classcond_denoising_loss(unet, x0: torch.Tensor, y: torch.Tensor, alphas_cumprod: torch.Tensor, seed: int = 0,
                             draws: int = 4) -> float:
    """Mean epsilon MSE of ``unet`` on every image with its own label, over ``draws`` fixed (seeded) draws."""
    losses = []
    idx = torch.arange(len(x0))
    for d in range(draws):
        gen = torch.Generator().manual_seed(mix_seed(seed, _EVAL_STREAM, d))
        xt, t, labels, noise = _noised(x0, y, idx, alphas_cumprod, 0, 0.0, gen)
        losses.append(F.mse_loss(unet(xt, t, class_labels=labels).sample, noise).item())
    return float(np.mean(losses))


def finetune_classcond(cfg: FinetuneConfig, real: RealImages, base_folder: Path, progress: bool = True,
                       callback: Callable[[int, float], None] | None = None) -> Path:
    """Fine-tune the class-conditional generator in ``base_folder`` on ``real`` (LoRA or full); the output folder."""
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    if cfg.mixed_precision != "no" or cfg.gradient_checkpointing:
        raise UserError("the built-in generator fine-tunes in float32 without gradient checkpointing (it is small): "
                        "set mixed_precision: no and gradient_checkpointing: false")
    if cfg.validation.every:
        raise UserError("validation images are for text-to-image pipelines; for the built-in generator leave "
                        "validation.every unset and sample the adapter with synclone generate")
    out = Path(cfg.output)
    pipe = load_classcond_pipeline(base_folder)
    y = generator_labels(pipe, real, cfg.data)
    x0 = encode_images(generator_pixels(pipe, real.images), pipe.preprocessing)
    write_run_info(out, cfg)
    # The training noise schedule is the one the sampling scheduler was built on (same betas and length).
    alphas_cumprod = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod
    unet = pipe.unet
    loss_before = classcond_denoising_loss(unet, x0, y, alphas_cumprod, cfg.seed)
    if cfg.method == "lora":
        add_lora(unet, cfg.lora, cfg.seed, default=CLASSCOND_TARGETS)
    else:
        unet.requires_grad_(True)
    unet.train()
    named = {k: p for k, p in unet.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(list(named.values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    lora = cfg.lora.resolved(CLASSCOND_TARGETS) if cfg.method == "lora" else None
    run = {"base_model": pipe.revision, "data": real.fingerprint, "method": cfg.method, "lora": lora,
           "batch_size": cfg.batch_size, "lr": cfg.lr, "warmup_steps": cfg.warmup_steps,
           "weight_decay": cfg.weight_decay, "seed": cfg.seed, "p_uncond": cfg.p_uncond,
           "max_grad_norm": cfg.max_grad_norm}
    ckpt = out / CKPT_DIR
    step, losses = 0, []
    if cfg.resume and (ckpt / CKPT_JSON).is_file() and (ckpt / CKPT_WEIGHTS).is_file():
        step, losses = _load_checkpoint(ckpt, named, opt, run)

    bar = tqdm(total=cfg.steps, initial=step, desc="finetune", disable=not progress, mininterval=5, unit="step")
    while step < cfg.steps:
        idx = batch_indices(len(x0), cfg.batch_size, cfg.seed, step)
        gen = torch.Generator().manual_seed(mix_seed(cfg.seed, _STEP_STREAM, step))
        xt, t, labels, noise = _noised(x0, y, idx, alphas_cumprod, pipe.null_class, cfg.p_uncond, gen)
        torch.manual_seed(mix_seed(cfg.seed, _DROPOUT_STREAM, step))  # LoRA dropout, if any
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        loss = F.mse_loss(unet(xt, t, class_labels=labels).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(named.values()), cfg.max_grad_norm)
        opt.step()
        step += 1
        losses.append(loss.item())
        bar.update(1)
        if callback is not None:
            callback(step, losses[-1])
        if step % cfg.checkpoint_every == 0 and step < cfg.steps:
            _save_checkpoint(ckpt, named, opt, step, losses, run)
    bar.close()
    unet.eval()
    _save_checkpoint(ckpt, named, opt, step, losses, run)
    loss_after = classcond_denoising_loss(unet, x0, y, alphas_cumprod, cfg.seed)
    if cfg.method == "lora":
        save_lora(unet, out)
        weights = out / LORA_WEIGHTS
    else:
        info = {**pipe.info, "finetuned": {"base": pipe.revision, "steps": step, "images": len(x0),
                                           "data_fingerprint": real.fingerprint}}
        save_classcond(out / PIPELINE_DIR, unet, pipe.scheduler, pipe.label_space, pipe.preprocessing,
                       defaults=pipe.defaults, info=info)
        weights = out / PIPELINE_DIR / "unet" / "diffusion_pytorch_model.safetensors"
    present = sorted({r.label for r in real.records})
    return write_adapter_record(out, cfg, {"source": pipe.source, "revision": pipe.revision, "kind": "classcond"},
                                lora, weights, step, len(x0), [real.label_space.classes[c] for c in present],
                                real.fingerprint, loss_before, loss_after, losses)
