"""Generator fine-tuning: LoRA step time against full UNet fine-tuning and against the UNet's forward + backward
bound, and the adapter's size on disk, on a small random Stable Diffusion pipeline (nothing downloaded).

    .venv/bin/python bench/bench_finetune.py            # print the table
    .venv/bin/python bench/bench_finetune.py --write    # also update "## Generator fine-tuning" in bench/RESULTS.md

A step of ``synclone generator finetune`` is timed from the step callback (median over the steps after the
first two), so model loading and encoding the real images are not counted. The bound is a bare loop of the
same UNet's forward and backward pass on the same batch shape (noisy latents, timesteps, text states), with
gradients for every weight and no optimiser: what a training step cannot beat. LoRA's step also runs the
adapter layers and AdamW over the adapter only; full fine-tuning adds AdamW over every UNet weight.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from _results import write_section

warnings.filterwarnings("ignore")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SECTION = "## Generator fine-tuning"


def real_folder(root: Path, size: int, per_class: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            from PIL import Image

            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def step_times(cfg) -> tuple[float, Path]:
    from synclone.generate.finetune import finetune

    stamps: list[float] = []
    out = finetune(cfg, progress=False, callback=lambda step, loss: stamps.append(time.perf_counter()))
    gaps = np.diff(stamps)[2:]
    return float(statistics.median(gaps)), out


def bound_time(model: Path, batch: int, steps: int, weights: bool = True) -> float:
    """Median time of a bare forward + backward of the pipeline's UNet on one batch: gradients for every weight
    (full fine-tuning's bound) or, with ``weights=False``, frozen weights and gradients through the activations
    only (LoRA's bound: its backward must reach every adapted layer, but computes no base-weight gradient)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model / "unet")
    unet.train()
    unet.requires_grad_(weights)
    c, s = unet.config.in_channels, unet.config.sample_size
    x = torch.randn(batch, c, s, s, requires_grad=not weights)
    t = torch.randint(0, 1000, (batch,))
    text = torch.randn(batch, 32, unet.config.cross_attention_dim)  # the tiny tokenizer's 32 tokens
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        unet.zero_grad(set_to_none=True)
        unet(x, t, text).sample.pow(2).mean().backward()
        times.append(time.perf_counter() - t0)
    return float(statistics.median(times[2:]))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from synclone.generate.finetune import FinetuneConfig
    from synclone.generate.tiny import build_tiny_text2img

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = build_tiny_text2img(tmp / "sd", image_size=args.image_size, layers_per_block=2, text_layers=2)
        data = real_folder(tmp / "real", args.image_size)
        common = dict(model=str(model), data=str(data), batch_size=args.batch, steps=args.steps, device="cpu",
                      checkpoint_every=10_000)
        lora_s, lora_out = step_times(FinetuneConfig(**common, output=str(tmp / "lora"), lora={"rank": args.rank}))
        full_s, full_out = step_times(FinetuneConfig(**common, output=str(tmp / "full"), method="full", lr=1e-5))
        bound_s = bound_time(model, args.batch, args.steps)
        frozen_s = bound_time(model, args.batch, args.steps, weights=False)
        adapter = (lora_out / "pytorch_lora_weights.safetensors").stat().st_size
        unet_file = (full_out / "pipeline/unet/diffusion_pytorch_model.safetensors").stat().st_size
        from diffusers import UNet2DConditionModel

        n_unet = sum(p.numel() for p in UNet2DConditionModel.from_pretrained(model / "unet").parameters())

    rows = [
        (f"LoRA fine-tuning step (rank {args.rank})", f"{1000 * lora_s:.1f} ms", f"{frozen_s / lora_s:.2f} (frozen)"),
        ("full UNet fine-tuning step", f"{1000 * full_s:.1f} ms", f"{bound_s / full_s:.2f} (weights)"),
        ("UNet forward + backward, frozen weights (LoRA's bound)", f"{1000 * frozen_s:.1f} ms", "1.00"),
        ("UNet forward + backward, weight gradients (full's bound)", f"{1000 * bound_s:.1f} ms", "1.00"),
    ]
    lines = [
        SECTION, "",
        f"`bench/bench_finetune.py`: random Stable-Diffusion-shaped pipeline ({n_unet / 1e6:.2f}M UNet parameters), "
        f"{args.image_size}x{args.image_size} images, batch {args.batch}, {args.threads} thread(s), "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}; median step over "
        f"{args.steps - 3} steps.", "",
        "| step | time | bound / time |", "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows], "",
        f"Adapter on disk: {adapter / 1024:.1f} KiB (`pytorch_lora_weights.safetensors`) against "
        f"{unet_file / 1024 / 1024:.2f} MiB for the fully fine-tuned UNet ({unet_file / adapter:.0f}x).",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(SECTION, text)


if __name__ == "__main__":
    sys.exit(main())
