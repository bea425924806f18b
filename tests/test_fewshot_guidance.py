"""He et al.'s few-shot real guidance: img2img strength chosen per class from its number of real shots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _tiny_pipelines import gen_config, one_torch_thread, tiny_sd  # noqa: F401
from synclone.errors import UserError
from synclone.generate import GenerateConfig, generate
from synclone.generate.backends import strength_for_shots

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TABLE = {1: 0.9, 2: 0.6, 4: 0.3}


def test_strength_table_lookup_by_hand():
    # The entry of the largest key <= shots; below the smallest key, the smallest key's entry.
    assert [strength_for_shots(TABLE, k) for k in (1, 2, 3, 4, 5, 16)] == [0.9, 0.6, 0.6, 0.3, 0.3, 0.3]
    assert strength_for_shots({4: 0.3, 8: 0.2}, 1) == 0.3
    assert strength_for_shots({16: 0.2, 1: 0.5}, 8) == 0.5  # keys need not be given in order


@pytest.mark.parametrize("table, message", [({}, "is empty"), ({0: 0.5}, "shots >= 1"), ({2: 1.5}, "(0, 1]")])
def test_bad_strength_tables_are_refused(table, message):
    with pytest.raises(UserError, match=message.replace("(", "\\(").replace("]", "\\]")):
        GenerateConfig(generator={"backend": "img2img", "model": "x",
                                  "options": {"references": "r", "strength_by_shots": table}})


def _pixels(folder: Path, label: int) -> list[np.ndarray]:
    rows = [json.loads(x) for x in (folder / "train" / "metadata.jsonl").read_text().splitlines()]
    return [np.asarray(Image.open(folder / "train" / r["file_name"]), dtype=np.int16)
            for r in sorted(rows, key=lambda r: r["id"]) if r["label"] == label]


@pytest.mark.slow  # three small generation runs: ~30 s on a loaded 2-core machine
def test_each_class_is_guided_at_the_strength_of_its_shot_count(tmp_path):
    sd = tiny_sd()
    refs = tmp_path / "refs"
    rng = np.random.default_rng(0)
    for slug, n in (("dress", 1), ("sneaker", 3)):
        (refs / slug).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(refs / slug / f"r{i}.png")

    def run(name, **options):
        cfg = gen_config(sd, tmp_path / name, labels=["Dress", "Sneaker"], images_per_class=2, batch_size=4,
                         generator={"backend": "img2img", "steps": 4, "options": {"references": str(refs), **options}})
        return generate(cfg)

    table = run("table", strength_by_shots=TABLE)
    info = json.loads((table / "dataset.json").read_text())["generator"]
    assert info["strength_by_class"] == {"Dress": 0.9, "Sneaker": 0.6}  # 1 shot -> 0.9, 3 shots -> entry 2
    assert info["options"]["strength_by_shots"] == {"1": 0.9, "2": 0.6, "4": 0.3}
    # Each class's images are those a fixed-strength run at its table entry makes (same ids and seeds).
    at_09, at_06 = run("s09", strength=0.9), run("s06", strength=0.6)
    for label, same, other in ((0, at_09, at_06), (1, at_06, at_09)):
        got, want, not_want = _pixels(table, label), _pixels(same, label), _pixels(other, label)
        assert all(np.abs(g - w).max() <= 1 for g, w in zip(got, want, strict=True))
        assert any(np.abs(g - w).max() > 1 for g, w in zip(got, not_want, strict=True))
    # Without a table the record is the one older datasets have (no strength_by_shots key).
    assert "strength_by_shots" not in json.loads((at_09 / "dataset.json").read_text())["generator"]["options"]
