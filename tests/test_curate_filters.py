"""Curation filters on hand-made scores: He et al.'s rule, thresholds, quantiles, top-k, dedup, degenerate."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics.pairwise import cosine_distances

from synclone.config import load_config
from synclone.curate.config import CurateConfig, FiltersConfig
from synclone.curate.filters import (
    apply_filters,
    degenerate_reasons,
    he_rule_reasons,
    near_duplicate_reasons,
    quantile_reasons,
    threshold_reasons,
    top_k_reasons,
)
from synclone.curate.stats import mean_pairwise_cosine_distance
from synclone.data.images import STAT_NAMES
from synclone.errors import UserError


def test_he_rule_on_hand_made_scores():
    # 3 classes, so chance = 1/3. Class 0: four images, one at exactly 1/3 (not above: dropped).
    p = np.array([0.90, 0.50, 1 / 3, 0.34, 0.20, 0.80, 0.60, 0.95, 0.10])
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2])
    active = np.ones(9, dtype=bool)
    only_chance = he_rule_reasons(p, labels, num_classes=3, k=None, active=active)
    assert list(only_chance) == [None, None, "he:below_chance", None, "he:below_chance", None, None, None,
                                 "he:below_chance"]
    with_k = he_rule_reasons(p, labels, num_classes=3, k=2, active=active)
    # Class 0 above chance: 0.90, 0.50, 0.34 -> the top 2 stay, 0.34 is "not top k".
    assert list(with_k) == [None, None, "he:below_chance", "he:not_top_k", "he:below_chance", None, None, None,
                            "he:below_chance"]
    # Chance depends on C: with 2 classes the bar is 0.5, so 0.50 itself fails ("above 1/C").
    assert he_rule_reasons(p, labels, 2, None, active)[1] == "he:below_chance"
    # Images already dropped by an earlier filter are not looked at.
    inactive = active.copy()
    inactive[0] = False
    r = he_rule_reasons(p, labels, 3, 1, inactive)
    assert r[0] is None and r[1] is None and r[3] == "he:not_top_k"


def test_top_k_ties_break_by_id_and_are_stable():
    v = np.array([0.5, 0.5, 0.5, 0.9])
    labels = np.zeros(4, dtype=int)
    ids = np.array(["d", "b", "c", "a"])
    r = top_k_reasons(v, labels, 2, np.ones(4, bool), "keep_k", ids)
    # 0.9 ("a") first, then the 0.5 with the smallest id ("b"); "c" and "d" go.
    assert list(r) == ["keep_k", None, "keep_k", None]


def test_threshold_and_quantile():
    scores = {"p_label": np.array([0.2, 0.6, np.nan, 0.9]), "margin": np.array([0.5, -0.1, 0.3, 0.4])}
    r = threshold_reasons(scores, {"p_label": 0.5, "margin": 0.0}, np.ones(4, bool))
    assert list(r) == ["threshold:p_label", "threshold:margin", "threshold:p_label", None]

    values = np.arange(10, dtype=float)
    labels = np.array([0] * 5 + [1] * 5)
    r = quantile_reasons(values, labels, 0.4, np.ones(10, bool), "class_sim")
    # numpy's linear quantile of [0..4] at 0.4 is 1.6 and of [5..9] is 6.6: drop 0, 1 and 5, 6.
    assert [i for i, x in enumerate(r) if x] == [0, 1, 5, 6]
    assert np.quantile(values[:5], 0.4) == pytest.approx(1.6)


def test_near_duplicates_greedy_keeps_the_preferred_copy():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(3, 16))
    emb = np.stack([base[0], base[0] + 0.01 * rng.normal(size=16), base[1], base[2], base[1] * 2])
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = np.array([0, 0, 0, 0, 1])  # the last is a copy of image 2 but in another class: not a duplicate
    prefer = np.array([0.1, 0.9, 0.5, 0.5, 0.5])
    ids = np.array(["a", "b", "c", "d", "e"])
    r, dup = near_duplicate_reasons(emb, labels, 0.99, np.ones(5, bool), prefer, ids)
    assert list(r) == ["duplicate", None, None, None, None]
    assert dup[0] == 1  # the better-scored copy (b) survives and a points at it
    # Greedy, not transitive closure: a chain x~y~z with x !~ z keeps x and z when y comes later.
    t = np.linspace(0, 0.5, 3)
    chain = np.stack([np.cos(t), np.sin(t)], axis=1)  # angles 0, 0.25, 0.5 rad
    r, dup = near_duplicate_reasons(chain, np.zeros(3, int), float(np.cos(0.3)), np.ones(3, bool),
                                    np.array([1.0, 0.0, 0.5]))
    assert list(r) == [None, "duplicate", None] and dup[1] == 0
    # Block boundaries do not change the answer.
    many = rng.normal(size=(50, 4))
    many /= np.linalg.norm(many, axis=1, keepdims=True)
    lab = np.zeros(50, int)
    a = near_duplicate_reasons(many, lab, 0.8, np.ones(50, bool), block=7)
    b = near_duplicate_reasons(many, lab, 0.8, np.ones(50, bool), block=1024)
    assert list(a[0]) == list(b[0]) and list(a[1]) == list(b[1])
    assert (a[0] == "duplicate").sum() > 0


def test_degenerate():
    stats = np.array([
        [0, 255, 100, 50, 0.0],   # fine
        [0, 0, 0, 0, 0.0],        # black
        [128, 128, 128, 0, 0.0],  # constant grey
        [0, 3, 1, 0.8, 0.0],      # near black (max 3 <= 4)
        [0, 200, 80, 30, 0.01],   # NaN pixels in the source
    ], dtype=float)
    assert list(degenerate_reasons(stats, np.ones(5, bool), black_max=4, min_std=0.5)) == [
        None, "degenerate:black", "degenerate:constant", "degenerate:black", "degenerate:nan"]


def _table(p_label, labels, readable=None, stats=None):
    n = len(p_label)
    t = pd.DataFrame({"id": [f"{i:03d}" for i in range(n)], "label": labels, "p_label": p_label,
                      "margin": np.zeros(n), "class_sim": np.full(n, np.nan), "prompt_sim": np.full(n, np.nan),
                      "readable": readable if readable is not None else np.ones(n, bool)})
    st = stats if stats is not None else np.tile([0, 255, 100, 50, 0], (n, 1))
    for j, name in enumerate(STAT_NAMES):
        t[name] = st[:, j]
    return t


def test_apply_filters_records_first_reason_and_log():
    p = np.array([0.9, 0.8, 0.2, 0.7, np.nan, 0.95])
    labels = np.array([0, 0, 0, 1, 1, 1])
    readable = np.array([True, True, True, True, False, True])
    stats = np.tile([0, 255, 100, 50, 0.0], (6, 1))
    stats[5] = [0, 0, 0, 0, 0]  # black, and also a confident one: degenerate runs first and names it
    emb = np.eye(6)
    emb[1] = emb[0]  # image 1 duplicates image 0
    cfg = FiltersConfig(he={"enabled": True, "k": 1}, dedup={"enabled": True, "tau": 0.99})
    t, log = apply_filters(_table(p, labels, readable, stats), emb, cfg, num_classes=2)
    assert list(t["kept"]) == [True, False, False, True, False, False]
    assert list(t["drop_reason"].fillna("")) == ["", "duplicate", "he:below_chance", "", "unreadable",
                                                 "degenerate:black"]
    assert t["dup_of"][1] == "000"
    assert [s["filter"] for s in log] == ["unreadable", "degenerate", "dedup", "he"]
    assert sum(s["dropped"] for s in log) == int((~t["kept"]).sum())


def test_filter_on_missing_score_is_a_user_error():
    cfg = FiltersConfig(threshold={"prompt_sim": 0.2})
    with pytest.raises(UserError, match="prompt_sim"):
        apply_filters(_table(np.array([0.5, 0.6]), np.array([0, 1])), np.eye(2), cfg, 2, scorer_kind="teacher")


@pytest.mark.parametrize("override, key", [
    ("filters.threshold.p_label=1.5", "filters.threshold.p_label"),
    ("filters.threshold.prompt_sim=-2", "filters.threshold.prompt_sim"),
    ("filters.quantile.q=1.0", "filters.quantile.q"),
    ("filters.dedup.tau=1.2", "filters.dedup.tau"),
    ("filters.he.k=0", "filters.he.k"),
    ("filters.quantile.score=confidence", "filters.quantile.score"),
    ("filters.order=[he, he]", "filters.order"),
    ("filters.threshold.p_labl=0.5", "filters.threshold.p_labl"),
])
def test_out_of_range_settings_are_user_errors(tmp_path, override, key):
    path = tmp_path / "curate.yaml"
    path.write_text(yaml.safe_dump({"input": "in", "output": "out"}))
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        load_config(CurateConfig, path, [override])
    ok = load_config(CurateConfig, path, ["filters.threshold.p_label=0.6", "scorer.kind=teacher"])
    assert ok.filters.threshold.p_label == 0.6


def test_diversity_matches_sklearn():
    rng = np.random.default_rng(3)
    e = rng.normal(size=(40, 8))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    d = cosine_distances(e)
    expected = d[~np.eye(40, dtype=bool)].mean()
    assert mean_pairwise_cosine_distance(e) == pytest.approx(expected, abs=1e-12)
    assert mean_pairwise_cosine_distance(np.repeat(e[:1], 5, axis=0)) == pytest.approx(0.0, abs=1e-12)
    assert np.isnan(mean_pairwise_cosine_distance(e[:1]))


def test_he_rule_select_random_is_seeded_and_hand_checkable():
    from synclone.curate.filters import random_keys
    from synclone.util.seeds import derive_seed

    p = np.array([0.90, 0.55, 0.20, 0.34, 0.80, 0.60, 0.95, 0.70])
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    ids = np.array(["a", "b", "c", "d", "e", "f", "g", "h"])
    active = np.ones(8, dtype=bool)
    r = he_rule_reasons(p, labels, 2, 2, active, ids, select="random", seed=5)
    # Chance is 1/2: "c" (0.20) and "d" (0.34) fall below, so class 0 keeps "a" and "b" whatever the draw.
    assert list(r[:4]) == [None, None, "he:below_chance", "he:below_chance"]
    # Class 1: all four above chance; the two with the smallest derive_seed(5, "he-random", id) stay.
    keys = {i: derive_seed(5, "he-random", i) for i in "efgh"}
    assert list(random_keys(ids[4:], 5)) == [keys[i] for i in "efgh"]
    keep = sorted("efgh", key=keys.get)[:2]
    assert [r[4 + j] is None for j in range(4)] == [i in keep for i in "efgh"]
    assert sum(x == "he:not_sampled" for x in r) == 2
    # Reproducible, independent of row order, and another seed draws another subset for some seed.
    perm = np.array([7, 6, 5, 4, 3, 2, 1, 0])
    r2 = he_rule_reasons(p[perm], labels[perm], 2, 2, active, ids[perm], select="random", seed=5)
    assert list(r2[np.argsort(perm)]) == list(r)
    draws = {tuple(he_rule_reasons(p, labels, 2, 2, active, ids, select="random", seed=s)) for s in range(6)}
    assert len(draws) > 1


# --- He et al.'s real-feature filter: the nearest real-shot centroid must be the image's own class ----------------


def test_real_centroid_rule_against_a_hand_computed_case():
    from synclone.curate.filters import class_centroids, real_centroid_reasons

    # Real shots in 2-D: class 0 at (1, 0) and (1, 1)/sqrt2 -> centroid direction 22.5 deg; class 1 at (0, 1).
    shots = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    cents = class_centroids(shots, np.array([0, 0, 1]), 2)
    a = np.deg2rad(22.5)
    assert np.allclose(cents, [[np.cos(a), np.sin(a)], [0.0, 1.0]])
    # Synthetic images at 0, 50, 60, 90 and 10 degrees. The bisector of 22.5 and 90 deg is 56.25 deg, so 0 and 50
    # deg are nearest class 0, 60 and 90 deg nearest class 1, whatever their own label.
    deg = np.deg2rad([0.0, 50.0, 60.0, 90.0, 10.0])
    emb = np.stack([np.cos(deg), np.sin(deg)], axis=1)
    labels = np.array([0, 1, 0, 1, 1])
    active = np.array([True, True, True, True, False])  # the last was dropped by an earlier filter
    r = real_centroid_reasons(emb, labels, cents, active)
    assert list(r) == [None, "real_centroid", "real_centroid", None, None]


def test_real_centroid_filter_runs_in_apply_filters_and_logs():
    n = 4
    table = pd.DataFrame({"id": [str(i) for i in range(n)], "label": [0, 0, 1, 1], "readable": [True] * n,
                          **{s: np.full(n, 0.9) for s in ("p_label", "margin", "class_sim", "prompt_sim")},
                          **{s: np.full(n, 100.0) for s in STAT_NAMES}})
    table["px_nan"] = 0.0
    emb = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    cfg = FiltersConfig.model_validate({"real_centroid": {"references": "shots"}})
    out, log = apply_filters(table, emb, cfg, 2, centroids=np.eye(2))
    assert list(out["kept"]) == [True, False, True, False]
    assert [r if isinstance(r, str) else None for r in out["drop_reason"]] == [None, "real_centroid", None,
                                                                               "real_centroid"]
    step = next(s for s in log if s["filter"] == "real_centroid")
    assert step["dropped"] == 2 and step["classes"] == 2
    with pytest.raises(UserError, match="no real-shot centroids"):
        apply_filters(table, emb, cfg, 2)


def test_configs_without_the_real_centroid_filter_dump_as_before_it_existed():
    """Recipe stage hashes and curated records of existing configs must not change with the new filter."""
    old_order = ["degenerate", "threshold", "quantile", "dedup", "he", "keep_k"]
    d = FiltersConfig().model_dump(mode="json")
    assert "real_centroid" not in d and d["order"] == old_order
    used = FiltersConfig.model_validate({"real_centroid": {"references": "shots"}}).model_dump(mode="json")
    assert used["real_centroid"] == {"references": "shots"} and "real_centroid" in used["order"]
    assert FiltersConfig.model_validate(used).real_centroid.references == "shots"
