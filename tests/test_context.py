"""Context bias: P_k and ratios, FOCUS annotations, generated context prompts, evaluation on a table of images."""

from __future__ import annotations

import json
import random

import numpy as np
import pandas as pd
import pytest
import torch

from _probe_helpers import probe_on_folder
from synclone.errors import UserError
from synclone.labels import LabelSpace
from synclone.probes.context import (
    context_accuracy,
    read_context_table,
)
from synclone.prompts.contexts import context_prompts, context_settings


def test_pk_and_ratios_by_number_of_uncommon_attributes():
    correct = [1, 1, 1, 0, 1, 0, 0, 1, 0, 0]
    n_unc = [0, 0, 0, 0, 1, 1, 2, 2, 2, 3]
    r = context_accuracy(correct, n_unc)
    assert r.accuracy == {0: 0.75, 1: 0.5, 2: pytest.approx(1 / 3), 3: 0.0}
    assert r.n == {0: 4, 1: 2, 2: 3, 3: 1}
    assert r.ratio_to_p0[1] == pytest.approx(0.5 / 0.75) and r.ratio_to_p0[0] == 1.0
    assert r.overall == pytest.approx(0.5)
    rows = r.to_rows()
    assert set(rows["variant"]) == {"P0", "P1", "P2", "P3", "all"}
    assert np.isnan(context_accuracy([1, 0], [1, 2]).ratio_to_p0[1])  # no P0 images: no ratio
    with pytest.raises(UserError, match="0..3"):
        context_accuracy([1], [4])


def test_prompts_cover_every_pattern_with_consistent_flags():
    prompts = context_prompts("truck", random.Random(0))
    assert len(prompts) == 8
    assert sorted(n for _, _, n in prompts) == [0, 1, 1, 1, 2, 2, 2, 3]
    settings = context_settings("truck")
    for prompt, attrs, n in prompts:
        assert n == sum(attrs[f"{a}_uncommon"] for a in ("time", "weather", "location"))
        for a in ("time", "weather", "location"):
            pool = settings[a]["uncommon" if attrs[f"{a}_uncommon"] else "common"]
            assert attrs[a] in pool and attrs[a] in prompt
        assert prompt.startswith("a photo of a truck")
    # FOCUS's table: a truck on a street is common, in the water uncommon.
    assert "on a street" in settings["location"]["common"] and "in the water" in settings["location"]["uncommon"]
    assert context_prompts("truck", 3) == context_prompts("truck", 3)  # a seed fixes the prompts
    gen = context_prompts("truck", np.random.default_rng(3))  # numpy Generators work too
    assert [n for _, _, n in gen] == [n for _, _, n in prompts]


def test_prompts_skip_patterns_a_class_cannot_have_and_fall_back_to_defaults():
    frog = context_prompts("frog", 0)
    assert len(frog) == 4 and not any(a["time_uncommon"] for _, a, _ in frog)  # night is common for frogs
    odd = context_prompts("Quokka", 0, n_per_pattern=2)
    assert len(odd) == 16 and odd[0][0].startswith("a photo of a Quokka")
    assert context_settings("Ankle boot")["location"]["common"][0] == "on a shoe rack"  # Fashion-MNIST class
    assert context_prompts("apple", 0)[0][0].startswith("a photo of an apple")


def test_focus_raw_attributes_are_judged_with_focus_table(tmp_path):
    df = pd.DataFrame({
        "file_name": ["a.png", "b.png", "c.png", "d.png"],
        "class_name": ["truck", "dog", "car", "frog"],
        "time": ["night", "day", "day", "night"],
        "weather": ["foggy", "sunny", "cloudy", "raining"],
        "locations": ["street", "grass", "grass, water", "indoors"],
    })
    df.to_csv(tmp_path / "annotations.csv", index=False)
    table = read_context_table(tmp_path)
    # truck: night + fog (street is common) = 2; dog on grass by day = 0; car: water among its locations = 1;
    # frog: night is common for frogs, rain and indoors are not = 2.
    assert list(table["n_uncommon"]) == [2, 0, 1, 2]
    assert table["path"][0] == str(tmp_path / "a.png")


def test_tables_without_context_columns_are_refused(tmp_path):
    pd.DataFrame({"file_name": ["a.png"], "class_name": ["cat"]}).to_csv(tmp_path / "metadata.csv", index=False)
    with pytest.raises(UserError, match="says nothing about context"):
        read_context_table(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        read_context_table(tmp_path / "nope")


class _Grey(torch.nn.Module):
    """Predicts class k when the mean grey level is near k / 2 (3 classes)."""

    input_size = (1, 8, 8)

    def __init__(self):
        super().__init__()
        self.label_space = LabelSpace.from_names(["ant", "bee", "cow"])

    def forward(self, x):
        return -(x.mean(dim=(1, 2, 3))[:, None] - torch.tensor([0.0, 0.5, 1.0])[None]) ** 2


def test_evaluate_a_generated_style_probe_end_to_end(tmp_path):
    """A dataset folder as ``synclone generate`` writes it, with the prompt attributes in metadata.jsonl."""
    from PIL import Image

    grey = {"ant": 0, "bee": 128, "cow": 255}
    rows = []
    rng = random.Random(0)
    for cls in grey:
        for prompt, attrs, n in context_prompts(cls, rng):
            # Images with 2+ uncommon attributes are drawn with the wrong grey level: the model fails on them.
            level = grey[cls] if n < 2 else (grey[cls] + 128) % 256
            name = f"{cls}/{len(rows):03d}.png"
            (tmp_path / "train" / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8), level, dtype=np.uint8)).save(tmp_path / "train" / name)
            rows.append({"file_name": name, "label": list(grey).index(cls), "class_name": cls, "prompt": prompt,
                         **attrs})
    (tmp_path / "train" / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    values, counts = probe_on_folder("context", _Grey(), folder=str(tmp_path))
    assert values["P0", "top1"] == 1.0 and values["P1", "top1"] == 1.0
    assert values["P2", "top1"] == 0.0 and values["P3", "top1"] == 0.0
    assert {v: counts[v, "top1"] for v in ("P0", "P1", "P2", "P3")} == {"P0": 3, "P1": 9, "P2": 9, "P3": 3}
    assert values["P2", "ratio_to_P0"] == 0.0
    assert counts["all", "top1"] == 24 and values["all", "top1"] == 0.5


def test_generated_metadata_nests_context_under_attributes(tmp_path):
    """`synclone generate --contexts` writes the context per image under 'attributes'; the reader lifts it."""
    import json

    from synclone.probes.context import read_context_table

    rows = [{"file_name": f"{i}.png", "class_name": "Bag",
             "attributes": {"n_uncommon": i % 3, "time": "night", "weather": "snow"}} for i in range(6)]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    df = read_context_table(tmp_path)
    assert df["n_uncommon"].tolist() == [0, 1, 2, 0, 1, 2] and df["time"].iloc[0] == "night"


def _focus_db(root, rows) -> None:
    """FOCUS's annotations.db as its authors' BGVarDB writes it: table `annotations` (file_name TEXT PRIMARY KEY,
    category, time, weather, locations (sorted, ", "-joined), humans), file names with a leading '/'."""
    import sqlite3

    con = sqlite3.connect(root / "annotations.db")
    con.execute("CREATE TABLE if not exists annotations (file_name TEXT PRIMARY KEY, category TEXT, time TEXT, "
                "weather TEXT, locations TEXT, humans TEXT)")
    for file_name, category, time, weather, locations, humans in rows:
        con.execute("REPLACE INTO annotations VALUES (?, ?, ?, ?, ?, ?)",
                    (file_name, category, time, weather, ", ".join(sorted(locations)), humans))
    con.commit()
    con.close()


def test_focus_annotations_db_is_read_directly(tmp_path):
    from PIL import Image

    rows = [("/cat/1.jpg", "cat", "day", "sunny", ["forest", "grass"], "no"),
            ("/cat/89.jpg", "cat", "night", "foggy", ["forest"], "no"),
            ("/dog/91.jpg", "dog", "day", "sunny", ["indoors"], "yes"),
            ("/horse/19.jpg", "horse", "night", "none", ["grass", "water"], "no"),
            ("/car/23.jpg", "car", "day", "cloudy", ["snow", "street"], "no"),
            ("/plane/76.jpg", "plane", "day", "raining", ["street"], "no")]
    _focus_db(tmp_path, rows)
    for file_name, *_ in rows:
        (tmp_path / file_name[1:]).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 90, dtype=np.uint8)).save(tmp_path / file_name[1:])
    table = read_context_table(tmp_path)  # finds annotations.db in the dataset root
    assert list(table["file_name"]) == sorted(r[0] for r in rows)
    by_file = table.set_index("file_name")
    # FOCUS's own table of uncommon settings: forest is uncommon for cats (1); a cat at night in fog in a forest
    # is uncommon in all three (3); a horse at night by water 2; a car on snow 1; a plane in rain 1; a dog indoors 0.
    assert by_file["n_uncommon"].to_dict() == {"/car/23.jpg": 1, "/cat/1.jpg": 1, "/cat/89.jpg": 3,
                                               "/dog/91.jpg": 0, "/horse/19.jpg": 2, "/plane/76.jpg": 1}
    assert by_file.loc["/cat/1.jpg", "path"] == str(tmp_path / "cat" / "1.jpg")

    # An ImageNet-1k model decided on FOCUS's categories, end to end from the .db file.
    from synclone.labels import imagenet1k_space

    class _AlwaysTabby(torch.nn.Module):
        input_size = (3, 8, 8)
        label_space = imagenet1k_space()

        def forward(self, x):
            out = torch.zeros(len(x), 1000)
            out[:, 281] = 1.0  # tabby cat: right for the cats only
            return out

    values, counts = probe_on_folder("context", _AlwaysTabby(), folder=str(tmp_path))
    assert {k: counts[(k, "top1")] for k in ("P0", "P1", "P2", "P3")} == {"P0": 1, "P1": 3, "P2": 1, "P3": 1}
    # only the cats are right: the one at night in fog in a forest (P3) and one of the three P1 images
    assert {k: values[(k, "top1")] for k in ("P0", "P1", "P2", "P3")} == pytest.approx(
        {"P0": 0.0, "P1": 1 / 3, "P2": 0.0, "P3": 1.0})
    from synclone.probes.context_focus import read_focus_db

    assert list(read_focus_db(tmp_path / "annotations.db", humans="yes")["class_name"]) == ["dog"]


def test_a_sqlite_file_that_is_not_focus_is_refused(tmp_path):
    import sqlite3

    con = sqlite3.connect(tmp_path / "annotations.db")
    con.execute("CREATE TABLE images (name TEXT)")
    con.commit()
    con.close()
    with pytest.raises(UserError, match="has no table 'annotations' \\(tables: images\\)"):
        read_context_table(tmp_path)
    (tmp_path / "bad.db").write_bytes(b"not a database at all" * 10)
    with pytest.raises(UserError, match="SQLite"):
        read_context_table(tmp_path / "bad.db")
