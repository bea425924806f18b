"""The shape-bias, background and context probes through the suite runner's contract.

Built probes are checked against a direct computation on the folders the probes write (files read one by one,
the model called on them, the library's metric functions on its decisions), and the context probe reads a
dataset folder made by ``synclone generate`` with the contexts strategy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from _probe_helpers import fit_tiny, one_thread, run_probe, same, table
from synclone.config import validate
from synclone.data.fashion_mnist import load_fashion_mnist
from synclone.data.images import load_image
from synclone.data.imageset import TensorImageSet
from synclone.errors import UserError
from synclone.labels import FASHION_MNIST, class_lookup, imagenet1k_space
from synclone.models import create_classifier
from synclone.probes.background import background_bias, labels_for, read_variant_folder
from synclone.probes.base import EvalContext, ModelEntry, get_probe
from synclone.probes.shape_bias import category_decisions, read_cue_conflict_folder, shape_bias
from synclone.prompts.contexts import context_prompts
from synclone.stimuli.backgrounds import IN9_VARIANTS


@pytest.fixture(autouse=True)
def _threads():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def real():
    train = load_fashion_mnist("train").per_class_subset(40, seed=1)
    return {"real": ModelEntry("real", Path("real"), fit_tiny(train, 60, 0), "fp-real")}


@pytest.fixture(scope="module")
def clean():
    return load_fashion_mnist("test").per_class_subset(20, seed=0)


def _logits(model, paths, size) -> np.ndarray:
    x = torch.from_numpy(np.stack([load_image(p, size) for p in paths]))
    with torch.no_grad():
        return model.eval()(x).double().numpy()


def _direct_shape_bias(model, folder, size):
    """Shape bias computed without the suite: read the folder, run the model, decide, count."""
    items = read_cue_conflict_folder(folder)
    cats = sorted({it.shape for it in items} | {it.texture for it in items}
                  | {p.name for p in Path(folder).iterdir() if p.is_dir()})
    space = getattr(model, "label_space", None)
    dec, _ = category_decisions(_logits(model, [it.path for it in items], size), cats, "auto", space=space,
                                where=folder, lookup=class_lookup(space) if space is not None else None)
    return shape_bias(dec, np.array([it.shape for it in items]), np.array([it.texture for it in items]), cats)


def _direct_background(model, folder, size):
    space = model.label_space
    correct = {}
    for v in IN9_VARIANTS:
        items = read_variant_folder(folder, v)
        labels = labels_for(items, space.classes, class_lookup(space), Path(folder) / v)
        correct[v] = _logits(model, [it.path for it in items], size).argmax(1) == labels
    return background_bias(correct)


def _same(a: float, b: float) -> bool:
    return same(a, b, 1e-12)


# ---------------------------------------------------------------------------------------------------- shape bias


def test_built_cue_conflict_probe_matches_the_library_and_is_reused(real, clean, tmp_path):
    ctx = EvalContext(real, clean, tmp_path, progress=False)
    rows = run_probe("shape_bias", ctx, build=True, per_class=6, per_pair=1)
    folder = tmp_path / "probes" / "cue_conflict"
    assert (folder / "build.json").is_file() and (folder / "metadata.csv").is_file()
    t = table(rows)
    assert {r.variant for r in rows} == {"all", *FASHION_MNIST.slugs}
    assert {r.metric for r in rows if r.variant == "dress"} == {"shape_bias", "shape_fraction", "texture_fraction"}
    assert next(r.n for r in rows if r.variant == "all") == 90  # 10 x 9 ordered class pairs, one stimulus each
    # The suite's path (in-memory, cached logits) equals a direct computation on the written folder.
    lib = _direct_shape_bias(real["real"].module, folder, (1, 28, 28))
    assert t["real", "all", "shape_bias"] == pytest.approx(lib.shape_bias)
    assert t["real", "all", "texture_fraction"] == pytest.approx(lib.texture_fraction)
    for rec in lib.per_category.itertuples():
        assert _same(t["real", rec.category, "shape_bias"], rec.shape_bias)
    assert t["real", "all", "shape_fraction"] + t["real", "all", "texture_fraction"] <= 1
    art = next(a["data"] for a in ctx.artifacts if a["kind"] == "shape_bias")
    assert art["categories"] == sorted(FASHION_MNIST.slugs) and len(art["shape_bias"]) == 10

    stamp = (folder / "build.json").stat().st_mtime_ns
    again = EvalContext(real, clean, tmp_path, progress=False)
    assert table(run_probe("shape_bias", again, build=True, per_class=6, per_pair=1)).keys() == t.keys()
    assert again.forward_passes == 0 and (folder / "build.json").stat().st_mtime_ns == stamp
    rebuilt = run_probe("shape_bias", again, build=True, per_class=6, per_pair=2)  # other settings: a new build
    assert next(r.n for r in rebuilt if r.variant == "all") == 180


def test_imagenet_model_decides_among_the_16_categories(tmp_path):
    torch.manual_seed(0)
    space = imagenet1k_space()
    model = create_classifier("synclone_cnn_tiny", space, (3, 16, 16)).eval()
    clean = TensorImageSet(torch.zeros(4, 3, 16, 16, dtype=torch.uint8), torch.arange(4), space, "in1k")
    rng = np.random.default_rng(0)
    names = ["airplane1-bear1", "airplane2-airplane1", "airplane3-bicycle2", "bear1-bicycle1", "bear2-airplane3",
             "bicycle1-bear2", "bicycle2-airplane1", "bicycle3-bicycle1"]
    for name in names:
        path = tmp_path / "cc" / name.split("-")[0].rstrip("0123456789") / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
    ctx = EvalContext({"net": ModelEntry("net", Path("net"), model, "fp-net")}, clean, tmp_path, progress=False)
    rows = run_probe("shape_bias", ctx, folder=str(tmp_path / "cc"))
    assert "imagenet16 (mean of softmax" in rows[0].convention
    lib = _direct_shape_bias(model, tmp_path / "cc", (3, 16, 16))
    t = table(rows)
    assert _same(t["net", "all", "shape_bias"], lib.shape_bias) and t["net", "all", "shape_fraction"] == \
        lib.shape_fraction
    assert {r.variant for r in rows} == {"all", "airplane", "bear", "bicycle"}
    (tmp_path / "cc" / "bear" / "bear_no_texture.png").write_bytes((tmp_path / "cc" / "bear" / "bear1-bicycle1.png")
                                                                  .read_bytes())
    with pytest.raises(UserError, match="bear_no_texture.png"):
        run_probe("shape_bias", ctx, folder=str(tmp_path / "cc"))


# ---------------------------------------------------------------------------------------------------- background


def test_built_background_probe_rows_and_library_agreement(real, clean, tmp_path):
    ctx = EvalContext(real, clean, tmp_path, progress=False)
    rows = run_probe("background", ctx, per_class=4)  # no folder: built from the clean set on natural textures
    t = table(rows)
    assert {r.variant for r in rows if r.metric == "top1"} == set(IN9_VARIANTS)
    gap = t["real", "mixed_same", "top1"] - t["real", "mixed_rand", "top1"]
    assert t["real", "all", "bg_gap"] == pytest.approx(gap)
    assert all(r.n == 40 for r in rows)
    folder = tmp_path / "probes" / "backgrounds"
    lib = _direct_background(real["real"].module, folder, (1, 28, 28))
    assert all(t["real", v, "top1"] == pytest.approx(a) for v, a in lib.accuracy.items())
    # The garment on black is the Fashion-MNIST image itself; the textured scene without it carries no garment.
    assert t["real", "only_fg", "top1"] >= t["real", "no_fg", "top1"] + 0.3
    assert next(a["data"] for a in ctx.artifacts if a["kind"] == "background") == \
        {v: t["real", v, "top1"] for v in IN9_VARIANTS}

    partial = tmp_path / "partial"
    shutil.copytree(folder, partial)
    shutil.rmtree(partial / "mixed_rand")
    with pytest.raises(UserError, match="variant 'mixed_rand' is missing: no folder '.*partial/mixed_rand/val'"):
        run_probe("background", ctx, folder=str(partial))
    rows = run_probe("background", ctx, folder=str(partial), variants=["original", "only_fg"])
    assert {r.metric for r in rows} == {"top1"}  # no BG-gap without the mixed variants


# ---------------------------------------------------------------------------------------------------- context


def test_context_probe_reads_a_folder_from_synclone_generate(real, clean, tmp_path):
    from _tiny_pipelines import gen_config, tiny_sd
    from synclone.generate import generate

    out = generate(gen_config(tiny_sd(), tmp_path / "ctx", images_per_class=8, prompts={"strategy": "contexts"}))
    ctx = EvalContext(real, clean, tmp_path / "eval", progress=False)
    rows = run_probe("context", ctx, folder=str(out))
    meta = [json.loads(line) for line in (out / "train" / "metadata.jsonl").read_text().splitlines()]
    # Recomputed by hand: each image read at the model's input size, grouped by its recorded n_uncommon.
    x = torch.from_numpy(np.stack([load_image(out / "train" / r["file_name"], (1, 28, 28)) for r in meta]))
    with torch.no_grad():
        pred = real["real"].module(x).argmax(1).numpy()
    correct = pred == np.array([FASHION_MNIST.index(r["class_name"]) for r in meta])
    k = np.array([r["attributes"]["n_uncommon"] for r in meta])
    t = table(rows)
    assert {r.variant for r in rows if r.metric == "top1"} == {f"P{v}" for v in set(k)} | {"all"}
    for v in set(k):
        assert t["real", f"P{v}", "top1"] == pytest.approx(correct[k == v].mean())
        assert next(r.n for r in rows if r.variant == f"P{v}") == (k == v).sum()
    assert t["real", "all", "top1"] == pytest.approx(correct.mean())

    for r in meta:  # the same folder as a prompt strategy without contexts would leave it
        r["attributes"] = {}
    (out / "train" / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in meta))
    with pytest.raises(UserError, match="contexts prompt strategy"):
        run_probe("context", ctx, folder=str(out))


def test_context_probe_on_a_focus_styletable(real, clean, tmp_path):
    """Common contexts get images the model gets right; 2+ uncommon ones get images it gets wrong."""
    model = real["real"].module
    with torch.no_grad():
        pred = model(clean.batch(slice(None))[0]).argmax(1)
    right = (pred == clean.labels).nonzero().flatten().tolist()
    wrong = (pred != clean.labels).nonzero().flatten().tolist()
    rows, used = [], {"right": 0, "wrong": 0}
    for _prompt, attrs, n in context_prompts("Dress", np.random.default_rng(0)):
        pool = "right" if n < 2 else "wrong"
        i = (right if n < 2 else wrong)[used[pool]]
        used[pool] += 1
        name = f"{len(rows):03d}.png"
        Image.fromarray(clean.images[i, 0].numpy()).save(tmp_path / name)
        rows.append({"file_name": name, "label": int(clean.labels[i]), "time_uncommon": attrs["time_uncommon"],
                     "weather_uncommon": attrs["weather_uncommon"], "location_uncommon": attrs["location_uncommon"]})
    pd.DataFrame(rows).to_csv(tmp_path / "annotations.csv", index=False)
    ctx = EvalContext(real, clean, tmp_path / "eval", progress=False)
    t = table(run_probe("context", ctx, folder=str(tmp_path)))
    assert t["real", "P0", "top1"] == 1.0 and t["real", "P1", "top1"] == 1.0
    assert t["real", "P2", "top1"] == 0.0 and t["real", "P3", "top1"] == 0.0
    assert t["real", "P1", "ratio_to_P0"] == 1.0 and t["real", "P2", "ratio_to_P0"] == 0.0


# ---------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("probe", "settings", "message"), [
    ("shape_bias", {"folder": "x", "build": True}, "either folder"),
    ("shape_bias", {"build": False}, "build: false needs a folder"),
    ("background", {"variants": ["mixed_odd"]}, "unknown background variant mixed_odd"),
    ("background", {"per_class": 1}, "per_class"),
    ("context", {}, "missing config key 'folder'"),
])
def test_bad_settings_are_one_line_user_errors(probe, settings, message):
    spec = get_probe(probe)
    with pytest.raises(UserError) as err:
        validate(spec.settings, settings, source=f"probes.{probe}")
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("probe", ["shape_bias", "background", "context"])
def test_missing_folders_are_user_errors(real, clean, tmp_path, probe):
    ctx = EvalContext(real, clean, tmp_path, progress=False)
    with pytest.raises(UserError, match="nowhere' does not exist"):
        run_probe(probe, ctx, folder=str(tmp_path / "nowhere"))
