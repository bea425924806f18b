"""Regenerate-until-full: after filtering, top every short class back up with fresh images until it is full.

Why it lives in ``curate`` (``CurateConfig.refill``) rather than as a ``generate`` option: only curation knows
how many images of a class survive, and the loop needs the scorer, its cache and the filters between rounds.
``generate`` only has to make "images k .. k+m-1 of class c" with the ids, seeds and prompts a larger plan would
give them (``GenerateConfig.extend``), which it does as an ordinary, resumable run.

Each round, a short class with ``kept`` of ``target`` images gets ``ceil((target - kept) / max(rate,
min_keep_rate))`` new ones, ``rate`` being its share of images kept so far. Its new images continue its own
numbering after the source plan (image ``k`` of class ``label`` has id ``k * C + label``), so no id, and so no
seed, is ever used twice. The pool (source + every round) is scored through the one cache and filtered as a
whole; the top-k rule then keeps exactly ``target`` per class. A class still short after ``max_rounds`` rounds
gives a :class:`RefillIncomplete` warning naming it and its count.

Layout of ``<output>/refill/``::

    refill.json      the source's identity, the generate config's fingerprint, and every round: its folder,
                     per class [first image, count], and the kept counts that asked for it
    round-001/       a generated dataset folder (plan, ledger, train/, dataset.json) holding one round

A round is recorded in ``refill.json`` before any of its images is made, so an interrupted run is finished by
running the same command: the recorded round is resumed with the same ranges (``generate``'s exact resume),
then the loop goes on. A complete output makes nothing: every round is read back and scored from the cache.
Rounds made under other filters stay in the pool (they are valid images with unique ids); nothing is deleted.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from synclone.config import apply_overrides, load_yaml, validate
from synclone.curate.config import CurateConfig, FiltersConfig, RefillConfig
from synclone.curate.output import REFILL_DIR
from synclone.curate.output import REFILL_STATE as STATE_FILE
from synclone.data.folder import METADATA, ImageRecord, read_dataset_folder, read_dataset_json
from synclone.errors import UserError
from synclone.generate.api import generate
from synclone.generate.backends import create_backend
from synclone.generate.config import GenerateConfig
from synclone.generate.job import resolve_labels
from synclone.labels import LabelSpace
from synclone.util.files import write_json_atomic

log = logging.getLogger(__name__)

STATE_FORMAT = "synclone-refill/1"
GENERATED_FORMAT = "synclone-generated-dataset"  # synclone.generate.api.FORMAT
ROUND_KEY = "refill_round"  # metadata column: 0 for source images, n for images of round n

# (records) -> (score result, filtered table, filter log); run.py binds the scorer, cache and filters.
Evaluate = Callable[[list[ImageRecord]], tuple[object, pd.DataFrame, list[dict]]]


class RefillIncomplete(UserWarning):
    """Refill stopped at ``max_rounds`` with classes still short of the target."""


# --- checks before any work ---------------------------------------------------------------------------


def selection_filters(filters: FiltersConfig, target: int) -> FiltersConfig:
    """``filters`` with the top-k rule set to ``target``: He et al.'s ``k`` if ``he`` is enabled, else ``keep_k``.

    A ``k`` set to anything else is a user error, as is a top-k rule that runs before a filter that can still
    drop images (a class could then end short although it has enough candidates).
    """
    he_k = filters.he.k if filters.he.enabled else None
    for key, k in (("filters.he.k", he_k), ("filters.keep_k.k", filters.keep_k.k)):
        if k is not None and k != target:
            raise UserError(f"{key}={k} but refill.target_per_class={target}: with refill the top-k per class is "
                            f"the target; set {key}={target} or leave it unset")
    data = filters.model_dump()
    if filters.he.enabled:
        data["he"]["k"] = target
    else:
        data["keep_k"]["k"] = target
    out = FiltersConfig.model_validate(data)
    selectors = ["he"] if out.he.enabled else []
    if out.keep_k.k is not None:
        selectors.append("keep_k")
    for s in selectors:
        if s not in out.order:
            raise UserError(f"refill selects the top {target} per class with '{s}', but filters.order leaves it "
                            f"out; add '{s}' to filters.order")
    droppers = [name for name, on in (("degenerate", out.degenerate.enabled),
                                      ("threshold", any(v is not None for v in out.threshold.model_dump().values())),
                                      ("quantile", out.quantile.score is not None), ("dedup", out.dedup.enabled))
                if on and name in out.order]
    first_select = min(out.order.index(s) for s in selectors)
    late = [d for d in droppers if out.order.index(d) > first_select]
    if late:
        raise UserError(f"filters.order runs {', '.join(late)} after the top-k rule; with refill the top-k must "
                        f"come last so that every class ends with exactly {target} images")
    return out


def _source_info(source: Path) -> dict:
    info = read_dataset_json(source)
    if info.get("format") != GENERATED_FORMAT or "plan" not in info or "images_per_class" not in info:
        raise UserError(f"refill needs a source folder made by synclone generate (its dataset.json names the plan "
                        f"that new images continue); '{source}' is not one: curate it without refill")
    if info.get("extend"):
        raise UserError(f"'{source}' is itself a top-up (its dataset.json has 'extend'); refill the dataset it "
                        "tops up instead")
    return info


def load_generate_config(rc: RefillConfig, source: Path, info: dict, space: LabelSpace):
    """The validated config that made the source (``extend`` unset); its classes must be the source's, in order."""
    if rc.generate_config is None:
        path = source / "config.yaml"
        if not path.is_file():
            raise UserError(f"refill: '{path}' is missing; set refill.generate_config to the generate config that "
                            "made the source dataset")
        data, where = load_yaml(path), str(path)
    elif isinstance(rc.generate_config, str):
        data, where = load_yaml(rc.generate_config), rc.generate_config
    else:
        data, where = dict(rc.generate_config), "refill.generate_config"
    gen = validate(GenerateConfig, apply_overrides(data, rc.generate_overrides), source=where)
    if gen.extend is not None:
        raise UserError(f"{where}: a refill's generate config must not set 'extend' (the rounds set it)")
    if gen.images_per_class != int(info["images_per_class"]):
        raise UserError(f"{where} has images_per_class={gen.images_per_class} but '{source}' was made with "
                        f"{info['images_per_class']}: use the config that made the source")
    classes = _generate_classes(gen)
    if classes != list(space.classes):
        raise UserError(f"{where} makes the classes {classes[:5]}... but '{source}' has {list(space.classes)[:5]}...: "
                        "new ids continue the source's numbering, so the classes (and their order) must match")
    return gen


def _generate_classes(gen) -> list[str]:
    backend = None
    if gen.labels is None:  # the generator's own classes (classcond): ask the backend, without loading weights

        backend = create_backend(gen.generator, "cpu")
    return list(resolve_labels(gen.labels, backend).classes)


# --- the state file ------------------------------------------------------------------------------------


def _write_json(path: Path, data: dict) -> None:
    write_json_atomic(path, data)


@dataclass
class RefillState:
    """``<output>/refill/refill.json``: who the rounds belong to and every round made or started."""
    root: Path
    source: dict
    fingerprint: str
    rounds: list[dict] = field(default_factory=list)

    @classmethod
    def open(cls, root: Path, source: dict, fingerprint: str) -> RefillState:
        path = root / STATE_FILE
        if not path.is_file():
            if root.is_dir() and any(root.iterdir()):
                raise UserError(f"'{root}' exists without {STATE_FILE}; it is not a refill folder: move it away")
            return cls(root, source, fingerprint)
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != STATE_FORMAT:
            raise UserError(f"'{path}' is not a refill record ({STATE_FORMAT})")
        state = cls(root, data["source"], data["fingerprint"], data["rounds"])
        if state.rounds and state.source != source:
            raise UserError(f"'{root}' holds refill images of another source dataset; curate into another output "
                            f"folder, or delete '{root}' to refill from scratch")
        if state.rounds and state.fingerprint != fingerprint:
            raise UserError(f"'{root}' was filled with another generate config (fingerprint {state.fingerprint}, now "
                            f"{fingerprint}); use the same refill.generate_config and overrides, or delete '{root}'")
        state.source, state.fingerprint = source, fingerprint
        return state

    def save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        _write_json(self.root / STATE_FILE, {"format": STATE_FORMAT, "source": self.source,
                                             "fingerprint": self.fingerprint, "rounds": self.rounds})

    def next_image(self, classes: tuple[str, ...], images_per_class: int) -> dict[str, int]:
        """Per class, the first image index no earlier plan or round has used."""
        nxt = {c: images_per_class for c in classes}
        for r in self.rounds:
            for c, (start, count) in r["ranges"].items():
                nxt[c] = max(nxt[c], start + count)
        return nxt


# --- the loop ------------------------------------------------------------------------------------------


def round_sizes(kept: dict[str, int], pool: dict[str, int], target: int, rc: RefillConfig) -> dict[str, int]:
    """New images per short class: the missing count divided by the class's keep rate so far (floored)."""
    sizes = {}
    for c, k in kept.items():
        if k >= target:
            continue
        rate = k / pool[c] if pool[c] else 1.0
        # The epsilon keeps float noise (3 / 0.3 = 10.000000000000002) from asking for one image more.
        n = math.ceil((target - k) / max(rate, rc.min_keep_rate) - 1e-9)
        sizes[c] = min(n, rc.max_per_round) if rc.max_per_round else n
    return sizes


class Refill:
    """A validated refill: built before any scoring (so bad settings fail fast), then :meth:`run`."""

    def __init__(self, cfg: CurateConfig, records: list[ImageRecord], space: LabelSpace):
        assert cfg.refill is not None
        self.cfg, self.rc, self.space = cfg, cfg.refill, space
        self.target = self.rc.target_per_class
        self.source_dir = Path(cfg.input)
        self.filters = selection_filters(cfg.filters, self.target)
        self.info = _source_info(self.source_dir)
        self.gen = load_generate_config(self.rc, self.source_dir, self.info, space)
        self.images_per_class = int(self.info["images_per_class"])
        self.source_records = [_with_round(r, 0) for r in records]
        self.source_key = {"plan_sha256": self.info["plan"]["sha256"], "images_per_class": self.images_per_class,
                           "classes": list(space.classes)}

    def round_config(self, rnd: dict, root: Path):
        data = self.gen.model_dump(mode="json")
        data.update(output=str(root / rnd["folder"]), progress=self.cfg.progress,
                    extend={c: {"start": s, "count": n} for c, (s, n) in rnd["ranges"].items()})
        return GenerateConfig.model_validate(data)

    def _make_round(self, rnd: dict, root: Path) -> list[ImageRecord]:
        """Generate (or finish, or just read) round ``rnd``; its records, tagged with the round number."""
        folder = root / rnd["folder"]
        info = read_dataset_json(folder) if folder.is_dir() else {}
        want = {c: {"start": s, "count": n} for c, (s, n) in rnd["ranges"].items()}
        if info and info.get("extend") != want:
            raise UserError(f"'{folder}' does not hold the images {STATE_FILE} records for round {rnd['round']}; "
                            f"delete '{root}' to refill from scratch")
        if not ("counts" in info and (folder / "train" / METADATA).is_file()):

            log.info("refill round %d: generating %s", rnd["round"], {c: n for c, (_, n) in rnd["ranges"].items()})
            generate(self.round_config(rnd, root))
        recs, space = read_dataset_folder(folder)
        if tuple(space.classes) != tuple(self.space.classes):
            raise UserError(f"'{folder}' has other classes than the source dataset")
        return [_with_round(r, rnd["round"]) for r in recs]

    def run(self, out: Path, evaluate: Evaluate) -> tuple[list[ImageRecord], object, pd.DataFrame, list[dict], dict]:
        """Refill into ``out/refill`` until full or ``max_rounds``; the final pool, its scores, table, log and the
        ``refill`` section of the curated dataset.json."""
        root = out / REFILL_DIR
        state = RefillState.open(root, self.source_key, self.gen.fingerprint())
        classes = self.space.classes
        pool = list(self.source_records)
        for rnd in state.rounds:  # made by earlier runs; the last may be unfinished (resume it)
            pool += self._make_round(rnd, root)
        evaluations = 0
        while True:
            _check_unique(pool)
            result, table, steps = evaluate(pool)
            evaluations += 1
            kept, sizes = _class_counts(table, classes, kept_only=True), _class_counts(table, classes)
            todo = round_sizes(kept, sizes, self.target, self.rc)
            if not todo or len(state.rounds) >= self.rc.max_rounds:
                break
            start = state.next_image(classes, self.images_per_class)
            n = len(state.rounds) + 1
            rnd = {"round": n, "folder": f"round-{n:03d}", "ranges": {c: [start[c], k] for c, k in todo.items()},
                   "kept_before": kept, "pool_before": sizes}
            state.rounds.append(rnd)
            state.save()  # before any image: a rerun resumes this round with these ranges
            pool += self._make_round(rnd, root)
        short = {c: k for c, k in kept.items() if k < self.target}
        if short:
            listed = ", ".join(f"'{c}' {k}" for c, k in short.items())
            msg = (f"refill: {len(short)} class(es) still short of {self.target} images after {len(state.rounds)} "
                   f"round(s) (refill.max_rounds={self.rc.max_rounds}): {listed}; raise refill.max_rounds or "
                   "loosen the filters")
            log.warning(msg)
            warnings.warn(msg, RefillIncomplete, stacklevel=3)
        section = self._section(state, pool, table, kept, short, evaluations)
        table = table.assign(**{ROUND_KEY: [r.meta[ROUND_KEY] for r in pool]})  # a column of curation.parquet
        return pool, result, table, steps, section

    def _section(self, state: RefillState, pool: list[ImageRecord], table: pd.DataFrame, kept: dict[str, int],
                 short: dict[str, int], evaluations: int) -> dict:
        """Per round: images asked for, made, skipped and kept in the final selection, per class."""
        classes = self.space.classes
        rounds_of = np.array([r.meta[ROUND_KEY] for r in pool])
        labels = table["label"].to_numpy()
        is_kept = table["kept"].to_numpy(dtype=bool)

        def per_class(mask: np.ndarray) -> dict[str, int]:
            counts = np.bincount(labels[mask], minlength=len(classes))
            return {c: int(n) for c, n in zip(classes, counts, strict=True)}

        src_counts = self.info.get("counts", {})
        rounds = [{"round": 0, "folder": str(self.source_dir), "generated": per_class(rounds_of == 0),
                   "skipped": int(src_counts.get("skipped", 0)), "kept": per_class((rounds_of == 0) & is_kept)}]
        for rnd in state.rounds:
            info = read_dataset_json(state.root / rnd["folder"])
            mine = rounds_of == rnd["round"]
            rounds.append({"round": rnd["round"], "folder": f"{REFILL_DIR}/{rnd['folder']}",
                           "requested": {c: n for c, (_, n) in rnd["ranges"].items()},
                           "image_index": {c: [s, s + n - 1] for c, (s, n) in rnd["ranges"].items()},
                           "generated": per_class(mine), "skipped": int(info.get("counts", {}).get("skipped", 0)),
                           "kept": per_class(mine & is_kept), "kept_before": rnd["kept_before"]})
        return {**self.rc.model_dump(mode="json"), "folder": REFILL_DIR, "generate_fingerprint": state.fingerprint,
                "matches_source_config": state.fingerprint == self.info.get("config_fingerprint"),
                "full": not short, "short": short, "kept": kept, "evaluations": evaluations, "rounds": rounds}


def _with_round(r: ImageRecord, n: int) -> ImageRecord:
    return ImageRecord(r.id, r.path, r.label, r.class_name, r.file_name, {**r.meta, ROUND_KEY: n})


def _class_counts(table: pd.DataFrame, classes: tuple[str, ...], kept_only: bool = False) -> dict[str, int]:
    labels = table["label"].to_numpy()
    if kept_only:
        labels = labels[table["kept"].to_numpy(dtype=bool)]
    counts = np.bincount(labels, minlength=len(classes))
    return {c: int(n) for c, n in zip(classes, counts, strict=True)}


def _check_unique(pool: list[ImageRecord]) -> None:
    seen: set[str] = set()
    for r in pool:
        if r.id in seen:  # would mean a reused plan id: never silently merge two images under one id
            raise UserError(f"image id '{r.id}' appears twice in the source and its refill rounds")
        seen.add(r.id)
