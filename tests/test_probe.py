"""Classifier tuning and linear probes end to end: cache, grid, selection on validation, model folders."""

from __future__ import annotations

import json

import pytest
import torch

from _tiny_openclip import build_tiny_openclip
from synclone.data import load_fashion_mnist
from synclone.errors import UserError
from synclone.models import create_classifier, save_model
from synclone.models.backbones import BackboneConfig
from synclone.models.feature_classifier import load_feature_classifier
from synclone.train.heads import HeadGridConfig
from synclone.train.probe import (
    ClassifierTuningConfig,
    LinearProbeConfig,
    ProbeDataConfig,
    TuningHeadsConfig,
    classifier_tuning,
    linear_probe,
)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    return build_tiny_openclip(tmp_path_factory.getbasetemp() / "tiny_openclip")


@pytest.fixture(scope="module")
def fmnist():
    train = load_fashion_mnist("train")
    test = load_fashion_mnist("test")
    return {"train20": train.per_class_subset(20, seed=1), "train100": train.per_class_subset(100, seed=2),
            "test": test.per_class_subset(30, seed=0)}


@pytest.fixture
def count_vit_calls(monkeypatch):
    """Counts forward calls of open_clip's image tower, whichever instance makes them."""
    from open_clip.transformer import VisionTransformer

    calls = {"n": 0}
    original = VisionTransformer.forward

    def counting(self, x):
        calls["n"] += 1
        return original(self, x)

    monkeypatch.setattr(VisionTransformer, "forward", counting)
    return calls


def _ct_config(tiny_clip, tmp_path, out: str, **heads) -> ClassifierTuningConfig:
    return ClassifierTuningConfig(
        backbone=BackboneConfig(name=f"local-dir:{tiny_clip['local_dir']}"),
        data=ProbeDataConfig(val_fraction=0.25, test=None),
        heads=TuningHeadsConfig(lrs=[1e-3, 1e-2], weight_decays=[0.0, 1e-2], epochs=8, batch_size=32,
                             **heads),
        templates="photo", output=str(tmp_path / out), cache_dir=str(tmp_path / "cache"))


def test_classifier_tuning_end_to_end_and_cache_hit(tiny_clip, fmnist, tmp_path, count_vit_calls):
    cfg = _ct_config(tiny_clip, tmp_path, "ct1")
    res = classifier_tuning(cfg, train=fmnist["train20"], test=fmnist["test"])
    n_batches = sum(-(-n // cfg.encode_batch_size) for n in (150, 50, 300))
    assert count_vit_calls["n"] == n_batches
    assert res.cache_hits == {"train": False, "val": False, "test": False}
    m = res.metrics
    assert m["n_train"] == 150 and m["n_val"] == 50 and m["n_test"] == 300
    # The grid trained, and the best head was chosen on the held-out validation split, not the test set.
    assert len(res.grid.grid) == 4 and m["selected_on"].startswith("fashion_mnist_train_20pc_val (held out 0.25")
    assert res.grid.best == max(range(4), key=lambda h: (res.grid.val_top1[h], -res.grid.val_loss[h], -h))
    assert m["zeroshot_val_top1"] > 0.2 and m["val_top1"] > m["zeroshot_val_top1"]
    assert res.grid.init_val_top1[0] == pytest.approx(m["zeroshot_val_top1"])
    assert m["test_top1"] > m["zeroshot_test_top1"] > 0.2

    # The folder is a model: pixels in [0, 1] -> logits, same numbers as the run measured.
    model = load_feature_classifier(res.folder)
    assert model.label_space == fmnist["train20"].label_space and model.input_size == (1, 28, 28)
    x, y = fmnist["test"].batch(slice(None))
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    assert acc == pytest.approx(m["test_top1"])
    # Gradients reach the pixels through the resize and normalisation (attacks need them); weights stay frozen.
    xg = x[:4].clone().requires_grad_(True)
    model(xg).logsumexp(1).sum().backward()
    assert xg.grad is not None and float(xg.grad.abs().sum()) > 0
    assert all(not p.requires_grad for p in model.parameters())
    saved = json.loads((res.folder / "config.json").read_text())
    assert saved["training"]["selection"]["selected_on"] == m["selected_on"]
    assert {g["lr"] for g in saved["training"]["selection"]["grid"]} == {1e-3, 1e-2}
    assert (res.folder / "model.safetensors").is_file() and not list(res.folder.glob("*.pt*"))

    # Second run, same data and encoder: every feature comes from the cache, no image is encoded.
    count_vit_calls["n"] = 0
    res2 = classifier_tuning(cfg.model_copy(update={"output": str(tmp_path / "ct2")}), train=fmnist["train20"],
                             test=fmnist["test"])
    assert count_vit_calls["n"] == 0
    assert res2.cache_hits == {"train": True, "val": True, "test": True}
    assert res2.metrics["test_top1"] == m["test_top1"]
    torch.testing.assert_close(res2.grid.weight, res.grid.weight)

    # The same weights loaded from a config file + checkpoint path hash the same: still a cache hit.
    cfg3 = cfg.model_copy(update={"output": str(tmp_path / "ct3"), "backbone": BackboneConfig(
        name=str(tiny_clip["config"]), pretrained=str(tiny_clip["checkpoint"]))})
    res3 = classifier_tuning(cfg3, train=fmnist["train20"], test=fmnist["test"])
    assert count_vit_calls["n"] == 0 and all(res3.cache_hits.values())


def test_distillation_weight_changes_the_head(tiny_clip, fmnist, tmp_path):
    a = classifier_tuning(_ct_config(tiny_clip, tmp_path, "d0"), train=fmnist["train20"])
    b = classifier_tuning(_ct_config(tiny_clip, tmp_path, "d1", distill_weight=5.0, distill_temperature=2.0),
                          train=fmnist["train20"])
    assert b.cache_hits == {"train": True, "val": True}
    assert not torch.allclose(a.grid.weight, b.grid.weight)
    assert json.loads((b.folder / "config.json").read_text())["training"]["heads"]["distill_weight"] == 5.0


def test_linear_probe_of_synclone_cnn_on_fashion_mnist(fmnist, tmp_path):
    torch.manual_seed(0)
    cnn = create_classifier("synclone_cnn_tiny", fmnist["train100"].label_space, (1, 28, 28))
    save_model(cnn, tmp_path / "cnn")
    cfg = LinearProbeConfig(backbone=BackboneConfig(kind="synclone", name=str(tmp_path / "cnn")),
                            data=ProbeDataConfig(val_fraction=0.2),
                            heads=HeadGridConfig(lrs=[1e-3, 1e-2, 1e-1], weight_decays=[0.0], epochs=20,
                                                 batch_size=64),
                            output=str(tmp_path / "probe"), cache_dir=str(tmp_path / "cache"))
    res = linear_probe(cfg, train=fmnist["train100"], test=fmnist["test"])
    # Even random conv features separate Fashion-MNIST far above the 10% of chance.
    assert res.metrics["test_top1"] > 0.5 and res.metrics["val_top1"] > 0.5
    assert "zeroshot_val_top1" not in res.metrics
    model = load_feature_classifier(res.folder)
    x, y = fmnist["test"].batch(slice(None))
    with torch.no_grad():
        assert float((model(x).argmax(1) == y).float().mean()) == pytest.approx(res.metrics["test_top1"])


def test_linear_probe_of_timm_model_by_name(fmnist, tmp_path):
    cfg = LinearProbeConfig(backbone=BackboneConfig(kind="timm", name="test_vit"),
                            data=ProbeDataConfig(val_fraction=0.25, test=None),
                            heads=HeadGridConfig(lrs=[1e-2], weight_decays=[0.0], epochs=5, batch_size=32),
                            output=str(tmp_path / "timm"), cache_dir=str(tmp_path / "cache"))
    res = linear_probe(cfg, train=fmnist["train20"])
    assert res.metrics["val_top1"] > 0.2
    # A seeded random init is reproducible, so the second run hits the cache.
    assert all(linear_probe(cfg, train=fmnist["train20"]).cache_hits.values())


def test_config_from_overrides_keeps_zero_shot_init():
    from synclone.config import load_config

    cfg = load_config(ClassifierTuningConfig, overrides=["backbone.name=ViT-B-32", "heads.lrs=[0.001, 0.01]"])
    assert cfg.heads.init == "zeroshot" and cfg.heads.lrs == [0.001, 0.01]
    assert load_config(LinearProbeConfig, overrides=["backbone.name=x"]).heads.init == "zeros"
    with pytest.raises(UserError, match="heads.epocs"):
        load_config(LinearProbeConfig, overrides=["backbone.name=x", "heads.epocs=3"])


def test_bad_input_is_a_clear_error(tiny_clip, fmnist, tmp_path):
    cnn = create_classifier("synclone_cnn_tiny", fmnist["train20"].label_space, (1, 28, 28))
    save_model(cnn, tmp_path / "cnn")
    cnn_backbone = BackboneConfig(kind="synclone", name=str(tmp_path / "cnn"))
    with pytest.raises(UserError, match="needs a CLIP backbone"):
        classifier_tuning(ClassifierTuningConfig(backbone=cnn_backbone, output=str(tmp_path / "x")),
                          train=fmnist["train20"])
    with pytest.raises(UserError, match="teacher"):
        linear_probe(LinearProbeConfig(backbone=cnn_backbone, heads=HeadGridConfig(distill_weight=1.0),
                                       data=ProbeDataConfig(test=None), output=str(tmp_path / "x"), cache_dir=None),
                     train=fmnist["train20"])
    with pytest.raises(UserError, match="unknown open_clip model"):
        classifier_tuning(ClassifierTuningConfig(backbone=BackboneConfig(name="ViT-Nope"), output=str(tmp_path / "x")),
                          train=fmnist["train20"])
    with pytest.raises(UserError, match="neither a file nor a pretrained tag"):
        classifier_tuning(ClassifierTuningConfig(backbone=BackboneConfig(name=str(tiny_clip["config"]),
                                                                         pretrained="/nonexistent.safetensors"),
                                                 output=str(tmp_path / "x")), train=fmnist["train20"])
    other = fmnist["test"].subset(torch.arange(len(fmnist["test"])))
    other.label_space = type(other.label_space).from_names([f"c{i}" for i in range(10)])
    with pytest.raises(UserError):
        linear_probe(LinearProbeConfig(backbone=cnn_backbone, output=str(tmp_path / "x"), cache_dir=None),
                     train=fmnist["train20"], test=other)
    # A head whose encoder's weights changed since training refuses to load.
    res = linear_probe(LinearProbeConfig(backbone=cnn_backbone, data=ProbeDataConfig(test=None), cache_dir=None,
                                         heads=HeadGridConfig(lrs=[1e-2], weight_decays=[0.0], epochs=1),
                                         output=str(tmp_path / "ok")), train=fmnist["train20"])
    torch.manual_seed(1)
    save_model(create_classifier("synclone_cnn_tiny", fmnist["train20"].label_space, (1, 28, 28)), tmp_path / "cnn")
    with pytest.raises(UserError, match="no longer has the weights"):
        load_feature_classifier(res.folder)


def test_classifier_tuning_with_real_shots_as_a_second_batch(tiny_clip, fmnist, tmp_path):
    shots = load_fashion_mnist("test").per_class_subset(2, seed=4)
    cfg = _ct_config(tiny_clip, tmp_path, "two", real_batch_size=8, real_weight=0.5)
    res = classifier_tuning(cfg, train=fmnist["train20"], real=shots)
    assert res.metrics["n_real"] == 20
    assert res.metrics["two_batch"] == {"synthetic": 32, "real": 8, "synthetic_weight": 1.0, "real_weight": 0.5}
    plain = classifier_tuning(_ct_config(tiny_clip, tmp_path, "one"), train=fmnist["train20"])
    assert not torch.allclose(res.grid.weight, plain.grid.weight)  # the real batch moved the head
