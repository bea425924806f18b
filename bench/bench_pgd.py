"""PGD throughput: synclone.probes.adversarial.pgd against torchattacks.PGD, same model, images, steps.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_pgd.py                      # defaults below
    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_pgd.py --model resnet18 --size 224 --n 8 --threads 1

The model is a randomly initialised timm model with normalisation inside (no weights are
downloaded); the attack cost does not depend on the weights. Runs alternate between the two
implementations (one first, then the other first) so that load from other processes hits both
alike; the median of ``--repeats`` timed runs is reported, after one warm-up run each, as
wall-clock images/s and as images per CPU second (process time, steadier than wall-clock on a
shared machine). With random start off, the two adversarial batches are also compared bit for bit.
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
import torchattacks
from torch import nn

from synclone.probes.adversarial import pgd


class Normalised(nn.Module):
    def __init__(self, net: nn.Module, mean, std):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", help="timm architecture (random init)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--n", type=int, default=32, help="images per batch")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--eps", type=float, default=8 / 255)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--random-start", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    net = timm.create_model(args.model, pretrained=False, num_classes=args.classes, in_chans=args.channels)
    model = Normalised(net, [0.5] * args.channels, [0.5] * args.channels).eval()
    images = torch.rand(args.n, args.channels, args.size, args.size)
    labels = torch.randint(0, args.classes, (args.n,))
    alpha = 2.5 * args.eps / args.steps

    def ours():
        return pgd(model, images, labels, args.eps, alpha=alpha, steps=args.steps, random_start=args.random_start)

    theirs_attack = torchattacks.PGD(model, eps=args.eps, alpha=alpha, steps=args.steps, random_start=args.random_start)

    def theirs():
        return theirs_attack(images, labels)

    runs = {"synclone": ours, "torchattacks": theirs}
    outputs = {name: fn() for name, fn in runs.items()}  # warm-up
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for rep in range(args.repeats):
        # Alternate which goes first, so a drift in machine load favours neither.
        for name, fn in list(runs.items())[:: 1 if rep % 2 == 0 else -1]:
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)

    print(
        f"model={args.model} images={args.n}x{args.channels}x{args.size}x{args.size} steps={args.steps} "
        f"eps={args.eps:.5g} random_start={args.random_start} threads={torch.get_num_threads()} "
        f"torch={torch.__version__} torchattacks={torchattacks.__version__}"
    )
    rates, cpu_rates = {}, {}
    for name in runs:
        rates[name] = args.n / statistics.median(wall[name])
        cpu_rates[name] = args.n / statistics.median(cpu[name])
        print(
            f"  {name:<13} {rates[name]:9.2f} images/s wall   {cpu_rates[name]:9.2f} images/CPU-s   "
            f"(medians of {args.repeats} runs)"
        )
    print(
        f"  ratio synclone / torchattacks: {rates['synclone'] / rates['torchattacks']:.3f} wall, "
        f"{cpu_rates['synclone'] / cpu_rates['torchattacks']:.3f} CPU"
    )
    if not args.random_start:
        print(f"  identical adversarial images: {torch.equal(outputs['synclone'], outputs['torchattacks'])}")


if __name__ == "__main__":
    main()
