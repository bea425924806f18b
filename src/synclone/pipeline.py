"""``synclone run``: one recipe chains generate -> curate -> train -> evaluate -> report.

A recipe names the stages' configs; references tie them together (``@generated.<name>``,
``@curated``, ``@teacher``, ``@train.<name>``). Each stage writes ``stage.json`` with a hash of its
resolved config when it finishes: a later run skips a finished stage whose config is unchanged,
resumes an unfinished one (generation and training resume exactly), and refuses to overwrite a
finished stage whose config changed (nothing already made is lost; the message says which folder to
remove). Evaluation and the report are derived data and are simply redone when their inputs change.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from synclone.config import StrictModel, apply_overrides, load_yaml, validate, write_run_info
from synclone.errors import UserError

STAGE_JSON = "stage.json"


class Recipe(StrictModel):
    """A whole experiment. Stage sections hold the configs of the matching commands, without their folders."""

    output: str = "runs/experiment"
    title: str = "synclone experiment"
    generate: dict[str, dict[str, Any]] = Field(default_factory=dict, description="name -> generate config")
    teacher: dict[str, Any] | None = Field(None, description="train config of a curation teacher (real subset)")
    curate: dict[str, Any] | None = Field(None, description="curate config; input e.g. '@generated.train'")
    train: dict[str, dict[str, Any]] = Field(default_factory=dict, description="model name -> train config")
    evaluate: dict[str, Any] = Field(default_factory=dict, description="evaluate config (models are added)")
    report: dict[str, Any] = Field(default_factory=dict, description="report options (title)")


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """A recipe from YAML with dotted overrides (``train.real.optim.steps=100``)."""
    return validate(Recipe, apply_overrides(load_yaml(path), overrides or []), source=str(path))


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Refs:
    """Resolves ``@...`` references to the folders of the stages that make them."""

    def __init__(self, out: Path, recipe: Recipe) -> None:
        self.map = {f"@generated.{n}": out / "generated" / n for n in recipe.generate}
        if recipe.curate is not None:
            self.map["@curated"] = out / "curated"
        if recipe.teacher is not None:
            self.map["@teacher"] = out / "teacher" / "model"
        self.map.update({f"@train.{n}": out / "train" / n / "model" for n in recipe.train})

    def resolve(self, obj: Any, where: str) -> Any:
        if isinstance(obj, dict):
            return {k: self.resolve(v, f"{where}.{k}") for k, v in obj.items()}
        if isinstance(obj, list):
            return [self.resolve(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        if isinstance(obj, str) and obj.startswith("@"):
            if obj not in self.map:
                raise UserError(f"{where}: unknown reference '{obj}'; this recipe defines "
                                f"{', '.join(sorted(self.map)) or 'none'}")
            return str(self.map[obj])
        return obj


class Stage:
    """One step of the chain: its folder, resolved config, and how to run it."""

    def __init__(self, name: str, folder: Path, cfg: Any, run: Any, derived: bool = False,
                 estimate_s: float = 0.0, upstream: list[str] | None = None) -> None:
        self.name, self.folder, self.cfg, self._run, self.derived = name, folder, cfg, run, derived
        self.estimate_s = estimate_s
        self.hash = _hash([cfg.model_dump(mode="json"), upstream or []])

    def state(self) -> str:
        """'done' (finished with this config), 'changed' (finished with another), 'partial' or 'new'."""
        p = self.folder / STAGE_JSON
        if p.is_file():
            try:
                rec = json.loads(p.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                return "partial"
            return "done" if rec.get("hash") == self.hash else "changed"
        return "partial" if self.folder.exists() else "new"

    def run(self) -> float:
        state = self.state()
        if state == "done":
            return 0.0
        if state == "changed":
            if not self.derived:
                raise UserError(f"stage '{self.name}' in '{self.folder}' was made with another config; remove that "
                                "folder to redo it, or set a new recipe output")
            shutil.rmtree(self.folder)
        t0 = time.perf_counter()
        self._run(self.cfg, resume=state == "partial")
        took = time.perf_counter() - t0
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / STAGE_JSON).write_text(json.dumps({"stage": self.name, "hash": self.hash,
                                                          "seconds": round(took, 1)}) + "\n", encoding="utf-8")
        return took


def plan(recipe: Recipe) -> list[Stage]:
    """The stages of ``recipe`` in order, with validated configs (every config error surfaces here)."""
    from synclone.curate import CurateConfig
    from synclone.evaluate import EvaluateConfig
    from synclone.generate import GenerateConfig
    from synclone.train import TrainConfig

    out = Path(recipe.output)
    refs = _Refs(out, recipe)
    stages: list[Stage] = []
    for name, raw in recipe.generate.items():
        cfg = validate(GenerateConfig, {**refs.resolve(raw, f"generate.{name}"),
                                        "output": str(out / "generated" / name)}, f"recipe generate.{name}")
        stages.append(Stage(f"generate.{name}", Path(cfg.output), cfg, _run_generate,
                            estimate_s=_gen_estimate(cfg)))
    if recipe.teacher is not None:
        cfg = validate(TrainConfig, {**refs.resolve(recipe.teacher, "teacher"), "output": str(out / "teacher")},
                       "recipe teacher")
        stages.append(Stage("teacher", out / "teacher", cfg, _run_train, estimate_s=_train_estimate(cfg)))
    if recipe.curate is not None:
        raw = refs.resolve(recipe.curate, "curate")
        cfg = validate(CurateConfig, {**raw, "output": str(out / "curated"), "overwrite": True}, "recipe curate")
        stages.append(Stage("curate", out / "curated", cfg, _run_curate, estimate_s=20.0))
    for name, raw in recipe.train.items():
        cfg = validate(TrainConfig, {**refs.resolve(raw, f"train.{name}"), "output": str(out / "train" / name)},
                       f"recipe train.{name}")
        stages.append(Stage(f"train.{name}", out / "train" / name, cfg, _run_train,
                            estimate_s=_train_estimate(cfg)))
    if recipe.train:
        raw = refs.resolve(recipe.evaluate, "evaluate")
        models = {n: str(out / "train" / n / "model") for n in recipe.train}
        cfg = validate(EvaluateConfig, {**raw, "models": {**models, **raw.get("models", {})},
                                        "output": str(out / "eval")}, "recipe evaluate")
        cfg.probe_settings()
        # The evaluation hash also covers the models' training stages, so a retrained model is re-evaluated.
        stages.append(Stage("evaluate", out / "eval", cfg, _run_evaluate, derived=True, estimate_s=120.0,
                            upstream=[s.hash for s in stages]))
        report_cfg = ReportStage(output=str(out), title=recipe.report.get("title", recipe.title),
                                 eval_dir=str(out / "eval"),
                                 curation=str(out / "curated") if recipe.curate is not None else None,
                                 datasets=[str(out / "generated" / n) for n in recipe.generate],
                                 train_runs={n: str(out / "train" / n) for n in recipe.train},
                                 upstream=_hash([s.hash for s in stages]))
        stages.append(Stage("report", out / "report", report_cfg, _run_report, derived=True, estimate_s=15.0))
    return stages


class ReportStage(StrictModel):
    output: str
    title: str
    eval_dir: str
    curation: str | None = None
    datasets: list[str] = Field(default_factory=list)
    train_runs: dict[str, str] = Field(default_factory=dict)
    upstream: str = ""


def _gen_estimate(cfg: Any) -> float:
    # The built-in generator makes ~25 images/s on 2 cores at 10 steps (bench/RESULTS.md); others are slower.
    rate = 25.0 * 10 / max(cfg.generator.steps or 10, 1) if cfg.generator.backend == "classcond" else 0.05
    n = cfg.images_per_class * (len(cfg.labels) if isinstance(cfg.labels, list) else 10)
    return n / rate


def _train_estimate(cfg: Any) -> float:
    steps = cfg.optim.steps or cfg.optim.epochs * 60000 // cfg.optim.batch_size
    return steps * cfg.optim.batch_size / 2500.0  # synclone_cnn_small trains ~2.5k images/s on 2 cores


def _disk_estimate(stage: Stage) -> float:
    """Bytes a stage will write, roughly: PNGs (compressed ~half of raw pixels), checkpoints, caches."""
    kind = stage.name.split(".")[0]
    if kind == "generate":
        cfg = stage.cfg
        h, w = (cfg.generator.height or 28, cfg.generator.width or 28) if cfg.generator.backend == "classcond" else (
            cfg.generator.height or 512, cfg.generator.width or 512)
        n = cfg.images_per_class * (len(cfg.labels) if isinstance(cfg.labels, list) else 10)
        return n * (h * w * 3 * 0.5 + 600)  # + a metadata line per image
    if kind in ("train", "teacher"):
        return 20 * 2**20  # model, last model and the resumable checkpoint of a small CNN
    return 10 * 2**20


def _run_generate(cfg: Any, resume: bool) -> None:
    from synclone.generate import generate

    generate(cfg)


def _run_train(cfg: Any, resume: bool) -> None:
    from synclone.train import train

    train(cfg, resume=resume or (Path(cfg.output) / "checkpoints").is_dir(), progress=True)


def _run_curate(cfg: Any, resume: bool) -> None:
    from synclone.curate import curate

    curate(cfg)


def _run_evaluate(cfg: Any, resume: bool) -> None:
    from synclone.evaluate import evaluate

    evaluate(cfg)


def _run_report(cfg: ReportStage, resume: bool) -> None:
    from synclone.report import build_report

    build_report([Path(cfg.eval_dir)], Path(cfg.output), title=cfg.title,
                 curation=Path(cfg.curation) if cfg.curation else None,
                 datasets=[Path(d) for d in cfg.datasets], train_runs={k: Path(v) for k, v in cfg.train_runs.items()})


def _generated_space(cfg: Any) -> Any:
    """The label space a generate stage will produce, known before generating."""
    import json as _json

    from synclone.generate.hub import resolve_model
    from synclone.labels import LabelSpace, get_label_space

    folder = Path(resolve_model(cfg.generator.model, marker="model_index.json", what="generator").location)
    meta = folder / "synclone.json"
    own = LabelSpace.from_dict(_json.loads(meta.read_text(encoding="utf-8"))["label_space"]) if meta.is_file() else None
    if isinstance(cfg.labels, list):
        space = LabelSpace.from_names([str(c) for c in cfg.labels], name="custom")
    elif isinstance(cfg.labels, str):
        space = get_label_space(cfg.labels)
    elif own is not None:
        return own
    else:
        raise UserError(f"generator '{cfg.generator.model}' has no label space of its own: set 'labels' in its stage")
    if cfg.generator.backend == "classcond" and own is not None:
        missing = [c for c in space.classes if c not in own.classes]
        if missing:
            raise UserError(f"class-conditional generator '{cfg.generator.model}' cannot make "
                            f"{', '.join(map(repr, missing[:5]))}: it knows {own.describe()}")
    return space


def _data_space(spec: str | None, spaces: dict[str, Any], where: str) -> Any:
    """Label space of a dataset spec: a built-in, the output of an earlier stage, or an existing folder."""
    from synclone.data.sources import BUILTIN
    from synclone.labels import BUILTIN_SPACES

    if spec is None:
        return None
    name = spec.partition(":")[0]
    if name in BUILTIN:
        return BUILTIN_SPACES[name]
    for folder, space in spaces.items():
        if Path(spec) == Path(folder):
            return space
    if not Path(spec).is_dir():
        raise UserError(f"{where}: dataset '{spec}' is neither a built-in ({', '.join(sorted(BUILTIN))}), the output "
                        "of a stage of this recipe, nor an existing folder")
    from synclone.curate.folder import read_dataset_folder

    return read_dataset_folder(spec)[1]


def check(recipe: Recipe, stages: list[Stage]) -> None:
    """What can be checked before work starts: data present, generators found, folders exist, labels aligned."""
    from synclone.data.fashion_mnist import locate
    from synclone.models.io import read_model_config

    if any("fashion_mnist" in json.dumps(s.cfg.model_dump(mode="json")) for s in stages):
        locate("train")
        locate("test")
    spaces: dict[str, Any] = {}  # stage output folder -> the label space it will hold
    for s in stages:
        kind = s.name.split(".")[0]
        if kind == "generate":
            spaces[str(s.folder)] = _generated_space(s.cfg)
        elif kind == "curate":
            src = _data_space(s.cfg.input, spaces, "curate.input")
            spaces[str(s.folder)] = src
            model = s.cfg.scorer.model
            if s.cfg.scorer.kind == "teacher" and str(Path(model).parent) not in spaces and not Path(model).is_dir():
                raise UserError(f"curate.scorer.model: teacher folder '{model}' does not exist")
        elif kind in ("teacher", "train"):
            real = _data_space(s.cfg.data.real, spaces, f"{s.name}.data.real")
            syn = _data_space(s.cfg.data.synthetic, spaces, f"{s.name}.data.synthetic")
            if real is not None and syn is not None:
                real.check_aligned(syn, f"{s.name}'s real data", f"{s.name}'s synthetic data")
            spaces[str(s.folder)] = real if real is not None else syn
        elif kind == "evaluate":
            clean = _data_space(s.cfg.data, spaces, "evaluate.data")
            for name, folder in s.cfg.models.items():
                run = str(Path(folder).parent)
                space = spaces[run] if run in spaces else _external_model_space(folder, read_model_config)
                space.check_aligned(clean, f"model '{name}'", f"evaluation data '{s.cfg.data}'")
            for name, settings in s.cfg.probe_settings():
                for spec in getattr(settings, "datasets", None) or []:
                    if name == "shift":
                        _data_space(spec, spaces, "evaluate.probes.shift.datasets")
                    elif not Path(spec).is_dir() and not _is_builtin(spec):
                        raise UserError(f"evaluate.probes.{name}.datasets: '{spec}' is neither a built-in nor a "
                                        "folder")


def _external_model_space(folder: str, read_model_config: Any) -> Any:
    from synclone.labels import LabelSpace

    return LabelSpace.from_dict(read_model_config(folder)["label_space"])


def _is_builtin(spec: str) -> bool:
    from synclone.data.sources import BUILTIN
    from synclone.evaluate.datasets import OOD_BUILTINS

    return spec.partition(":")[0] in (*BUILTIN, *OOD_BUILTINS)


def run_recipe(recipe: Recipe, dry_run: bool = False) -> Path:
    """Run (or with ``dry_run`` only check and print) the recipe; returns the report path or the output folder."""
    stages = plan(recipe)
    check(recipe, stages)
    out = Path(recipe.output)
    lines = [f"recipe -> {out}"]
    total = disk = 0.0
    for s in stages:
        st = s.state()
        est = 0.0 if st == "done" else s.estimate_s
        total += est
        disk += 0 if st == "done" else _disk_estimate(s)
        lines.append(f"  {s.name:<26} {st:<8} ~{est / 60:5.1f} min  {s.folder}")
    lines.append(f"  estimated: ~{total / 60:.1f} min on a 2-core CPU, ~{disk / 2**20:.0f} MB of disk")
    print("\n".join(lines), flush=True)
    if dry_run:
        return out
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(json.dumps(recipe.model_dump(mode="json"), indent=2), encoding="utf-8")
    write_run_info(out, recipe)
    times = {}
    for s in stages:
        print(f"== {s.name}", flush=True)
        times[s.name] = round(s.run(), 1)
    (out / "timings.json").write_text(json.dumps(times, indent=2) + "\n", encoding="utf-8")
    return out / "report.html" if (out / "report.html").is_file() else out


def demo_recipe(output: str = "runs/demo", quick: bool = False) -> Recipe:
    """The built-in Fashion-MNIST synthetic-clone experiment (``recipes/demo.yaml`` holds the same)."""
    from importlib import resources

    import yaml

    name = "demo_quick.yaml" if quick else "demo.yaml"
    data = yaml.safe_load((resources.files("synclone") / "recipes" / name).read_text(encoding="utf-8"))
    data["output"] = output
    return validate(Recipe, data, source=f"built-in recipe {name}")
