"""LoRA on the built-in class-conditional generator (``synclone generator finetune`` with ``model:
builtin:fashion_mnist``) and per-class adapters (DataDream's second mode), on the built-in generator and on the
tiny random Stable Diffusion pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from _tiny_pipelines import TINY, file_hashes, gen_config, one_torch_thread  # noqa: F401
from synclone.data import load_fashion_mnist
from synclone.errors import UserError
from synclone.generate import GenerateConfig, generate
from synclone.generate.classcond import encode_images, load_classcond_pipeline
from synclone.generate.classcond_finetune import classcond_denoising_loss, generator_labels, generator_pixels
from synclone.generate.finetune import FinetuneConfig, finetune, read_real_images
from synclone.generate.lora import ADAPTER_JSON, LORA_WEIGHTS, adapter_fingerprint, merge_lora_into_unet
from synclone.generate.tiny import build_tiny_text2img
from synclone.models.hub import builtin_generator

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CLASSES = (0, 3, 7)  # T-shirt/top, Dress, Sneaker


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    """Four inverted Fashion-MNIST test images of each of three classes (a shifted domain), by slug."""
    root = tmp_path_factory.mktemp("shots")
    fm = load_fashion_mnist("test")
    for c in CLASSES:
        folder = root / fm.label_space.slugs[c]
        folder.mkdir()
        for i in (fm.labels == c).nonzero().flatten()[:4].tolist():
            Image.fromarray(255 - fm.images[i, 0].numpy()).save(folder / f"{i}.png")
    return root


def _cfg(shots: Path, out: Path, **kw) -> FinetuneConfig:
    base = dict(model="builtin:fashion_mnist", data=str(shots), output=str(out), batch_size=4, lr=2e-3, steps=30,
                lora={"rank": 4}, checkpoint_every=100, device="cpu")
    base.update(kw)
    return FinetuneConfig(**base)


@pytest.fixture(scope="module")
def adapter(shots, tmp_path_factory) -> Path:
    return finetune(_cfg(shots, tmp_path_factory.mktemp("ft") / "lora"), progress=False)


def _gen(out: Path, **generator) -> GenerateConfig:
    return GenerateConfig(labels=["T-shirt/top", "Dress", "Sneaker"], images_per_class=2, batch_size=3, seed=3,
                          output=str(out), progress=False,
                          generator={"backend": "classcond", "model": "builtin:fashion_mnist", "steps": 4,
                                     **generator})


def test_adapter_is_in_diffusers_lora_format_and_records_its_base(adapter):
    tensors = load_file(str(adapter / LORA_WEIGHTS))
    assert tensors and all(k.startswith("unet.") and (".lora.down." in k or ".lora.up." in k) for k in tensors)
    assert {min(v.shape[:2]) for v in tensors.values()} == {4}
    assert any(".conv1.lora" in k for k in tensors) and any(".to_q.lora" in k for k in tensors)
    rec = json.loads((adapter / ADAPTER_JSON).read_text())
    base = load_classcond_pipeline(builtin_generator("fashion_mnist"))
    assert rec["base_model"]["revision"] == base.revision and rec["method"] == "lora"
    assert rec["images"] == 12 and rec["lora"]["target_modules"][-2:] == ["conv1", "conv2"]


def test_lora_lowers_the_denoising_loss_on_its_training_images(adapter, shots, tmp_path):
    from diffusers import DDPMScheduler

    pipe = load_classcond_pipeline(builtin_generator("fashion_mnist"))
    real = read_real_images(_cfg(shots, tmp_path / "unused"))
    x0 = encode_images(generator_pixels(pipe, real.images), pipe.preprocessing)
    y = generator_labels(pipe, real, str(shots))
    ac = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod
    before = classcond_denoising_loss(pipe.unet, x0, y, ac, seed=99, draws=4)
    merge_lora_into_unet(pipe.unet, adapter, 1.0)
    after = classcond_denoising_loss(pipe.unet, x0, y, ac, seed=99, draws=4)
    # The inverted shots are far from what the generator learnt (white backgrounds): 30 steps cut the loss a lot.
    assert after < 0.8 * before, (before, after)
    rec = json.loads((adapter / ADAPTER_JSON).read_text())["denoising_loss"]
    assert rec["after"] < rec["before"]


def test_generate_loads_the_adapter_scale_zero_is_the_base_bytes(adapter, tmp_path):
    base = generate(_gen(tmp_path / "base"))
    lora = generate(_gen(tmp_path / "lora", lora=str(adapter), lora_scale=1.0))
    zero = generate(_gen(tmp_path / "zero", lora=str(adapter), lora_scale=0.0))
    h_base, h_lora, h_zero = file_hashes(base), file_hashes(lora), file_hashes(zero)
    assert len(h_base) == 6 and h_zero == h_base
    assert all(h_lora[k] != h_base[k] for k in h_base)
    info = json.loads((lora / "dataset.json").read_text())
    assert info["generator"]["lora"] == {"folder": str(adapter), "sha256": adapter_fingerprint(adapter), "scale": 1.0}
    fps = {json.loads((d / "dataset.json").read_text())["config_fingerprint"] for d in (base, lora, zero)}
    assert len(fps) == 3
    # Adapted to inverted images: the generated backgrounds turn bright (the base's are black).
    import numpy as np

    def mean(folder):
        return np.mean([np.asarray(Image.open(p)).mean() for p in sorted((folder / "train").rglob("*.png"))])

    assert mean(lora) > mean(base) + 20


class Killed(Exception):
    pass


@pytest.mark.parametrize("method", ["lora", "full"])
def test_killed_and_resumed_equals_uninterrupted(shots, tmp_path, method):
    kw = dict(steps=4, checkpoint_every=2, method=method, lr=1e-3)
    whole = finetune(_cfg(shots, tmp_path / "whole", **kw), progress=False)

    def kill_at_3(step, loss):
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        finetune(_cfg(shots, tmp_path / "resumed", **kw), progress=False, callback=kill_at_3)
    resumed = finetune(_cfg(shots, tmp_path / "resumed", **kw), progress=False)
    name = LORA_WEIGHTS if method == "lora" else "pipeline/unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(str(whole / name)), load_file(str(resumed / name))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if method == "full":  # the fine-tuned folder is a generator folder generate can use
        out = generate(_gen(tmp_path / "gen", model=str(whole / "pipeline")))
        assert len(file_hashes(out)) == 6


def test_adapter_for_another_generator_is_refused(adapter, tmp_path):
    import shutil

    other = tmp_path / "other_gen"
    shutil.copytree(builtin_generator("fashion_mnist"), other)
    w = other / "unet" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import save_file

    state = load_file(str(w))
    k = next(iter(state))
    state[k] = state[k] + 1e-3
    save_file(state, str(w))
    with pytest.raises(UserError, match="made for base model"):
        generate(_gen(tmp_path / "o", model=str(other), lora=str(adapter)))


# --- one adapter per class ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def per_class(shots, tmp_path_factory) -> Path:
    return finetune(_cfg(shots, tmp_path_factory.mktemp("pc") / "lora", steps=6, per_class=True), progress=False)


def test_per_class_trains_one_adapter_per_class_on_its_images(per_class, shots):
    rec = json.loads((per_class / ADAPTER_JSON).read_text())
    slugs = [load_fashion_mnist("test").label_space.slugs[c] for c in CLASSES]
    # The shots folder names its classes by slug, so the record does too; generate matches names or slugs.
    assert sorted(rec["per_class"].values()) == sorted(slugs)
    for name, slug in rec["per_class"].items():
        sub = json.loads((per_class / slug / ADAPTER_JSON).read_text())
        assert sub["classes"] == [name] and sub["images"] == 4
    w = [load_file(str(per_class / slug / LORA_WEIGHTS)) for slug in rec["per_class"].values()]
    k = next(k for k in w[0] if ".lora.up." in k)
    assert not torch.equal(w[0][k], w[1][k])  # trained on different images


def test_generate_uses_each_class_adapter(per_class, tmp_path):
    """An image made with the per-class folder equals the one made with its class's adapter alone."""
    rec = json.loads((per_class / ADAPTER_JSON).read_text())
    both = generate(_gen(tmp_path / "pc", lora=str(per_class)))
    dress = generate(_gen(tmp_path / "dress", lora=str(per_class / rec["per_class"]["dress"])))
    h_both, h_dress = file_hashes(both), file_hashes(dress)
    dress_files = [k for k in h_both if "/dress/" in k]
    assert len(dress_files) == 2 and all(h_both[k] == h_dress[k] for k in dress_files)
    assert any(h_both[k] != h_dress[k] for k in h_both if k not in dress_files)


def test_per_class_needs_every_class_and_lora(per_class, shots, tmp_path):
    cfg = GenerateConfig(labels=["Dress", "Bag"], images_per_class=1, output=str(tmp_path / "o"), progress=False,
                         generator={"backend": "classcond", "model": "builtin:fashion_mnist", "lora": str(per_class)})
    with pytest.raises(UserError, match="no adapter for class.*'Bag'"):
        generate(cfg)
    with pytest.raises(UserError, match="per_class: true trains one LoRA adapter per class"):
        finetune(_cfg(shots, tmp_path / "f", method="full", per_class=True), progress=False)


def test_per_class_on_the_tiny_stable_diffusion(tmp_path):
    """Per-class adapters on a text-to-image pipeline: each class's images come from its own adapter."""
    import numpy as np

    sd = build_tiny_text2img(tmp_path / "sd", **TINY)
    real = tmp_path / "real"
    for c, v in (("Dress", 220), ("Sneaker", 30)):
        (real / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((16, 16, 3), v + i, np.uint8)).save(real / c / f"{i}.png")
    out = finetune(FinetuneConfig(model=str(sd), data=str(real), output=str(tmp_path / "pc"), per_class=True,
                                  batch_size=2, steps=3, lr=5e-2, lora={"rank": 4}, device="cpu"), progress=False)
    rec = json.loads((out / ADAPTER_JSON).read_text())
    assert set(rec["per_class"]) == {"Dress", "Sneaker"}
    both = generate(gen_config(sd, tmp_path / "both", labels=["Dress", "Sneaker"], images_per_class=1,
                               generator={"lora": str(out)}))
    dress = generate(gen_config(sd, tmp_path / "dress", labels=["Dress", "Sneaker"], images_per_class=1,
                                generator={"lora": str(out / rec["per_class"]["Dress"])}))
    h_both, h_dress = file_hashes(both), file_hashes(dress)
    assert [h_both[k] == h_dress[k] for k in sorted(h_both)] == [True, False]  # dress/ then sneaker/
