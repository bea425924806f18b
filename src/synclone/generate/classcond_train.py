"""Training the class-conditional generator (``synclone generator train CONFIG``).

DDPM training (squared-cosine schedule, epsilon prediction) of the UNet in
:mod:`synclone.generate.classcond` with classifier-free-guidance label dropout, AdamW with linear
warm-up, gradient clipping, an EMA copy of the weights (used for sampling), horizontal flips.
Checkpoints are resumable exactly: model, EMA, optimiser, step, elapsed time and the data/noise RNG
are saved (safetensors + JSON), so a stopped run continues where it left off.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from pydantic import Field
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from synclone.config import StrictModel, write_run_info
from synclone.data.fashion_mnist import load_fashion_mnist
from synclone.errors import UserError
from synclone.generate.classcond import (
    build_unet,
    encode_images,
    load_classcond_pipeline,
    make_preprocessing,
    sampling_scheduler,
    save_classcond,
)
from synclone.labels import LabelSpace
from synclone.util.files import atomic_path

CKPT_DIR = "checkpoint"
CKPT_WEIGHTS = "training_state.safetensors"
CKPT_JSON = "training_state.json"


# --- configs ------------------------------------------------------------------------------------------


class GeneratorModelConfig(StrictModel):
    """The UNet's shape and the pixel folding."""
    block_out_channels: list[int] = Field(default_factory=lambda: [48, 96, 96])
    layers_per_block: int = Field(1, ge=1)
    attention_in_lowest: bool = True
    norm_num_groups: int = Field(16, ge=1)
    pixel_unshuffle: int = Field(2, ge=1, description="space-to-depth factor; 2 runs a 32x32 image at 16x16")


class GeneratorOptimConfig(StrictModel):
    """Optimisation and diffusion-training settings."""
    steps: int = Field(2000, ge=1, description="optimiser steps in total (a resumed run counts from its checkpoint)")
    max_minutes: float | None = Field(None, gt=0, description="stop (and export) after this much training time")
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(100, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    ema_decay: float = Field(0.995, ge=0, lt=1)
    p_uncond: float = Field(0.1, ge=0, lt=1, description="probability of replacing a label by the null class")
    hflip: bool = True
    num_train_timesteps: int = Field(1000, ge=10)
    beta_schedule: str = "squaredcos_cap_v2"
    seed: int = 0
    checkpoint_every: int = Field(200, ge=1)
    resume: bool = True


class GeneratorSampleConfig(StrictModel):
    """Sampling defaults stored with the generator."""
    num_inference_steps: int = Field(10, ge=1)
    guidance_scale: float = Field(4.0, ge=0)


class GeneratorTrainConfig(StrictModel):
    """``synclone generator train CONFIG``: train a class-conditional generator on a real dataset.

    Fine-tuning (adapting the generator to a few real shots): ``init`` names a trained generator
    (``builtin:fashion_mnist`` or a folder) whose weights, shape, label space and pixel format are the start,
    and ``data`` a real image folder (``<class>/*.png``, classes by the generator's names or slugs).
    """
    dataset: Literal["fashion_mnist"] = "fashion_mnist"
    data: str | None = Field(None, description="a real image folder to train on instead of `dataset`")
    init: str | None = Field(None, description="start from this generator (builtin:NAME or a folder): fine-tuning")
    data_root: str | None = None
    split: Literal["train", "test"] = "train"
    limit: int | None = Field(None, ge=1, description="use only the first N images (smoke tests)")
    out_dir: str = "runs/generator_fashion_mnist"
    export_dir: str | None = Field(None, description="where the final generator folder goes; default OUT_DIR/generator")
    model: GeneratorModelConfig = Field(default_factory=GeneratorModelConfig)
    optim: GeneratorOptimConfig = Field(default_factory=GeneratorOptimConfig)
    sample: GeneratorSampleConfig = Field(default_factory=GeneratorSampleConfig)


# --- helpers ---------------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of a module's float tensors (parameters and buffers).

    The decay warms up as ``min(decay, (1 + n) / (10 + n))`` so early averages are not dominated by
    the random initialisation (the same rule as diffusers' ``EMAModel`` with ``use_ema_warmup=False``).
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].mul_(d).add_(v.detach().float(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)

    def copy_to(self, model: torch.nn.Module) -> None:
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.shadow.items()})


def _as_nchw(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images
    if x.dtype != torch.uint8:
        raise UserError(f"training images must be uint8, got {x.dtype}")
    if x.ndim == 3:
        x = x.unsqueeze(1)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise UserError(f"training images must be (N, H, W) or (N, C, H, W) with C in 1 or 3, got {tuple(x.shape)}")
    return x.contiguous()


def _optimizer_state_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimiser state dict into tensors (for safetensors) and plain JSON data."""
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain: dict = {"param_groups": sd["param_groups"], "state": {}}
    for pid, st in sd["state"].items():
        plain["state"][str(pid)] = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.{pid}.{k}"] = v.detach().cpu().contiguous()
                plain["state"][str(pid)][k] = "tensor"
            else:
                plain["state"][str(pid)][k] = v
    return tensors, plain


def _optimizer_state_from_tensors(tensors: dict[str, torch.Tensor], plain: dict) -> dict:
    state = {}
    for pid, st in plain["state"].items():
        state[int(pid)] = {k: (tensors[f"opt.{pid}.{k}"] if v == "tensor" else v) for k, v in st.items()}
    return {"state": state, "param_groups": plain["param_groups"]}


def _save_checkpoint(folder: Path, unet, ema: EMA, opt, gen: torch.Generator, step: int, elapsed: float,
                     losses: list[float], run: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}
    tensors.update({f"ema.{k}": v.contiguous() for k, v in ema.shadow.items()})
    opt_tensors, opt_plain = _optimizer_state_to_tensors(opt)
    tensors.update(opt_tensors)
    tensors["rng"] = gen.get_state()
    info = {"step": step, "elapsed_s": elapsed, "ema_updates": ema.num_updates, "optimizer": opt_plain,
            "recent_losses": losses[-100:], "run": run}
    # Write both files under temporary names first so a kill mid-write leaves the old checkpoint intact.
    # The weights are renamed into place before their record (the inner block ends first).
    with atomic_path(folder / CKPT_JSON) as tmp_j:
        tmp_j.write_text(json.dumps(info) + "\n", encoding="utf-8")
        with atomic_path(folder / CKPT_WEIGHTS) as tmp_w:
            save_file(tensors, str(tmp_w))


def _load_checkpoint(folder: Path, unet, ema: EMA, opt, gen: torch.Generator, run: dict) -> tuple[int, float]:
    info = json.loads((folder / CKPT_JSON).read_text(encoding="utf-8"))
    if info.get("run") != run:
        raise UserError(
            f"the checkpoint in '{folder}' was made with different model/data settings; "
            "use another out_dir or set optim.resume=false to start over"
        )
    tensors = load_file(str(folder / CKPT_WEIGHTS))
    unet.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ema.shadow = {k[4:]: v.clone() for k, v in tensors.items() if k.startswith("ema.")}
    ema.num_updates = int(info["ema_updates"])
    opt.load_state_dict(_optimizer_state_from_tensors(tensors, info["optimizer"]))
    gen.set_state(tensors["rng"])
    return int(info["step"]), float(info["elapsed_s"])


# --- training ----------------------------------------------------------------------------------------------


def train_classcond(
    real_images: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    label_space: LabelSpace,
    out_dir: str | Path,
    steps: int | None = None,
    max_minutes: float | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int | None = None,
    resume: bool | None = None,
    model: GeneratorModelConfig | None = None,
    optim: GeneratorOptimConfig | None = None,
    sample: GeneratorSampleConfig | None = None,
    export_dir: str | Path | None = None,
    progress: bool = True,
    log_every: int = 50,
    init: Path | None = None,
) -> Path:
    """Train a class-conditional generator on uint8 images (N, H, W) or (N, C, H, W) with int labels.

    Checkpoints go to ``out_dir/checkpoint`` every ``optim.checkpoint_every`` steps and at the end; with
    ``resume`` a rerun continues from there. Returns the exported generator folder (default ``out_dir/generator``),
    loadable by :func:`synclone.generate.classcond.load_classcond_pipeline`.
    ``steps``/``max_minutes``/``batch_size``/``lr``/``seed``/``resume``, when given, override the matching
    ``optim`` fields (defaults: 2000 steps, no time limit, batch 64, lr 1e-3, seed 0, resume on).
    """
    model = model or GeneratorModelConfig()
    given = {"steps": steps, "max_minutes": max_minutes, "batch_size": batch_size, "lr": lr, "seed": seed,
             "resume": resume}
    optim = GeneratorOptimConfig.model_validate(
        {**(optim or GeneratorOptimConfig()).model_dump(), **{k: v for k, v in given.items() if v is not None}}
    )
    sample = sample or GeneratorSampleConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x_all = _as_nchw(real_images)
    y_all = torch.as_tensor(np.asarray(labels)).long().reshape(-1)
    if len(x_all) != len(y_all) or len(x_all) == 0:
        raise UserError(f"need as many labels as images (and at least one): {len(x_all)} images, {len(y_all)} labels")
    c = len(label_space)
    if int(y_all.min()) < 0 or int(y_all.max()) >= c:
        raise UserError(f"labels must lie in 0..{c - 1} for label space '{label_space.name}'")

    channels = int(x_all.shape[1])
    init_revision = None
    if init is not None:  # fine-tuning: the generator's own UNet, label space and pixel format
        base = load_classcond_pipeline(init)
        base.label_space.check_aligned(label_space, what=f"generator '{init}'", other_what="training data")
        pre = dict(base.preprocessing)
        if [int(x_all.shape[2]), int(x_all.shape[3])] != list(pre["image_size"]) or channels != pre["channels"]:
            raise UserError(f"training images are {channels}x{x_all.shape[2]}x{x_all.shape[3]} but generator "
                            f"'{init}' makes {pre['channels']}x{pre['image_size'][0]}x{pre['image_size'][1]}")
        unet = UNet2DModel.from_config(base.unet.config)
        unet.load_state_dict(base.unet.state_dict())
        unet.requires_grad_(True)
        init_revision = base.revision
    else:
        n_down = len(model.block_out_channels) - 1
        pre = make_preprocessing((int(x_all.shape[2]), int(x_all.shape[3])), channels, model.pixel_unshuffle,
                                 n_down)
        fold = model.pixel_unshuffle
        torch.manual_seed(optim.seed)  # the UNet's initialisation
        unet = build_unet(c, pre["unet_sample_size"], channels * fold * fold, model.block_out_channels,
                          model.layers_per_block, model.attention_in_lowest, model.norm_num_groups)
    noise_sched = DDPMScheduler(num_train_timesteps=optim.num_train_timesteps, beta_schedule=optim.beta_schedule,
                                prediction_type="epsilon")
    ema = EMA(unet, optim.ema_decay)
    opt = torch.optim.AdamW(unet.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
    gen = torch.Generator().manual_seed(optim.seed)
    # What a checkpoint must agree with to be resumed (not the step budget, which may grow).
    run = {"model": model.model_dump(), "label_space": label_space.fingerprint, "n": len(x_all),
           "batch_size": optim.batch_size, "seed": optim.seed, "preprocessing": pre}
    if init_revision is not None:  # only then, so checkpoints from before fine-tuning existed still resume
        run["init"] = init_revision

    ckpt = out / CKPT_DIR
    step, elapsed = 0, 0.0
    if optim.resume and (ckpt / CKPT_JSON).is_file() and (ckpt / CKPT_WEIGHTS).is_file():
        step, elapsed = _load_checkpoint(ckpt, unet, ema, opt, gen, run)

    def lr_at(s: int) -> float:
        return optim.lr * min(1.0, (s + 1) / max(1, optim.warmup_steps))

    alphas_cumprod = noise_sched.alphas_cumprod
    losses: list[float] = []
    unet.train()
    budget_s = optim.max_minutes * 60 if optim.max_minutes else None
    bar = tqdm(total=optim.steps, initial=step, desc="generator", disable=not progress, mininterval=5, unit="step")
    t_last = time.perf_counter()
    while step < optim.steps and (budget_s is None or elapsed < budget_s):
        idx = torch.randint(0, len(x_all), (optim.batch_size,), generator=gen)
        xb = x_all[idx]
        if optim.hflip:
            flip = torch.rand(optim.batch_size, generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        x0 = encode_images(xb, pre)
        yb = y_all[idx].clone()
        drop = torch.rand(optim.batch_size, generator=gen) < optim.p_uncond
        yb[drop] = c  # the null class
        t = torch.randint(0, optim.num_train_timesteps, (optim.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas_cumprod[t].float().view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        pred = unet(xt, t, class_labels=yb).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), optim.grad_clip)
        opt.step()
        ema.update(unet)
        step += 1
        now = time.perf_counter()
        elapsed += now - t_last
        t_last = now
        losses.append(loss.item())
        bar.update(1)
        if step % log_every == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-log_every:]):.4f}", min=f"{elapsed / 60:.1f}")
        if step % optim.checkpoint_every == 0 or step == optim.steps:
            _save_checkpoint(ckpt, unet, ema, opt, gen, step, elapsed, losses, run)
            t_last = time.perf_counter()  # checkpoint I/O is not training time
    bar.close()
    _save_checkpoint(ckpt, unet, ema, opt, gen, step, elapsed, losses, run)

    final = UNet2DModel.from_config(unet.config)
    ema.copy_to(final)
    info = {"steps": step, "train_minutes": round(elapsed / 60, 2), "batch_size": optim.batch_size, "lr": optim.lr,
            "ema_decay": optim.ema_decay, "p_uncond": optim.p_uncond, "hflip": optim.hflip, "images": len(x_all),
            "seed": optim.seed, "init": init_revision, "noise_schedule": noise_sched.config.beta_schedule,
            "num_train_timesteps": optim.num_train_timesteps, "final_loss": float(np.mean(losses[-100:]))
            if losses else None}
    dest = Path(export_dir) if export_dir else out / "generator"
    save_classcond(dest, final, sampling_scheduler(noise_sched.config), label_space, pre,
                   defaults=sample.model_dump(), info=info)
    return dest


def load_training_data(cfg: GeneratorTrainConfig) -> tuple[torch.Tensor, torch.Tensor, LabelSpace]:
    """The real images/labels named by ``cfg`` (uint8 (N, C, H, W), int64 (N,)) and their label space.

    With ``cfg.init`` and ``cfg.data``, the folder's images are resized to the generator's size and channels
    and labelled in the generator's label space.
    """
    if cfg.data is not None:
        from synclone.data.folder import load_image_folder_tensors

        space, size, channels = None, None, None
        if cfg.init is not None:
            base = load_classcond_pipeline(_init_folder(cfg.init))
            space, size, channels = base.label_space, tuple(base.preprocessing["image_size"]), \
                base.preprocessing["channels"]
        ds = load_image_folder_tensors(cfg.data, label_space=space, size=size, channels=channels)
        images, labels, space = ds.images, ds.labels, ds.label_space
    elif cfg.dataset == "fashion_mnist":

        ds = load_fashion_mnist(cfg.split, data_root=cfg.data_root)
        images, labels, space = ds.images, ds.labels, ds.label_space
    else:  # pragma: no cover - Literal guards this
        raise UserError(f"unknown dataset '{cfg.dataset}'")
    if cfg.limit:
        images, labels = images[: cfg.limit], labels[: cfg.limit]
    return torch.as_tensor(images), torch.as_tensor(labels), space


def train_generator(cfg: GeneratorTrainConfig, progress: bool = True) -> Path:
    """Run ``synclone generator train``: load the data, train (resumably), export; returns the generator folder."""
    images, labels, space = load_training_data(cfg)
    write_run_info(cfg.out_dir, cfg)
    return train_classcond(images, labels, space, cfg.out_dir, model=cfg.model, optim=cfg.optim, sample=cfg.sample,
                           export_dir=cfg.export_dir, progress=progress,
                           init=_init_folder(cfg.init) if cfg.init else None)


def _init_folder(name: str) -> Path:
    from synclone.models.hub import resolve_model

    return Path(resolve_model(name, marker="model_index.json", what="generator to fine-tune").location)
