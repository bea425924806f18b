"""One generation run's state on disk: its config, plan, backend and dataset record (local and Ray executors)."""

from __future__ import annotations

import json
from pathlib import Path

from synclone.config import package_versions
from synclone.errors import UserError
from synclone.generate.backends import Backend, create_backend
from synclone.generate.config import GenerateConfig
from synclone.generate.plan import PLAN_FILE, PlanSummary, build_plan, write_plan
from synclone.generate.writer import (
    DATASET_JSON,
    read_dataset_json,
)
from synclone.labels import LabelSpace, get_label_space
from synclone.prompts import PromptStrategy, create_strategy
from synclone.util.files import file_sha256
from synclone.util.lock import LOCK_NAME

DRY_RUN_JSON = "dry_run.json"
FORMAT = "synclone-generated-dataset"
FORMAT_VERSION = 1
_OWN_FILES = {PLAN_FILE, PLAN_FILE + ".tmp", DRY_RUN_JSON, LOCK_NAME}


# A PNG of generated content compresses to about half its raw pixels; each image also gets a metadata line.
PNG_RATIO, ROW_BYTES = 0.5, 600


def estimated_bytes(cfg: GenerateConfig, images: int, folder: str | Path | None = None) -> float:
    """Bytes ``images`` images of ``cfg`` take on disk: measured by the dry run (``dry_run.json`` in ``folder``)
    when it ran, else raw pixels x :data:`PNG_RATIO` (the recipe's dry run and the full-disk message use this)."""
    if folder is not None:
        try:
            per_image = float(json.loads((Path(folder) / DRY_RUN_JSON).read_text(encoding="utf-8"))["bytes_per_image"])
            if per_image > 0:
                return images * (per_image + ROW_BYTES)
        except (OSError, ValueError, KeyError, TypeError):
            pass
    g = cfg.generator
    default = 28 if g.backend == "classcond" else 512
    return images * ((g.height or default) * (g.width or default) * 3 * PNG_RATIO + ROW_BYTES)


def resolve_labels(labels: str | list[str] | None, backend: Backend) -> LabelSpace:
    """The configured label space, or the generator's own one when ``labels`` is not set."""
    if labels is None:
        own = backend.label_space()
        if own is None:
            raise UserError("labels: give a built-in label space name, a .json/.txt file or a list of class names")
        return own
    if isinstance(labels, list):
        return LabelSpace.from_names([str(c) for c in labels], name="custom")
    return get_label_space(labels)


def extension_ranges(cfg: GenerateConfig, labels: LabelSpace) -> dict[int, tuple[int, int]] | None:
    """``cfg.extend`` as label -> (start, count); ``None`` for an ordinary plan. Unknown classes are user errors."""
    if cfg.extend is None:
        return None
    ranges: dict[int, tuple[int, int]] = {}
    for name, r in cfg.extend.items():
        try:
            label = labels.index(name)
        except UserError:
            raise UserError(f"extend names class '{name}', which is not in the label space ({labels.describe()}); "
                            f"use the dataset's class names") from None
        if label in ranges:
            raise UserError(f"extend names class '{labels.classes[label]}' twice (by name and by slug)")
        ranges[label] = (r.start, r.count)
    if not any(c for _, c in ranges.values()):
        raise UserError("extend asks for no images (every count is 0)")
    return ranges


class GenerationRun:
    """The validated pieces of one run, shared by the real run and the dry run."""

    def __init__(self, cfg: GenerateConfig, device: str):
        self.cfg = cfg
        self.backend = create_backend(cfg.generator, device)
        self.labels = resolve_labels(cfg.labels, self.backend)
        self.backend.check_labels(self.labels)
        self.strategy: PromptStrategy = create_strategy(cfg.prompts, self.labels, cfg.seed)
        self.references = self.backend.references(self.labels)
        self.ranges = extension_ranges(cfg, self.labels)
        self.out = Path(cfg.output)
        self.plan_path = self.out / PLAN_FILE

    def existing(self) -> dict | None:
        """dataset.json of an earlier run of the same config, or ``None`` for a fresh folder."""
        if (self.out / DATASET_JSON).is_file():
            info = read_dataset_json(self.out)
            if info.get("config_fingerprint") != self.cfg.fingerprint():
                raise UserError(
                    f"output folder '{self.out}' holds a dataset made with a different config: use the same config "
                    f"to resume it, or choose a new output folder"
                )
            return info
        if self.out.exists() and not self.out.is_dir():
            raise UserError(f"output '{self.out}' is a file, not a folder")
        if self.out.is_dir():
            foreign = sorted(p.name for p in self.out.iterdir() if p.name not in _OWN_FILES)
            if foreign:
                raise UserError(
                    f"output folder '{self.out}' is not empty and is not a synclone dataset ({DATASET_JSON} is "
                    f"missing; found {', '.join(foreign[:3])}): choose a new or empty folder"
                )
        return None

    def write_plan(self) -> tuple[PlanSummary, dict]:
        prompt_info = self.strategy.prepare(self.cfg.images_per_class)
        self.out.mkdir(parents=True, exist_ok=True)
        jobs = build_plan(self.labels, self.strategy, self.cfg.images_per_class, self.cfg.seed,
                          self.cfg.prompts.negative_prompt, self.references, self.ranges)
        return write_plan(self.plan_path, jobs), prompt_info

    def ensure_plan(self, info: dict) -> None:
        """On resume: the plan file must be the one ``dataset.json`` recorded (rebuilt if it went missing)."""
        want = info["plan"]["sha256"]
        if self.plan_path.is_file() and file_sha256(self.plan_path) == want:
            return
        summary, _ = self.write_plan()
        if summary.sha256 != want:
            raise UserError(
                f"'{self.plan_path}' no longer matches {DATASET_JSON} and rebuilding it gave a different plan (a "
                f"changed prompt file or caption model?): restore it or start a new output folder"
            )

    def dataset_info(self, plan: PlanSummary, prompt_info: dict) -> dict:
        extend = {"extend": {c: r.model_dump() for c, r in self.cfg.extend.items()}} if self.cfg.extend else {}
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "label_space": self.labels.to_dict(),
            "generator": self.backend.describe(),
            "prompts": {**self.cfg.prompts.model_dump(mode="json"), "info": prompt_info},
            "images_per_class": self.cfg.images_per_class,
            "seed": self.cfg.seed,
            "batch_size": self.cfg.batch_size,
            "plan": {"file": PLAN_FILE, **plan.to_dict()},
            "config_fingerprint": self.cfg.fingerprint(),
            **extend,
            "versions": package_versions(),
        }


def check_same_generator(recorded: dict, current: dict, out: Path) -> None:
    """A resumed run must load the same model (revision, scheduler, steps...) as the run that started it."""
    changed = [k for k in recorded if recorded.get(k) != current.get(k)]
    if changed:
        k = changed[0]
        raise UserError(
            f"the generator differs from the one '{out}' was started with ({k}: {recorded.get(k)!r} then, "
            f"{current.get(k)!r} now): restore that model or start a new output folder"
        )
