"""The on-disk caches: content keys, append-only shards, failures remembered, compaction, damaged shards."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from _tiny_clip import one_thread, shared_teacher, write_dataset_folder  # noqa: E402
from synclone.curate.cache import FileKeys, ScorerCache, TensorStore, sha1_bytes
from synclone.curate.config import ScorerConfig
from synclone.curate.scorers import create_scorer
from synclone.curate.scoring import score_records
from synclone.data.folder import read_dataset_folder
from synclone.labels import LabelSpace


def test_tensor_store_roundtrip_errors_compaction(tmp_path):
    store = TensorStore(tmp_path, "images")
    rng = np.random.default_rng(0)
    expected = {}
    for i in range(5):
        keys = [f"k{i}_{j}" for j in range(3)]
        emb = rng.normal(size=(3, 4)).astype(np.float32)
        store.add(keys, {"embedding": emb}, errors={f"bad{i}": "truncated"})
        expected.update(zip(keys, emb, strict=True))
    assert store.add([], {}, None) is None
    order = sorted(expected, reverse=True)  # rows from many shards, in any order
    np.testing.assert_array_equal(store.get(order, "embedding"), np.stack([expected[k] for k in order]))
    assert "bad3" in store and store.missing(["k0_0", "bad1", "new", "new"]) == ["new"]

    again = TensorStore(tmp_path, "images")  # a fresh process sees the same rows and failures
    np.testing.assert_array_equal(again.get(order, "embedding"), store.get(order, "embedding"))
    assert again.errors["bad4"] == "truncated"
    again.compact(max_shards=2)
    assert len(list(tmp_path.glob("images-*.safetensors"))) == 1
    merged = TensorStore(tmp_path, "images")
    np.testing.assert_array_equal(merged.get(order, "embedding"), store.get(order, "embedding"))
    assert set(merged.errors) == {f"bad{i}" for i in range(5)}

    # A damaged shard is skipped (its rows are recomputed), not fatal.
    (tmp_path / "images-damaged.safetensors").write_bytes(b"\x00" * 20)
    assert len(TensorStore(tmp_path, "images")) == len(expected)


def test_file_keys_follow_content(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"hello")
    keys = FileKeys(tmp_path)
    assert keys.lookup(f) is None and keys.remember(f, b"hello") == sha1_bytes(b"hello")
    keys.save()
    reloaded = FileKeys(tmp_path)
    assert reloaded.lookup(f) == sha1_bytes(b"hello")
    f.write_bytes(b"HELLO!")  # new size (and mtime): the remembered key no longer applies
    assert reloaded.lookup(f) is None and reloaded.key_of(f) == sha1_bytes(b"HELLO!")
    assert reloaded.key_of(tmp_path / "missing") is None


def test_changed_image_is_rescored_moved_dataset_is_not(tmp_path):
    space = LabelSpace.from_names(["T-shirt/top", "Trouser"])
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(4)]
    ds = write_dataset_folder(tmp_path / "gen", imgs, [0, 1, 0, 1], space)
    teacher = shared_teacher()

    def run(folder):
        records, sp = read_dataset_folder(folder)
        scorer = create_scorer(ScorerConfig(kind="teacher", model=str(teacher)))
        cache = ScorerCache(tmp_path / "cache", scorer.cache_id(FileKeys(tmp_path / "cache")))
        with one_thread():
            return score_records(records, sp, scorer, cache), scorer

    first, s1 = run(ds)
    assert s1.images_encoded == 4
    path = ds / "train" / "trouser" / "00001.png"
    Image.fromarray(255 - imgs[1]).save(path)
    os.utime(path, ns=(1, 1))  # even with an unusual mtime the size/mtime check sees a change
    second, s2 = run(ds)
    assert s2.images_encoded == 1
    assert second.table["p_label"][0] == first.table["p_label"][0]
    # The same bytes in another place are the same images: keyed by content, not path.
    moved = tmp_path / "moved"
    ds.rename(moved)
    third, s3 = run(moved)
    assert s3.images_encoded == 0 and not s3.loaded
    np.testing.assert_array_equal(third.table["p_label"], second.table["p_label"])
