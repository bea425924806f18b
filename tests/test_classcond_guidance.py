"""SDEdit-style real guidance for the built-in class-conditional generator: noise a real image to strength s,
denoise it with its class label."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from _tiny_pipelines import gen_config, one_torch_thread  # noqa: F401
from synclone.data import load_fashion_mnist
from synclone.errors import UserError
from synclone.generate import generate
from synclone.generate.classcond import load_classcond_pipeline
from synclone.models.hub import builtin_generator

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipe():
    return load_classcond_pipeline(builtin_generator("fashion_mnist"))


@pytest.fixture(scope="module")
def real():
    fm = load_fashion_mnist("test")
    idx = [int((fm.labels == c).nonzero()[0]) for c in (3, 7)]  # a Dress, a Sneaker
    return fm.images[idx], [3, 7]


def _unet_calls(pipe, monkeypatch) -> list[int]:
    calls: list[int] = []
    forward = type(pipe.unet).forward

    def counting(self, *a, **k):
        calls.append(1)
        return forward(self, *a, **k)

    monkeypatch.setattr(type(pipe.unet), "forward", counting)
    return calls


def test_strength_runs_that_share_of_the_schedule(pipe, real, monkeypatch):
    images, labels = real
    calls = _unet_calls(pipe, monkeypatch)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    pipe(labels, generator=gens, num_inference_steps=10, image=images, strength=0.3, output_type="pt")
    assert len(calls) == 3  # int(10 * 0.3) denoising steps, conditional and null class in one forward each
    with pytest.raises(UserError, match="runs no denoising step"):
        pipe(labels, generator=gens, num_inference_steps=10, image=images, strength=0.05)
    with pytest.raises(UserError, match="reference images must be uint8"):
        pipe(labels, generator=gens, num_inference_steps=10, image=images.float(), strength=0.5)


def test_low_strength_stays_near_the_real_image_and_strength_one_ignores_it(pipe, real):
    images, labels = real

    def run(**kw):
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        return pipe(labels, generator=gens, num_inference_steps=10, output_type="pt", **kw)

    target = images.float() / 255
    free = run()
    near, mid = run(image=images, strength=0.2), run(image=images, strength=0.6)
    err = [float((x - target).abs().mean()) for x in (near, mid, free)]
    assert err[0] < err[1] < err[2], err  # more noise, further from the real image
    assert err[0] < 0.1
    assert torch.equal(run(image=images, strength=1.0), free)  # strength 1: the reference plays no part


def test_guided_classcond_generation_through_generate(real, tmp_path):
    images, _ = real
    refs = tmp_path / "refs"
    for slug, im in zip(("dress", "sneaker"), images, strict=True):
        (refs / slug).mkdir(parents=True)
        Image.fromarray(im[0].numpy()).save(refs / slug / "shot0.png")
    options = {"references": str(refs), "strength_by_shots": {1: 0.3, 4: 0.2}}
    cfg = gen_config("builtin:fashion_mnist", tmp_path / "o", labels=["Dress", "Sneaker"], images_per_class=2,
                     batch_size=3, generator={"backend": "classcond", "steps": 10, "guidance_scale": 2.0,
                                              "options": options})
    out = generate(cfg)
    info = json.loads((out / "dataset.json").read_text())["generator"]
    assert info["strength_by_class"] == {"Dress": 0.3, "Sneaker": 0.3}  # one shot each -> the 1-shot entry
    rows = [json.loads(x) for x in (out / "train" / "metadata.jsonl").read_text().splitlines()]
    assert sorted(r["reference"] for r in rows) == ["dress/shot0.png"] * 2 + ["sneaker/shot0.png"] * 2
    # recorded as written, so the metadata does not depend on where the package is installed
    assert info["generator"] == "builtin:fashion_mnist" and {r["generator"] for r in rows} == {info["generator"]}
    for r in rows:  # every image stays near its class's real shot
        got = np.asarray(Image.open(out / "train" / r["file_name"]), dtype=np.float32) / 255
        ref = images[0 if r["class_name"] == "Dress" else 1, 0].numpy() / 255
        assert np.abs(got - ref).mean() < 0.12
    assert generate(cfg) == out  # the resume check accepts its own record (JSON keys of the table)
