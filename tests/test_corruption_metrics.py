"""CE, mCE and relative mCE on hand-made tables; AlexNet constants paired by name; bad input."""

from __future__ import annotations

import random

import numpy as np
import pandas as pd
import pytest

from synclone.errors import UserError
from synclone.probes.corruptions.metrics import (
    ALEXNET_ERRORS,
    HELD_OUT_CORRUPTIONS,
    IMAGENET_C_CORRUPTIONS,
    corruption_error,
    error_table,
    mce,
    relative_corruption_error,
    relative_mce,
)

# metrics.md's list of AlexNet errors, in the order of its list of the 15 corruptions.
PUBLISHED_ORDER = [
    0.886428, 0.894468, 0.922640, 0.819880, 0.826268, 0.785948, 0.798360, 0.866816,
    0.826572, 0.819324, 0.564592, 0.853204, 0.646056, 0.717840, 0.606500,
]


def random_table(seed: int, corruptions=IMAGENET_C_CORRUPTIONS, lo=0.2, hi=0.9) -> dict:
    rng = np.random.default_rng(seed)
    return {c: {s: float(rng.uniform(lo, hi)) for s in range(1, 6)} for c in corruptions}


def augmix_compute_mce(corruption_accs: dict) -> float:
    """The reference: compute_mce from AugMix's imagenet.py (Hendrycks et al., 2020), which pairs
    its ALEXNET_ERR list with its CORRUPTIONS list (the metrics.md order) by position."""
    mce_ = 0.0
    for i in range(len(IMAGENET_C_CORRUPTIONS)):
        avg_err = 1 - np.mean(corruption_accs[IMAGENET_C_CORRUPTIONS[i]])
        ce = 100 * avg_err / PUBLISHED_ORDER[i]
        mce_ += ce / 15
    return mce_


def test_hand_made_table():
    errs = {
        "fog": {1: 0.1, 2: 0.2, 3: 0.3, 4: 0.4, 5: 0.5},
        "snow": {1: 0.2, 2: 0.2, 3: 0.2, 4: 0.2, 5: 0.2},
        "pixelate": {1: 0.3, 2: 0.3, 3: 0.6, 4: 0.6, 5: 0.6},
    }
    base = {
        "fog": {1: 0.2, 2: 0.4, 3: 0.6, 4: 0.8, 5: 1.0},  # sum 3.0 vs 1.5: CE 50
        "snow": {1: 0.1, 2: 0.1, 3: 0.1, 4: 0.1, 5: 0.1},  # sum 0.5 vs 1.0: CE 200
        "pixelate": {1: 0.6, 2: 0.6, 3: 0.6, 4: 0.6, 5: 0.6},  # sum 3.0 vs 2.4: CE 80
    }
    ce = corruption_error(errs, base, "present")
    assert ce == pytest.approx({"fog": 50.0, "snow": 200.0, "pixelate": 80.0})
    assert mce(errs, base, corruptions=["fog", "snow", "pixelate"]) == pytest.approx(110.0)
    # A ratio of sums, not a mean of per-severity ratios (which would be (50 + 112.5) / 2 = 81.25).
    ce_fog = corruption_error({"fog": {1: 0.1, 2: 0.9}}, {"fog": {1: 0.2, 2: 0.8}}, ["fog"])["fog"]
    assert ce_fog == pytest.approx(100.0)


def test_mce_matches_augmix_reference():
    errs = random_table(0)
    accs = {c: [1 - errs[c][s] for s in range(1, 6)] for c in IMAGENET_C_CORRUPTIONS}
    assert mce(errs) == pytest.approx(augmix_compute_mce(accs), rel=1e-12)


def test_mce_ignores_the_order_of_corruptions_and_of_the_table():
    errs = random_table(1)
    expected = mce(errs)
    for seed in range(5):
        names = list(IMAGENET_C_CORRUPTIONS)
        random.Random(seed).shuffle(names)
        shuffled_errs = {c: errs[c] for c in reversed(names)}
        assert mce(shuffled_errs, corruptions=names) == pytest.approx(expected, rel=1e-12)
        baseline = {c: ALEXNET_ERRORS[c] for c in names}
        assert mce(errs, baseline, corruptions=names) == pytest.approx(expected, rel=1e-12)
    # The trap name-pairing avoids: errors listed in another order, paired with AlexNet by position.
    names = sorted(IMAGENET_C_CORRUPTIONS)
    pairs = zip(names, PUBLISHED_ORDER, strict=True)
    by_position = np.mean([100 * np.mean(list(errs[c].values())) / a for c, a in pairs])
    assert by_position != pytest.approx(expected, rel=1e-3)


def test_alexnet_constants_are_paired_by_name():
    assert list(ALEXNET_ERRORS) == list(IMAGENET_C_CORRUPTIONS)
    assert ALEXNET_ERRORS == dict(zip(IMAGENET_C_CORRUPTIONS, PUBLISHED_ORDER, strict=True))
    # A model whose every severity errs exactly as AlexNet's mean scores 100 on every corruption,
    # whatever the spelling of the names.
    alexnet_like = {c.replace("_", " ").title(): dict.fromkeys(range(1, 6), e) for c, e in ALEXNET_ERRORS.items()}
    assert list(corruption_error(alexnet_like).values()) == pytest.approx([100.0] * 15)
    assert mce(alexnet_like) == pytest.approx(100.0)


def test_relative_mce():
    rng = np.random.default_rng(3)
    base_clean = 0.3
    base = {c: {s: base_clean + float(rng.uniform(0.05, 0.5)) for s in range(1, 6)} for c in IMAGENET_C_CORRUPTIONS}
    clean = 0.1
    # The model loses exactly 40% of what the baseline loses to each corruption: relative mCE 40.
    errs = {c: {s: clean + 0.4 * (e - base_clean) for s, e in row.items()} for c, row in base.items()}
    assert relative_mce(errs, clean, base, base_clean) == pytest.approx(40.0)
    rel = relative_corruption_error(errs, clean, base, base_clean, corruptions=["fog"])
    assert rel == pytest.approx({"fog": 40.0})
    assert mce(errs, base) < 100  # plain mCE differs: it also credits the lower clean error
    # Against AlexNet's per-corruption means: model errors averaged over severities 1-5.
    alex_clean = 0.4
    errs = {c: dict.fromkeys(range(1, 6), clean + 0.5 * (a - alex_clean)) for c, a in ALEXNET_ERRORS.items()}
    assert relative_mce(errs, clean, ALEXNET_ERRORS, alex_clean) == pytest.approx(50.0)


def test_table_formats_agree():
    errs = random_table(4, corruptions=["fog", "snow"])
    rows = [(c, s, e) for c, row in errs.items() for s, e in row.items()]
    frame = pd.DataFrame(rows, columns=["corruption", "severity", "error"])
    by_pair = {(c, s): e for c, s, e in rows}
    assert error_table(frame) == error_table(errs) == error_table(by_pair)
    base = random_table(5, corruptions=["fog", "snow"])
    assert corruption_error(frame, base, "present") == corruption_error(errs, base, "present")
    # Per-corruption means against a per-severity baseline: the same ratio as the sums over 1-5.
    means = {c: float(np.mean(list(row.values()))) for c, row in errs.items()}
    assert corruption_error(means, base, "present") == pytest.approx(corruption_error(errs, base, "present"))


def test_bad_tables_are_user_errors():
    errs = random_table(6)
    base = {c: dict(row) for c, row in random_table(7).items()}
    del base["fog"]
    with pytest.raises(UserError, match="baseline_errs has no errors for corruption fog"):
        mce(errs, base)
    partial = {c: dict(row) for c, row in errs.items()}
    del partial["frost"][3]
    with pytest.raises(UserError, match=r"errs frost lacks severities \[3\]"):
        mce(partial)
    with pytest.raises(UserError, match=r"errs frost lacks severities \[3\]"):
        mce(partial, random_table(7))
    missing = {c: row for c, row in errs.items() if c != "contrast"}
    with pytest.raises(UserError, match="no errors for corruption contrast"):
        mce(missing)
    with pytest.raises(UserError, match="percentages"):
        mce({c: {s: 100 * e for s, e in row.items()} for c, row in errs.items()})
    with pytest.raises(UserError, match="given twice"):
        error_table({"fog": 0.5, "Fog": 0.4})
    with pytest.raises(UserError, match="not above its clean error"):
        relative_mce(errs, 0.1, errs, 0.95)


def test_corruption_error_defaults_to_the_15_and_names_the_held_out_four():
    # A testbed-style table: all 19 corruptions. AlexNet's published errors cover only the 15, so the
    # default must be those 15 (as mce's), with the held-out four scored only against a baseline that has them.
    errs = random_table(11, corruptions=[*IMAGENET_C_CORRUPTIONS, *HELD_OUT_CORRUPTIONS])
    ce = corruption_error(errs)
    assert list(ce) == list(IMAGENET_C_CORRUPTIONS)
    assert sum(ce.values()) / 15 == pytest.approx(mce(errs))
    base = random_table(12, corruptions=[*IMAGENET_C_CORRUPTIONS, *HELD_OUT_CORRUPTIONS])
    held = corruption_error(errs, base, "held_out")
    assert list(held) == ["speckle_noise", "gaussian_blur", "spatter", "saturate"]
    row, brow = errs["spatter"], base["spatter"]
    assert held["spatter"] == pytest.approx(100 * sum(row.values()) / sum(brow.values()))
    assert list(corruption_error(errs, base, "all")) == [*IMAGENET_C_CORRUPTIONS, *HELD_OUT_CORRUPTIONS]
    with pytest.raises(UserError, match="baseline_errs has no errors for corruption speckle_noise"):
        corruption_error(errs, corruptions="held_out")
    with pytest.raises(UserError, match="not a set name"):
        corruption_error(errs, corruptions="heldout4")
