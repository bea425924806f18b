"""Throughput of synclone's corruption engine against the reference imagecorruptions-imaug, same CPU, same images.

    .venv/bin/python bench/bench_corruptions.py                 # print the table
    .venv/bin/python bench/bench_corruptions.py --write         # also update "## Corruptions" in bench/RESULTS.md

Images: photos from ``skimage.data`` resized to 224x224 and 28x28. Every corruption runs at all five
severities. The reference corrupts one PIL image per call (as ``imagecorruptions.corrupt`` does, calling the
corruption function directly because ``corrupt`` refuses images under 32 pixels) and converts to uint8;
ours corrupts a batch tensor. Both run on one thread by default (``torch.set_num_threads``,
``cv2.setNumThreads``); the machine may be shared, so the two are timed in alternating rounds and each
keeps its best round.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
import warnings
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import torch
from _results import write_section

warnings.filterwarnings("ignore")

SECTION = "## Corruptions"


def photos(size: int) -> list[np.ndarray]:
    """A handful of colour photos from skimage.data, resized to size x size (uint8 HWC)."""
    import skimage.data as skd
    from PIL import Image

    sources = [skd.astronaut(), skd.coffee(), skd.chelsea(), skd.rocket(), skd.immunohistochemistry()]
    return [np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in sources]


def time_reference(name: str, imgs: list, n: int) -> float:
    """Seconds per image for the reference, cycling severities 1-5 over n images."""
    from imagecorruptions import corruption_dict
    from PIL import Image

    fn = corruption_dict[name]
    pils = [Image.fromarray(imgs[i % len(imgs)]) for i in range(n)]
    start = time.perf_counter()
    for i, pil in enumerate(pils):
        np.uint8(fn(pil, i % 5 + 1))
    return (time.perf_counter() - start) / n


def time_ours(name: str, batch: torch.Tensor, seed: int) -> float:
    """Seconds per image for synclone, one call per severity on the whole batch."""
    from synclone.probes.corruptions.engine import corrupt

    start = time.perf_counter()
    for severity in range(1, 6):
        corrupt(batch, name, severity, seed=seed)
    return (time.perf_counter() - start) / (5 * batch.shape[0])


def run(sizes, names, rounds: int, ref_images: dict, batch_sizes: dict) -> dict:
    results = {}
    for size in sizes:
        imgs = photos(size)
        n = batch_sizes[size]
        batch = torch.stack([torch.from_numpy(imgs[i % len(imgs)]) for i in range(n)]).permute(0, 3, 1, 2)
        batch = batch.float().div(255).contiguous()
        for name in names:
            # warm both sides' caches (tap tables, kernel spectra, frost textures, numba) at every severity
            time_ours(name, batch, seed=0)
            time_reference(name, imgs, 5)
            ref, ours = math.inf, math.inf
            for r in range(rounds):
                ref = min(ref, time_reference(name, imgs, ref_images[size]))
                ours = min(ours, time_ours(name, batch, seed=r))
            results[(size, name)] = (ref, ours)
            print(f"{size:>4} {name:<18} ref {ref * 1e3:8.3f} ms  ours {ours * 1e3:8.3f} ms  x{ref / ours:6.1f}",
                  file=sys.stderr, flush=True)
    return results


def table(results: dict, sizes, names, common) -> str:
    lines = ["| corruption | " + " | ".join(f"{s}x{s} ref ms/img | {s}x{s} ours ms/img | {s}x{s} speed-up"
                                            for s in sizes) + " |",
             "|---|" + "---:|" * (3 * len(sizes))]
    for name in names:
        cells = []
        for s in sizes:
            ref, ours = results[(s, name)]
            cells += [f"{ref * 1e3:.3f}", f"{ours * 1e3:.3f}", f"{ref / ours:.1f}x"]
        tag = "" if name in common else " (held out)"
        lines.append(f"| {name}{tag} | " + " | ".join(cells) + " |")
    for label, subset in (("geometric mean, 15 corruptions", [n for n in names if n in common]),
                          ("geometric mean, all 19", names)):
        if not subset:
            continue
        cells = []
        for s in sizes:
            ratios = [results[(s, n)][0] / results[(s, n)][1] for n in subset]
            cells += ["", "", f"**{math.exp(sum(map(math.log, ratios)) / len(ratios)):.1f}x**"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

def main(argv=None) -> None:
    from synclone.probes.corruptions.engine import ALL_CORRUPTIONS, CORRUPTIONS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 28])
    p.add_argument("--names", nargs="+", default=list(ALL_CORRUPTIONS), choices=ALL_CORRUPTIONS)
    p.add_argument("--rounds", type=int, default=3, help="alternating timing rounds; each side keeps its best")
    p.add_argument("--threads", type=int, default=1, help="torch and OpenCV threads (default 1)")
    p.add_argument("--write", action="store_true", help="update the '## Corruptions' section of bench/RESULTS.md")
    args = p.parse_args(argv)

    import cv2

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    ref_images = {224: 10, 28: 100}
    batch_sizes = {224: 32, 28: 512}
    for s in args.sizes:
        ref_images.setdefault(s, 10 if s >= 128 else 100)
        batch_sizes.setdefault(s, 32 if s >= 128 else 512)
    load_start = os.getloadavg()[0]
    start = time.perf_counter()
    results = run(args.sizes, args.names, args.rounds, ref_images, batch_sizes)
    elapsed = time.perf_counter() - start
    md = table(results, args.sizes, args.names, set(CORRUPTIONS))
    text = "\n".join([
        SECTION,
        "",
        f"Command: `{command(argv)}` ({elapsed:.0f} s), on {platform.machine()} with {os.cpu_count()} cores "
        f"(shared with other jobs; 1-minute load average {load_start:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end). torch {torch.__version__}, numpy {version('numpy')}, "
        f"numba {_version('numba')}, imagecorruptions-imaug {version('imagecorruptions-imaug')}; "
        f"{args.threads} thread(s) for torch and OpenCV.",
        "Photos from skimage.data; all five severities; per size, the reference corrupts "
        + ", ".join(f"{ref_images[s]} ({s}px)" for s in args.sizes)
        + " images one by one and ours batches of "
        + ", ".join(f"{batch_sizes[s]} ({s}px)" for s in args.sizes)
        + f"; best of {args.rounds} alternating rounds. Milliseconds per image; speed-up = reference / ours.",
        "",
        md,
        "",
        reading(results, args.sizes, [n for n in args.names if n in CORRUPTIONS]),
    ])
    print(text)
    if args.write:
        write_section(SECTION, text)


# Why a corruption stays below 10x at 224x224: what bounds ours, and what the reference already does well.
LIMITS = {
    "gaussian_noise": "Box-Muller's logarithm, square root, sine and cosine per pair of values, fused with the "
                      "random words and the clipped sum (about 1.3 ns per value on 8-wide vectors)",
    "speckle_noise": "as gaussian_noise: bound by Box-Muller per pair of values",
    "impulse_noise": "one 32-bit uniform and two comparisons per value, fused with the output; the reference "
                     "(scikit-image) is vectorised NumPy too",
    "shot_noise": "one 32-bit uniform and one lookup per value in a 512 kB table, which misses the L1 cache",
    "defocus_blur": "severities 4-5 go by FFT (their kernels do not factorise into the disk's runs), as the "
                    "reference's OpenCV filter2D already does",
    "glass_blur": "two Gaussian blurs (7-13 taps each way) around the sequential pixel shuffle, which is "
                  "compiled in the reference too",
    "motion_blur": "21-41 taps per pixel at a random angle per image, four taps per vectorised pass",
    "snow": "the flake layer's motion blur stays in float64 because the layer is rounded to 8 bits afterwards "
            "(float32 would move pixels by a level against the reference)",
    "fog": "the diamond-square plasma: 65,536 points per image in eight dependent levels",
    "elastic_transform": "a 15-tap Gaussian each way on the two displacement planes, then bilinear resampling",
    "pixelate": "the reference is Pillow's 8-bit C resize (about 0.2 ms per image); ours reads and writes "
                "float32 (4x the bytes) and checks the input, which costs about as much as the block means",
    "jpeg_compression": "the reference is libjpeg-turbo on 8-bit PIL images; ours converts float32 to 8 bits "
                        "and back around its compiled lossy steps (about 0.1 ms of the total)",
    "contrast": "two passes over the image (the means, then the blend) besides the input check",
}


def reading(results: dict, sizes, common) -> str:
    """The goal, what was reached, and why, under the table."""
    if not common:
        return ""
    gm = {s: math.exp(sum(math.log(results[(s, n)][0] / results[(s, n)][1]) for n in common) / len(common))
          for s in sizes}
    reached = " and ".join(f"{gm[s]:.1f}x at {s}x{s}" for s in sizes)
    lines = [
        f"Reading: the goal was a geometric-mean speed-up of at least 10x over the 15 corruptions; this run "
        f"reached {reached}. Timings on this shared machine vary by 10-30% between runs. Both sides run on one "
        "thread: the reference works image by image in single-threaded libraries, and using both cores would "
        "speed each side up by at most 2x (a process pool for the reference, torch threads for ours), leaving "
        "the ratio where it is. docs/corruptions.md (Speed) says what bounds each corruption.",
    ]
    for s in sizes:
        slow = [n for n in common if results[(s, n)][0] / results[(s, n)][1] < 10]
        if not slow:
            continue
        lines.append("")
        lines.append(f"Below 10x at {s}x{s}:")
        for n in slow:
            reason = LIMITS.get(n, "see docs/corruptions.md") if s >= 128 else SMALL_LIMITS.get(n, LIMITS.get(n))
            lines.append(f"- {n} ({results[(s, n)][0] / results[(s, n)][1]:.1f}x): {reason}.")
    return "\n".join(lines)


# At 28x28 the reference pays Python and call overheads per image, which batching removes; what remains is work.
SMALL_LIMITS = {
    "pixelate": "the reference's Pillow call costs about 20 us per image and ours still reads and writes "
                "float32 values",
    "jpeg_compression": "the reference's libjpeg-turbo call costs about 0.1 ms per image",
    "defocus_blur": "the disk shrinks with the image to a few taps per pixel, which the reference's OpenCV "
                    "filter2D also applies directly in C",
}


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def command(argv) -> str:
    args = sys.argv[1:] if argv is None else list(argv)
    return "HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_corruptions.py" + "".join(f" {a}" for a in args)


if __name__ == "__main__":
    main()
