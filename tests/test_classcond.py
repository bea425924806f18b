"""The class-conditional pixel-space generator: training, resume, save/load, sampling determinism, CFG."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from synclone.config import load_config
from synclone.errors import UserError
from synclone.generate.classcond import (
    ClassCondPipeline,
    build_unet,
    decode_samples,
    encode_images,
    load_classcond_pipeline,
    make_preprocessing,
    sampling_scheduler,
    save_classcond,
)
from synclone.generate.classcond_train import (
    GeneratorModelConfig,
    GeneratorOptimConfig,
    GeneratorTrainConfig,
    train_classcond,
    train_generator,
)
from synclone.labels import FASHION_MNIST, LabelSpace

BUILTIN = Path(__file__).resolve().parents[1] / "src" / "synclone" / "assets" / "generators" / "fashion_mnist"
TINY_MODEL = GeneratorModelConfig(block_out_channels=[8, 16], norm_num_groups=4, pixel_unshuffle=2)
SPACE3 = LabelSpace.from_names(["circle", "bar", "cross"], name="shapes")


def _shapes(n: int = 48, size: int = 14) -> tuple[np.ndarray, np.ndarray]:
    """Three easily told-apart classes of uint8 images (a blob, a vertical bar, a cross)."""
    rng = np.random.default_rng(0)
    x = np.zeros((n, size, size), np.uint8)
    y = np.arange(n) % 3
    c = size // 2
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        s = int(rng.integers(2, 4))
        if y[i] == 0:
            x[i][(yy - c) ** 2 + (xx - c) ** 2 <= s * s] = 255
        elif y[i] == 1:
            x[i][:, c - 1 : c + 1] = 255
        else:
            x[i][c - 1 : c + 1, :] = 200
            x[i][:, c - 1 : c + 1] = 200
    return x, y


def _train_tiny(out: Path, steps: int, **kw) -> Path:
    x, y = _shapes()
    optim = GeneratorOptimConfig(checkpoint_every=2, warmup_steps=2)
    return train_classcond(x, y, SPACE3, out, steps=steps, batch_size=8, seed=1, model=TINY_MODEL, optim=optim,
                           progress=False, **kw)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return _train_tiny(tmp_path_factory.mktemp("gen") / "run", steps=3)


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_pad_and_fold_round_trip():
    pre = make_preprocessing((28, 28), 1, fold=2, downsamples=2)
    assert pre["unet_sample_size"] == [16, 16] and pre["padding"] == [2, 2, 2, 2]
    imgs = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    z = encode_images(imgs, pre)
    assert z.shape == (3, 4, 16, 16)
    back = (decode_samples(z, pre) * 255).round().to(torch.uint8)
    assert torch.equal(back, imgs)


def test_tiny_training_saves_and_loads_by_path(tiny):
    for rel in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                "scheduler/scheduler_config.json", "synclone.json"):
        assert (tiny / rel).is_file(), rel
    assert not list(tiny.rglob("*.bin")) and not list(tiny.rglob("*.pt"))
    pipe = load_classcond_pipeline(str(tiny))
    assert pipe.label_space == SPACE3
    assert pipe.unet.config.num_class_embeds == 4  # 3 classes + the null class
    imgs = pipe([0, 2], _gens([0, 1]), num_inference_steps=2)
    assert [im.size for im in imgs] == [(14, 14)] * 2 and {im.mode for im in imgs} == {"L"}
    assert ClassCondPipeline.from_pretrained(tiny).label_space == SPACE3
    meta = pipe.config_dict()
    assert meta["training"]["steps"] == 3 and meta["revision"].startswith("sha256:")
    assert meta["label_space"]["classes"] == list(SPACE3.classes)


def test_resumed_training_equals_uninterrupted(tmp_path):
    straight = _train_tiny(tmp_path / "a", steps=4)
    _train_tiny(tmp_path / "b", steps=2)  # stops after 2 steps (a checkpoint is written)
    resumed = _train_tiny(tmp_path / "b", steps=4)  # continues from step 2
    a = load_classcond_pipeline(straight).unet.state_dict()
    b = load_classcond_pipeline(resumed).unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((resumed / "synclone.json").read_text())["training"]["steps"] == 4


def test_resume_refuses_other_settings(tmp_path):
    _train_tiny(tmp_path / "r", steps=2)
    x, y = _shapes()
    other = TINY_MODEL.model_copy(update={"block_out_channels": [8, 8]})
    with pytest.raises(UserError, match="different model/data settings"):
        train_classcond(x, y, SPACE3, tmp_path / "r", steps=3, batch_size=8, seed=1, model=other, progress=False)


def test_sampling_is_per_generator_and_independent_of_batch(tiny):
    pipe = load_classcond_pipeline(tiny)
    one = pipe([1], _gens([7]), num_inference_steps=3, guidance_scale=3.0, output_type="pt")
    four = pipe([0, 2, 1, 1], _gens([3, 4, 7, 8]), num_inference_steps=3, guidance_scale=3.0, output_type="pt")
    again = pipe([1], _gens([7]), num_inference_steps=3, guidance_scale=3.0, output_type="pt")
    assert torch.equal(one, again)
    torch.testing.assert_close(four[2:3], one, atol=1e-5, rtol=0)
    # The other images differ: different seed (3 vs 8 for class 1 ... ) and different class with other seeds.
    assert (four[3] - four[2]).abs().max() > 1e-3
    # As 8-bit images the result is the same too.
    pil1 = pipe([1], _gens([7]), num_inference_steps=3, guidance_scale=3.0)[0]
    pil4 = pipe([0, 2, 1, 1], _gens([3, 4, 7, 8]), num_inference_steps=3, guidance_scale=3.0)[2]
    assert np.abs(np.asarray(pil1, np.int16) - np.asarray(pil4, np.int16)).max() <= 1


def test_stochastic_scheduler_uses_per_image_noise(tiny):
    pipe = load_classcond_pipeline(tiny)
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, algorithm_type="sde-dpmsolver++")
    one = pipe([2], _gens([5]), num_inference_steps=3, output_type="pt")
    two = pipe([0, 2], _gens([9, 5]), num_inference_steps=3, output_type="pt")
    torch.testing.assert_close(two[1:], one, atol=1e-5, rtol=0)


def test_cfg_runs_cond_and_uncond_in_one_forward(tiny):
    pipe = load_classcond_pipeline(tiny)
    batches: list[tuple[int, list[int]]] = []
    hook = pipe.unet.register_forward_hook(
        lambda m, args, kwargs, out: batches.append((args[0].shape[0], kwargs["class_labels"].tolist())),
        with_kwargs=True,
    )
    w, steps = 2.5, 3
    got = pipe([0, 2], _gens([1, 2]), num_inference_steps=steps, guidance_scale=w, output_type="pt")
    assert [b for b, _ in batches] == [4] * steps  # 2 images x (cond + uncond), once per step
    assert batches[0][1] == [0, 2, 3, 3]  # null class = 3
    batches.clear()
    pipe([0, 2], _gens([1, 2]), num_inference_steps=steps, guidance_scale=1.0, output_type="pt")
    assert [b for b, _ in batches] == [2] * steps  # no guidance: one half only
    hook.remove()

    # Reference: separate cond / uncond passes combined by eps_u + w (eps_c - eps_u).
    sched = sampling_scheduler(pipe.scheduler.config)
    sched.set_timesteps(steps)
    x = torch.stack([torch.randn((4, 8, 8), generator=g) for g in _gens([1, 2])]) * sched.init_noise_sigma
    y, null = torch.tensor([0, 2]), torch.tensor([3, 3])
    with torch.no_grad():
        for t in sched.timesteps:
            e_c = pipe.unet(x, t, class_labels=y).sample
            e_u = pipe.unet(x, t, class_labels=null).sample
            x = sched.step(e_u + w * (e_c - e_u), t, x).prev_sample
    torch.testing.assert_close(got, decode_samples(x, pipe.preprocessing), atol=1e-5, rtol=0)


def test_weights_not_matching_config_is_user_error(tiny, tmp_path):
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(tiny, bad)
    cfg_path = bad / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["block_out_channels"] = [8, 32]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="don't match its UNet config"):
        load_classcond_pipeline(bad)
    (bad / "synclone.json").unlink()
    with pytest.raises(UserError, match="synclone.json"):
        load_classcond_pipeline(bad)
    with pytest.raises(UserError, match="does not exist"):
        load_classcond_pipeline(tmp_path / "nowhere")


def test_label_out_of_range_and_generator_count(tiny):
    pipe = load_classcond_pipeline(tiny)
    with pytest.raises(UserError, match="outside"):
        pipe([3], _gens([0]), num_inference_steps=1)
    with pytest.raises(UserError, match="one per image"):
        pipe([0, 1], _gens([0]), num_inference_steps=1)


def test_train_generator_from_config(tmp_path):
    try:
        from synclone.data.fashion_mnist import locate

        locate("train", download=False)
    except Exception:
        pytest.skip("Fashion-MNIST is not on this machine")
    out = tmp_path / "run"
    cfg = load_config(GeneratorTrainConfig, None, [
        f"out_dir={out}", "limit=64", "optim.steps=2", "optim.batch_size=8", "model.block_out_channels=[8, 16]",
        "model.norm_num_groups=4",
    ])
    folder = train_generator(cfg, progress=False)
    assert folder == out / "generator" and (out / "config.yaml").is_file()
    pipe = load_classcond_pipeline(folder)
    # Two UNet levels halve once: 28x28 folds to 14x14 without padding (the recipe's three levels pad to 32).
    assert pipe.label_space == FASHION_MNIST and pipe.preprocessing["unet_sample_size"] == [14, 14]
    with pytest.raises(UserError, match="unknown config key 'optim.epocs'"):
        load_config(GeneratorTrainConfig, None, ["optim.epocs=3"])


def test_builtin_fashion_mnist_checkpoint():
    weights = BUILTIN / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.is_file(), "the built-in generator checkpoint is missing"
    assert weights.stat().st_size <= 20 * 1024 * 1024
    pipe = load_classcond_pipeline(BUILTIN)
    assert pipe.label_space == FASHION_MNIST
    imgs = pipe([1, 8], _gens([0, 1]), num_inference_steps=2)
    assert [(im.size, im.mode) for im in imgs] == [((28, 28), "L")] * 2
    assert pipe.defaults["guidance_scale"] > 1
    # Clipping x0 keeps few-step sampling on the squared-cosine schedule from saturating every pixel to 0/255:
    # real Fashion-MNIST has ~43% mid-tone pixels (16 < v < 239); a saturated sample has almost none.
    px = np.stack([np.asarray(im) for im in imgs]).astype(np.int16)
    assert ((px > 16) & (px < 239)).mean() > 0.1
    assert pipe.scheduler.config.thresholding


def test_build_unet_has_null_class():
    unet = build_unet(10, (16, 16), 4, (8, 16), norm_num_groups=4)
    assert unet.config.num_class_embeds == 11 and unet.config.in_channels == 4


def test_save_refuses_nothing_but_writes_safetensors_only(tmp_path):
    unet = build_unet(2, (8, 8), 4, (8, 16), norm_num_groups=4)
    pre = make_preprocessing((14, 14), 1, 2, 1)
    from diffusers import DDPMScheduler

    folder = save_classcond(tmp_path / "g", unet, sampling_scheduler(DDPMScheduler().config),
                            LabelSpace.from_names(["a", "b"]), pre)
    files = sorted(p.name for p in folder.rglob("*") if p.is_file())
    assert files == ["config.json", "diffusion_pytorch_model.safetensors", "model_index.json",
                     "scheduler_config.json", "synclone.json"]
