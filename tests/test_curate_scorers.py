"""Scorers against direct computations with the same tiny models (open_clip, transformers CLIP, a teacher)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _tiny_clip import (  # noqa: E402
    TINY_OPENCLIP_CFG,
    one_thread,
    shared_hf_clip,
    shared_openclip,
    shared_teacher,
    write_dataset_folder,
)
from synclone.curate.cache import FileKeys, ScorerCache
from synclone.curate.config import ScorerConfig
from synclone.curate.scorers import create_scorer, hf_clip_tokenizer_offline
from synclone.curate.scoring import score_records
from synclone.data.folder import read_dataset_folder
from synclone.errors import UserError
from synclone.labels import LabelSpace

SPACE = LabelSpace.from_names(["T-shirt/top", "ankle boot", "golden retriever"], name="mixed")
TEMPLATES = ["a photo of a {c}.", "a drawing of the {c}."]


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (20, 20), dtype=np.uint8) for _ in range(3)]
    imgs += [rng.integers(0, 256, (24, 16, 3), dtype=np.uint8) for _ in range(3)]  # colour, not square
    prompts = ["a photo of a shirt", None, "a boot on a table", "a dog", "a shirt", "a boot"]
    return write_dataset_folder(tmp_path_factory.mktemp("ds") / "gen", imgs, [0, 1, 2, 2, 0, 1], SPACE,
                                prompts=prompts)


def _score(cfg, dataset, cache_dir):
    records, space = read_dataset_folder(dataset)
    scorer = create_scorer(cfg)
    cache = ScorerCache(cache_dir, scorer.cache_id(FileKeys(Path(cache_dir))))
    return records, scorer, score_records(records, space, scorer, cache)


def _rgb(path):
    return Image.open(path).convert("RGB")


def _check_against(res, img_emb, class_w, text_of, scale, records):
    """p_label, top1, margin, class_sim and prompt_sim recomputed from raw embeddings."""
    img = img_emb / np.linalg.norm(img_emb, axis=1, keepdims=True)
    logits = scale * img @ class_w.T
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    labels = np.array([r.label for r in records])
    t = res.table
    np.testing.assert_allclose(t["p_label"], p[np.arange(len(p)), labels], atol=1e-5)
    assert list(t["top1"]) == [SPACE.classes[j] for j in p.argmax(1)]
    other = p.copy()
    other[np.arange(len(p)), labels] = -1
    np.testing.assert_allclose(t["margin"], p[np.arange(len(p)), labels] - other.max(1), atol=1e-5)
    np.testing.assert_allclose(t["class_sim"], (img * class_w[labels]).sum(1), atol=1e-5)
    for i, r in enumerate(records):
        if r.prompt is None:
            assert np.isnan(t["prompt_sim"][i])
        else:
            assert t["prompt_sim"][i] == pytest.approx(float(img[i] @ text_of(r.prompt)), abs=1e-5)


def test_hf_tokenizer_matches_open_clip():
    import open_clip

    tok = hf_clip_tokenizer_offline()
    ref = open_clip.get_tokenizer("ViT-B-32")
    for text in ("a photo of a T-shirt/top.", "Ankle boot", "itap of a golden_retriever!"):
        ids = tok(text)["input_ids"]
        assert ids == ref([text])[0][: len(ids)].tolist()


def test_openclip_scorer_matches_direct_computation(small_dataset, tmp_path):
    import open_clip

    folder = shared_openclip()
    cfg = ScorerConfig(kind="openclip", model=str(folder), templates=TEMPLATES)
    records, scorer, res = _score(cfg, small_dataset, tmp_path / "cache")
    model, _, pre = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tok = open_clip.get_tokenizer(f"local-dir:{folder}")
    with torch.no_grad():
        img_emb = model.encode_image(torch.stack([pre(_rgb(r.path)) for r in records])).numpy()

        def text(t):
            return model.encode_text(tok([t]), normalize=True)[0].numpy()

        # The class embedding: normalised mean of normalised template embeddings.
        w = np.stack([np.mean([text(tp.replace("{c}", c)) for tp in TEMPLATES], axis=0) for c in SPACE.classes])
        w /= np.linalg.norm(w, axis=1, keepdims=True)
        scale = float(model.logit_scale.exp())
        _check_against(res, img_emb, w, text, scale, records)
    assert res.embeddings.shape == (6, TINY_OPENCLIP_CFG["embed_dim"])
    assert scorer.images_encoded == 6

    # The same weights through a model-config .json + checkpoint file give the same scores.
    cfg_file = tmp_path / "tiny_cfg.json"
    cfg_file.write_text(json.dumps(TINY_OPENCLIP_CFG))
    cfg2 = ScorerConfig(kind="openclip", model=str(cfg_file), pretrained=str(folder / "open_clip_model.safetensors"),
                        templates=TEMPLATES)
    _, _, res2 = _score(cfg2, small_dataset, tmp_path / "cache2")
    np.testing.assert_allclose(res2.table["p_label"], res.table["p_label"], atol=1e-6)


def test_hf_clip_scorer_matches_direct_computation(small_dataset, tmp_path):
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    folder = shared_hf_clip()
    cfg = ScorerConfig(kind="hf_clip", model=str(folder), templates=TEMPLATES, logit_scale=50.0)
    records, _, res = _score(cfg, small_dataset, tmp_path / "cache")
    model = CLIPModel.from_pretrained(str(folder)).eval()
    proc = CLIPImageProcessor.from_pretrained(str(folder))
    tok = AutoTokenizer.from_pretrained(str(folder))
    with torch.no_grad():
        out = model.get_image_features(pixel_values=proc(images=[_rgb(r.path) for r in records],
                                                         return_tensors="pt")["pixel_values"])
        img_emb = (out if isinstance(out, torch.Tensor) else out.pooler_output).numpy()

        def text(t):
            o = model.get_text_features(**tok([t], return_tensors="pt"))
            e = (o if isinstance(o, torch.Tensor) else o.pooler_output)[0].numpy()
            return e / np.linalg.norm(e)

        w = np.stack([np.mean([text(tp.replace("{c}", c)) for tp in TEMPLATES], axis=0) for c in SPACE.classes])
        w /= np.linalg.norm(w, axis=1, keepdims=True)
        _check_against(res, img_emb, w, text, 50.0, records)


def test_teacher_scorer_matches_the_model(tmp_path):
    from synclone.data import load_fashion_mnist
    from synclone.models import load_model

    teacher = shared_teacher()
    data = load_fashion_mnist("test").per_class_subset(2, seed=5)
    space = data.label_space
    # Dataset classes in another order, and a subset: columns are matched by name.
    sub = LabelSpace.from_names([space.classes[7], space.classes[0], space.classes[3]], name="sub")
    keep = [i for i, y in enumerate(data.labels.tolist()) if space.classes[y] in sub.classes]
    imgs = [data.images[i, 0].numpy() for i in keep]
    labels = [sub.index(space.classes[data.labels[i]]) for i in keep]
    ds = write_dataset_folder(tmp_path / "gen", imgs, labels, sub)
    records, scorer, res = _score(ScorerConfig(kind="teacher", model=str(teacher)), ds, tmp_path / "cache")
    model = load_model(teacher)
    x = torch.stack([torch.from_numpy(im).float().div(255).unsqueeze(0) for im in imgs])
    with torch.no_grad():
        logits = model(x)[:, [space.index(c) for c in sub.classes]]
        feats = model.features(x)
    p = torch.softmax(logits, 1).numpy()
    np.testing.assert_allclose(res.table["p_label"], p[np.arange(len(p)), labels], atol=1e-5)
    f = feats.numpy() / np.linalg.norm(feats.numpy(), axis=1, keepdims=True)
    np.testing.assert_allclose(res.embeddings, f, atol=1e-5)
    assert res.table["class_sim"].isna().all() and res.table["prompt_sim"].isna().all()
    assert res.classes == sub.classes
    # The real teacher recognises real images: most of them are its top-1.
    assert (res.table["top1"] == res.table["class_name"]).mean() >= 0.5

    # Softmax over the teacher's whole space instead: C = 10, same argmax classes as the full model.
    _, _, full = _score(ScorerConfig(kind="teacher", model=str(teacher), restrict_to_dataset=False), ds,
                        tmp_path / "cache")
    assert full.classes == space.classes
    assert list(full.table["top1"]) == [space.classes[j] for j in model(x).argmax(1).tolist()]


def test_scorer_input_errors(small_dataset, tmp_path):
    teacher = shared_teacher()
    # The dataset has classes the teacher never learnt.
    with pytest.raises(UserError, match="golden retriever.*teacher"):
        _score(ScorerConfig(kind="teacher", model=str(teacher)), small_dataset, tmp_path / "c")
    # CLIP over an explicit label space that lacks a dataset class.
    (tmp_path / "space.txt").write_text("T-shirt/top\nankle boot\n")
    with pytest.raises(UserError, match="golden retriever"):
        _score(ScorerConfig(kind="openclip", model=str(shared_openclip()), label_space=str(tmp_path / "space.txt"),
                            templates=TEMPLATES), small_dataset, tmp_path / "c")
    with pytest.raises(UserError, match="unknown open_clip model"):
        create_scorer(ScorerConfig(model="ViT-Nope")).cache_id(FileKeys(tmp_path))
    with pytest.raises(UserError, match="not a synclone model folder|does not exist"):
        create_scorer(ScorerConfig(kind="teacher", model=str(tmp_path))).cache_id(FileKeys(tmp_path))
    with pytest.raises(UserError, match="config.json"):
        create_scorer(ScorerConfig(kind="hf_clip", model=str(tmp_path))).cache_id(FileKeys(tmp_path))
    with pytest.raises(UserError, match="template"):
        _score(ScorerConfig(kind="openclip", model=str(shared_openclip()), templates=["no placeholder"]),
               small_dataset, tmp_path / "c")
