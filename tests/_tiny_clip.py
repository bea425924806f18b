"""Tiny local models and dataset folders for the curation tests (nothing is downloaded).

- an open_clip model from a custom config, saved in open_clip's own ``local-dir:`` folder format;
- a transformers ``CLIPModel`` from a small ``CLIPConfig``, with a ``CLIPTokenizer`` built from open_clip's
  bundled BPE file (vocab and merges passed as objects: transformers 5 ignores ``vocab_file=``);
- a real teacher: the small synclone CNN trained a few hundred steps on a Fashion-MNIST subset;
- writers for synclone dataset folders (``train/<slug>/<id>.png`` + ``metadata.jsonl`` + ``dataset.json``).

Builders are cached per process so several test modules share one teacher.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from synclone.labels import LabelSpace

TINY_OPENCLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    # The vocabulary must be CLIP's (49408) for the bundled tokenizer's ids to fit.
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def make_openclip_folder(folder: Path, seed: int = 0) -> Path:
    """open_clip's local-dir layout: open_clip_config.json (model_cfg + preprocess_cfg) + safetensors weights."""
    import open_clip
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_OPENCLIP_CFG)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    cfg = {"model_cfg": TINY_OPENCLIP_CFG,
           "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)}}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return folder


def make_hf_clip_folder(folder: Path, seed: int = 0) -> Path:
    """A tiny transformers CLIPModel + tokenizer + image processor, saved with save_pretrained."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from synclone.curate.scorers import hf_clip_tokenizer_offline

    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "vocab_size": 49408, "max_position_embeddings": 77},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    CLIPModel(cfg).eval().save_pretrained(str(folder))
    hf_clip_tokenizer_offline().save_pretrained(str(folder))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(folder))
    return folder


def train_teacher(folder: Path, steps: int = 250, per_class: int = 200, seed: int = 0) -> Path:
    """synclone_cnn_tiny trained ``steps`` Adam steps on ``per_class`` real Fashion-MNIST images per class."""
    from synclone.data import load_fashion_mnist
    from synclone.models import create_classifier, save_model

    data = load_fashion_mnist("train").per_class_subset(per_class, seed=seed)
    torch.manual_seed(seed)
    model = create_classifier("synclone_cnn_tiny", data.label_space, (1, 28, 28))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    model.train()
    with one_thread():
        for _ in range(steps):
            idx = torch.randint(len(data), (64,), generator=g)
            x, y = data.batch(idx)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    save_model(model.eval(), folder)
    return folder


@contextlib.contextmanager
def one_thread():
    """Run torch on one thread for the block: tiny ops on a shared 2-core machine are faster that way."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _process_tmpdir(prefix: str) -> Path:
    """A temporary folder removed when the test process exits."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.cache
def shared_teacher() -> Path:
    """One trained teacher per test process (a few seconds to train)."""
    return train_teacher(_process_tmpdir("synclone_teacher_") / "teacher")


@functools.cache
def shared_openclip() -> Path:
    return make_openclip_folder(_process_tmpdir("synclone_openclip_") / "tiny_openclip")


@functools.cache
def shared_hf_clip() -> Path:
    return make_hf_clip_folder(_process_tmpdir("synclone_hfclip_") / "tiny_hf_clip")


def write_dataset_folder(root: Path, images: list[np.ndarray] | np.ndarray, labels: list[int], space: LabelSpace,
                         prompts: list[str | None] | None = None, ids: list[str] | None = None,
                         extra: dict | None = None) -> Path:
    """A synclone dataset folder as ``synclone generate`` writes it. ``images``: uint8 (H, W) or (H, W, C)."""
    train = root / "train"
    rows = []
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        iid = ids[i] if ids else f"{i:05d}"
        rel = f"{space.slugs[label]}/{iid}.png"
        (train / rel).parent.mkdir(parents=True, exist_ok=True)
        a = np.asarray(img)
        Image.fromarray(a.squeeze(0) if a.ndim == 3 and a.shape[0] == 1 else a).save(train / rel)
        row = {"file_name": rel, "id": iid, "label": int(label), "class_name": space.classes[label],
               "seed": i, "strategy": "test"}
        if prompts and prompts[i] is not None:
            row["prompt"] = prompts[i]
            row["negative_prompt"] = ""
        rows.append(row)
    train.mkdir(parents=True, exist_ok=True)
    with open(train / "metadata.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    info = {"label_space": space.to_dict(), "generator": {"kind": "test-fixture"}, **(extra or {})}
    (root / "dataset.json").write_text(json.dumps(info), encoding="utf-8")
    return root


def fashion_mnist_mixture(root: Path, per_class: int = 8, off_label: int = 2, noise: int = 2, seed: int = 1,
                          prompts: bool = True) -> tuple[Path, list[str]]:
    """A generated-looking dataset of real Fashion-MNIST test images: per class ``per_class`` correctly
    labelled ones, ``off_label`` images of class (c + 5) mod 10 labelled c, and ``noise`` uniform-noise images.

    Returns the folder and each image's kind in order: "real", "off_label" or "noise".
    """
    from synclone.data import load_fashion_mnist

    data = load_fashion_mnist("test").per_class_subset(per_class + off_label, seed=seed)
    space = data.label_space
    rng = np.random.default_rng(seed)
    by_class = [data.images[data.labels == c].numpy()[:, 0] for c in range(len(space))]
    images, labels, kinds = [], [], []
    for c in range(len(space)):
        parts = [(by_class[c][:per_class], "real"), (by_class[(c + 5) % len(space)][per_class:], "off_label"),
                 (rng.integers(0, 256, (noise, 28, 28), dtype=np.uint8), "noise")]
        for imgs, kind in parts:
            for img in imgs:
                images.append(img)
                labels.append(c)
                kinds.append(kind)
    ps = [f"a photo of a {space.classes[c]}" for c in labels] if prompts else None
    return write_dataset_folder(root, images, labels, space, prompts=ps), kinds


def write_png16(path: Path, arr: np.ndarray) -> Path:
    """Write a 16-bit PNG (grey, grey+alpha, RGB or RGBA) by hand: Pillow cannot write 16-bit colour PNGs."""
    a = arr if arr.ndim == 3 else arr[..., None]
    h, w, c = a.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    raw = b"".join(b"\x00" + a[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path
