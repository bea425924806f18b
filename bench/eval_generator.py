"""Quality and speed of a class-conditional generator: a real-data classifier's accuracy on its samples.

    .venv/bin/python bench/eval_generator.py [--generator DIR] [--classifier DIR] [--per-class 1000]
        [--steps 10] [--guidance 4.0] [--batch 200] [--threads N]

Generates ``per-class`` images of every class (image i's noise from a generator seeded with
(seed, i), so a rerun gives the same images), times the sampling alone (images/s), then classifies
them with ``--classifier`` (a model folder loadable by ``synclone.load_model``; images in [0, 1]).
When that folder does not exist and ``--fallback-classifier`` is given, a small CNN is trained on real
Fashion-MNIST for ``--fallback-epochs`` epochs, saved there and used instead (the script says so).
Prints a Markdown table: accuracy per class, overall, images/s.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_GENERATOR = ROOT / "src" / "synclone" / "assets" / "generators" / "fashion_mnist"
DEFAULT_CLASSIFIER = ROOT / "runs" / "fmnist_real" / "model"


def train_fallback_classifier(out: Path, epochs: int, seed: int = 0) -> tuple[Path, float]:
    """A synclone_cnn_small trained on real Fashion-MNIST train (hflip + 2-px shift); returns (folder, test acc)."""
    import torch.nn.functional as F

    from synclone.data.fashion_mnist import load_fashion_mnist
    from synclone.models import create_classifier, save_model

    tr, te = load_fashion_mnist("train"), load_fashion_mnist("test")
    torch.manual_seed(seed)
    model = create_classifier("synclone_cnn_small", tr.label_space, (1, 28, 28), (0.286,), (0.353,))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=5e-4)
    steps = epochs * (len(tr) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for s in range(steps):
        idx = torch.randint(0, len(tr), (128,), generator=g)
        x, y = tr.batch(idx)
        flip = torch.rand(len(x), generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if s % 200 == 0:
            print(f"  fallback classifier step {s}/{steps} loss {loss.item():.3f}", flush=True)
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(te.batch(slice(i, i + 1000))[0]).argmax(1) for i in range(0, len(te), 1000)])
    acc = float((pred == te.labels).float().mean())
    save_model(model, out, extra={"epochs": epochs, "real_test_top1": acc, "note": "bench/eval_generator.py fallback"})
    return out, acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--generator", default=str(DEFAULT_GENERATOR))
    ap.add_argument("--classifier", default=str(DEFAULT_CLASSIFIER))
    ap.add_argument("--fallback-classifier", default=None, help="train a CNN here if --classifier is missing")
    ap.add_argument("--fallback-epochs", type=int, default=4)
    ap.add_argument("--per-class", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on a busy shared CPU)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)

    from synclone.generate.classcond import load_classcond_pipeline
    from synclone.models import load_model

    clf_path = Path(args.classifier)
    note = ""
    if not clf_path.is_dir():
        if not args.fallback_classifier:
            raise SystemExit(f"no classifier at {clf_path}; pass --classifier or --fallback-classifier DIR")
        clf_path = Path(args.fallback_classifier)
        if not clf_path.is_dir():
            t0 = time.perf_counter()
            _, acc = train_fallback_classifier(clf_path, args.fallback_epochs, args.seed)
            minutes = (time.perf_counter() - t0) / 60
            print(f"trained fallback classifier: real test top-1 {acc:.4f} in {minutes:.1f} min")
        note = " (fallback CNN trained by this script)"
    clf = load_model(clf_path)
    pipe = load_classcond_pipeline(args.generator)
    space = pipe.label_space
    clf.label_space.check_aligned(space, what="classifier", other_what="generator")

    c = len(space)
    labels = np.repeat(np.arange(c), args.per_class)
    preds = np.empty(len(labels), np.int64)
    gen_s = 0.0
    for start in range(0, len(labels), args.batch):
        ids = range(start, min(start + args.batch, len(labels)))
        gens = [torch.Generator().manual_seed(args.seed * 1_000_003 + i) for i in ids]
        t0 = time.perf_counter()
        imgs = pipe([int(labels[i]) for i in ids], gens, num_inference_steps=args.steps,
                    guidance_scale=args.guidance, output_type="pt")
        # Quantise like a saved PNG would be, so the classifier sees what a dataset folder holds.
        imgs = (imgs * 255).round() / 255
        gen_s += time.perf_counter() - t0
        with torch.no_grad():
            preds[start : start + len(ids)] = clf(imgs).argmax(1).numpy()
        print(f"  {start + len(ids)}/{len(labels)} images, {(start + len(ids)) / gen_s:.1f} img/s", flush=True)

    acc = {space.classes[k]: float((preds[labels == k] == k).mean()) for k in range(c)}
    overall = float((preds == labels).mean())
    print(f"\ngenerator {args.generator} ({pipe.config_dict()['training']})")
    print(f"classifier {clf_path}{note}; {args.per_class} images per class, {args.steps} DPM-Solver++ steps, "
          f"guidance {args.guidance}, batch {args.batch}, torch threads {torch.get_num_threads()}\n")
    print("| class | accuracy |\n|---|---|")
    for k, v in acc.items():
        print(f"| {k} | {v:.1%} |")
    print(f"| **overall** | **{overall:.1%}** |\n")
    print(f"sampling speed: {len(labels) / gen_s:.1f} images/s ({gen_s:.0f} s for {len(labels)} images)")


if __name__ == "__main__":
    main()
