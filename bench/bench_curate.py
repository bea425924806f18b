"""Curation speed: batched scoring vs image by image, and a re-filter from the cache vs a cold run.

Models are built locally with random weights (nothing is downloaded): the compute cost of a forward pass
does not depend on the weights' values, so the throughput figures hold for the trained models too.

- ``teacher``: the synclone_cnn_tiny classifier at 28x28 (the Fashion-MNIST demo's scorer);
- ``openclip``: open_clip's ViT-B-32 architecture at 224x224 (He et al.'s CLIP filter's size class).

Images are Fashion-MNIST test images written as a generated dataset folder (28x28 grey PNGs).

    python bench/bench_curate.py                 # both scorers
    python bench/bench_curate.py --skip-clip     # teacher only (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from synclone.curate import CurateConfig, curate  # noqa: E402
from synclone.curate.cache import FileKeys, ScorerCache  # noqa: E402
from synclone.curate.scorers import create_scorer  # noqa: E402
from synclone.curate.scoring import score_records  # noqa: E402
from synclone.data.folder import read_dataset_folder  # noqa: E402


def write_dataset(root: Path, n: int) -> Path:
    from synclone.data import load_fashion_mnist

    data = load_fashion_mnist("test")
    space = data.label_space
    train = root / "train"
    rows = []
    for i in range(n):
        label = int(data.labels[i])
        rel = f"{space.slugs[label]}/{i:06d}.png"
        (train / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(data.images[i, 0].numpy()).save(train / rel)
        rows.append({"file_name": rel, "id": f"{i:06d}", "label": label, "class_name": space.classes[label],
                     "prompt": f"a photo of a {space.classes[label]}"})
    (train / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "dataset.json").write_text(json.dumps({"label_space": space.to_dict()}))
    return root


def make_model(name: str, root: Path) -> dict:
    """A scorer config for a freshly built model folder ('teacher' or 'openclip')."""
    torch.manual_seed(0)
    if name == "teacher":
        from synclone.labels import FASHION_MNIST
        from synclone.models import create_classifier, save_model

        teacher = save_model(create_classifier("synclone_cnn_tiny", FASHION_MNIST, (1, 28, 28)), root / "teacher")
        return {"kind": "teacher", "model": str(teacher)}
    import open_clip
    from safetensors.torch import save_file

    folder = root / "vit_b_32"
    folder.mkdir()
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    cfg = {"model_cfg": open_clip.get_model_config("ViT-B-32"),
           "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)}}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    return {"kind": "openclip", "model": str(folder), "templates": "simple"}


def time_scoring(dataset: Path, scorer_cfg: dict, batch_size: int, cache_dir: Path, cold: bool) -> tuple[float, float]:
    """(wall, CPU) seconds of ``score_records`` over the dataset, with the model already loaded.

    ``cold``: the cache holds no image rows (every image is hashed, decoded, encoded and written), but the
    text side (class and prompt embeddings) is cached, so the figure is the image pipeline's alone.
    """
    records, space = read_dataset_folder(dataset)
    cfg = CurateConfig.model_validate({"input": str(dataset), "output": "-",
                                       "scorer": {**scorer_cfg, "batch_size": batch_size}})
    scorer = create_scorer(cfg.scorer)
    sid = scorer.cache_id(FileKeys(cache_dir))
    scorer.load()
    if cold:
        first_of_class = list({r.label: r for r in records}.values())
        score_records(first_of_class, space, scorer, ScorerCache(cache_dir, sid))  # primes the text side
        for f in (cache_dir / sid).glob("images-*.safetensors"):
            f.unlink()
        (cache_dir / "files.json").unlink(missing_ok=True)
    cache = ScorerCache(cache_dir, sid)
    before = scorer.images_encoded
    t0, c0 = time.perf_counter(), time.process_time()
    score_records(records, space, scorer, cache)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert scorer.images_encoded - before == (len(records) if cold else 0)
    return wall, cpu


def time_curate(dataset: Path, scorer_cfg: dict, out: Path, cache_dir: Path, threshold: float) -> tuple[float, float]:
    cfg = CurateConfig.model_validate({
        "input": str(dataset), "output": str(out), "cache_dir": str(cache_dir), "scorer": scorer_cfg,
        "progress": False, "filters": {"threshold": {"p_label": threshold}, "dedup": {"enabled": True}}})
    t0, c0 = time.perf_counter(), time.process_time()
    curate(cfg)
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="images for the teacher")
    ap.add_argument("--clip-n", type=int, default=128, help="images for the CLIP scorer")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--skip-clip", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_curate_") as tmp:
        tmp = Path(tmp)
        for name, n in (("teacher", args.n), ("openclip", args.clip_n)):
            if name == "openclip" and args.skip_clip:
                continue
            ds = write_dataset(tmp / f"data_{name}", n)
            sc = make_model(name, tmp)
            t0 = time.perf_counter()
            create_scorer(CurateConfig.model_validate({"input": "-", "output": "-", "scorer": sc}).scorer).load()
            load_s = time.perf_counter() - t0
            batched = time_scoring(ds, sc, args.batch_size, tmp / f"c_{name}", cold=True)
            single = time_scoring(ds, sc, 1, tmp / f"c_{name}", cold=True)
            warm = time_scoring(ds, sc, args.batch_size, tmp / f"c_{name}", cold=False)
            cold_run = time_curate(ds, sc, tmp / f"out_{name}", tmp / f"cc_{name}", 0.1)
            refilter = time_curate(ds, sc, tmp / f"out_{name}", tmp / f"cc_{name}", 0.3)
            rows.append({"scorer": name, "images": n, "model_load_s": load_s, "batched": batched, "single": single,
                         "cached": warm, "cold_curate": cold_run, "refilter": refilter})
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}")
    print("Figures are wall / CPU (process time); img/s = images per second.\n")
    print("| scorer | images | model load s | batched img/s | one-by-one img/s | batched speed-up | cached img/s "
          "| cold curate s | re-filter s | cold / re-filter |")
    print("|---|---|---|---|---|---|---|---|---|---|")

    def pair(a: float, b: float, fmt: str = ".0f") -> str:
        return f"{a:{fmt}} / {b:{fmt}}"

    for r in rows:
        n = r["images"]
        rate = {k: (n / r[k][0], n / r[k][1]) for k in ("batched", "single", "cached")}
        speedup = (rate["batched"][0] / rate["single"][0], rate["batched"][1] / rate["single"][1])
        print(f"| {r['scorer']} | {n} | {r['model_load_s']:.1f} | {pair(*rate['batched'], '.1f')} | "
              f"{pair(*rate['single'], '.1f')} | {pair(*speedup, '.1f')} | "
              f"{pair(*rate['cached'])} | {pair(*r['cold_curate'], '.1f')} | {pair(*r['refilter'], '.1f')} | "
              f"{pair(r['cold_curate'][0] / r['refilter'][0], r['cold_curate'][1] / r['refilter'][1], '.1f')} |")
    print(json.dumps(rows, default=lambda o: float(o) if isinstance(o, np.floating) else o))


if __name__ == "__main__":
    main()
