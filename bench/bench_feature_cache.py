"""Classifier tuning with the feature cache vs re-encoding every epoch (what He et al.'s code does).

Both paths train the same zero-shot-initialised head (same optimiser, schedule, batch order and seed) on
the same Fashion-MNIST images for the same number of epochs, with a frozen open_clip image encoder
(a randomly initialised built-in architecture: the cost of encoding is what matters here, not accuracy).

- baseline: every epoch, every batch goes through the encoder, then the head takes a step; validation
  images are re-encoded at every epoch's evaluation, as a training loop with a frozen backbone does;
- cached (cold): features computed once into an empty cache, then the head trains on them;
- cached (warm): a second run, features read from the cache;
- grid: 15 heads (5 learning rates x 3 weight decays) trained in one pass over the cached features,
  against the 15 baseline runs that a per-run script would need (extrapolated: 15 x one baseline run).

The two single-head results are compared too (weights and validation top-1): the speed-up is only
worth reporting if the head is the same.

    .venv/bin/python bench/bench_feature_cache.py                      # ViT-S-32, 20 images per class
    .venv/bin/python bench/bench_feature_cache.py --model ViT-B-32 --per-class 10
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from synclone.data import load_fashion_mnist  # noqa: E402
from synclone.models.backbones import BackboneConfig, load_backbone  # noqa: E402
from synclone.train.clip_zeroshot import zeroshot_weights  # noqa: E402
from synclone.train.features import cached_features  # noqa: E402
from synclone.train.heads import (  # noqa: E402
    HeadGridConfig,
    LinearHeadGrid,
    build_optimizer,
    cosine_schedule,
    evaluate_heads,
    train_head_grid,
)


class Clock:
    """Wall-clock and process (CPU) seconds: on a shared machine the CPU seconds are the steadier figure."""

    def __init__(self) -> None:
        self.w, self.c = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.w, time.process_time() - self.c


def baseline(encoder, train, val, text_w, scale, cfg: HeadGridConfig):
    """The re-encoding loop: the head sees the same batches as train_head_grid, features come fresh each time."""
    heads = LinearHeadGrid(1, text_w.shape[1], text_w.shape[0], scale, "zeroshot", text_w, cfg.seed)
    opt = build_optimizer(heads, cfg)
    sched = cosine_schedule(opt, cfg.epochs * math.ceil(len(train) / cfg.batch_size))
    g = torch.Generator().manual_seed(cfg.seed)
    clock = Clock()
    for _epoch in range(cfg.epochs):
        order = torch.randperm(len(train), generator=g)
        for s in range(0, len(order), cfg.batch_size):
            x, y = train.batch(order[s:s + cfg.batch_size])
            with torch.no_grad():
                f = encoder(x)
            loss = F.cross_entropy(heads(f)[0], y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        with torch.no_grad():  # the epoch's validation pass re-encodes the validation images too
            bs = cfg.batch_size
            fv = torch.cat([encoder(val.batch(slice(s, s + bs))[0]) for s in range(0, len(val), bs)])
        acc, _ = evaluate_heads(heads, fv, val.labels)
    return clock.read(), heads.stacked()[0][0].detach(), acc[0]


def cached(encoder, train, val, text_w, scale, cfg: HeadGridConfig, cache_dir: str):
    clock = Clock()
    # Encoded at the training batch size, as the baseline encodes: the comparison is about how often, not how.
    ftr = cached_features(encoder, train, cache_dir, batch_size=cfg.batch_size)
    fva = cached_features(encoder, val, cache_dir, batch_size=cfg.batch_size)
    t_enc = clock.read()[0]
    res = train_head_grid(ftr.features, ftr.labels, fva.features, fva.labels, text_w.shape[0], cfg, scale=scale,
                          init_weight=text_w)
    return clock.read(), t_enc, res, ftr.cache_hit and fva.cache_hit


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-S-32", help="open_clip built-in architecture (random weights)")
    ap.add_argument("--per-class", type=int, default=20, help="Fashion-MNIST training images per class")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)

    bb = load_backbone(BackboneConfig(name=args.model))
    data = load_fashion_mnist("train").per_class_subset(args.per_class, seed=0)
    train, val = data.split(0.2, seed=0)
    text_w = zeroshot_weights(bb, data.label_space.classes, "simple_imagenet")
    one = HeadGridConfig(init="zeroshot", lrs=[1e-3], weight_decays=[1e-4], epochs=args.epochs,
                         batch_size=args.batch_size)
    grid = one.model_copy(update={"lrs": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2], "weight_decays": [0.0, 1e-4, 1e-2]})
    n_heads = len(grid.grid())
    print(f"{args.model} (random init), {len(train)} train + {len(val)} val images upsampled to "
          f"{bb.encoder.input_size}, {args.epochs} epochs, batch {args.batch_size}, torch threads "
          f"{torch.get_num_threads()}")

    (t_base, c_base), w_base, acc_base = baseline(bb.encoder, train, val, text_w, bb.logit_scale, one)
    print(f"baseline (re-encode every epoch): {t_base:8.2f} s wall, {c_base:8.2f} s CPU")
    with tempfile.TemporaryDirectory() as cache:
        (t_cold, c_cold), t_enc, res_cold, _ = cached(bb.encoder, train, val, text_w, bb.logit_scale, one, cache)
        (t_warm, c_warm), _, res_warm, hit = cached(bb.encoder, train, val, text_w, bb.logit_scale, one, cache)
        assert hit, "the second run should read every feature from the cache"
        with tempfile.TemporaryDirectory() as cache2:
            (t_grid, c_grid), _, res_grid, _ = cached(bb.encoder, train, val, text_w, bb.logit_scale, grid, cache2)
    same = float((res_cold.weight - w_base).abs().max())
    out = {
        "model": args.model, "n_train": len(train), "n_val": len(val), "epochs": args.epochs,
        "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0],
        "wall_s": {"baseline": t_base, "cached_cold": t_cold, "cached_cold_encode": t_enc, "cached_warm": t_warm,
                   "grid_cold": t_grid},
        "cpu_s": {"baseline": c_base, "cached_cold": c_cold, "cached_warm": c_warm, "grid_cold": c_grid},
        "grid_heads": n_heads,
        "speedup_wall": {"cold": t_base / t_cold, "warm": t_base / t_warm, "grid_cold": n_heads * t_base / t_grid},
        "speedup_cpu": {"cold": c_base / c_cold, "warm": c_base / c_warm, "grid_cold": n_heads * c_base / c_grid},
        "head_max_abs_diff": same, "head_moved_from_init": float((res_cold.weight - text_w).abs().max()),
        "val_top1_baseline": acc_base, "val_top1_cached": res_cold.val_top1[0],
    }
    sw, sc = out["speedup_wall"], out["speedup_cpu"]
    print(f"cached, cold cache (encode once):  {t_cold:8.2f} s wall, {c_cold:8.2f} s CPU ({t_enc:.2f} s wall "
          f"encoding)  speed-up {sw['cold']:.1f}x wall, {sc['cold']:.1f}x CPU")
    print(f"cached, warm cache:                {t_warm:8.2f} s wall, {c_warm:8.2f} s CPU  speed-up "
          f"{sw['warm']:.0f}x wall, {sc['warm']:.0f}x CPU")
    print(f"grid of {n_heads} heads, one pass, cold: {t_grid:8.2f} s wall, {c_grid:8.2f} s CPU; vs {n_heads} baseline "
          f"runs (extrapolated) speed-up {sw['grid_cold']:.0f}x wall, {sc['grid_cold']:.0f}x CPU")
    print(f"same head? max |W_cached - W_baseline| = {same:.2e} (the head moved {out['head_moved_from_init']:.2e} "
          f"from its init); val top-1 {res_cold.val_top1[0]:.4f} (cached) vs {acc_base:.4f} (baseline)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
