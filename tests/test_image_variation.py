"""``backend: image_variation`` on a tiny random StableDiffusionImageVariationPipeline (a tiny
CLIPVisionModelWithProjection conditions the UNet): references per image, exact resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _tiny_pipelines import file_hashes, one_torch_thread  # noqa: F401
from synclone.errors import UserError
from synclone.generate import GenerateConfig, generate
from synclone.generate.tiny import build_tiny_image_variation

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CLASSES = ["Dress", "Sneaker"]


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory) -> Path:
    return build_tiny_image_variation(tmp_path_factory.mktemp("iv") / "pipe")


@pytest.fixture(scope="module")
def refs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("refs")
    rng = np.random.default_rng(0)
    for c in ("dress", "sneaker"):
        (root / c).mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def _cfg(model: Path, refs: Path, out: Path, **kw) -> GenerateConfig:
    base = dict(labels=CLASSES, images_per_class=3, batch_size=2, seed=5, output=str(out), progress=False,
                generator={"backend": "image_variation", "model": str(model), "steps": 2, "guidance_scale": 2.0,
                           "options": {"references": str(refs)}})
    base.update(kw)
    return GenerateConfig(**base)


def test_variations_of_references_recorded_per_image(pipe_dir, refs, tmp_path):
    out = generate(_cfg(pipe_dir, refs, tmp_path / "a"))
    rows = [json.loads(line) for line in (out / "train" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    # Each class's references are taken in turn: image k of a class uses reference k mod 2.
    by_class = {}
    for r in sorted(rows, key=lambda r: r["id"]):
        by_class.setdefault(r["class_name"], []).append(r["reference"])
    assert by_class == {"Dress": ["dress/0.png", "dress/1.png", "dress/0.png"],
                        "Sneaker": ["sneaker/0.png", "sneaker/1.png", "sneaker/0.png"]}
    info = json.loads((out / "dataset.json").read_text())
    assert info["generator"]["backend"] == "image_variation" and info["generator"]["references"] == str(refs)
    assert info["generator"]["pipeline"] == "StableDiffusionImageVariationPipeline"
    # The reference conditions the image: the same seed with the other reference gives another image.
    assert Image.open(out / "train" / rows[0]["file_name"]).size == (16, 16)
    h = file_hashes(out)
    assert len(set(h.values())) == 6


def test_resume_makes_the_same_images(pipe_dir, refs, tmp_path):
    whole = generate(_cfg(pipe_dir, refs, tmp_path / "whole"))
    part = tmp_path / "part"
    generate(_cfg(pipe_dir, refs, part))
    victims = sorted((part / "train").rglob("*.png"))[:3]
    for v in victims:  # as if the run had been killed before these were written
        v.unlink()
    generate(_cfg(pipe_dir, refs, part))
    assert file_hashes(part) == file_hashes(whole)


def test_bad_input(pipe_dir, refs, tmp_path):
    from _tiny_pipelines import tiny_sd

    with pytest.raises(UserError, match="reference folder .* does not exist"):
        generate(_cfg(pipe_dir, tmp_path / "nowhere", tmp_path / "x"))
    with pytest.raises(UserError, match="has no image encoder"):
        generate(_cfg(tiny_sd(), refs, tmp_path / "y"))
    with pytest.raises(UserError, match="cannot load it"):
        cfg = _cfg(pipe_dir, refs, tmp_path / "z")
        generate(cfg.model_copy(update={"generator": cfg.generator.model_copy(update={"lora": str(tmp_path)})}))
