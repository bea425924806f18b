"""The Ray executor against the local one: overhead with one worker, scaling to two, driver memory.

Ray is started once per process before anything is timed (as on a cluster that is already up), with
``--cpus`` CPUs; every figure is wall time of the stage call, best of ``--repeats``.

* ``gen``    -- ``synclone generate`` with the built-in class-conditional generator (builtin:fashion_mnist):
                local executor (one torch thread) vs Ray with 1 and 2 workers (one CPU each). Each run makes
                the whole plan in a fresh folder; a one-batch run on each executor gives the fixed cost
                (worker start + model load, plan, finalize), so the steady images/s excludes it. A last row
                is the machine's own bound for two workers: two local processes (one torch thread each)
                started together, each making half the images per class into its own folder; the 2-worker
                speed-up is read against it as well as against the ideal 2x.
* ``eval``   -- clean logits of a small CNN (synclone_cnn_small) on ``--n`` Fashion-MNIST test images
                through ``EvalContext.logits`` (no cache hit): local vs Ray 1 and 2 workers.
* ``memory`` -- peak RSS of the driver for plans of 1,000 and 100,000 rows (each in a fresh process):
                plan, done ids, the todo part files, and the Ray Dataset over them streamed through a
                pass-through actor (no model, so the plan-dependent part of the driver is what is measured).

    python bench/bench_ray.py gen [--images-per-class 40] [--steps 4] [--batch 50]
    python bench/bench_ray.py eval [--n 10000]
    python bench/bench_ray.py memory
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

GEN = {"backend": "classcond", "model": "builtin:fashion_mnist", "guidance_scale": 2.0}


def _start_ray(cpus: int) -> None:
    import logging

    import ray

    from synclone.util.executor import LOCAL_SYSTEM_CONFIG

    # As synclone starts a local Ray itself (ray_session), with the CPU count fixed for the comparison.
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False,
             _system_config=LOCAL_SYSTEM_CONFIG)


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_gen(args) -> list[dict]:
    from synclone.generate import GenerateConfig, generate

    work = Path(tempfile.mkdtemp(prefix="bench-ray-gen-"))
    rows = []

    def run(executor: dict, per_class: int) -> None:
        out = work / "out"
        shutil.rmtree(out, ignore_errors=True)
        generate(GenerateConfig(generator={**GEN, "steps": args.steps}, images_per_class=per_class,
                                batch_size=args.batch, seed=0, output=str(out), progress=False, executor=executor))

    def two_local(per_class: int) -> None:
        # Two independent processes at once: what two cores of this machine give without any executor.
        procs = [subprocess.Popen([sys.executable, __file__, "gen-child", "--images-per-class", str(per_class),
                                   "--steps", str(args.steps), "--batch", str(args.batch), "--out", str(work / f"p{k}"),
                                   "--seed", str(k)]) for k in range(2)]
        if any(proc.wait() for proc in procs):
            raise SystemExit("a local generate process failed")

    one_batch = max(1, args.batch // 10)  # 10 classes: one batch of images
    try:
        torch.set_num_threads(1)
        for name, ex in (("local", {"kind": "local"}), ("ray, 1 worker", {"kind": "ray", "workers": 1}),
                         ("ray, 2 workers", {"kind": "ray", "workers": 2}), ("2 local processes (bound)", None)):
            if ex is None:
                fixed = _best(lambda: two_local(max(1, one_batch // 2)), args.repeats)
                total = _best(lambda: two_local(args.images_per_class // 2), args.repeats)
                n, n1 = 20 * (args.images_per_class // 2), 20 * max(1, one_batch // 2)
            else:
                fixed = _best(lambda ex=ex: run(ex, one_batch), args.repeats)
                total = _best(lambda ex=ex: run(ex, args.images_per_class), args.repeats)
                n, n1 = 10 * args.images_per_class, 10 * one_batch
            rows.append({"executor": name, "images": n, "seconds": round(total, 2), "images_per_s": round(n / total, 2),
                         "fixed_s": round(fixed, 2), "steady_images_per_s": round((n - n1) / (total - fixed), 2)})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def _gen_child(args) -> None:
    from synclone.generate import GenerateConfig, generate

    torch.set_num_threads(1)
    shutil.rmtree(args.out, ignore_errors=True)
    generate(GenerateConfig(generator={**GEN, "steps": args.steps}, images_per_class=args.images_per_class,
                            batch_size=args.batch, seed=args.seed, output=args.out, progress=False))


def bench_eval(args) -> list[dict]:
    from synclone.data.fashion_mnist import load_fashion_mnist
    from synclone.evaluate.runner import load_entry
    from synclone.labels import FASHION_MNIST
    from synclone.models import create_classifier, save_model
    from synclone.probes.base import EvalContext
    from synclone.util.executor import ExecutorConfig

    work = Path(tempfile.mkdtemp(prefix="bench-ray-eval-"))
    try:
        torch.manual_seed(0)
        m = create_classifier("synclone_cnn_small", FASHION_MNIST, (1, 28, 28), [0.286], [0.353])
        entries = {"cnn": load_entry("cnn", save_model(m, work / "cnn"))}
        test = load_fashion_mnist("test")
        data = test.subset(torch.arange(min(args.n, len(test))), "fmnist")
        one = test.subset(torch.arange(256), "fmnist-one-batch")
        torch.set_num_threads(1)
        rows = []
        for name, ex in (("local", None), ("ray, 1 worker", ExecutorConfig(kind="ray", workers=1)),
                         ("ray, 2 workers", ExecutorConfig(kind="ray", workers=2))):
            def run(ex=ex, part=data):
                ctx = EvalContext(entries, part, work / "e", cache_dir=work / "c", batch_size=256, progress=False,
                                  executor=ex)
                ctx.logits("cnn", part)
                shutil.rmtree(work / "c", ignore_errors=True)

            # One batch gives the fixed cost (Ray: actor start and model load), as for generation.
            fixed = _best(lambda run=run: run(part=one), args.repeats)
            sec = _best(run, args.repeats)
            rows.append({"executor": name, "images": len(data), "seconds": round(sec, 2),
                         "images_per_s": round(len(data) / sec, 1), "fixed_s": round(fixed, 2),
                         "steady_images_per_s": round((len(data) - len(one)) / max(sec - fixed, 1e-9), 1)})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


class _PassThrough:
    def __call__(self, batch):
        return {"n": [len(batch["text"])]}


def _memory_child(rows: int) -> dict:
    """One driver: plan of ``rows`` jobs -> todo parts -> Ray Dataset through a pass-through actor."""
    import ray.data

    from synclone.generate import GenerateConfig
    from synclone.generate.api import _Run
    from synclone.generate.ray_runner import write_todo
    from synclone.generate.writer import done_ids

    work = Path(tempfile.mkdtemp(prefix="bench-ray-mem-"))
    try:
        cfg = GenerateConfig(generator={**GEN, "steps": 1}, images_per_class=rows // 10, batch_size=50,
                             output=str(work / "out"), progress=False)
        t0 = time.perf_counter()
        run = _Run(cfg, "cpu")
        run.write_plan()
        done, _ = done_ids(run.out, rows)
        files, n = write_todo(run.out, run.plan_path, done, cfg.batch_size, 2)
        _start_ray(2)
        ds = ray.data.read_text([str(p) for p in files], num_cpus=0)
        ds = ds.map_batches(_PassThrough, batch_size=cfg.batch_size, compute=ray.data.ActorPoolStrategy(size=2),
                            num_cpus=1)
        seen = sum(int(b["n"].sum()) for b in ds.iter_batches(batch_size=None, batch_format="numpy"))
        assert seen == n == rows, (seen, n, rows)
        took = time.perf_counter() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"rows": rows, "parts": len(files), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                                                      / 1024), "seconds": round(took, 1)}


def bench_memory(args) -> list[dict]:
    out = []
    for rows in (1000, 100_000):
        res = subprocess.run([sys.executable, __file__, "memory-child", "--rows", str(rows)], capture_output=True,
                             text=True, check=True)
        out.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps(out[-1]), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["gen", "eval", "memory", "memory-child", "gen-child"])
    p.add_argument("--images-per-class", type=int, default=40)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--rows", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.what == "gen-child":
        _gen_child(args)
        return
    if args.what == "memory-child":
        print(json.dumps(_memory_child(args.rows)))
        return
    if args.what == "memory":
        bench_memory(args)
        return
    _start_ray(args.cpus)
    (bench_gen if args.what == "gen" else bench_eval)(args)


if __name__ == "__main__":
    main()
