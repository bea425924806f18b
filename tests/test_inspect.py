"""synclone inspect on real Fashion-MNIST: real-vs-real near the ideal values, noise far from them, the cache,
the files it writes, and bad input as one line with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from _probe_helpers import fit_tiny, one_thread
from synclone.cli import main
from synclone.data.fashion_mnist import load_fashion_mnist
from synclone.inspect import InspectConfig, inspect_dataset
from synclone.labels import FASHION_MNIST, LabelSpace
from synclone.models import save_model

PER_CLASS = 60
FAST = {"max_per_class": PER_CLASS, "kid_subsets": 10, "grid_examples": 4, "worst_covered": 3}


def write_folder(root: Path, images: torch.Tensor, labels: torch.Tensor, space=FASHION_MNIST) -> Path:
    """A synclone dataset folder (dataset.json + train/<slug>/<id>.png + train/metadata.jsonl)."""
    (root / "train").mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({"label_space": space.to_dict()}), encoding="utf-8")
    rows = []
    for i, (im, y) in enumerate(zip(images, labels.tolist(), strict=True)):
        rel = f"{space.slugs[y]}/{i:05d}.png"
        (root / "train" / space.slugs[y]).mkdir(exist_ok=True)
        Image.fromarray(im[0].numpy(), "L").save(root / "train" / rel)
        rows.append({"file_name": rel, "id": f"img{i:05d}", "label": y, "class_name": space.classes[y]})
    (root / "train" / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():  # small matrices on a shared 2-core machine: one thread is faster
        yield


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    train = load_fashion_mnist("train")
    model = fit_tiny(train.per_class_subset(200, seed=1), 100, seed=0)
    save_model(model, root / "real" / "model")
    real = train.per_class_subset(PER_CLASS, seed=2)  # real training images posing as a "synthetic" set
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, real.images.shape, generator=g, dtype=torch.uint8)
    return {"root": root, "model": root / "real" / "model",
            "real": write_folder(root / "real_set", real.images, real.labels),
            "noise": write_folder(root / "noise_set", noise, real.labels)}


def _all(df: pd.DataFrame) -> dict[str, float]:
    return dict(df.loc[df["class"] == "all", ["metric", "value"]].itertuples(index=False))


@pytest.fixture(scope="module")
def real_run(setup):
    cfg = InspectConfig(dataset=str(setup["real"]), reference="fashion_mnist:test", features=str(setup["model"]),
                        output=str(setup["root"] / "out_real"), **FAST)
    return cfg, inspect_dataset(cfg)


def test_real_training_images_against_real_test_images_are_near_ideal(setup, real_run):
    _, df = real_run
    noise = inspect_dataset(InspectConfig(dataset=str(setup["noise"]), reference="fashion_mnist:test",
                                          features=str(setup["model"]), output=str(setup["root"] / "out_noise"),
                                          **FAST))
    r, n = _all(df), _all(noise)
    for m in ("precision", "recall", "coverage"):
        assert r[m] > 0.8, (m, r[m])
        assert n[m] < 0.05, (m, n[m])
    assert 0.75 < r["density"] < 1.3 and n["density"] < 0.05
    assert 0.85 < r["diversity_ratio"] < 1.15
    assert n["frechet_distance"] > 20 * r["frechet_distance"]
    assert n["kid"] > 20 * max(r["kid"], 1e-4)
    # The classifier is as right on these real images as on the real test images; noise is one mush class.
    assert abs(r["classifiability"] - r["classifier_top1_real"]) < 0.08 and r["classifiability"] > 0.6
    assert n["classifiability"] < 0.2
    assert r["near_duplicate_rate"] < 0.05 and r["exact_duplicate_rate"] == 0.0
    # Per class too: every class of the real set covers most of its real test images.
    per_class = df[(df["metric"] == "coverage") & (df["class"] != "all")]
    assert len(per_class) == 10 and (per_class["value"] > 0.6).all()


def test_inspect_writes_the_long_table_grids_and_csvs(setup, real_run):
    cfg, df = real_run
    out = Path(cfg.output)
    assert list(pd.read_csv(out / "results.csv").columns) == ["dataset", "reference", "features", "class", "metric",
                                                              "value", "n", "convention"]
    assert pd.read_parquet(out / "results.parquet").equals(df)
    assert set(df["class"]) == {*FASHION_MNIST.classes, "all"}
    assert (df[df["metric"] == "n_synthetic"].set_index("class")["value"].drop("all") == PER_CLASS).all()
    for slug in FASHION_MNIST.slugs:
        assert Image.open(out / "grids" / f"{slug}.png").size[0] > 200
    worst = pd.read_csv(out / "worst_covered.csv")
    assert len(worst) == 3 * 10 and worst["real_id"].str.startswith("fashion_mnist_test[").all()
    assert worst["nearest_synthetic_id"].str.startswith("img").all()
    # Worst first, and a real test image listed is the one the reference holds at that index.
    assert (worst.groupby("class")["gap"].apply(lambda g: g.is_monotonic_decreasing)).all()
    conf = pd.read_csv(out / "confusion.csv")
    assert conf.groupby("set")["count"].sum().to_dict() == {"real": 10 * PER_CLASS, "synthetic": 10 * PER_CLASS}
    info = json.loads((out / "inspect.json").read_text())
    assert info["classifier"] == "model:real" and {f["file"] for f in info["figures"]} == {"grid.png",
                                                                                          "worst_covered.png"}


def test_a_second_run_computes_no_features(setup, real_run, monkeypatch):
    cfg, first = real_run

    def no_model(*_a, **_k):
        raise AssertionError("a model was loaded although every feature is cached")

    monkeypatch.setattr("synclone.models.load_model", no_model)
    again = inspect_dataset(cfg)
    info = json.loads((Path(cfg.output) / "inspect.json").read_text())
    assert info["cache"] == {"hits": 2, "misses": 0, "forward_batches": 0}
    pd.testing.assert_frame_equal(again, first)


def test_cli_inspect_and_its_bad_inputs(setup, capsys):
    out = setup["root"] / "out_cli"
    code = main(["inspect", str(setup["real"]), "--reference", "fashion_mnist:test", "--features", "pixels:8",
                 "--classifier", str(setup["model"]), "--output", str(out), "--set", "max_per_class=20",
                 "--set", "kid_subsets=2", "--set", "grid_examples=0"])
    assert code == 0 and capsys.readouterr().out.strip() == str(out)
    df = pd.read_parquet(out / "results.parquet")
    assert set(df["features"]) == {"pixels:8"}  # pixel features, the real model's logits for classifiability
    assert _all(df)["classifiability"] > 0.6

    other = write_folder(setup["root"] / "two_classes", torch.zeros(4, 1, 28, 28, dtype=torch.uint8),
                         torch.tensor([0, 0, 1, 1]), LabelSpace.from_names(["cat", "dog"], name="pets"))
    cases = {
        "label spaces don't align": [str(other), "--reference", "fashion_mnist:test", "--features", "pixels"],
        "offline default is --features MODEL_FOLDER": [str(setup["real"]), "--reference", "fashion_mnist:test"],
        "cannot load the weights for --features clip": [str(setup["real"]), "--reference", "fashion_mnist:test",
                                                        "--features", "clip"],
        "cannot load the weights for --features dinov2": [str(setup["real"]), "--reference", "fashion_mnist:test",
                                                           "--features", "dinov2"],
        "neither an existing model folder": [str(setup["real"]), "--reference", "fashion_mnist:test",
                                             "--features", "no/such/model"],
    }
    for needle, argv in cases.items():
        code = main(["inspect", *argv, "--output", str(setup["root"] / "bad")])
        err = capsys.readouterr().err.strip()
        assert code == 2, (needle, err)
        assert len(err.splitlines()) == 1 and needle in err, err
        if {"clip", "dinov2", "no/such/model"} & set(argv):
            assert "offline default is --features MODEL_FOLDER" in err  # the way out, named


def test_exact_duplicates_count_once_per_copy(setup):
    real = load_fashion_mnist("test").per_class_subset(12, seed=0)
    images = real.images.clone()
    images[1::2] = images[0::2]  # every second image a copy of the one before it (same class by construction)
    labels = real.labels.clone()
    labels[1::2] = labels[0::2]
    folder = write_folder(setup["root"] / "dups", images, labels)
    df = inspect_dataset(InspectConfig(dataset=str(folder), reference="fashion_mnist:test", features="pixels:8",
                                       output=str(setup["root"] / "out_dups"), kid_subsets=2, max_per_class=40,
                                       grid_examples=0))
    a = _all(df)
    assert a["exact_duplicate_rate"] == pytest.approx(0.5)
    assert "classifiability" not in a  # pixels give no logits, and no classifier was named
    assert a["near_duplicate_rate"] >= 0.5  # a copy's nearest neighbour is at distance 0
    assert np.isfinite(a["frechet_distance"])


def test_report_gets_a_dataset_section_from_the_files(setup, real_run, tmp_path):
    import shutil

    from synclone.report import build_report
    from test_report import _browser_check, _chromium, parse, write_eval_folder

    cfg, df = real_run
    # The default place, inside the dataset folder, is found from the datasets the report shows.
    shutil.copytree(cfg.output, setup["real"] / "inspect", dirs_exist_ok=True)
    ev = write_eval_folder(tmp_path / "eval", probes=("clean",))
    html = build_report(ev, tmp_path / "out", datasets=[setup["real"]]).read_text()
    p = parse(html)
    sec = p.sections["dataset"]
    header = [c[0] for c in sec["tables"][0][0]]
    assert header[:4] == ["class", "synthetic images", "Fréchet dist.", "KID"] and "coverage" in header
    body = sec["tables"][0][1:]
    assert [r[0][0] for r in body] == [*FASHION_MNIST.classes, "all"]
    cov = float(body[-1][header.index("coverage")][0])
    assert cov == pytest.approx(_all(df)["coverage"], abs=5e-4)  # the number on the page is the file's
    assert len(sec["imgs"]) == 2  # the synthetic | real grid and the worst-covered images
    assert "datasets" in p.sections  # the generated-data section (sample grid) stays as it was
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Dataset diagnostics" in md and "| Sandal |" in md
    if _chromium() is not None:
        check = _browser_check(html, tmp_path)
        assert check["broken"] == 0 and check["empty"] == [] and not check["overflow"], check


def test_a_dataset_of_some_classes_is_compared_on_those(setup):
    test = load_fashion_mnist("test")
    picks = torch.cat([(test.labels == 1).nonzero()[:15, 0], (test.labels == 8).nonzero()[:15, 0]])
    space = LabelSpace.from_names(["Trouser", "Bag"], name="two")
    labels = (test.labels[picks] == 8).long()  # Trouser -> 0, Bag -> 1 in the folder's own space
    folder = write_folder(setup["root"] / "some_classes", test.images[picks], labels, space)
    df = inspect_dataset(InspectConfig(dataset=str(folder), reference="fashion_mnist:test", features="pixels:8",
                                       output=str(setup["root"] / "out_some"), max_per_class=30, kid_subsets=2,
                                       grid_examples=0, worst_covered=0))
    n = df[df["metric"] == "n_synthetic"].set_index("class")["value"]
    assert n["Trouser"] == 15 and n["Bag"] == 15 and n["Coat"] == 0 and n["all"] == 30
    cov = df[df["metric"] == "coverage"].set_index("class")["value"]
    assert set(cov.index) == {"Trouser", "Bag", "all"}
    assert cov["all"] < 0.5 < cov["Bag"]  # 8 of the 10 real classes have no synthetic image near them


def test_clip_features_from_an_open_clip_folder(setup):
    from _tiny_openclip import build_tiny_openclip

    clip = build_tiny_openclip(setup["root"] / "tiny_clip", train_steps=0)["local_dir"]
    out = setup["root"] / "out_clip"
    cfg = InspectConfig(dataset=str(setup["real"]), reference="fashion_mnist:test", features=f"clip:{clip}",
                        output=str(out), max_per_class=20, kid_subsets=2, grid_examples=0, worst_covered=0)
    df = inspect_dataset(cfg)
    assert set(df["features"]) == {f"clip:{clip}"} and "classifiability" not in set(df["metric"])
    info = json.loads((out / "inspect.json").read_text())
    assert info["cache"]["misses"] == 2 and info["extractor_id"].startswith("clip-")
    (feats,) = [f for f in (out / "cache" / info["extractor_id"]).iterdir() if f.name.startswith(
        info["fingerprints"]["dataset"])]
    from safetensors.numpy import load_file

    assert load_file(str(feats))["features"].shape == (200, 32)  # 10 classes x 20, the tiny model's embed_dim
