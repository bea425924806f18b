"""Shape bias: the 16-category decision, the metric against model-vs-human's analysis, cue-conflict folders."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from _probe_helpers import probe_on_folder
from synclone.errors import UserError
from synclone.labels import imagenet1k_space
from synclone.probes.shape_bias import (
    imagenet16_categories,
    imagenet16_decision,
    imagenet16_indices,
    imagenet16_scores,
    parse_cue_conflict_name,
    read_cue_conflict_folder,
    shape_bias,
)

# Counted from model-vs-human's HumanCategories.<category>_indices lists (helper/human_categories.py).
MVH_COUNTS = {"airplane": 1, "bear": 4, "bicycle": 2, "bird": 49, "boat": 5, "bottle": 7, "car": 3, "cat": 6,
              "chair": 4, "clock": 3, "dog": 109, "elephant": 2, "keyboard": 2, "knife": 1, "oven": 1, "truck": 8}


def test_imagenet16_table_has_model_vs_humans_counts_and_order():
    idx = imagenet16_indices()
    assert imagenet16_categories() == tuple(sorted(MVH_COUNTS))
    assert {c: len(v) for c, v in idx.items()} == MVH_COUNTS
    flat = [i for v in idx.values() for i in v]
    assert len(flat) == len(set(flat)) == 207  # no ImageNet class in two categories
    assert 0 <= min(flat) and max(flat) < 1000
    names = imagenet1k_space().classes
    assert len(names) == len(set(names)) == 1000
    assert names[idx["knife"][0]] == "cleaver" and names[idx["airplane"][0]] == "airliner"
    assert [names[i] for i in idx["cat"]][-1] == "cougar"  # model-vs-human counts the cougar as a cat


def _probs_with(mass: dict[int, float]) -> np.ndarray:
    """A softmax row with the given mass on some classes and the rest spread over classes in no category."""
    p = np.zeros(1000)
    for i, v in mass.items():
        p[i] = v
    outside = sorted(set(range(1000)) - {i for v in imagenet16_indices().values() for i in v} - set(mass))
    p[outside] = (1 - p.sum()) / len(outside)
    return p


def test_mean_not_sum_decides_the_mean_vs_sum_trap():
    cats = imagenet16_categories()
    dog, knife = imagenet16_indices()["dog"], imagenet16_indices()["knife"]
    # 109 dog classes at 0.004 each hold 0.436 in total, the single knife class 0.3: the mean says knife
    # (0.3 vs 0.004), a sum would say dog (0.436 vs 0.3).
    p = _probs_with({**{i: 0.004 for i in dog}, knife[0]: 0.3})
    assert cats[imagenet16_decision(p[None])[0]] == "knife"
    assert cats[imagenet16_decision(p[None], aggregation="sum")[0]] == "dog"
    scores = imagenet16_scores(p[None])[0]
    assert scores[cats.index("dog")] == pytest.approx(0.004) and scores[cats.index("knife")] == pytest.approx(0.3)


def _mvh_16_decision(probs: np.ndarray) -> list[str]:
    """model-vs-human's ImageNetProbabilitiesTo16ClassesMapping (datasets/decision_mappings.py), top-1 only."""
    cats = sorted(MVH_COUNTS)
    agg = np.transpose([np.mean(np.take(probs, imagenet16_indices()[c], axis=-1), axis=-1) for c in cats])
    sorted_indices = np.flip(np.argsort(agg, axis=-1), axis=-1)
    return list(np.take(cats, sorted_indices, axis=-1)[:, 0])


def test_decision_matches_model_vs_human_on_random_softmax_rows():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 1000)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    ours = [imagenet16_categories()[i] for i in imagenet16_decision(probs)]
    assert ours == _mvh_16_decision(probs)
    assert (imagenet16_decision(logits, from_logits=True) == imagenet16_decision(probs)).all()


def test_decision_rejects_logits_passed_as_probabilities():
    with pytest.raises(UserError, match="from_logits"):
        imagenet16_decision(np.random.default_rng(0).normal(size=(2, 1000)))


def _mvh_shape_bias(df: pd.DataFrame) -> dict:
    """model-vs-human's ShapeBias.analysis (plotting/analyses.py) on columns category, texture, object_response."""
    df2 = df.loc[df.category != df.texture]
    fcs = len(df2.loc[df2.object_response == df2.category]) / len(df)
    fct = len(df2.loc[df2.object_response == df2.texture]) / len(df)
    return {"fraction-correct-shape": fcs, "fraction-correct-texture": fct, "shape-bias": fcs / (fcs + fct)}


def test_shape_bias_excludes_agreeing_pairs_and_matches_model_vs_human():
    shapes = ["cat", "cat", "cat", "dog", "dog", "dog", "knife", "knife"]
    textures = ["dog", "knife", "cat", "cat", "dog", "knife", "cat", "dog"]
    decisions = ["cat", "knife", "cat", "dog", "dog", "bear", "cat", "knife"]
    # Conflict images (shape != texture): 6 of 8. Shape hits: cat/dog->cat, dog/cat->dog, knife/dog->knife = 3;
    # texture hits: cat/knife->knife, knife/cat->cat = 2. The two agreeing images (cat/cat, dog/dog) were
    # answered "correctly" and would add a hit to both sides if they were counted.
    r = shape_bias(decisions, shapes, textures)
    assert (r.n_images, r.n_conflict, r.n_shape_hits, r.n_texture_hits) == (8, 6, 3, 2)
    assert r.shape_bias == pytest.approx(3 / 5)
    assert r.shape_fraction == pytest.approx(3 / 8) and r.texture_fraction == pytest.approx(2 / 8)
    ref = _mvh_shape_bias(pd.DataFrame({"category": shapes, "texture": textures, "object_response": decisions}))
    assert r.shape_bias == pytest.approx(ref["shape-bias"])
    assert r.shape_fraction == pytest.approx(ref["fraction-correct-shape"])
    assert r.texture_fraction == pytest.approx(ref["fraction-correct-texture"])
    per = r.per_category.set_index("category")
    assert per.loc["cat", "shape_bias"] == pytest.approx(0.5)  # cat/dog->cat (shape), cat/knife->knife (texture)
    assert per.loc["dog", "shape_bias"] == pytest.approx(1.0)  # dog/knife->bear is neither
    assert per.loc["knife", "shape_bias"] == pytest.approx(0.5)
    rows = r.to_rows(model="m")
    assert set(rows["variant"]) == {"all", "cat", "dog", "knife"} and (rows["model"] == "m").all()


def test_shape_bias_accepts_indices_and_reports_nan_without_hits():
    cats = ["a", "b", "c"]
    r = shape_bias(np.array([0, 1, -1]), np.array([0, 0, 1]), np.array([1, 1, 2]), categories=cats)
    assert (r.n_shape_hits, r.n_texture_hits) == (1, 1)
    assert np.isnan(shape_bias(["c", "c"], ["a", "b"], ["b", "a"]).shape_bias)
    with pytest.raises(UserError, match="no cue conflict"):
        shape_bias(["a"], ["a"], ["a"])
    with pytest.raises(UserError, match="lengths"):
        shape_bias(["a", "b"], ["a"], ["b"])


@pytest.mark.parametrize("name,expected", [
    ("airplane1-bicycle2.png", ("airplane", "bicycle")),
    ("XXX_dog10-bird2.png", ("dog", "bird")),
    ("t_shirt_top3-ankle_boot12.png", ("t_shirt_top", "ankle_boot")),
    ("shirt4-t_shirt_top1.png", ("shirt", "t_shirt_top")),
])
def test_parse_cue_conflict_names(name, expected):
    cats = ["airplane", "bicycle", "bird", "dog", "t_shirt_top", "shirt", "ankle_boot"]
    assert parse_cue_conflict_name(name, cats) == expected


@pytest.mark.parametrize("name", ["airplane1.png", "airplane1-unicorn2.png", "airplanes-bird1.png"])
def test_cue_conflict_names_without_both_labels_name_the_file(name):
    with pytest.raises(UserError, match=name):
        parse_cue_conflict_name(name, ["airplane", "bird"])


def _write(path, value: int, size=8):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, dtype=np.uint8)).save(path)


def test_folder_reader_checks_names_and_folders(tmp_path):
    _write(tmp_path / "cat" / "cat1-dog2.png", 10)
    _write(tmp_path / "dog" / "dog1-cat1.png", 10)
    items = read_cue_conflict_folder(tmp_path)
    assert [(i.shape, i.texture) for i in items] == [("cat", "dog"), ("dog", "cat")]
    _write(tmp_path / "dog" / "dog7.png", 10)
    with pytest.raises(UserError, match="dog7.png"):
        read_cue_conflict_folder(tmp_path)
    (tmp_path / "dog" / "dog7.png").unlink()
    _write(tmp_path / "dog" / "cat2-dog3.png", 10)
    with pytest.raises(UserError, match="cat2-dog3.png"):
        read_cue_conflict_folder(tmp_path)


class _BrightnessModel(torch.nn.Module):
    """Names class k for mean grey level near k / (K - 1): a model that only sees 'texture' (intensity)."""

    def __init__(self, classes):
        super().__init__()
        from synclone.labels import LabelSpace

        self.label_space = LabelSpace.from_names(classes)
        self.input_size = (1, 8, 8)

    def forward(self, x):
        k = len(self.label_space)
        centres = torch.linspace(0, 1, k)
        return -(x.mean(dim=(1, 2, 3))[:, None] - centres[None]) ** 2


def test_evaluate_folder_with_a_direct_model(tmp_path):
    # Texture = grey level; a brightness model always names the texture: shape bias 0.
    levels = {"a": 0, "b": 128, "c": 255}
    for s in levels:
        for t in levels:
            _write(tmp_path / s / f"{s}1-{t}1.png", levels[t])
    values, counts = probe_on_folder("shape_bias", _BrightnessModel(["a", "b", "c"]),
                                     folder=str(tmp_path))
    assert counts["all", "shape_bias"] == 9
    assert values["all", "shape_bias"] == 0.0 and values["all", "texture_fraction"] == pytest.approx(6 / 9)


def test_real_imagenet_model_through_the_16_categories(tmp_path):
    """EfficientNet-Lite0 with real weights: a cat photo decides 'cat', a clock photo 'clock'."""
    import skimage.data
    from PIL import Image

    from _imagenet_model import load_efficientnet_lite0

    model = load_efficientnet_lite0()
    photos = {"cat": skimage.data.chelsea(), "clock": np.repeat(skimage.data.clock()[..., None], 3, axis=-1)}
    x = torch.stack([torch.from_numpy(np.array(Image.fromarray(p).resize((224, 224), Image.Resampling.BILINEAR)))
                     .permute(2, 0, 1).float() / 255 for p in photos.values()])
    with torch.no_grad():
        probs = model(x).softmax(-1).numpy()
    cats = imagenet16_categories()
    assert [cats[i] for i in imagenet16_decision(probs)] == ["cat", "clock"]
    # The same photos as a two-image cue-conflict folder: each names its shape, so shape bias is 1.
    for shape, texture in (("cat", "clock"), ("clock", "cat")):
        (tmp_path / shape).mkdir()
        Image.fromarray(photos[shape]).save(tmp_path / shape / f"{shape}1-{texture}1.png")
    values, _ = probe_on_folder("shape_bias", model, imagenet1k_space(), folder=str(tmp_path))
    assert values["cat", "shape_fraction"] == 1.0 and values["clock", "shape_fraction"] == 1.0
    assert values["all", "shape_bias"] == 1.0
