"""Images/s of the training data path on big folders: worker processes, the timm preset, folder vs shards.

On a local stand-in for ImageNet (JPEGs in WordNet-id class folders, sizes around 500x375, quality 90,
written by ``tests/_imagenet_standin.py``), it measures:

- the bound: decode + resize alone (the loader's decoder, then a resize of the shorter side to 224 and
  a 224 centre crop), one process, no DataLoader;
- the training data path at 224 px with the ``imagenet_resnet`` preset (timm's RandomResizedCrop, flip,
  colour jitter, per image under its seed) through ``synclone.train.loader`` (the loop's own loader: step
  keys, collate, pinned memory off on the CPU) with 1 and 2 worker processes;
- the same with the ``ffcv_rn50`` preset (crop + flip only) and the ``simple`` preset (fixed resize + centre
  crop; JPEG draft mode applies to images at least twice the size);
- the same path reading the images from webdataset shards (``synclone shard``) instead of the folder.

Each configuration runs ``--steps`` batches of ``--batch`` images after one warm-up batch (worker start-up
is timed apart). Besides wall-clock images/s it reports images per CPU-second of the worker processes (their
rusage once joined): on a shared machine the wall clock measures the other jobs as much as the loader, the
CPU rate does not, and "images/s per worker with a core of its own" is exactly that figure.

    .venv/bin/python bench/bench_dataloader.py                   # 400 images, 10 classes
    .venv/bin/python bench/bench_dataloader.py --classes 20 --per-class 40 --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the stand-in writer lives with the tests

from _imagenet_standin import write_standin  # noqa: E402
from synclone.data.decode import decode_rgb, read_bytes, resize_center_crop  # noqa: E402
from synclone.data.sources import resolve_dataset, shard_dataset  # noqa: E402
from synclone.train.augment import resolve  # noqa: E402
from synclone.train.batches import CyclingSampler  # noqa: E402
from synclone.train.config import AugConfig  # noqa: E402
from synclone.train.loader import StepBatches, TrainItems, make_loader  # noqa: E402


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def bound(paths: list[Path], size: int, decoder: str) -> tuple[float, float]:
    """(images/s wall, images per CPU-second) of decode + resize + centre crop alone, in this process."""
    t0, c0 = time.perf_counter(), time.process_time()
    for p in paths:
        resize_center_crop(decode_rgb(read_bytes(str(p)), decoder=decoder, name=str(p)), size)
    return len(paths) / (time.perf_counter() - t0), len(paths) / (time.process_time() - c0)


def loader_rate(ds, preset: str, workers: int, batch: int, steps: int, size: int) -> tuple[float, float, float]:
    """(images/s wall over ``steps`` batches after the first, images per worker CPU-second over all batches,
    seconds to the first batch). Worker CPU time is read from the finished worker processes (RUSAGE_CHILDREN),
    so it does not depend on how busy the machine is."""
    aug = resolve(AugConfig(preset=preset))
    items = TrainItems([ds], aug, seed=0, size=size, total_steps=steps + 1)
    batches = StepBatches([CyclingSampler(len(ds), batch, 0, 0)], 0, steps + 1)
    c0 = _children_cpu()
    t0 = time.perf_counter()
    loader = make_loader(items, batches, workers, prefetch=4, pin_memory=False)
    it = iter(loader)
    next(it)
    t1 = time.perf_counter()
    n = 0
    for x, _, _, bad in it:
        assert not bad
        n += len(x)
    t2 = time.perf_counter()
    it._shutdown_workers()  # join the workers so their CPU time is counted
    del it, loader
    return n / (t2 - t1), (n + batch) / (_children_cpu() - c0), t1 - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--per-class", type=int, default=40)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--data", help="reuse a stand-in folder (written here when missing)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tmp = tempfile.TemporaryDirectory()
    root = Path(args.data or Path(tmp.name) / "imagenet-standin")
    if not root.exists():
        write_standin(root, args.classes, args.per_class, wnids=True)
    folder = resolve_dataset(str(root), image_size=args.size)
    shards = Path(tmp.name) / "shards"
    shard_dataset(root, shards, "64MB")
    sharded = resolve_dataset(str(shards), image_size=args.size)
    mb = sum(p.stat().st_size for p in folder.paths) / 1e6
    res: dict = {"images": len(folder), "MB": round(mb, 1), "cpus": os.cpu_count(),
                 "load_avg_before": os.getloadavg()[0]}
    paths = folder.paths[: min(len(folder), 200)]
    bound(paths[:10], args.size, "auto")
    for dec in ("torchvision", "pillow"):
        wall, cpu = bound(paths, args.size, dec)
        res[f"bound_decode_resize_{dec}"] = {"wall": round(wall, 1), "per_cpu_s": round(cpu, 1)}
    for name, ds in (("folder", folder), ("shards", sharded)):
        for preset in ("imagenet_resnet", "ffcv_rn50", "simple"):
            if name == "shards" and preset != "imagenet_resnet":
                continue
            for w in (1, 2):
                wall, cpu, start = loader_rate(ds, preset, w, args.batch, args.steps, args.size)
                res[f"{name}_{preset}_{w}w"] = {"wall": round(wall, 1), "per_worker_cpu_s": round(cpu, 1),
                                                "first_batch_s": round(start, 2)}
    res["load_avg_after"] = os.getloadavg()[0]
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
