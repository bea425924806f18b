"""Pre-training step throughput against the bound of two encoder forward+backward passes on the same batch.

A contrastive step (SimCLR, multi-positive) cannot be cheaper than passing the batch's two views through
the encoder and its projection head, forwards and backwards. This bench times the step the loop runs
(:class:`synclone.train.pretrain.SSLTask`: batch indices, the batched view augmentation of both views,
one forward of the 2N views, the loss, backward, the AdamW step) against that bound: two
forward+backward passes of the same module on N already-augmented images each, plus the same AdamW
step. Measurements are interleaved (bound, step, bound, step, ...) so a change in machine load hits
both; the median of each is reported, and the ratio is the median of the per-repetition ratios (each
bound against the step timed right after it), with its interquartile range: on a small network one
slow repetition moves a ratio of medians, a paired median barely. Goal: step >= 0.85 of the bound.
A second bound, ``joint``, runs the same two passes with one backward at the end: both views'
activations are then held at once, as a loss over both views requires; where the step is memory-bound
(the tiny CNN) this is what separates the step from the strict bound. On a shared machine,
``--threads 1 --clock cpu`` times the process's own CPU seconds, which other processes do not inflate.

    .venv/bin/python bench/bench_pretrain.py                                  # 28 px grey, both CNNs
    .venv/bin/python bench/bench_pretrain.py --arch resnet18 --size 224 --batch 16 --reps 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from synclone.data.imageset import TensorImageSet  # noqa: E402
from synclone.labels import FASHION_MNIST  # noqa: E402
from synclone.train.pretrain import PretrainConfig, SSLTask, build_ssl_module  # noqa: E402
from synclone.train.ssl_views import ViewSpec, ssl_views  # noqa: E402


def _data(size: int, channels: int, n: int) -> TensorImageSet:
    if size == 28 and channels == 1:
        from synclone.data import load_fashion_mnist

        ds = load_fashion_mnist("train")
        return ds.subset(torch.arange(n))
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)
    return TensorImageSet(images, torch.arange(n) % 10, FASHION_MNIST, "random")


def bench(arch: str, size: int, batch: int, method: str, reps: int, clock=time.perf_counter) -> dict:  # noqa: ANN001
    channels = 1 if size == 28 else 3
    data = _data(size, channels, max(4 * batch, 512))
    # A multi-positive batch counts items (one view each): 2N items encode as many images as N pairs.
    items = 2 * batch if method == "multipositive" else batch
    cfg = PretrainConfig.model_validate({"method": method, "model": {"arch": arch},
                                         "optim": {"batch_size": items}, "ssl": {"group_size": 2}})
    task = SSLTask(cfg)
    task.prepare(SimpleNamespace(real=data, synthetic=None), world=1)
    model = build_ssl_module(cfg, FASHION_MNIST, (channels, size, size)).to(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    acc = SimpleNamespace(num_processes=1)
    spec = ViewSpec.resolve(cfg.views, (channels, size, size))
    x0, _ = data.batch(torch.arange(batch))
    views = [ssl_views(x0, spec, k).contiguous(memory_format=torch.channels_last) for k in (1, 2)]

    def bound() -> None:
        for v in views:  # two forward+backward passes of N images
            model(v).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def joint() -> None:
        # The same two passes with both graphs alive until one backward, as any loss over both views needs:
        # the activations of both views are held at once (the strict bound frees each before the next).
        sum(model(v).float().pow(2).mean() for v in views).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step_no = [0]

    def step() -> None:
        b = task.batch(step_no[0], 0, 1)
        b["x"] = b["x"].contiguous(memory_format=torch.channels_last)
        task.loss(model, model, b, acc).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        task.after_step(model)
        step_no[0] += 1

    for _ in range(3):  # warm-up: the allocator and oneDNN primitive caches of both shapes
        bound(), joint(), step()
    tb, tj, ts = [], [], []
    for _ in range(reps):
        for fn, out in ((bound, tb), (joint, tj), (step, ts)):
            t = clock()
            fn()
            out.append(clock() - t)
    b, s = statistics.median(tb), statistics.median(ts)
    ratios = [x / y for x, y in zip(tb, ts, strict=True)]
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    joint_ratio = statistics.median(x / y for x, y in zip(tj, ts, strict=True))
    t = clock()
    for k in range(reps):
        task.batch(k, 0, 1)
    views_s = (clock() - t) / reps
    return {"arch": arch, "size": size, "batch": batch, "method": method, "bound_s": b, "step_s": s,
            "views_s": views_s, "ratio": statistics.median(ratios), "ratio_q1": q1, "ratio_q3": q3,
            "joint_s": statistics.median(tj), "joint_ratio": joint_ratio, "images_per_s": batch / s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", nargs="+", default=["synclone_cnn_tiny", "synclone_cnn_small"])
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--method", nargs="+", default=["simclr", "multipositive", "moco_v2"])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    a = p.parse_args()
    clock = time.perf_counter if a.clock == "wall" else time.process_time
    torch.set_num_threads(a.threads)
    print(f"{'arch':<20} {'size':>4} {'batch':>5} {'method':<14} {'bound s':>8} {'step s':>8} {'views s':>8} "
          f"{'step/bound':>10} {'IQR':>11} {'joint s':>8} {'step/joint':>10} {'img/s':>7}")
    for arch in a.arch:
        for method in a.method:
            r = bench(arch, a.size, a.batch, method, a.reps, clock)
            print(f"{r['arch']:<20} {r['size']:>4} {r['batch']:>5} {r['method']:<14} {r['bound_s']:>8.3f} "
                  f"{r['step_s']:>8.3f} {r['views_s']:>8.3f} {r['ratio']:>10.2f} "
                  f"{r['ratio_q1']:>5.2f}-{r['ratio_q3']:<5.2f} {r['joint_s']:>8.3f} {r['joint_ratio']:>10.2f} "
                  f"{r['images_per_s']:>7.0f}",
                  flush=True)


if __name__ == "__main__":
    main()
