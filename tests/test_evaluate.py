"""The suite runner: shared and cached forward passes, long-format rows, shift/ER and the OOD sets."""

from __future__ import annotations

import gzip
import io
import json
import pickle

import numpy as np
import pandas as pd
import pytest
import torch

from synclone.data.eval_sets import _NumpyOnlyUnpickler, load_animal_shapes_ood, load_digits_ood, noise_ood
from synclone.errors import UserError
from synclone.evaluate import EvaluateConfig, evaluate
from synclone.labels import FASHION_MNIST
from synclone.models import create_classifier, save_model
from synclone.probes.shift import effective_robustness, fit_baseline


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Four random-weight tiny CNNs (different seeds give different accuracies)."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for seed in range(4):
        torch.manual_seed(seed)
        m = create_classifier("synclone_cnn_tiny", FASHION_MNIST, (1, 28, 28), [0.286], [0.353])
        out[f"m{seed}"] = str(save_model(m, root / f"m{seed}"))
    return out


@pytest.fixture(scope="module")
def shifted(tmp_path_factory):
    """A small image folder of Fashion-MNIST classes (brightness-inverted test images): a shifted set."""
    from PIL import Image

    from synclone.data.fashion_mnist import load_fashion_mnist

    test = load_fashion_mnist("test")
    root = tmp_path_factory.mktemp("shifted")
    for i in range(60):
        label = int(test.labels[i])
        folder = root / FASHION_MNIST.slugs[label]
        folder.mkdir(exist_ok=True)
        Image.fromarray(255 - test.images[i, 0].numpy()).save(folder / f"{i}.png")
    return root


def test_probes_share_one_forward_pass_and_the_disk_cache(models, tmp_path):
    cfg = EvaluateConfig(output=str(tmp_path / "e"), models={k: models[k] for k in ("m0", "m1")}, max_images=300,
                         probes={"clean": {}, "calibration": {}, "ood": {"datasets": ["digits"], "max_images": 100}})
    df = evaluate(cfg, progress=False)
    timings = json.loads((tmp_path / "e" / "timings.json").read_text())
    # clean, calibration and ood all read the clean logits: 2 models x (clean + digits) passes, not more.
    assert timings["forward_passes"] == 4
    df2 = evaluate(cfg, progress=False)
    assert json.loads((tmp_path / "e" / "timings.json").read_text())["forward_passes"] == 0
    pd.testing.assert_frame_equal(df, df2)
    assert set(df.model) == {"m0", "m1"}
    assert set(df[df.probe == "ood"].variant) == {"msp", "max_logit", "energy", "entropy"}
    assert set(df[df.probe == "ood"].metric) == {"auroc", "aupr_in", "aupr_out", "fpr95"}
    art = json.loads((tmp_path / "e" / "artifacts.json").read_text())
    assert {a["kind"] for a in art} == {"reliability", "roc"}


def test_cache_key_changes_with_the_weights(models, tmp_path):
    cfg = EvaluateConfig(output=str(tmp_path / "e"), models={"a": models["m0"]}, max_images=100,
                         cache_dir=str(tmp_path / "cache"))
    a = evaluate(cfg, progress=False)
    cfg2 = cfg.model_copy(update={"models": {"a": models["m1"]}})
    b = evaluate(cfg2, progress=False)
    assert json.loads((tmp_path / "e" / "timings.json").read_text())["forward_passes"] == 1
    assert a.value.tolist() != b.value.tolist()


def test_shift_and_effective_robustness(models, shifted, tmp_path):
    cfg = EvaluateConfig(output=str(tmp_path / "e"), models=models, max_images=300,
                         probes={"clean": {}, "shift": {"datasets": [str(shifted)]}})
    df = evaluate(cfg, progress=False)
    shift = df[(df.probe == "shift") & (df.metric == "top1")].set_index("model").value
    clean = df[(df.probe == "clean") & (df.metric == "top1")].set_index("model").value
    fit = fit_baseline(clean[list(models)].to_numpy(), shift[list(models)].to_numpy())
    er = df[df.metric == "effective_robustness"].set_index("model").value
    for m in models:
        assert er[m] == pytest.approx(effective_robustness(fit, clean[m], shift[m]))
    conv = df[df.metric == "effective_robustness"].convention.iloc[0]
    assert "baselines=4" in conv and "slope=" in conv and "r2=" in conv
    drop = df[df.metric == "top1_drop"].set_index("model").value
    assert drop["m0"] == pytest.approx(clean["m0"] - shift["m0"])


def test_effective_robustness_refused_with_too_few_baselines(models, shifted, tmp_path):
    cfg = EvaluateConfig(output=str(tmp_path / "e"), models=models, max_images=100,
                         probes={"shift": {"datasets": [str(shifted)], "baseline_models": ["m0", "m1"]}})
    with pytest.raises(UserError, match="at least 3 baseline models, got 2"):
        evaluate(cfg, progress=False)
    # Without explicit baselines, two models give accuracies but no ER rows (and no error).
    cfg = cfg.model_copy(update={"models": {k: models[k] for k in ("m0", "m1")},
                                 "probes": {"shift": {"datasets": [str(shifted)]}}})
    df = evaluate(cfg, progress=False)
    assert "effective_robustness" not in set(df.metric) and "top1" in set(df.metric)


def test_ood_sets_match_the_clean_images():
    from synclone.data.fashion_mnist import load_fashion_mnist

    like = load_fashion_mnist("test")
    digits, animals = load_digits_ood(like), load_animal_shapes_ood(like)
    assert digits.images.shape == (1797, 1, 28, 28) and digits.images.dtype == torch.uint8
    assert animals.images.shape == (10000, 1, 28, 28) and int(animals.images.max()) == 255
    # Digits keep their ink: 0..16 scaled to the full 0..255 range.
    assert int(digits.images.max()) >= 250 and int(digits.images.min()) == 0
    u, g = noise_ood("uniform_noise", like, 500), noise_ood("gaussian_noise", like, 500)
    assert abs(float(u.images.float().mean()) - 127.5) < 2 and abs(float(g.images.float().std()) - 64) < 3
    assert torch.equal(noise_ood("uniform_noise", like, 10).images, noise_ood("uniform_noise", like, 10).images)


def test_third_party_pickles_may_only_hold_arrays():
    good = pickle.dumps(np.arange(6, dtype=np.uint8).reshape(2, 3))
    assert _NumpyOnlyUnpickler(io.BytesIO(good)).load().shape == (2, 3)
    evil = pickle.dumps(print)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        _NumpyOnlyUnpickler(io.BytesIO(evil)).load()
    # The shipped file is a gzip stream of a pickle (protocol opcode first): the format the loader expects, read
    # through this unpickler and never through pickle.load.
    from importlib import resources

    with resources.as_file(resources.files("animal_shape_mnist") / "data" / "Animal Shape" /
                           "animal_data_version_3.gz") as path:
        assert path.read_bytes()[:2] == b"\x1f\x8b"
        with gzip.open(path, "rb") as f:
            assert f.read(1) == pickle.PROTO



def test_calibration_is_measured_on_every_shifted_set(models, shifted, tmp_path):
    from synclone.probes import calibration_metrics

    cfg = EvaluateConfig(output=str(tmp_path / "e"), models={k: models[k] for k in ("m0", "m1")}, max_images=200,
                         probes={"calibration": {}, "shift": {"datasets": [str(shifted)]}})
    df = evaluate(cfg, progress=False)
    cal = df[(df.probe == "calibration") & (df.metric == "ece")]
    assert set(zip(cal.dataset, cal.variant, strict=True)) == {("fashion_mnist_test", "clean"),
                                                               (shifted.name, "shifted")}
    from synclone.data.eval_sets import load_eval_dataset
    from synclone.models import load_model

    data = load_eval_dataset(str(shifted), "test")
    x, y = data.batch(slice(0, len(data)))
    with torch.no_grad():
        z = load_model(models["m0"])(x).double().numpy()
    ref = calibration_metrics(z, y.numpy(), n_bins=15, from_logits=True)
    got = cal[(cal.model == "m0") & (cal.variant == "shifted")].value.iloc[0]
    assert got == pytest.approx(ref["ece"], abs=1e-6)
    arts = json.loads((tmp_path / "e" / "artifacts.json").read_text())
    assert {a["dataset"] for a in arts if a["kind"] == "reliability"} == {"fashion_mnist_test", shifted.name}
