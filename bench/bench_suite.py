"""The whole evaluation suite against its unavoidable forward passes, and against one probe at a time.

Setting: Fashion-MNIST test (10,000 images) as the clean set, N ``synclone_cnn_small`` models (built
locally with ``create_classifier``, a few Adam steps each so that their accuracies differ and the shift
probe's effective-robustness fit is defined, then ``save_model``), and the probes ``clean``,
``calibration``, ``ood`` (its four default sets: scikit-learn digits, animal-shape silhouettes, uniform
and Gaussian noise, 2,000 images each at most) and ``shift`` (a folder of brightness-inverted test
images as PNGs, read from disk like any user folder).

Three ways, each timed cold (empty logits cache) in alternating rounds:

- **suite**: one ``synclone.evaluate.evaluate`` call with all four probes; it loads the models and
  data, shares each (model, dataset) forward pass between the probes, computes the metrics and
  writes results, artefacts and timings;
- **bound**: the unavoidable forward passes alone: each model on each distinct dataset once (clean,
  shifted, four OOD sets), on tensors already in memory, timed with nothing else;
- **per probe**: each probe in its own ``evaluate`` call with a fresh output folder and cache (a fresh
  context: models and data loaded again, the clean pass repeated per probe), which is how the anchor
  benchmark runs its evaluations (one script per measurement).

A second mode, ``--streaming N``, checks that ImageNet-family folders (read by
:class:`synclone.data.streaming.FileImageSet`, decoded batch by batch on a thread pool while the
model runs) cost little more than the forward passes: N JPEG photos (scikit-image's, at their own sizes)
in an ImageNet val layout, a random-weight ``tf_efficientnet_lite0`` at 224x224, timing decoding alone,
the forward pass alone on decoded tensors, and ``EvalContext.logits`` streaming both.

    .venv/bin/python bench/bench_suite.py                    # 3 models, 2000 shifted images, 3 rounds
    .venv/bin/python bench/bench_suite.py --models 3 --rounds 5 --threads 1
    .venv/bin/python bench/bench_suite.py --streaming 256
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from synclone.data.eval_sets import load_eval_dataset  # noqa: E402
from synclone.data.fashion_mnist import load_fashion_mnist  # noqa: E402
from synclone.evaluate import EvaluateConfig, evaluate  # noqa: E402
from synclone.evaluate.runner import load_entry  # noqa: E402
from synclone.labels import FASHION_MNIST  # noqa: E402
from synclone.models import create_classifier, save_model  # noqa: E402
from synclone.probes.base import EvalContext  # noqa: E402

OOD_SETS = ["digits", "animal_shapes", "uniform_noise", "gaussian_noise"]


class Clock:
    """Wall-clock and process (CPU) seconds: on a shared machine the CPU seconds are the steadier figure."""

    def __init__(self) -> None:
        self.w, self.c = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.w, time.process_time() - self.c


def make_models(root: Path, n: int, arch: str) -> dict[str, str]:
    """``n`` models trained for 10, 20, 40, ... Adam steps: different accuracies, so the ER fit is defined.

    The forward cost does not depend on the weights; a few steps only spread the accuracies.
    """
    train = load_fashion_mnist("train").per_class_subset(100, seed=0)
    out = {}
    for k in range(n):
        torch.manual_seed(k)
        m = create_classifier(arch, FASHION_MNIST, (1, 28, 28), [0.286], [0.353])
        opt = torch.optim.Adam(m.parameters(), 3e-3)
        g = torch.Generator().manual_seed(k)
        for _ in range(10 * 2 ** k):
            x, y = train.batch(torch.randint(0, len(train), (64,), generator=g))
            loss = F.cross_entropy(m(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        out[f"m{k}"] = str(save_model(m.eval(), root / f"m{k}"))
    return out


def make_shift_folder(root: Path, n: int) -> Path:
    """``n`` brightness-inverted Fashion-MNIST test images as ``<class>/<i>.png``: a shifted set on disk."""
    test = load_fashion_mnist("test")
    for i in range(n):
        folder = root / FASHION_MNIST.slugs[int(test.labels[i])]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(255 - test.images[i, 0].numpy()).save(folder / f"{i}.png")
    return root


def config(out: Path, models: dict[str, str], shift: Path, probes: list[str], batch_size: int) -> EvaluateConfig:
    all_probes = {"clean": {}, "calibration": {}, "ood": {"datasets": OOD_SETS}, "shift": {"datasets": [str(shift)]}}
    return EvaluateConfig(output=str(out), models=models, batch_size=batch_size,
                          probes={p: all_probes[p] for p in probes})


def run_suite(work: Path, tag: str, models, shift, probes, batch_size) -> tuple[float, float, int]:
    clock = Clock()
    out = work / tag
    evaluate(config(out, models, shift, probes, batch_size), progress=False)
    w, c = clock.read()
    return w, c, json.loads((out / "timings.json").read_text())["forward_passes"]


def run_per_probe(work: Path, tag: str, models, shift, probes, batch_size) -> tuple[float, float, int]:
    w = c = 0.0
    passes = 0
    for p in probes:
        pw, pc, n = run_suite(work, f"{tag}_{p}", models, shift, [p], batch_size)
        w, c, passes = w + pw, c + pc, passes + n
    return w, c, passes


def bound_inputs(models: dict[str, str], shift: Path, batch_size: int, work: Path):
    """The exact tensors the suite feeds its models (same loaders, same seeded caps), loaded untimed."""
    clean = load_eval_dataset("fashion_mnist:test", "test")
    entries = {name: load_entry(name, path) for name, path in models.items()}
    ctx = EvalContext(entries, clean, work / "bound", batch_size=batch_size, progress=False)
    datasets = [clean, ctx.dataset(str(shift))] + [ctx.cap(ctx.dataset(s), 2000) for s in OOD_SETS]
    return ctx, datasets


def run_bound(ctx: EvalContext, datasets) -> tuple[float, float, int]:
    w = c = 0.0
    for name in ctx.models:
        for data in datasets:
            x = data.images
            clock = Clock()
            ctx.forward(name, x)
            dw, dc = clock.read()
            w, c = w + dw, c + dc
    return w, c, len(ctx.models) * len(datasets)


def streaming(n: int, rounds: int, batch_size: int) -> None:
    """Decode alone, forward alone and streamed decode + forward on an ImageNet-val-style JPEG folder."""
    import numpy as np
    from skimage import data as photos

    from synclone.data.imagenet import imagenet1k_wnids, load_imagenet_set
    from synclone.labels import imagenet1k_space
    from synclone.probes.base import ModelEntry

    names = ["chelsea", "coffee", "astronaut", "rocket", "hubble_deep_field", "immunohistochemistry"]
    pics = [np.asarray(getattr(photos, k)()) for k in names]
    torch.manual_seed(0)
    model = create_classifier("tf_efficientnet_lite0", imagenet1k_space(), (3, 224, 224)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "val"
        for i in range(n):
            folder = root / imagenet1k_wnids()[i % 1000]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pics[i % len(pics)]).save(folder / f"{i}.JPEG", quality=90)
        data = load_imagenet_set(root)
        ctx = EvalContext({"m": ModelEntry("m", root, model, "m")}, data, Path(tmp) / "out", batch_size=batch_size,
                          progress=False)
        x = torch.cat(list(data.iter_batches(batch_size)))
        times: dict[str, list[tuple[float, float]]] = {"decode alone": [], "forward alone": [], "streamed": []}
        for _ in range(rounds):
            clock = Clock()
            for _b in data.iter_batches(batch_size):
                pass
            times["decode alone"].append(clock.read())
            clock = Clock()
            ctx.forward("m", x)
            times["forward alone"].append(clock.read())
            ctx._memo.clear()  # a cold pass each round: no memo, no disk cache
            for f in ctx.cache_dir.glob("*.safetensors"):
                f.unlink()
            clock = Clock()
            ctx.logits("m", data)
            times["streamed"].append(clock.read())
    best = {k: (min(w for w, _ in v), min(c for _, c in v)) for k, v in times.items()}
    fw, fc = best["forward alone"]
    print(f"{n} JPEGs (scikit-image photos, 300x451 to 1000x872) -> 224x224, random tf_efficientnet_lite0, "
          f"batch {batch_size}, {torch.get_num_threads()} torch thread(s), {data.workers} decode threads; "
          f"best of {rounds}")
    print("| way | wall s | CPU s | img/s (wall) | x forward alone (wall / CPU) |")
    print("|---|---:|---:|---:|---:|")
    for k, (w, c) in best.items():
        print(f"| {k} | {w:.2f} | {c:.2f} | {n / w:.1f} | {w / fw:.2f} / {c / fc:.2f} |")
    print("load:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--arch", default="synclone_cnn_small")
    ap.add_argument("--shift-images", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--streaming", type=int, default=0, metavar="N",
                    help="instead: time N ImageNet-style JPEGs streamed through EfficientNet-Lite0")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.streaming:
        streaming(args.streaming, args.rounds, min(args.batch_size, 64))
        return
    probes = ["clean", "calibration", "ood", "shift"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        models = make_models(work / "models", args.models, args.arch)
        shift = make_shift_folder(work / "shifted", args.shift_images)
        ctx, datasets = bound_inputs(models, shift, args.batch_size, work)
        sizes = [len(d) for d in datasets]
        # Warm-up: imports, first-call allocations, the page cache for the PNGs and the dataset files.
        run_suite(work, "warmup", models, shift, probes, args.batch_size)
        results: dict[str, list[tuple[float, float, int]]] = {"suite": [], "bound": [], "per probe": []}
        for r in range(args.rounds):
            results["bound"].append(run_bound(ctx, datasets))
            results["suite"].append(run_suite(work, f"suite{r}", models, shift, probes, args.batch_size))
            results["per probe"].append(run_per_probe(work, f"pp{r}", models, shift, probes, args.batch_size))
    best = {k: (min(x[0] for x in v), min(x[1] for x in v), v[0][2]) for k, v in results.items()}
    med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for k, v in results.items()}
    print(f"{args.models} x {args.arch} on Fashion-MNIST test; datasets {sizes} images "
          f"(clean, shifted, {', '.join(OOD_SETS)}); batch {args.batch_size}; {args.threads} thread(s); "
          f"{args.rounds} rounds, best (median)")
    print("| way | forward passes | wall s | CPU s | x bound (wall / CPU) |")
    print("|---|---:|---:|---:|---:|")
    bw, bc, _ = best["bound"]
    for k in ("bound", "suite", "per probe"):
        w, c, n = best[k]
        print(f"| {k} | {n} | {w:.2f} ({med[k][0]:.2f}) | {c:.2f} ({med[k][1]:.2f}) | {w / bw:.2f} / {c / bc:.2f} |")
    sw, sc, _ = best["suite"]
    pw, pc, _ = best["per probe"]
    print(f"suite vs per probe: {pw / sw:.2f}x faster (wall), {pc / sc:.2f}x (CPU)")
    print("load:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
