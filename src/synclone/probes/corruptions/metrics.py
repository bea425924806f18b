"""Corruption error (CE), mean CE and relative mCE (Hendrycks & Dietterich, ICLR 2019).

Errors are fractions in [0, 1], one per (corruption, severity). Tables can be given as

- a dict keyed by ``(corruption, severity)``: ``{("fog", 1): 0.31, ...}``;
- a dict of dicts: ``{"fog": {1: 0.31, 2: 0.35, ...}, ...}``;
- a dict of numbers, ``{"fog": 0.42, ...}``: the mean error over severities 1-5, as published
  baselines are (see :data:`ALEXNET_ERRORS`);
- a pandas DataFrame in long format with columns ``corruption``, ``severity`` and ``error``.

Definitions, with s running over the severities both tables share:

- CE_c = sum_s err(c, s) / sum_s err_base(c, s), reported in % (the baseline scores 100);
- mCE = mean of CE_c over the 15 ImageNet-C corruptions (in %);
- relative CE_c = sum_s (err(c, s) - err_clean) / sum_s (err_base(c, s) - err_base_clean), and
  relative mCE its mean (in %).

When one side gives a per-corruption mean (no severities), the other side's errors must cover
severities 1-5 and are averaged; sums over the same five severities are proportional to means, so
the ratio is the same. Corruptions are always paired by name, never by position: names are
compared after lower-casing and turning spaces and hyphens into underscores ("JPEG Compression"
== "jpeg_compression").
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from synclone.errors import UserError

IMAGENET_C_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness",
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
HELD_OUT_CORRUPTIONS = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
SEVERITIES = (1, 2, 3, 4, 5)

# AlexNet's ImageNet-C top-1 errors, averaged over severities 1-5, from Hendrycks & Dietterich,
# "Benchmarking Neural Network Robustness to Common Corruptions and Perturbations", ICLR 2019
# (the constants published with their code, github.com/hendrycks/robustness, and reused by AugMix).
# Keyed by name so that no reordering of a corruption list can pair them with the wrong corruption.
ALEXNET_ERRORS: dict[str, float] = {
    "gaussian_noise": 0.886428,
    "shot_noise": 0.894468,
    "impulse_noise": 0.922640,
    "defocus_blur": 0.819880,
    "glass_blur": 0.826268,
    "motion_blur": 0.785948,
    "zoom_blur": 0.798360,
    "snow": 0.866816,
    "frost": 0.826572,
    "fog": 0.819324,
    "brightness": 0.564592,
    "contrast": 0.853204,
    "elastic_transform": 0.646056,
    "pixelate": 0.717840,
    "jpeg_compression": 0.606500,
}

# A corruption's errors: {severity: error}, or {None: mean error over severities 1-5}.
_Table = dict[str, dict[int | None, float]]


def normalise_name(name: str) -> str:
    """Canonical corruption name: lower case, spaces and hyphens as underscores."""
    return str(name).strip().lower().replace(" ", "_").replace("-", "_")


def _error(value, where: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise UserError(f"error for {where} must be a number, got {value!r}.") from None
    if not math.isfinite(value) or not 0 <= value <= 1:
        hint = " (percentages? divide by 100)" if math.isfinite(value) and 1 < value <= 100 else ""
        raise UserError(f"error for {where} must be a fraction in [0, 1], got {value}{hint}.")
    return value


def _severity(value, where: str) -> int:
    try:
        sev = int(value)
    except (TypeError, ValueError):
        raise UserError(f"severity for {where} must be an integer, got {value!r}.") from None
    if sev != value or sev < 1:
        raise UserError(f"severity for {where} must be an integer >= 1, got {value!r}.")
    return sev


def _put(table: _Table, name, severity, value, what: str) -> None:
    key = normalise_name(name)
    where = f"{what} {key}" + (f" severity {severity}" if severity is not None else "")
    row = table.setdefault(key, {})
    if severity in row:
        raise UserError(f"{where} is given twice (names are compared case- and separator-insensitively).")
    if row and (severity is None) != (None in row):
        raise UserError(f"{what} {key} mixes a mean over severities with per-severity errors; give one or the other.")
    row[severity] = _error(value, where)


def error_table(errs, what: str = "errs") -> _Table:
    """Read any supported table format (see the module docstring) into ``{corruption: {severity: error}}``.

    A per-corruption mean is stored under severity ``None``.
    """
    table: _Table = {}
    if hasattr(errs, "columns") and hasattr(errs, "itertuples"):  # a pandas DataFrame
        missing = {"corruption", "severity", "error"} - set(errs.columns)
        if missing:
            raise UserError(f"{what} needs columns corruption, severity, error; missing {', '.join(sorted(missing))}.")
        for name, sev, value in zip(errs["corruption"], errs["severity"], errs["error"], strict=True):
            _put(table, name, _severity(sev, f"{what} {name}"), value, what)
    elif isinstance(errs, Mapping):
        for key, value in errs.items():
            if isinstance(key, tuple):
                if len(key) != 2:
                    raise UserError(f"{what} keys must be (corruption, severity) pairs, got {key!r}.")
                _put(table, key[0], _severity(key[1], f"{what} {key[0]}"), value, what)
            elif isinstance(value, Mapping):
                if not value:
                    raise UserError(f"{what} {normalise_name(key)} has no severities.")
                for sev, err in value.items():
                    _put(table, key, _severity(sev, f"{what} {key}"), err, what)
            else:
                _put(table, key, None, value, what)
    else:
        raise UserError(f"{what} must be a dict or a DataFrame of errors per (corruption, severity).")
    if not table:
        raise UserError(f"{what} is empty.")
    return table


def _means(name: str, row: dict, other: dict, what: str, other_what: str) -> float:
    """Mean error of ``row`` when ``other`` is a per-corruption mean: needs all of severities 1-5."""
    if None in row:
        return row[None]
    missing = [s for s in SEVERITIES if s not in row]
    if missing:
        raise UserError(
            f"{what} {name} lacks severities {missing}: {other_what} gives a mean over severities 1-5, so {what} "
            "needs all five."
        )
    extra = sorted(s for s in row if s not in SEVERITIES)
    if extra:
        raise UserError(f"{what} {name} has severities {extra} beyond 1-5, which {other_what}'s mean does not cover.")
    return sum(row[s] for s in SEVERITIES) / len(SEVERITIES)


def _paired_sums(name: str, model: _Table, base: _Table, shift: float, base_shift: float) -> tuple[float, float]:
    """Numerator and denominator of (relative) CE for one corruption, paired by severity."""
    if name not in model:
        raise UserError(f"errs has no errors for corruption {name}; have {', '.join(sorted(model))} (name the "
                        "corruptions to score, or pass corruptions='present').")
    if name not in base:
        raise UserError(f"baseline_errs has no errors for corruption {name}; have {', '.join(sorted(base))}.")
    row, base_row = model[name], base[name]
    if None in row or None in base_row:
        num = _means(name, row, base_row, "errs", "baseline_errs") - shift
        den = _means(name, base_row, row, "baseline_errs", "errs") - base_shift
        return num, den
    missing = sorted(set(base_row) - set(row))
    if missing:
        raise UserError(f"errs {name} lacks severities {missing} that baseline_errs has; give the same severities.")
    missing = sorted(set(row) - set(base_row))
    if missing:
        raise UserError(f"baseline_errs {name} lacks severities {missing} that errs has; give the same severities.")
    num = sum(row[s] - shift for s in row)
    den = sum(base_row[s] - base_shift for s in row)
    return num, den


def _ratio(name: str, num: float, den: float, relative: bool) -> float:
    if den <= 0:
        why = "is not above its clean error" if relative else "is 0"
        raise UserError(f"the baseline's error on {name} {why}, so its (relative) CE is undefined.")
    return 100.0 * num / den


# Named corruption sets for the ``corruptions`` argument of the CE functions.
CORRUPTION_SETS: dict[str, tuple[str, ...]] = {
    "imagenet_c": IMAGENET_C_CORRUPTIONS,
    "held_out": HELD_OUT_CORRUPTIONS,
    "all": IMAGENET_C_CORRUPTIONS + HELD_OUT_CORRUPTIONS,
}


def _names(corruptions: Iterable[str] | str | None, model: _Table) -> list[str]:
    """The corruptions to score: a list of names, a set name of :data:`CORRUPTION_SETS`, or "present".

    None means the 15 ImageNet-C corruptions, the set mCE is defined over; the 4 held-out ones
    (speckle_noise, gaussian_blur, spatter, saturate) only when asked for ("held_out" or "all"),
    since AlexNet's published errors do not cover them.
    """
    if corruptions is None:
        corruptions = "imagenet_c"
    if isinstance(corruptions, str):
        key = normalise_name(corruptions)
        if key == "present":
            names = list(model)
        elif key in CORRUPTION_SETS:
            names = list(CORRUPTION_SETS[key])
        else:
            raise UserError(f"corruptions '{corruptions}' is not a set name: use a list of corruption names, "
                            f"'present' or one of {', '.join(CORRUPTION_SETS)}.")
    else:
        names = [normalise_name(c) for c in corruptions]
    if not names:
        raise UserError("corruptions is empty.")
    if len(set(names)) != len(names):
        raise UserError(f"corruptions lists a name twice: {names}.")
    return names


def corruption_error(errs, baseline_errs=ALEXNET_ERRORS,
                     corruptions: Iterable[str] | str | None = None) -> dict[str, float]:
    """CE_c in % for each corruption in ``corruptions``: by default the 15 ImageNet-C corruptions, as
    :func:`mce`; ``"held_out"`` for the 4 held-out ones, ``"all"`` for the 19, ``"present"`` for every
    corruption in ``errs``, or a list of names.

    CE_c = 100 * sum_s err(c, s) / sum_s err_base(c, s), paired by name and severity. The default
    baseline is AlexNet's published ImageNet-C errors; for other datasets pass the errors of a
    baseline model measured the same way (e.g. the real-data model of the same run).
    """
    model, base = error_table(errs), error_table(baseline_errs, "baseline_errs")
    return {c: _ratio(c, *_paired_sums(c, model, base, 0.0, 0.0), False) for c in _names(corruptions, model)}


def mce(errs, baseline_errs=ALEXNET_ERRORS, corruptions: Iterable[str] = IMAGENET_C_CORRUPTIONS) -> float:
    """Mean corruption error in %: the mean of :func:`corruption_error` over ``corruptions``
    (default the 15 ImageNet-C corruptions; the 4 held-out ones are not part of mCE)."""
    ces = corruption_error(errs, baseline_errs, corruptions)
    return sum(ces.values()) / len(ces)


def relative_corruption_error(
    errs, clean_err: float, baseline_errs, baseline_clean_err: float, corruptions: Iterable[str] | str | None = None
) -> dict[str, float]:
    """Relative CE_c in %: 100 * sum_s (err(c, s) - clean_err) / sum_s (err_base(c, s) - baseline_clean_err).

    ``corruptions`` as in :func:`corruption_error` (default the 15 ImageNet-C corruptions).

    It measures how much accuracy a corruption costs relative to the baseline's loss, not the
    absolute error. ``clean_err`` and ``baseline_clean_err`` are the uncorrupted test errors.
    """
    model, base = error_table(errs), error_table(baseline_errs, "baseline_errs")
    shift, base_shift = _error(clean_err, "clean_err"), _error(baseline_clean_err, "baseline_clean_err")
    return {
        c: _ratio(c, *_paired_sums(c, model, base, shift, base_shift), True) for c in _names(corruptions, model)
    }


def relative_mce(
    errs,
    clean_err: float,
    baseline_errs,
    baseline_clean_err: float,
    corruptions: Iterable[str] = IMAGENET_C_CORRUPTIONS,
) -> float:
    """Relative mCE in %: the mean of :func:`relative_corruption_error` over ``corruptions``."""
    ces = relative_corruption_error(errs, clean_err, baseline_errs, baseline_clean_err, corruptions)
    return sum(ces.values()) / len(ces)
