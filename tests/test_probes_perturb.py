"""The corruptions and adversarial probes through the suite runner's contract, on real Fashion-MNIST models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _probe_helpers import fit_tiny, one_thread, run_probe, same, table
from synclone.config import validate
from synclone.data.fashion_mnist import load_fashion_mnist
from synclone.data.imageset import TensorImageSet
from synclone.errors import UserError
from synclone.labels import FASHION_MNIST, imagenet1k_space
from synclone.models import create_classifier
from synclone.probes.base import EvalContext, ModelEntry, get_probe
from synclone.probes.corruptions.engine import corrupt
from synclone.probes.corruptions.metrics import ALEXNET_ERRORS

NAMES = ["gaussian_noise", "defocus_blur", "contrast", "jpeg_compression", "speckle_noise"]  # the last is held out
SEVERITIES = [1, 3, 5]


@pytest.fixture(scope="module")
def models():
    train = load_fashion_mnist("train").per_class_subset(40, seed=1)
    with one_thread():
        return {"real": ModelEntry("real", Path("real"), fit_tiny(train, 60, 0), "fp-real"),
                "weak": ModelEntry("weak", Path("weak"), fit_tiny(train, 15, 1), "fp-weak")}


@pytest.fixture(scope="module")
def clean():
    return load_fashion_mnist("test").per_class_subset(20, seed=0)  # 200 images


@pytest.fixture(autouse=True)
def _threads():
    with one_thread():
        yield


def _same(a: float, b: float) -> bool:
    return same(a, b, 1e-9)


def test_corruption_rows_are_complete_and_mce_follows_its_definition(models, clean, tmp_path):
    ctx = EvalContext(models, clean, tmp_path, progress=False)
    rows = run_probe("corruptions", ctx, names=NAMES, severities=SEVERITIES, baseline="real")
    t = table(rows)
    for m in models:
        got = {r.variant for r in rows if r.model == m and r.metric == "top1"}
        assert got == {f"{c}@{s}" for c in NAMES for s in SEVERITIES} | {"clean"}
        assert {r.variant for r in rows if r.model == m and r.metric in ("error", "ce")} == set(NAMES)
        assert {r.metric for r in rows if r.model == m and r.variant == "all"} == {"mean_top1", "mce", "relative_mce"}
        for c in NAMES:
            assert t[m, c, "error"] == pytest.approx(1 - np.mean([t[m, f"{c}@{s}", "top1"] for s in SEVERITIES]))
        assert t[m, "all", "mean_top1"] == pytest.approx(np.mean([t[m, f"{c}@{s}", "top1"]
                                                                  for c in NAMES for s in SEVERITIES]))
    # The baseline scores 100 by definition; the other model's mCE recomputed from the top-1 rows, over the
    # four ImageNet-C corruptions only (speckle_noise is held out of mCE).
    assert t["real", "all", "mce"] == pytest.approx(100.0)
    assert all(t["real", c, "ce"] == pytest.approx(100.0) for c in NAMES)

    def err(m, c):
        return np.array([1 - t[m, f"{c}@{s}", "top1"] for s in SEVERITIES])

    in_mce = NAMES[:4]
    expected = np.mean([100 * err("weak", c).sum() / err("real", c).sum() for c in in_mce])
    assert t["weak", "all", "mce"] == pytest.approx(expected)
    clean_err = {m: 1 - t[m, "clean", "top1"] for m in models}
    rel = np.mean([100 * (err("weak", c) - clean_err["weak"]).sum() / (err("real", c) - clean_err["real"]).sum()
                   for c in in_mce])
    assert t["weak", "all", "relative_mce"] == pytest.approx(rel)
    # The corruptions were applied: severity-5 noise costs the trained model accuracy.
    assert t["real", "gaussian_noise@5", "top1"] < t["real", "clean", "top1"] - 0.1
    assert "baseline=real" in next(r.convention for r in rows if r.metric == "mce")
    curves = {a["model"]: a["data"] for a in ctx.artifacts if a["kind"] == "corruption_curve"}
    assert curves["weak"]["contrast"]["3"] == t["weak", "contrast@3", "top1"]


def test_mce_does_not_depend_on_order_and_reruns_come_from_the_cache(models, clean, tmp_path):
    first = EvalContext(models, clean, tmp_path, progress=False)
    rows = run_probe("corruptions", first, names=NAMES, severities=SEVERITIES)  # baseline: the first model
    assert first.forward_passes > 0
    again = EvalContext(models, clean, tmp_path, progress=False)
    reordered = run_probe("corruptions", again, names=NAMES[::-1], severities=SEVERITIES[::-1])
    assert again.forward_passes == 0  # neither corrupted nor run again: every logit came from the disk cache
    a, b = table(rows), table(reordered)
    assert a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    # Another seed is another corruption draw, so it misses the cache.
    other = EvalContext(models, clean, tmp_path, progress=False)
    run_probe("corruptions", other, names=["gaussian_noise"], severities=[3], seed=1)
    assert other.forward_passes == len(models)


def test_imagenet_models_are_compared_with_alexnets_published_errors(tmp_path):
    torch.manual_seed(0)
    space = imagenet1k_space()
    model = create_classifier("synclone_cnn_tiny", space, (3, 16, 16)).eval()
    g = torch.Generator().manual_seed(0)
    data = TensorImageSet(torch.randint(0, 256, (12, 3, 16, 16), generator=g, dtype=torch.uint8),
                          torch.randint(0, 1000, (12,), generator=g), space, "tiny_imagenet")
    ctx = EvalContext({"net": ModelEntry("net", Path("net"), model, "fp-net")}, data, tmp_path, progress=False)
    t = table(rows := run_probe("corruptions", ctx, names=["fog", "contrast"]))
    err = {c: 1 - np.mean([t["net", f"{c}@{s}", "top1"] for s in range(1, 6)]) for c in ("fog", "contrast")}
    assert t["net", "all", "mce"] == pytest.approx(np.mean([100 * err[c] / ALEXNET_ERRORS[c] for c in err]))
    assert "AlexNet" in next(r.convention for r in rows if r.metric == "mce")
    with pytest.raises(UserError, match="all five"):
        run_probe("corruptions", ctx, names=["fog"], severities=[1, 2], baseline="alexnet")


def test_released_folders_give_the_same_numbers_as_the_engine(models, clean, tmp_path):
    """A CIFAR-10-C-style .npy set and an ImageNet-C-style image folder holding the engine's own 8-bit images."""
    names, sevs = ["gaussian_noise", "contrast"], [1, 2]
    pngs, npys = tmp_path / "in-c", tmp_path / "c10-c"
    npys.mkdir()
    np.save(npys / "labels.npy", clean.labels.numpy())
    x = clean.images.float() / 255
    for c in names:
        stack = np.zeros((5 * len(clean), 28, 28, 1), dtype=np.uint8)
        for s in sevs:
            y = corrupt(x, c, s, seed=0).mul(255).round().to(torch.uint8)
            stack[(s - 1) * len(clean):s * len(clean)] = y.permute(0, 2, 3, 1).numpy()
            for i, (img, label) in enumerate(zip(y, clean.labels.tolist(), strict=True)):
                d = pngs / "digital" / c / str(s) / FASHION_MNIST.slugs[label]  # under a group folder, as released
                d.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img[0].numpy()).save(d / f"{i:04d}.png")
        np.save(npys / f"{c}.npy", stack)
    engine = table(run_probe("corruptions", EvalContext(models, clean, tmp_path / "a", progress=False),
                         names=names, severities=sevs))
    for folder in (pngs, npys):
        rows = run_probe("corruptions", EvalContext(models, clean, tmp_path / folder.name, progress=False),
                    names=names, severities=sevs, folder=str(folder))
        got = table(rows)
        assert got.keys() == engine.keys() and all(_same(got[k], engine[k]) for k in got)
        assert {r.dataset for r in rows if r.variant != "clean"} == {folder.name}
    with pytest.raises(UserError, match="lacks severities \\[3\\]"):
        run_probe("corruptions", EvalContext(models, clean, tmp_path, progress=False), names=names, severities=[3],
             folder=str(pngs))


def test_adversarial_rows_curve_and_robust_below_clean(models, clean, tmp_path):
    ctx = EvalContext(models, clean, tmp_path, progress=False)
    eps = [1 / 255, 4 / 255, 16 / 255]
    rows = run_probe("adversarial", ctx, eps=eps, max_images=200)
    t = table(rows)
    for m in models:
        assert {r.variant for r in rows if r.model == m} == {"eps=0.003922", "eps=0.01569", "eps=0.06275", "clean"}
        clean_top1 = t[m, "clean", "clean_top1"]
        assert clean_top1 == pytest.approx(float((ctx.logits(m, clean).argmax(1) == clean.labels).float().mean()))
        assert all(t[m, f"eps={e:.4g}", "robust_top1"] <= clean_top1 for e in eps)
    assert t["real", "eps=0.06275", "robust_top1"] < t["real", "clean", "clean_top1"] - 0.2
    convention = next(r.convention for r in rows if r.metric == "robust_top1")
    assert "linf" in convention and "steps=10" in convention and "random_start=False" in convention
    curve = next(a["data"] for a in ctx.artifacts if a["kind"] == "robust_curve" and a["model"] == "real")
    assert curve["eps"] == eps and curve["clean_top1"] == t["real", "clean", "clean_top1"]
    assert curve["robust_top1"] == [t["real", f"eps={e:.4g}", "robust_top1"] for e in eps]
    fgsm = table(run_probe("adversarial", ctx, attack="fgsm", eps=[4 / 255], max_images=200))
    assert fgsm["real", "eps=0.01569", "robust_top1"] <= fgsm["real", "clean", "clean_top1"]


class _Counting(torch.nn.Module):
    """A model that counts its forward calls (attacks call the model directly, not through the context)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.label_space, self.input_size, self.calls = inner, inner.label_space, inner.input_size, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def test_adversarial_reruns_come_from_the_cache(models, clean, tmp_path):
    def run():
        net = _Counting(models["real"].module).eval()
        ctx = EvalContext({"real": ModelEntry("real", Path("real"), net, "fp-real")}, clean, tmp_path, progress=False)
        rows = run_probe("adversarial", ctx, attack="pgd_l2", eps=[0.5], steps=3, random_start=True, max_images=100)
        return rows, net.calls

    (first, calls), (second, calls_again) = run(), run()
    assert calls > 0 and calls_again == 0
    assert table(first) == table(second)
    assert "l2" in first[0].convention


def test_autoattack_through_the_probe(models, clean, tmp_path):
    ctx = EvalContext({"real": models["real"]}, clean, tmp_path, progress=False)
    aa = table(run_probe("adversarial", ctx, attack="autoattack", version="custom", attacks=["apgd-ce"], n_iter=5,
                     eps=[8 / 255], max_images=60))
    pgd = table(run_probe("adversarial", ctx, eps=[8 / 255], max_images=60))
    assert aa["real", "eps=0.03137", "robust_top1"] <= aa["real", "clean", "clean_top1"]
    assert aa["real", "clean", "clean_top1"] == pgd["real", "clean", "clean_top1"]


@pytest.mark.parametrize(("probe", "settings", "message"), [
    ("corruptions", {"names": ["fogg"]}, "unknown corruption 'fogg'; valid names: gaussian_noise"),
    ("corruptions", {"severities": [0, 1]}, "severities must lie in 1-5"),
    ("corruptions", {"nmaes": ["fog"]}, "unknown config key 'nmaes'"),
    ("adversarial", {"eps": [0.0]}, "eps must be > 0"),
    ("adversarial", {"eps": [-0.01]}, "eps must be > 0"),
    ("adversarial", {"restarts": 3}, "restarts > 1 needs random_start"),
    ("adversarial", {"attack": "pgd_l2", "norm": "linf"}, "pgd_l2 is an l2 attack"),
])
def test_bad_settings_are_one_line_user_errors(probe, settings, message):
    spec = get_probe(probe)
    with pytest.raises(UserError) as err:
        validate(spec.settings, settings, source=f"probes.{probe}")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_folder_and_unknown_baseline_are_user_errors(models, clean, tmp_path):
    ctx = EvalContext(models, clean, tmp_path, progress=False)
    with pytest.raises(UserError, match="corruption folder '.*nowhere' does not exist"):
        run_probe("corruptions", ctx, names=["fog"], folder=str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="baseline 'resnet' is not a model of this suite; choose one of real, weak"):
        run_probe("corruptions", ctx, names=["fog"], baseline="resnet")


def test_fgsm_and_pgd_blocks_in_one_run_share_the_clean_pass(models, clean, tmp_path):
    """Singh et al. report FGSM and PGD: two attack blocks in one probe, each row labelled with its attack, the
    numbers identical to running each attack alone, one clean forward pass per model."""
    eps = [1 / 255, 4 / 255]
    ctx = EvalContext(models, clean, tmp_path / "both", progress=False)
    rows = run_probe("adversarial", ctx, eps=eps, max_images=120,
                     blocks=[{"attack": "fgsm"}, {"attack": "pgd_linf", "steps": 5, "name": "pgd5"}])
    t = table(rows)
    assert ctx.forward_passes == len(models)  # the clean logits of the 120 images, once per model
    alone_fgsm = table(run_probe("adversarial", EvalContext(models, clean, tmp_path / "f", progress=False),
                                 attack="fgsm", eps=eps, max_images=120))
    alone_pgd = table(run_probe("adversarial", EvalContext(models, clean, tmp_path / "p", progress=False),
                                steps=5, eps=eps, max_images=120))
    for m in models:
        assert {r.variant for r in rows if r.model == m} == {
            "fgsm eps=0.003922", "fgsm eps=0.01569", "pgd5 eps=0.003922", "pgd5 eps=0.01569", "clean"}
        for e in eps:
            assert t[m, f"fgsm eps={e:.4g}", "robust_top1"] == alone_fgsm[m, f"eps={e:.4g}", "robust_top1"]
            assert t[m, f"pgd5 eps={e:.4g}", "robust_top1"] == alone_pgd[m, f"eps={e:.4g}", "robust_top1"]
        # PGD is the stronger attack at the same budget
        assert t[m, "pgd5 eps=0.01569", "robust_top1"] <= t[m, "fgsm eps=0.01569", "robust_top1"] + 1e-9
    curves = [a["data"]["attack"] for a in ctx.artifacts if a["kind"] == "robust_curve" and a["model"] == "real"]
    assert curves == ["fgsm", "pgd5"]
    with pytest.raises(UserError, match="two blocks are both 'fgsm'"):
        run_probe("adversarial", ctx, blocks=[{"attack": "fgsm"}, {"attack": "fgsm", "eps": [0.1]}])
    with pytest.raises(UserError, match=r"blocks\[0\]\.steps"):
        run_probe("adversarial", ctx, blocks=[{"attack": "pgd_linf", "steps": 0}])
