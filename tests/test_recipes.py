"""The seed papers' full-scale recipes in recipes/, recipe variables, the train kinds of ``synclone run``
(classifier tuning, linear probe, few-shot over seeds, imported pretrained models), and the dry run that
lists every problem of a recipe at once.

Full scale cannot run here (no hub, no ImageNet); what is checked: each recipe is a valid config whose
dry run names exactly what is missing offline, and He et al.'s recipe, pointed at tiny local models
and a tiny downstream dataset through its variables, runs end to end.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from _tiny_openclip import build_tiny_openclip
from _tiny_pipelines import one_torch_thread, tiny_sd, tiny_t5  # noqa: F401  (one_torch_thread: a fixture)
from synclone.cli import main
from synclone.data import load_fashion_mnist
from synclone.errors import UserError
from synclone.labels import FASHION_MNIST
from synclone.models import create_classifier, load_model
from synclone.models.pretrained import PretrainedConfig, import_timm
from synclone.recipe import load_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
CONFIG_ERRORS = ("unknown config key", "Field required", "unknown reference", "is not valid YAML", "Input should be")


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out + err


# --- the seed papers' recipes -------------------------------------------------------------------------

MISSING = {
    "bansal2023_imagenet_clone": [
        "generator 'CompVis/stable-diffusion-v1-4'", "nodata/imagenet/train", "resnet18.tv_in1k", "vgg16.tv_in1k",
        "imagenet-val folder", "imagenet-v2 folder", "imagenet-sketch folder", "imagenet-r folder",
        "objectnet folder"],
    "he2023_clip_tuning": [
        "generator 'CompVis/stable-diffusion-v1-4'", "label file", "nodata/eurosat/classes.txt",
        "nodata/eurosat/shots' does not exist", "open_clip 'ViT-B-16' ('openai')", "nodata/eurosat/test"],
    "singh2024_robustness_benchmark": [  # all 14 model families of the paper, and every dataset
        "resnet50.a1_in1k", "vit_base_patch16_224.augreg_in1k", "deit3_large_patch16_224.fb_in1k",
        "swin_base_patch4_window7_224.ms_in1k", "convnext_base.fb_in22k_ft_in1k", "imagenet_1k_sd.pth",
        "classname/16M.pt", "dinov2_vitb14_reg4_pretrain.pth", "dinov2_vitb14_reg4_linear_head.pth",
        "mae_lp_e90.pth", "mocov3_linear.tar", "synclr/linear_best.pt", "open_clip 'ViT-B-16' ('openai')",
        "Synthetic/371M.pt", "synthclip/open_clip' does not exist", "nodata/imagenet/train", "imagenet-val folder",
        "imagenet-v2 folder", "imagenet-sketch folder", "imagenet-r folder", "imagenet-a folder", "objectnet folder",
        "baselines.imagenet-r: table", "robustness_top1s.csv' does not exist", "imagenet-c' does not exist",
        "ood/inaturalist", "ood/sun", "ood/places", "cue-conflict' does not exist", "bg_challenge' does not exist",
        "focus' does not exist"],
}


@pytest.mark.parametrize("name", sorted(MISSING))
def test_seed_recipe_dry_run_lists_everything_missing_offline(name, tmp_path, capsys):
    data = tmp_path / "nodata"
    code, out = run(capsys, "run", str(RECIPES / f"{name}.yaml"), "--dry-run", f"vars.data={data}",
                    f"vars.output={tmp_path / 'out'}", f"vars.checkpoints={tmp_path / 'ckpt'}")
    assert code == 2, out
    # a valid recipe: everything reported is something this machine lacks, nothing is wrong in the recipe
    assert "the recipe is valid, but" in out and "not on this machine" in out and "nothing was run" in out
    assert "error(s) in the recipe" not in out and not any(e in out for e in CONFIG_ERRORS), out
    for item in MISSING[name]:
        assert item in out, f"{item!r} not reported:\n{out}"
    # every stage of the plan is printed with an estimate, and nothing is written
    assert "estimated:" in out and "train." in out and not (tmp_path / "out").exists()


def test_bansal_recipe_with_its_datasets_in_place_lacks_only_weights(tmp_path, capsys):
    """Once the ImageNet folders exist, the dry run accepts them (labels aligned between the real train
    folder, found by its WordNet-id layout, and the generated ImageNet-1k clone) and lists only weights."""
    from synclone.data.imagenet import imagenet1k_wnids

    data = tmp_path / "data"
    for split in ("train", "val"):
        for w in imagenet1k_wnids():
            (data / "imagenet" / split / w).mkdir(parents=True)
    for name in ("imagenet-v2", "imagenet-sketch", "imagenet-r", "objectnet"):
        (data / name).mkdir()
    code, out = run(capsys, "run", str(RECIPES / "bansal2023_imagenet_clone.yaml"), "--dry-run",
                    f"vars.data={data}", f"vars.output={tmp_path / 'out'}")
    assert code == 2 and "7 thing(s) this recipe needs" in out, out  # the generator and six baselines' weights
    assert "stable-diffusion-v1-4" in out and out.count("timm's pretrained weights") == 6
    assert str(data) not in out.split("not on this machine")[1]


# --- recipe variables ---------------------------------------------------------------------------------

def _write(tmp_path: Path, recipe: dict, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(recipe))
    return p


def test_vars_substitute_typed_nested_and_overridable(tmp_path):
    recipe = {"vars": {"ds": "eurosat", "out": "runs/${ds}", "steps": 7},
              "output": "${out}/x", "title": "on ${ds}",
              "train": {"a": {"optim": {"steps": "${steps}"}, "data": {"real": "fashion_mnist"}}}}
    r = load_recipe(_write(tmp_path, recipe))
    assert r.output == "runs/eurosat/x" and r.title == "on eurosat"
    assert r.train["a"]["optim"]["steps"] == 7  # a whole-value variable keeps its type
    r = load_recipe(_write(tmp_path, recipe), ["vars.ds=cifar10", "vars.steps=3"])
    assert r.output == "runs/cifar10/x" and r.train["a"]["optim"]["steps"] == 3


@pytest.mark.parametrize("vars_, where, message", [
    ({"a": 1}, "${b}", "uses '${b}' but vars has no 'b'"),
    ({"a": "${b}", "b": "${a}"}, "${a}", "cycle"),
    ({"a": "${nope}"}, "x", "vars.a uses '${nope}'"),
])
def test_bad_vars_are_named(tmp_path, capsys, vars_, where, message):
    p = _write(tmp_path, {"vars": vars_, "output": where})
    code, out = run(capsys, "run", str(p), "--dry-run")
    assert code == 2 and message in out, out


def test_dry_run_collects_every_problem_of_a_recipe(tmp_path, capsys):
    recipe = {"output": str(tmp_path / "out"),
              "train": {"a": {"optim": {"epocs": 2}},
                        "b": {"data": {"real": None, "synthetic": str(tmp_path / "missing")}},
                        "c": {"kind": "pretraind"},
                        "d": {"kind": "pretrained", "arch": "resnet18", "pretrained": str(tmp_path / "no.pth"),
                              "labels": "fashion_mnist"}},
              "evaluate": {"probes": {"shape_bias": {"folder": str(tmp_path / "cue")}}}}
    code, out = run(capsys, "run", str(_write(tmp_path, recipe)), "--dry-run")
    assert code == 2
    for item in ("unknown config key 'optim.epocs'", "missing' is neither a built-in", "unknown kind 'pretraind'",
                 "no.pth' does not exist", "cue' does not exist", "recipe not ready: 5 problem(s)"):
        assert item in out, out
    # mistakes in the recipe and what the machine lacks are listed apart
    errors, missing = out.split("2 error(s) in the recipe:")[1].split("3 thing(s) this recipe needs")
    assert "epocs" in errors and "pretraind" in errors and "no.pth" in missing and "cue'" in missing
    assert not (tmp_path / "out").exists()


# --- train kinds in a run -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return build_tiny_openclip(tmp_path_factory.getbasetemp() / "tiny_openclip")


def test_train_kinds_run_and_are_evaluated(tiny_clip, tmp_path, capsys, one_torch_thread):  # noqa: F811
    torch.manual_seed(0)
    imported = create_classifier("synclone_cnn_tiny", FASHION_MNIST, (1, 28, 28))
    ckpt = tmp_path / "cnn.safetensors"
    save_file({k: v.contiguous() for k, v in imported.net.state_dict().items()}, str(ckpt))
    gen = {"backend": "classcond", "model": "builtin:fashion_mnist", "steps": 2, "guidance_scale": 2.0}
    recipe = {
        "vars": {"shots": 5},
        "output": str(tmp_path / "out"),
        "generate": {"syn": {"generator": gen, "images_per_class": 6, "batch_size": 30}},
        "train": {
            "fs": {"kind": "fewshot", "shots": "${shots}", "seeds": [0, 1], "threads": 1,
                   "model": {"arch": "synclone_cnn_tiny"},
                   "data": {"real": "fashion_mnist", "synthetic": "@generated.syn", "val_max": 50},
                   "optim": {"steps": 6, "batch_size": 16, "warmup_steps": 1}},
            "clip": {"kind": "classifier-tuning", "backbone": {"name": f"local-dir:{tiny_clip['local_dir']}"},
                     "data": {"train": ["@generated.syn", "fashion_mnist"], "train_per_class": 10, "val_max": 60,
                              "test": None},
                     "heads": {"lrs": [1e-3], "weight_decays": [0.0], "epochs": 2}, "templates": "photo",
                     "cache_dir": str(tmp_path / "cache")},
            "imported": {"kind": "pretrained", "arch": "synclone_cnn_tiny", "pretrained": str(ckpt),
                         "labels": "fashion_mnist", "input_size": [1, 28, 28], "mean": [0.5], "std": [0.5]},
        },
        "evaluate": {"max_images": 100, "probes": {"clean": {}}},
    }
    p = _write(tmp_path, recipe)
    code, out = run(capsys, "run", str(p))
    assert code == 0, out
    res = pd.read_parquet(tmp_path / "out" / "eval" / "results.parquet")
    assert set(res.model) == {"fs_seed0", "fs_seed1", "clip", "imported"}
    fs = json.loads((tmp_path / "out" / "train" / "fs" / "fewshot.json").read_text())
    assert fs["shots"] == 5 and fs["seeds"] == [0, 1] and fs["conventions"]["synthetic"].endswith("generated/syn")
    clip = json.loads((tmp_path / "out" / "train" / "clip" / "model" / "results.json").read_text())
    assert clip["metrics"]["n_train"] == 10 * 10  # 10 per class, drawn from the joined generated + real sources
    trained_on = json.loads((tmp_path / "out" / "train" / "clip" / "model" / "config.json").read_text())
    assert "syn+fashion_mnist" in json.dumps(trained_on["training"]["train_dataset"])
    # the imported model is the checkpoint's network, byte for byte in its outputs
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "out" / "train" / "imported" / "model")(x), imported.eval()(x))
    # a second run skips every stage but the derived ones, and still reports their recorded times
    assert main(["run", str(p)]) == 0
    timings = json.loads((tmp_path / "out" / "timings.json").read_text())
    assert all(not v["ran"] and v["seconds"] is not None for k, v in timings.items()
               if k.startswith(("generate", "train")))


# --- importing trained timm models --------------------------------------------------------------------

def test_import_timm_checkpoint_reproduces_a_real_imagenet_model(tmp_path):
    from _imagenet_model import IMAGENET_MEAN, IMAGENET_STD, load_efficientnet_lite0

    ref = load_efficientnet_lite0()
    ckpt = tmp_path / "lite0.safetensors"
    save_file({k: v.contiguous() for k, v in ref.net.state_dict().items()}, str(ckpt))
    folder = import_timm(PretrainedConfig(arch="tf_efficientnet_lite0", pretrained=str(ckpt),
                                          mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD), output=str(tmp_path / "i")))
    model = load_model(folder)
    assert len(model.label_space) == 1000 and tuple(model.input_size) == (3, 224, 224)
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=1e-5)
    # without overrides, the preprocessing is what timm records for the architecture
    cfg = json.loads((import_timm(PretrainedConfig(arch="tf_efficientnet_lite0", pretrained=str(ckpt),
                                                   output=str(tmp_path / "j"))) / "config.json").read_text())
    assert cfg["preprocessing"]["mean"] == pytest.approx([0.5, 0.5, 0.5])  # timm: Inception statistics
    with pytest.raises(UserError, match="does not fit timm 'resnet18'"):
        import_timm(PretrainedConfig(arch="resnet18", pretrained=str(ckpt), output=str(tmp_path / "k")))
    pickled = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "obj": object()}, pickled)  # not plain tensors
    with pytest.raises(UserError, match="pickled code"):
        import_timm(PretrainedConfig(arch="resnet18", pretrained=str(pickled), output=str(tmp_path / "l")))


# --- He et al.'s recipe end to end at toy scale ------------------------------------------------------

def _downstream(root: Path, classes: list[str], per_class: dict[str, int]) -> Path:
    """A downstream dataset folder as the recipe expects: test/ and shots/ of real images, classes.txt."""
    fm = load_fashion_mnist("test")
    for name in classes:
        idx = (fm.labels == fm.label_space.classes.index(name)).nonzero().flatten()
        # test images from the front of the class, shots from its end: the two never share an image
        for split, pick in (("test", idx[: per_class["test"]]), ("shots", idx[-per_class["shots"]:])):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in pick.tolist():
                Image.fromarray(fm.images[i, 0].numpy()).save(folder / f"{i:05d}.png")
    (root / "classes.txt").write_text("\n".join(sorted(classes)) + "\n")
    return root


def test_he_recipe_runs_end_to_end_on_tiny_local_models(tiny_clip, tmp_path, capsys, one_torch_thread):  # noqa: F811
    data = tmp_path / "data"
    _downstream(data / "toy", ["Bag", "Dress", "Sneaker"], {"test": 12, "shots": 4})
    small = {"dtype": "float32", "steps": 2, "height": 16, "width": 16}
    args = [f"vars.data={data}", "vars.dataset=toy", f"vars.output={tmp_path / 'out'}",
            f"vars.generator={tiny_sd()}", f"vars.sentences_model={tiny_t5()}",
            f"vars.clip=local-dir:{tiny_clip['local_dir']}", "vars.clip_pretrained=",
            "vars.images_per_class=6", "vars.keep_per_class=4",
            "generate.zeroshot.prompts.options.require_class_name=false",
            "generate.zeroshot.prompts.options.max_new_tokens=2", "curate.progress=false",
            # a random tiny generator makes noise that CLIP's filter would rightly drop whole classes of
            "curate.filters.he.enabled=false",
            "evaluate.image_size=32", *(f"train.{m}.data.image_size=32" for m in
                                        ("zeroshot_synthetic", "fewshot_guided", "fewshot_real_only")),
            *(f"generate.{g}.generator.{k}={v}" for g in ("zeroshot", "guided") for k, v in small.items()),
            "generate.guided.generator.steps=4"]  # 4 shots -> strength 0.3: one denoising step of 4
    recipe = str(RECIPES / "he2023_clip_tuning.yaml")
    code, out = run(capsys, "run", recipe, "--dry-run", *args)
    assert code == 0, out  # with everything present, the full-scale recipe checks clean
    code, out = run(capsys, "run", recipe, *args)
    assert code == 0, out
    root = tmp_path / "out"
    res = pd.read_parquet(root / "eval" / "results.parquet")
    assert set(res.model) == {"zeroshot_synthetic", "fewshot_guided", "fewshot_real_only"}
    top1 = res[(res.probe == "clean") & (res.metric == "top1")]
    assert len(top1) == 3 and top1.value.between(0, 1).all()
    guided = json.loads((root / "train" / "fewshot_guided" / "model" / "results.json").read_text())
    # guided images as the synthetic batch (train + val split), the real shots as the second batch
    assert guided["metrics"]["n_train"] + guided["metrics"]["n_val"] == 3 * 4
    assert guided["metrics"]["n_real"] == 3 * 4 and guided["metrics"]["two_batch"]["real"] == 32
    assert (root / "report.html").is_file()
    # the CLIP-scored curation ran on the zero-shot images: one score per generated image
    scores = pd.read_parquet(root / "curated" / "curation.parquet")
    assert len(scores) == 3 * 6
