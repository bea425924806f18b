"""Fixtures for the generation tests: tiny random pipelines saved to folders and loaded by path.

Each builder saves its pipeline once per test session into a temporary folder and returns the path.
Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

import pytest
import torch

from synclone.generate.tiny import build_tiny_seq2seq, build_tiny_text2img

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Small enough for CPU tests: 16x16 images (8x8 latents), one layer per block, 2 text layers.
TINY = dict(image_size=16, layers_per_block=1, text_layers=2)


_BUILT: dict[str, Path] = {}
_ROOT = tempfile.TemporaryDirectory(prefix="synclone-tiny-")  # removed when the interpreter exits


def _cached(name: str, build) -> Path:
    if name not in _BUILT:
        _BUILT[name] = build(Path(_ROOT.name) / name)
    return _BUILT[name]


def tiny_sd() -> Path:
    """A tiny random Stable Diffusion pipeline folder without a safety checker (built once per session)."""
    return _cached("sd", lambda p: build_tiny_text2img(p, **TINY))


def tiny_sd_flag_all() -> Path:
    """A tiny pipeline whose safety checker flags every image."""
    return _cached("sd_flag_all", lambda p: build_tiny_text2img(p, safety_threshold=-2.0, **TINY))


def tiny_t5() -> Path:
    """A tiny random T5 with a word-level tokenizer."""
    return _cached("t5", build_tiny_seq2seq)


def gen_config(model: Path | str, out: Path, **kw):
    """A GenerateConfig for the tiny pipeline: 2 sampler steps with guidance (two UNet halves)."""
    from synclone.generate import GenerateConfig

    generator = {"model": str(model), "steps": 2, "guidance_scale": 2.0, **kw.pop("generator", {})}
    base = dict(labels=["T-shirt/top", "Dress", "Ankle boot"], images_per_class=3, batch_size=4, seed=7,
                output=str(out), progress=False)
    base.update(kw)
    return GenerateConfig(generator=generator, **base)


def file_hashes(root: Path, pattern: str = "train/**/*.png") -> dict[str, str]:
    """sha256 of every file matching ``pattern`` under ``root``, keyed by relative path."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.glob(pattern))}


@contextlib.contextmanager
def torch_threads(n: int):
    """Run a block with ``n`` torch threads (restored after): runs compared byte for byte use the same count."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a test module (restored after): on this shared 2-core machine two threads per
    process oversubscribe the cores and run the tiny models ~10x slower; it also pins the thread count
    that byte-for-byte comparisons with subprocesses rely on."""
    with torch_threads(1):
        yield
