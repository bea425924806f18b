"""ImageNet-family folders: layout detection, class subsets (masks, ObjectNet's mapping) and streaming evaluation.

The end-to-end tests write tiny folders of each layout with real photographs from scikit-image
(``chelsea`` is a cat, ``coffee`` a cup of espresso) and score them with a real ImageNet
EfficientNet-Lite0 (tests/_imagenet_model.py). Expected values come from an independent
reference: torchvision's ``Resize(256)`` + ``CenterCrop(224)`` transforms and the scoring rules of
the reference code (Hendrycks' ``output[:, mask]``, imagenet-testbed's ``objectnet_accuracy``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from synclone.data.eval_sets import load_eval_dataset
from synclone.data.imagenet import (
    detect_layout,
    imagenet1k_wnids,
    imagenet_a_indices,
    imagenet_r_indices,
    load_imagenet_set,
    mask_logits,
    objectnet_table,
    objectnet_view,
    project_objectnet,
)
from synclone.data.streaming import FileImageSet
from synclone.errors import UserError
from synclone.probes.base import EvalContext, ModelEntry, get_probe
from synclone.probes.shift import accuracy, masked_argmax

CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian Mau
TABBY, ESPRESSO = 281, 967
WNIDS = imagenet1k_wnids()


# --- helpers ---------------------------------------------------------------------------------------------------------


def _photo(name: str, grey: bool = False) -> np.ndarray:
    from skimage import data

    img = np.asarray(getattr(data, name)())
    if grey:
        img = np.asarray(Image.fromarray(img).convert("L").convert("RGB"))
    return img


def _save(path: Path, img: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, quality=95) if path.suffix == ".JPEG" else Image.fromarray(img).save(path)
    return path


def _dummy(path: Path) -> Path:
    return _save(path, np.full((8, 8, 3), 128, np.uint8))


def _dirs(root: Path, names, files: int = 1) -> Path:
    for n in names:
        (root / n).mkdir(parents=True, exist_ok=True)
        for k in range(files):
            _dummy(root / n / f"{k}.png")
    return root


@pytest.fixture(scope="module")
def model():
    from _imagenet_model import load_efficientnet_lite0

    return load_efficientnet_lite0()


def _reference_logits(model, paths, border: int = 0) -> torch.Tensor:
    """torchvision's own ImageNet eval transforms (not synclone's code), then the model."""
    from PIL import ImageOps
    from torchvision import transforms as T

    tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.PILToTensor()])
    xs = []
    for p in paths:
        im = Image.open(p).convert("RGB")
        xs.append(tf(ImageOps.crop(im, border) if border else im))
    with torch.no_grad():
        return model(torch.stack(xs).float() / 255.0)


def _ctx(model, clean, tmp_path: Path, batch_size: int = 2) -> EvalContext:
    entry = ModelEntry("effnet", tmp_path, model, "effnet-lite0")
    return EvalContext({"effnet": entry}, clean, tmp_path / "out", batch_size=batch_size, progress=False)


# --- the tables ------------------------------------------------------------------------------------------------------


def test_bundled_tables_have_the_published_counts_and_match_timm():
    import timm

    info = Path(timm.__file__).parent / "data" / "_info"
    assert len(WNIDS) == len(set(WNIDS)) == 1000
    r, a = imagenet_r_indices(), imagenet_a_indices()
    assert len(r) == len(set(r.tolist())) == 200 and len(a) == len(set(a.tolist())) == 200
    assert r.tolist() == [int(x) for x in (info / "imagenet_r_indices.txt").read_text().split()]
    assert [WNIDS[i] for i in a] == (info / "imagenet_a_synsets.txt").read_text().split()
    assert set(r.tolist()) != set(a.tolist())
    table = objectnet_table()
    assert len(table.folders) == 313 and len(table.classes) == 113
    assert len({c.folder for c in table.classes}) == 113 and all(c.folder in table.folders for c in table.classes)
    assert len(table.sublist) == len(set(table.sublist.tolist())) == 125  # no ImageNet class in two groups
    by = {c.label: c for c in table.classes}
    assert sorted(WNIDS[i] for i in by["Alarm clock"].indices) == ["n02708093", "n03196217"]  # analog, digital


# --- scoring on arrays -----------------------------------------------------------------------------------------------


def test_mask_is_hendrycks_column_selection():
    rng = np.random.default_rng(0)
    z = torch.from_numpy(rng.normal(size=(300, 1000)) * 3)
    r = imagenet_r_indices()
    view = mask_logits(z, r)
    assert torch.isfinite(view).all()
    # Hendrycks' eval: pred = output[:, mask].argmax() indexes the subset; the view's argmax is its 1k index.
    assert (view.argmax(1).numpy() == r[z[:, r].argmax(1).numpy()]).all()
    assert (view.argmax(1).numpy() == masked_argmax(z.numpy(), r)).all()
    torch.testing.assert_close(torch.softmax(view, 1)[:, r], torch.softmax(z[:, r], 1), rtol=0, atol=1e-12)
    assert float(torch.softmax(view, 1).sum(1).sub(1).abs().max()) < 1e-12
    assert isinstance(mask_logits(z.numpy(), r), np.ndarray)


def _testbed_correct(z: np.ndarray, folders: list[str], masked: bool) -> np.ndarray:
    """imagenet-testbed's objectnet_accuracy: argmax over its class_sublist, hit if in the folder's ImageNet ids."""
    table = objectnet_table()
    ids = {c.folder: set(c.indices) for c in table.classes}
    sub = table.sublist if masked else np.arange(1000)
    pred = sub[z[:, sub].argmax(1)]
    return np.array([p in ids[f] for p, f in zip(pred, folders, strict=True)])


@pytest.mark.parametrize("masked", [True, False])
def test_objectnet_scoring_matches_imagenet_testbed(masked):
    rng = np.random.default_rng(1)
    table = objectnet_table()
    z = rng.normal(size=(2000, 1000))
    pick = rng.integers(0, 113, size=len(z))
    folders = [table.classes[k].folder for k in pick]
    # Make hits common: boost one ImageNet class of the true group in some rows, an unmapped class in others.
    for i in range(0, len(z), 3):
        z[i, rng.choice(table.classes[pick[i]].indices)] += 4
    outside = np.setdiff1d(np.arange(1000), table.sublist)
    z[1::5, rng.choice(outside)] += 6
    labels = torch.tensor([table.classes[k].column for k in pick])
    ours = objectnet_view(torch.from_numpy(z), mask=masked).argmax(1) == labels
    ref = _testbed_correct(z, folders, masked)
    assert 0.2 < ref.mean() < 0.8
    assert (ours.numpy() == ref).all()
    proj = project_objectnet(z, mask=masked)
    assert proj.shape == (len(z), 113 if masked else 114)
    assert ((proj.argmax(1) == pick) == ref).all()


# --- layout detection and errors ------------------------------------------------------------------------------------


def test_layouts_are_recognised_from_the_folder(tmp_path):
    r, a = set(imagenet_r_indices().tolist()), set(imagenet_a_indices().tolist())
    only_r = [WNIDS[i] for i in sorted(r - a)[:3]]
    only_a = [WNIDS[i] for i in sorted(a - r)[:3]]
    both = [WNIDS[i] for i in sorted(r & a)[:2]]
    neither = [WNIDS[0], WNIDS[TABBY + 1]]  # tench, tiger cat: in neither subset
    assert detect_layout(_dirs(tmp_path / "val", [WNIDS[TABBY], WNIDS[ESPRESSO]])) == "imagenet-val"
    assert detect_layout(_dirs(tmp_path / "mine", neither)) == "imagenet-val"
    assert detect_layout(_dirs(tmp_path / "sketch", neither)) == "imagenet-sketch"
    assert detect_layout(_dirs(tmp_path / "imagenet-r", only_r + both)) == "imagenet-r"
    assert detect_layout(_dirs(tmp_path / "imagenet-a", only_a + both)) == "imagenet-a"
    assert detect_layout(_dirs(tmp_path / "full_r", [WNIDS[i] for i in sorted(r)], files=0)) == "imagenet-r"
    assert detect_layout(_dirs(tmp_path / "full_a", [WNIDS[i] for i in sorted(a)], files=0)) == "imagenet-a"
    with pytest.warns(UserWarning, match="read as imagenet-r"):
        assert detect_layout(_dirs(tmp_path / "mine_r", only_r)) == "imagenet-r"
    assert detect_layout(_dirs(tmp_path / "imagenetv2-matched-frequency-format-val", ["281", "967"])) == "imagenet-v2"
    assert detect_layout(_dirs(tmp_path / "all1000", [str(i) for i in range(1000)], files=0)) == "imagenet-v2"
    onet = tmp_path / "objectnet-1.0"
    (onet / "mappings").mkdir(parents=True)
    _dirs(onet / "images", ["mug", "banana", "squeegee"])
    assert detect_layout(onet) == detect_layout(onet / "images") == "objectnet"
    _dummy(tmp_path / "flat" / "ILSVRC2012_val_00000001.JPEG")
    assert detect_layout(tmp_path / "flat") == "imagenet-val"
    # Plain class folders stay with the generic folder reader, even when the names look like ObjectNet's or digits.
    assert detect_layout(_dirs(tmp_path / "fruit", ["banana", "lemon", "orange"])) is None
    assert detect_layout(_dirs(tmp_path / "digits", ["0", "1", "2"])) is None


def _one_line_error(fn, match: str) -> str:
    with pytest.raises(UserError, match=match) as err:
        fn()
    assert "\n" not in str(err.value)
    return str(err.value)


def test_wrong_layouts_give_one_clear_error(tmp_path):
    r, a = set(imagenet_r_indices().tolist()), set(imagenet_a_indices().tolist())
    both = _dirs(tmp_path / "amb", [WNIDS[i] for i in sorted(r & a)[:2]])
    _one_line_error(lambda: detect_layout(both), "both the ImageNet-R and the ImageNet-A.*imagenet-r:PATH")
    assert len(load_imagenet_set(both, "imagenet-a")) == 2  # naming the layout settles it
    _one_line_error(lambda: detect_layout(_dirs(tmp_path / "x", ["n02123045", "n99999999"])),
                    "n99999999 are not ImageNet-1k classes")
    _one_line_error(lambda: detect_layout(_dirs(tmp_path / "y", ["n02123045", "cats"])),
                    "mixes WordNet-id class folders with other folders")
    tench = _dirs(tmp_path / "t", [WNIDS[0]])
    _one_line_error(lambda: load_eval_dataset(f"imagenet-r:{tench}"), "n01440764 are not among its 200 classes")
    _one_line_error(lambda: load_eval_dataset(f"imagenet-v2:{tench}"), "named 0..999")
    _one_line_error(lambda: load_eval_dataset(f"objectnet:{tench}"), "not ObjectNet class folder")
    _one_line_error(lambda: load_eval_dataset("imagenet-r:"), "give the folder after the layout")
    _one_line_error(lambda: load_imagenet_set(_dirs(tmp_path / "nums", ["0", "1"]), "imagenet-sketch"),
                    "no WordNet-id class folders")
    _one_line_error(lambda: detect_layout(_dirs(tmp_path / "imagenetv2-top-images", ["3", "1000"])), "named 0..999")
    _one_line_error(lambda: detect_layout(_dirs(tmp_path / "objectnet", ["mug", "mugs"])),
                    "mugs is not ObjectNet class folder")
    _dummy(tmp_path / "flat" / "ILSVRC2012_val_00000001.JPEG")
    _one_line_error(lambda: load_eval_dataset(str(tmp_path / "flat")), "no labels: put the devkit")
    empty = tmp_path / "imagenet-r"
    (empty / WNIDS[TABBY]).mkdir(parents=True)
    _one_line_error(lambda: load_eval_dataset(str(empty)), "holds no images")
    _one_line_error(lambda: load_imagenet_set(tmp_path / "fruit_missing"), "does not exist")


# --- end to end with a real ImageNet model ------------------------------------------------------------------------


def test_imagenet_val_scores_all_1000_classes(model, tmp_path):
    root = tmp_path / "val"
    cat = _save(root / WNIDS[TABBY] / "chelsea.JPEG", _photo("chelsea"))
    cup = _save(root / WNIDS[ESPRESSO] / "coffee.JPEG", _photo("coffee"))
    clean = load_eval_dataset(str(root))
    assert isinstance(clean, FileImageSet) and clean.name == "imagenet-val"
    assert clean.labels.tolist() == [TABBY, ESPRESSO]
    assert clean.convention.startswith("classes=1000 (ImageNet-1k); argmax over all 1000 logits")
    ctx = _ctx(model, clean, tmp_path)
    z = ctx.logits("effnet", clean)
    ref = _reference_logits(model, [cat, cup])
    torch.testing.assert_close(z, ref, rtol=0, atol=1e-4)
    assert int(z[0].argmax()) in CATS  # the chelsea cat is a cat on the full 1000
    rows = get_probe("clean").run(ctx, get_probe("clean").settings())
    assert rows[0].value == pytest.approx(accuracy(ref.numpy(), [TABBY, ESPRESSO]))
    assert ctx.forward_passes == 1


@pytest.mark.parametrize("truth", ["devkit", "kaggle"])
def test_flat_val_folder_reads_the_ground_truth(tmp_path, truth):
    from scipy.io import savemat

    root = tmp_path / "ILSVRC2012_img_val"
    for k in (1, 2, 3):
        _dummy(root / f"ILSVRC2012_val_{k:08d}.JPEG")
    wnids = [WNIDS[TABBY], WNIDS[ESPRESSO], WNIDS[0]]
    if truth == "devkit":
        # The devkit numbers classes by ILSVRC2012_ID (meta.mat order), not by the sorted-wnid index.
        data = tmp_path / "ILSVRC2012_devkit_t12" / "data"
        data.mkdir(parents=True)
        rows = [(7, wnids[0], 0), (3, wnids[1], 0), (1, wnids[2], 0), (1001, "n00001740", 3)]
        synsets = np.array([(i, w, "words", "gloss", n) for i, w, n in rows],
                           dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("gloss", "O"),
                                  ("num_children", "O")])
        savemat(data / "meta.mat", {"synsets": synsets})
        (data / "ILSVRC2012_validation_ground_truth.txt").write_text("7\n3\n1\n")
    else:
        (root / "LOC_val_solution.csv").write_text(
            "ImageId,PredictionString\n" + "".join(f"ILSVRC2012_val_{k:08d},{w} 1 2 3 4\n"
                                                   for k, w in zip((3, 1, 2), wnids[2:] + wnids[:2], strict=True)))
    data = load_eval_dataset(str(root))
    assert data.name == "imagenet-val" and data.labels.tolist() == [TABBY, ESPRESSO, 0]
    assert "labels from" in data.convention


@pytest.mark.filterwarnings("ignore:effective robustness")
def test_imagenet_r_masks_the_logits_and_that_changes_the_answer(model, tmp_path):
    r = imagenet_r_indices()
    root = tmp_path / "imagenet-r"
    cat = _save(root / WNIDS[TABBY] / "chelsea.png", _photo("chelsea"))
    cup = _save(root / WNIDS[ESPRESSO] / "coffee.png", _photo("coffee"))
    val = _dirs(tmp_path / "val", [WNIDS[0]])
    ctx = _ctx(model, load_eval_dataset(str(val)), tmp_path)
    data = ctx.dataset(str(root))
    assert data.name == "imagenet-r" and data.extra["class_subset"] == r.tolist()
    assert data.convention.startswith("classes=200 (ImageNet-R subset); logits masked before argmax")
    ref = _reference_logits(model, [cat, cup]).numpy()
    # The constructed case: the full-1000 argmax of the cat (a cat class) lies outside the 200, the masked one
    # is the tabby inside them, so masking turns a miss into a hit.
    assert int(ref[0].argmax()) in CATS and int(ref[0].argmax()) not in r
    assert masked_argmax(ref, r)[0] == TABBY
    assert accuracy(ref, data.labels) == 0.5 and accuracy(ref, data.labels, class_subset=r) == 1.0
    rows = get_probe("shift").run(ctx, get_probe("shift").settings(datasets=[str(root)]))
    top1 = {x.metric: x for x in rows}["top1"]
    assert top1.value == 1.0 and top1.dataset == "imagenet-r" and top1.n == 2
    z = ctx.logits("effnet", data)
    assert int(z[0].argmax()) == TABBY and torch.isfinite(z).all()


def test_imagenet_a_masks_to_its_own_200(model, tmp_path):
    a = imagenet_a_indices()
    photo = _save(tmp_path / "photo.png", _photo("chelsea"))
    ref = _reference_logits(model, [photo]).numpy()
    assert int(ref[0].argmax()) not in a
    label = int(masked_argmax(ref, a)[0])  # construct the folder the masked answer names
    root = tmp_path / "natural-adv-examples"
    Path(root / WNIDS[label]).mkdir(parents=True)
    photo.replace(root / WNIDS[label] / "chelsea.png")
    data = load_eval_dataset(str(root))
    assert data.name == "imagenet-a" and data.convention.startswith("classes=200 (ImageNet-A subset)")
    ctx = _ctx(model, data, tmp_path)
    z = ctx.logits("effnet", data)
    assert float((z.argmax(1) == data.labels).float().mean()) == 1.0
    assert accuracy(ref, data.labels) == 0.0


def test_imagenet_v2_and_sketch_score_the_full_1000(model, tmp_path):
    v2 = tmp_path / "imagenetv2-matched-frequency-format-val"
    files = [_save(v2 / str(TABBY) / "a.jpeg", _photo("chelsea")),
             _save(v2 / str(ESPRESSO) / "b.jpeg", _photo("coffee"))]
    sketch = tmp_path / "sketch"
    files.append(_save(sketch / WNIDS[TABBY] / "a.JPEG", _photo("chelsea", grey=True)))
    d2, ds = load_eval_dataset(str(v2)), load_eval_dataset(str(sketch))
    assert d2.name == "imagenet-v2:imagenetv2-matched-frequency-format-val" and d2.labels.tolist() == [TABBY, ESPRESSO]
    assert ds.name == "imagenet-sketch" and ds.labels.tolist() == [TABBY]
    ctx = _ctx(model, d2, tmp_path)
    ref = _reference_logits(model, files)
    torch.testing.assert_close(torch.cat([ctx.logits("effnet", d2), ctx.logits("effnet", ds)]), ref, rtol=0, atol=1e-4)
    assert int(ref[2].argmax()) in CATS  # still a cat in grey


def test_objectnet_maps_predictions_and_crops_the_red_border(model, tmp_path):
    release = tmp_path / "objectnet-1.0"
    (release / "mappings").mkdir(parents=True)
    photo = _photo("coffee")
    framed = np.pad(photo, ((1, 1), (1, 1), (0, 0)))
    framed[0, :], framed[-1, :], framed[:, 0], framed[:, -1] = (255, 0, 0), (255, 0, 0), (255, 0, 0), (255, 0, 0)
    files = [_save(release / "images" / folder / "coffee.png", framed) for folder in ("drinking_cup", "mug")]
    _save(release / "images" / "squeegee" / "rocket.png", _photo("rocket"))  # no ImageNet counterpart: skipped
    data = load_eval_dataset(str(release))
    assert data.name == "objectnet" and len(data) == 2 and data.extra["skipped"] == 1
    assert "classes=113" in data.convention
    assert "1 image(s) of the 200 other ObjectNet classes skipped" in data.convention
    # 2 px off every side removes the 1-px border (and one row/column of the photo), before the resize.
    from torchvision import transforms as T

    expected = T.Compose([T.Resize(256), T.CenterCrop(224), T.PILToTensor()])(Image.fromarray(photo[1:-1, 1:-1]))
    assert torch.equal(next(data.iter_batches(1)), expected[None])
    ctx = _ctx(model, data, tmp_path)
    z = ctx.logits("effnet", data)
    ref = _reference_logits(model, files, border=2).numpy()
    hits = _testbed_correct(ref, ["drinking_cup", "mug"], masked=True)
    assert ((z.argmax(1) == data.labels).numpy() == hits).all() and hits.sum() == 1  # one cup, two folders
    predicted = objectnet_table().classes[int(project_objectnet(ref).argmax(1)[0])].label
    assert predicted in ("Drinking Cup", "Mug")


# --- streaming -----------------------------------------------------------------------------------------------------


class _MeanColour(torch.nn.Module):
    """A stand-in classifier: 1000 logits from the mean colour (fast; enough to test the plumbing)."""

    input_size = (3, 32, 32)

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(3, 1000)
        self.batches: list[int] = []

    def forward(self, x):
        self.batches.append(len(x))
        return self.fc(x.mean((2, 3)))


def test_streaming_decodes_in_batches_and_caches(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    root = tmp_path / "val"
    for i in range(10):
        _save(root / WNIDS[i] / f"{i}.png", rng.integers(0, 256, size=(40 + i, 50, 3), dtype=np.uint8))
    data = load_imagenet_set(root)
    assert data.image_shape == (3, 224, 224) and data.resolve_size((3, 32, 32)) == (3, 32, 32)
    monkeypatch.setattr(FileImageSet, "images", property(lambda self: pytest.fail("materialised the whole set")))
    torch.manual_seed(0)
    net = _MeanColour()
    entry = ModelEntry("m", tmp_path, net, "mean-colour")
    ctx = EvalContext({"m": entry}, data, tmp_path / "out", batch_size=4, progress=False)
    z = ctx.logits("m", data)
    assert net.batches == [4, 4, 2] and ctx.forward_passes == 1
    one_by_one = torch.stack([data.preprocess(p, (3, 32, 32)) for p in data.paths]).float() / 255
    torch.testing.assert_close(z, net(one_by_one).detach(), rtol=0, atol=1e-6)
    ctx.logits("m", data)
    again = EvalContext({"m": entry}, data, tmp_path / "out", batch_size=4, progress=False)
    torch.testing.assert_close(again.logits("m", data), z)
    assert ctx.forward_passes == 1 and again.forward_passes == 0
    sub = ctx.cap(data, 3)
    assert isinstance(sub, FileImageSet) and len(sub) == 3 and sub.fingerprint() != data.fingerprint()
    x, y = sub.batch(slice(0, 2))
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32 and y.tolist() == sub.labels[:2].tolist()


def test_fingerprint_follows_the_files(tmp_path):
    root = tmp_path / "val"
    img = _dummy(root / WNIDS[0] / "a.png")
    before = load_imagenet_set(root).fingerprint()
    assert load_imagenet_set(root).fingerprint() == before
    _save(img, np.zeros((9, 9, 3), np.uint8))
    assert load_imagenet_set(root).fingerprint() != before
    assert load_imagenet_set(root, input_size=(3, 64, 64)).fingerprint() != load_imagenet_set(root).fingerprint()
    assert json.dumps(load_imagenet_set(root).extra)  # serialisable for reports


def test_calibration_under_shift_uses_the_sets_own_classes(model, tmp_path):
    """Calibration on ImageNet-R: the confidence is the softmax over its 200 classes, as its accuracy is masked."""
    from synclone.probes import calibration_metrics

    r = imagenet_r_indices()
    root = tmp_path / "imagenet-r"
    _save(root / WNIDS[TABBY] / "chelsea.png", _photo("chelsea"))
    _save(root / WNIDS[ESPRESSO] / "coffee.png", _photo("coffee"))
    val = _dirs(tmp_path / "val", [WNIDS[0]])
    ctx = _ctx(model, load_eval_dataset(str(val)), tmp_path)
    ctx.shift_datasets = [str(root)]  # what the runner sets from the shift probe's datasets
    rows = get_probe("calibration").run(ctx, get_probe("calibration").settings())
    got = {(x.dataset, x.variant, x.metric): x for x in rows}
    z = ctx.logits("effnet", ctx.dataset(str(root))).double().numpy()
    labels = ctx.dataset(str(root)).labels.numpy()
    pos = {int(c): i for i, c in enumerate(r)}
    ref = calibration_metrics(z[:, r], np.array([pos[int(y)] for y in labels]), n_bins=15, from_logits=True)
    assert got[("imagenet-r", "shifted", "ece")].value == pytest.approx(ref["ece"], abs=1e-12)
    assert got[("imagenet-r", "shifted", "nll")].value == pytest.approx(ref["nll"], abs=1e-12)
    assert "softmax over the 200 classes" in got[("imagenet-r", "shifted", "ece")].convention
    assert any(k[1] == "clean" and k[2] == "ece" for k in got)
    data = ctx.dataset(str(root))
    with torch.no_grad():
        raw = model(data.batch(slice(0, len(data)))[0]).double().numpy()  # the model's own 1000-way softmax
    full = calibration_metrics(raw, labels, n_bins=15, from_logits=True)
    assert full["nll"] > ref["nll"] + 0.1  # the classes outside the 200 take probability mass: masking matters
