"""A recipe and its stages: the typed recipe file, references between stages, and each stage's resolved config.

:func:`plan` turns a :class:`Recipe` into the ordered :class:`Stage` list that :mod:`synclone.recipe.run`
executes and :mod:`synclone.recipe.check` checks; errors are raised at once or collected in :class:`Problems`.

``synclone run``: one recipe chains generate -> curate -> train -> evaluate -> report.

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
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from pydantic import Field

from synclone.config import StrictModel, apply_overrides, load_yaml, validate
from synclone.errors import MissingResource, UserError
from synclone.util.files import write_text_atomic

STAGE_JSON = "stage.json"


class Problems:
    """Collects :class:`UserError` messages (``collect=True``) or lets the first one through.

    ``missing`` holds what this machine lacks (:class:`MissingResource`: weights, datasets, checkpoints),
    ``errors`` the mistakes in the recipe itself (configs, references, label spaces).
    """

    def __init__(self, collect: bool = True) -> None:
        self.collect = collect
        self.errors: list[str] = []
        self.missing: list[str] = []

    @property
    def items(self) -> list[str]:
        return self.errors + self.missing

    @contextmanager
    def catch(self, where: str = "") -> Iterator[None]:
        try:
            yield
        except UserError as err:
            if not self.collect:
                raise
            msg = str(err)
            line = f"{where}: {msg}" if where and not msg.startswith(where) else msg
            (self.missing if isinstance(err, MissingResource) else self.errors).append(line)

    def __bool__(self) -> bool:
        return bool(self.items)


Scalar = str | int | float | bool | None


class SweepSettings(StrictModel):
    """A recipe's ``sweep:`` section: what ``synclone sweep`` varies and draws (its options add to it).

    ``grid``: variable -> values (every combination is one run); ``seeds``: values of the ``seed`` variable, each
    grid point run once per seed; ``metrics``: what the report draws against each variable (see
    :mod:`synclone.report.sweep`); ``models``: the models drawn (default: every evaluated model).
    """

    grid: dict[str, list[Scalar]] = Field(default_factory=dict)
    seeds: list[int] | None = None
    metrics: list[str] = Field(default_factory=list)
    models: list[str] | None = None


class Recipe(StrictModel):
    """A whole experiment. Stage sections hold the configs of the matching commands, without their folders.

    ``vars`` are substituted for ``${name}`` in every other string of the recipe (after overrides, so
    ``vars.dataset=eurosat`` on the command line re-targets the whole recipe). A ``train`` entry's
    ``kind`` picks the trainer: ``supervised`` (default), ``classifier-tuning``, ``linear-probe``,
    ``fewshot`` (with ``shots``, ``seeds`` and ``eval_data``), or ``pretrained`` (import a trained timm
    classifier, :mod:`synclone.models.pretrained`, e.g. the real-data baselines of a benchmark).
    """

    vars: dict[str, Scalar] = Field(default_factory=dict, description="${name} substitutions")
    output: str = "runs/experiment"
    title: str = "synclone experiment"
    domain: dict[str, Any] | None = Field(None, description="a shifted real domain made from Fashion-MNIST "
                                          "(synclone.data.shifted): @domain.shots, @domain.references, @domain.test")
    finetune: dict[str, dict[str, Any]] = Field(default_factory=dict, description="name -> generator finetune "
                                                "config; @finetuned.<name> is its adapter (or its pipeline, full)")
    generate: dict[str, dict[str, Any]] = Field(default_factory=dict, description="name -> generate config")
    teacher: dict[str, Any] | None = Field(None, description="train config of a curation teacher (real subset)")
    curate: dict[str, Any] | None = Field(None, description="curate config; input e.g. '@generated.train'")
    train: dict[str, dict[str, Any]] = Field(default_factory=dict, description="model name -> train config")
    evaluate: dict[str, Any] = Field(default_factory=dict, description="evaluate config (models are added)")
    report: dict[str, Any] = Field(default_factory=dict, description="report options (title)")
    inspect: dict[str, Any] | None = Field(None, description="dataset diagnostics (synclone inspect settings, e.g. "
                                           "features: '@train.real'); 'datasets' defaults to every generated and "
                                           "the curated set")
    quick: list[str] = Field(default_factory=list, description="overrides applied by --quick (a miniature run)")
    sweep: SweepSettings = Field(default_factory=SweepSettings, description="synclone sweep: grid of vars, seeds, "
                                 "metrics to draw")


def load_recipe(path: str | Path, overrides: list[str] | None = None, quick: bool = False) -> Recipe:
    """A recipe from YAML with dotted overrides (``train.real.optim.steps=100``) and ``${var}`` substitution.

    ``quick`` applies the recipe's own ``quick:`` overrides first (a minutes-long version of it)."""
    raw = load_yaml(path)
    if quick:
        if not raw.get("quick"):
            raise UserError(f"{path}: --quick needs a 'quick:' list of overrides in the recipe; this one has none")
        raw = apply_overrides(raw, [str(o) for o in raw["quick"]])
    raw = apply_overrides(raw, overrides or [])
    return validate(Recipe, substitute_vars(raw, str(path)), source=str(path))


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def substitute_vars(raw: dict, source: str = "recipe") -> dict:
    """``raw`` with ``${name}`` replaced by ``raw['vars'][name]`` in every string outside ``vars``.

    A string that is exactly one ``${name}`` takes the variable's own type (a number stays a number).
    """
    values = raw.get("vars") or {}
    if not isinstance(values, dict):
        raise UserError(f"{source}: 'vars' must be a mapping of names to values")
    values = dict(values)
    # Variables may use other variables (output: runs/${dataset}); resolve them first, refusing cycles.
    for _ in range(len(values) + 1):
        pending = {k: v for k, v in values.items() if isinstance(v, str) and _VAR.search(v)}
        if not pending:
            break
        for k, v in pending.items():
            names = _VAR.findall(v)
            unknown = [n for n in names if n not in values]
            if unknown:
                raise UserError(f"{source}: vars.{k} uses '${{{unknown[0]}}}' but vars has no '{unknown[0]}'")
            if all(not (isinstance(values[n], str) and _VAR.search(values[n])) for n in names):
                values[k] = _VAR.sub(lambda m: str(values[m.group(1)]), v)
    else:
        raise UserError(f"{source}: vars refer to each other in a cycle ({', '.join(sorted(pending))})")

    def sub(obj: Any, where: str) -> Any:
        if isinstance(obj, dict):
            return {k: sub(v, f"{where}.{k}" if where else str(k)) for k, v in obj.items()}
        if isinstance(obj, list):
            return [sub(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        if not isinstance(obj, str):
            return obj
        for name in _VAR.findall(obj):
            if name not in values:
                raise UserError(f"{source}: {where} uses '${{{name}}}' but vars has no '{name}' "
                                f"(defined: {', '.join(sorted(values)) or 'none'})")
        whole = _VAR.fullmatch(obj)
        if whole:
            return values[whole.group(1)]
        return _VAR.sub(lambda m: str(values[m.group(1)]), obj)

    return {k: (v if k == "vars" else sub(v, k)) for k, v in raw.items()}


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# The folders a plan writes into (the recipe's output, a sweep's store), each with the token that stands for it
# in stage hashes and store keys: set by :func:`plan` while it builds the stages.
_ROOTS: ContextVar[tuple[tuple[str, str], ...]] = ContextVar("synclone_plan_roots", default=())


def _roots(**folders: str | Path | None) -> tuple[tuple[str, str], ...]:
    """(path prefix, token) pairs for ``token=folder``, as written and resolved, longest prefix first."""
    pairs = {(str(form), f"@{token}") for token, folder in folders.items() if folder is not None
             for form in (Path(folder), Path(folder).resolve())}
    return tuple(sorted(pairs, key=lambda pair: -len(pair[0])))


def _portable(obj: Any, roots: tuple[tuple[str, str], ...]) -> Any:
    """``obj`` with every path inside one of ``roots`` written from its token (``@store/generate.train-...``)."""
    if isinstance(obj, dict):
        return {k: _portable(v, roots) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_portable(v, roots) for v in obj]
    if isinstance(obj, str):
        for prefix, token in roots:
            if obj == prefix or obj.startswith((prefix + "/", prefix + os.sep)):
                return token + obj[len(prefix):].replace(os.sep, "/")
    return obj


def _key(obj: Any) -> str:
    """The hash of a stage's config in which the plan's own folders are tokens.

    A finished run or sweep moved to another folder (or reached through another path) keeps its stage hashes and
    store keys, so nothing is redone: the config says what a stage makes, not where the whole run lives.
    """
    return _hash(_portable(obj, _ROOTS.get()))


TRAIN_KINDS = ("supervised", "classifier-tuning", "linear-probe", "fewshot", "pretrained", "pretrain", "knn",
               "transfer")
# Entries whose output is not a classifier to evaluate: a pre-trained backbone, a transfer table.
_NOT_EVALUATED = ("pretrain", "transfer")


def _evaluated(raw: dict) -> bool:
    return raw.get("kind", "supervised") not in _NOT_EVALUATED or raw.get("method") == "supervised"
_FEWSHOT_KEYS = ("shots", "seeds", "eval_data")
_FEWSHOT_KEYS = ("shots", "seeds", "eval_data")


def model_folders(run: Path, raw: dict) -> list[tuple[str, Path]]:
    """(suffix, model folder) of what a train entry makes: one model, or one per seed for ``fewshot``."""
    if raw.get("kind") == "fewshot":
        return [(f"_seed{s}", run / f"seed{s}" / "model") for s in raw.get("seeds", DEFAULT_SEEDS)]
    return [("", run / "model")]


DEFAULT_SEEDS = (0, 1, 2)


class FewshotStage(StrictModel):
    """A ``fewshot`` train entry: the supervised config, trained once per seed on ``shots`` real images per class."""

    train: Any
    shots: int | None = Field(10, ge=1, description="real images per class; null: all of the real source (a "
                              "folder of shots), less the validation split")
    seeds: list[int] = Field(default_factory=lambda: list(DEFAULT_SEEDS), min_length=1)
    eval_data: str = "fashion_mnist:test"


class _Refs:
    """Resolves ``@...`` references to the folders of the stages that make them."""

    def __init__(self, out: Path, recipe: Recipe) -> None:
        self.map = {f"@generated.{n}": out / "generated" / n for n in recipe.generate}
        if recipe.domain is not None:
            from synclone.data.shifted import SHOTS, TEST

            self.map.update({"@domain.shots": out / "domain" / SHOTS, "@domain.test": out / "domain" / TEST,
                             # one sub-folder of images per class: what real guidance reads
                             "@domain.references": out / "domain" / SHOTS / "train"})
        for n, raw in recipe.finetune.items():
            folder = out / "finetune" / n
            self.map[f"@finetuned.{n}"] = folder / "pipeline" if raw.get("method") == "full" else folder
        if recipe.curate is not None:
            self.map["@curated"] = out / "curated"
        if recipe.teacher is not None:
            self.map["@teacher"] = out / "teacher" / "model"
        self.map.update({f"@train.{n}": model_folders(out / "train" / n, raw)[0][1] for n, raw in recipe.train.items()})
        self.default = dict(self.map)  # where each reference points outside a store

    def name_of(self, ref: Any, folder: Path) -> str:
        """A short name for what ``ref`` names: the last part of its folder outside a store."""
        return Path(self.default[ref]).name if isinstance(ref, str) and ref in self.default else folder.name

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
        # Where a stage runs (executor) never changes its result, so it stays out of the hash.
        made_of = [cfg.model_dump(mode="json", exclude={"executor"}), upstream or []]
        self.hash = _key(made_of)
        # The hash of the releases whose hashes held the folders as they were: their finished stages stay done.
        self.legacy_hash = _hash(made_of)

    def _record(self) -> dict | None:
        try:
            return json.loads((self.folder / STAGE_JSON).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None

    def state(self) -> str:
        """'done' (finished with this config), 'changed' (finished with another), 'partial' or 'new'."""
        if (self.folder / STAGE_JSON).is_file():
            rec = self._record()
            if rec is None:
                return "partial"
            return "done" if rec.get("hash") in (self.hash, self.legacy_hash) else "changed"
        return "partial" if self.folder.exists() else "new"

    def recorded_seconds(self) -> float | None:
        """The seconds this stage took when it last ran, from its stage.json (None when unknown)."""
        return (self._record() or {}).get("seconds")

    def run(self) -> float | None:
        """Run the stage unless it is done; the seconds it took, or None when it was skipped."""
        state = self.state()
        if state == "done":
            rec = self._record() or {}
            if rec.get("hash") != self.hash:  # recorded by an older release: from now on the folder may move
                write_text_atomic(self.folder / STAGE_JSON, json.dumps({**rec, "hash": self.hash}) + "\n")
            return None
        if state == "changed":
            if not self.derived:
                raise UserError(f"stage '{self.name}' in '{self.folder}' was made with another config; remove that "
                                "folder to redo it, or set a new recipe output")
            shutil.rmtree(self.folder)
        t0 = time.perf_counter()
        self._run(self.cfg, resume=state == "partial")
        took = time.perf_counter() - t0
        self.folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.folder / STAGE_JSON, json.dumps({"stage": self.name, "hash": self.hash,
                                                          "seconds": round(took, 1)}) + "\n")
        return took


def plan(recipe: Recipe, problems: Any = None, store: str | Path | None = None) -> list[Stage]:
    """The stages of ``recipe`` in order, with validated configs.

    Config errors raise at the first one, or, with ``problems`` (a :class:`synclone.recipe.check.Problems`),
    are all collected and the stages that could be built are returned.

    ``store``: a folder shared by several runs (the points of a sweep). Each stage that makes something a
    later stage reads (generate, teacher, curate, train, inspect) then gets the folder
    ``<store>/<stage>-<key>``, with ``key`` the hash of its config less its own folder. An upstream folder
    enters a config as its path, which holds its own key, so the key covers everything a stage depends on:
    runs whose stages agree share them (one generation serves every training that reads it) and the usual
    ``stage.json`` check skips what is finished. Evaluation and the report stay in ``recipe.output``.

    Paths inside ``recipe.output`` and ``store`` enter hashes and keys relative to them: a moved run or sweep
    folder, given as the new ``output``, finds every finished stage.
    """
    problems = problems if problems is not None else Problems(collect=False)
    out = Path(recipe.output)
    token = _ROOTS.set(_roots(output=out, store=store))
    try:
        return _plan(recipe, problems, out, store)
    finally:
        _ROOTS.reset(token)


def _plan(recipe: Recipe, problems: Any, out: Path, store: str | Path | None) -> list[Stage]:
    from synclone.curate import CurateConfig
    from synclone.evaluate import EvaluateConfig
    from synclone.generate import GenerateConfig
    from synclone.train import TrainConfig

    stages: list[Stage] = []
    with problems.catch():
        refs = _Refs(out, recipe)
    if problems:
        return stages

    def place(name: str, folder: Path, build: Any) -> Stage:
        """``build(folder)``, or in a store ``build`` at the folder keyed by its config."""
        if store is None:
            return build(folder)
        return build(_store_folder(store, name, build(_PLACEHOLDER).cfg.model_dump(mode="json", exclude={"executor"})))

    if recipe.domain is not None:
        from synclone.data.shifted import ShiftedDomainConfig

        with problems.catch():
            cfg = validate(ShiftedDomainConfig, {**recipe.domain, "output": str(out / "domain")}, "recipe domain")
            stages.append(Stage("domain", out / "domain", cfg, _run_domain, estimate_s=10.0))
    for name, raw in recipe.finetune.items():
        from synclone.generate.finetune import FinetuneConfig

        with problems.catch():
            cfg = validate(FinetuneConfig, {**refs.resolve(raw, f"finetune.{name}"),
                                            "output": str(out / "finetune" / name)}, f"recipe finetune.{name}")
            # The built-in generator (2.5M parameters) took 0.36-0.45 s per step at batch 20 on 2 shared CPU cores.
            stages.append(Stage(f"finetune.{name}", out / "finetune" / name, cfg, _run_finetune,
                                estimate_s=cfg.steps * cfg.batch_size / 50.0,
                                upstream=[s.hash for s in stages if s.name == "domain"]))
    # Generated sets depend on the domain's images and the adapters: a changed one makes them again.
    prep = [s.hash for s in stages]
    runs = {n: out / "train" / n for n in recipe.train}  # train entry -> its run folder
    for name, raw in recipe.generate.items():
        with problems.catch():
            def gen(folder: Path, name: str = name, raw: dict = raw) -> Stage:
                cfg = validate(GenerateConfig, {**refs.resolve(raw, f"generate.{name}"), "output": str(folder)},
                               f"recipe generate.{name}")
                return Stage(f"generate.{name}", folder, cfg, _run_generate, estimate_s=_gen_estimate(cfg),
                             upstream=prep)

            stages.append(place(f"generate.{name}", out / "generated" / name, gen))
            refs.map[f"@generated.{name}"] = stages[-1].folder
    if recipe.teacher is not None:
        with problems.catch():
            def teacher(folder: Path) -> Stage:
                cfg = validate(TrainConfig, {**refs.resolve(recipe.teacher, "teacher"), "output": str(folder)},
                               "recipe teacher")
                return Stage("teacher", folder, cfg, _run_train, estimate_s=_train_estimate(cfg))

            stages.append(place("teacher", out / "teacher", teacher))
            refs.map["@teacher"] = stages[-1].folder / "model"
    if recipe.curate is not None:
        with problems.catch():
            def curate(folder: Path) -> Stage:
                raw = refs.resolve(recipe.curate, "curate")
                cfg = validate(CurateConfig, {**raw, "output": str(folder), "overwrite": True}, "recipe curate")
                return Stage("curate", folder, cfg, _run_curate, estimate_s=20.0)

            stages.append(place("curate", out / "curated", curate))
            refs.map["@curated"] = stages[-1].folder
    # In a store a stage's folder is known only once the stages it reads are placed: entries that read other
    # entries (@train.X) come after them.
    for name in (_train_order(recipe.train) if store is not None else recipe.train):
        raw = recipe.train[name]
        with problems.catch():
            stages.append(place(f"train.{name}", runs[name], lambda folder, name=name, raw=raw: _train_stage(
                name, refs.resolve(raw, f"train.{name}"), folder)))
            runs[name] = stages[-1].folder
            refs.map[f"@train.{name}"] = model_folders(runs[name], raw)[0][1]
    inspections: list[Path] = []
    if recipe.inspect is not None:
        with problems.catch():
            found = _inspect_stages(recipe, refs, [s.hash for s in stages], store)
            stages += found
            inspections = [s.folder for s in found] if store is not None else []
    if any(_evaluated(r) for r in recipe.train.values()):
        with problems.catch():
            raw = refs.resolve(recipe.evaluate, "evaluate")
            if store is not None and "cache_dir" not in raw:
                # Logits are keyed by weights and data, so the runs of a store share one cache.
                raw = {**raw, "cache_dir": str(Path(store) / "cache" / "logits")}
            models = {n + suffix: str(folder) for n, r in recipe.train.items() if _evaluated(r)
                      for suffix, folder in model_folders(runs[n], r)}
            cfg = validate(EvaluateConfig, {**raw, "models": {**models, **raw.get("models", {})},
                                            "output": str(out / "eval")}, "recipe evaluate")
            cfg.probe_settings()
            # The evaluation hash also covers the models' training stages, so a retrained model is re-evaluated.
            stages.append(Stage("evaluate", out / "eval", cfg, _run_evaluate, derived=True, estimate_s=120.0,
                                upstream=[s.hash for s in stages if not s.name.startswith("inspect.")]))
            report_cfg = ReportStage(output=str(out), title=recipe.report.get("title", recipe.title),
                                     eval_dir=str(out / "eval"),
                                     curation=str(refs.map["@curated"]) if recipe.curate is not None else None,
                                     datasets=[str(refs.map[f"@generated.{n}"]) for n in recipe.generate],
                                     # training curves: the runs of the loop (probes and imports have none)
                                     train_runs={n + sfx: str(f.parent) for n, r in recipe.train.items()
                                                 if r.get("kind", "supervised") in ("supervised", "fewshot")
                                                 for sfx, f in model_folders(runs[n], r)},
                                     transfer=[str(runs[n]) for n, r in recipe.train.items()
                                               if r.get("kind") == "transfer"],
                                     inspections=[str(p) for p in inspections],
                                     adaptation=_adaptation_report(recipe, refs),
                                     upstream=_hash([s.hash for s in stages]))
            stages.append(Stage("report", out / "report", report_cfg, _run_report, derived=True, estimate_s=15.0))
    return stages


# The folder a stage is built at to compute its store key: a constant, so the key depends on the config only.
_PLACEHOLDER = Path("@stage")
_TRAIN_REF = re.compile(r"@train\.([A-Za-z0-9_.-]+)")


def _train_order(train: dict[str, dict]) -> list[str]:
    """The train entries with every entry after the entries it reads (``@train.X``), otherwise as written."""
    deps = {n: {m for m in _TRAIN_REF.findall(json.dumps(raw)) if m in train and m != n} for n, raw in train.items()}
    order: list[str] = []
    while len(order) < len(train):
        ready = [n for n in train if n not in order and deps[n] <= set(order)]
        if not ready:
            cycle = sorted(n for n in train if n not in order)
            raise UserError(f"train entries read each other in a cycle ({', '.join(cycle)}); one must come first")
        order.append(ready[0])
    return order


def _inspect_stages(recipe: Recipe, refs: _Refs, upstream: list[str], store: str | Path | None = None) -> list[Stage]:
    """One ``synclone inspect`` per dataset, written into ``<dataset>/inspect`` where the report finds it.

    In a store (see :func:`plan`) each inspection gets its own keyed folder there (the report is told where) and
    a feature cache shared by the store's runs; its key holds the paths of what it reads, which hold their keys.
    """
    from synclone.inspect import InspectConfig

    raw = dict(recipe.inspect or {})
    targets = raw.pop("datasets", None) or [*(f"@generated.{n}" for n in recipe.generate),
                                            *(["@curated"] if recipe.curate is not None else [])]
    if store is not None and "cache_dir" not in raw:
        raw["cache_dir"] = str(Path(store) / "cache" / "features")
    stages = []
    for i, ref in enumerate(targets):
        folder = Path(refs.resolve(ref, f"inspect.datasets[{i}]"))
        # Named after the dataset's place in the recipe (train, curated), wherever its folder is.
        name = f"inspect.{refs.name_of(ref, folder)}"

        def build(output: Path, folder: Path = folder, name: str = name) -> Stage:
            cfg = validate(InspectConfig, {"reference": "fashion_mnist:test", **refs.resolve(raw, "inspect"),
                                           "dataset": str(folder), "output": str(output)}, "recipe inspect")
            return Stage(name, output, cfg, _run_inspect, derived=True, estimate_s=30.0,
                         upstream=upstream if store is None else None)

        if store is None:
            stages.append(build(folder / "inspect"))
        else:
            stages.append(build(_store_folder(store, name, build(_PLACEHOLDER).cfg.model_dump(mode="json"))))
    return stages


def _store_folder(store: str | Path, name: str, config: dict) -> Path:
    """``<store>/<name>-<key>``: the folder of the stage with this config (less its own folder) in a store.

    A folder an older release keyed by the paths as written is used where it exists and the portable one does not,
    so a store made before keys became portable is not redone.
    """
    folder = Path(store) / f"{name}-{_key(config)}"
    legacy = Path(store) / f"{name}-{_hash(config)}"
    return legacy if legacy.is_dir() and not folder.exists() else folder


def _run_inspect(cfg: Any, resume: bool) -> None:
    from synclone.inspect import inspect_dataset

    inspect_dataset(cfg)


def _train_stage(name: str, raw: dict, folder: Path) -> Stage:
    """The stage of one ``train`` entry, by its ``kind``."""
    from synclone.models.pretrained import PretrainedConfig
    from synclone.train import TrainConfig
    from synclone.train.probe import ClassifierTuningConfig, LinearProbeConfig

    raw = dict(raw)
    kind = raw.pop("kind", "supervised")
    where = f"recipe train.{name}"
    if kind not in TRAIN_KINDS:
        raise UserError(f"{where}: unknown kind '{kind}'; use {', '.join(TRAIN_KINDS)}")
    if kind in ("classifier-tuning", "linear-probe"):
        cls = ClassifierTuningConfig if kind == "classifier-tuning" else LinearProbeConfig
        cfg = validate(cls, {**raw, "output": str(folder / "model")}, where)
        # Encoding dominates: a ViT-B CLIP encodes ~10 images/s on 2 CPU cores (~10k images here, roughly).
        return Stage(f"train.{name}", folder, cfg, _run_probe, estimate_s=1000.0)
    if kind == "pretrained":
        cfg = validate(PretrainedConfig, {**raw, "output": str(folder)}, where)
        return Stage(f"train.{name}", folder, cfg, _run_import, estimate_s=30.0)
    if kind == "pretrain":
        from synclone.train.pretrain import PretrainConfig

        cfg = validate(PretrainConfig, {**raw, "output": str(folder)}, where)
        return Stage(f"train.{name}", folder, cfg, _run_pretrain,
                     estimate_s=(1 if cfg.method == "supervised" else 2) * _train_estimate(cfg))
    if kind == "knn":
        from synclone.train.knn import KnnConfig

        cfg = validate(KnnConfig, {**raw, "output": str(folder / "model")}, where)
        return Stage(f"train.{name}", folder, cfg, _run_knn, estimate_s=60.0)
    if kind == "transfer":
        from synclone.train.transfer_eval import TransferConfig

        cfg = validate(TransferConfig, {**raw, "output": str(folder)}, where)
        jobs = len(cfg.encoders) * len(cfg.shots) * len(cfg.seeds)
        est = jobs * (("finetune" in cfg.measures) * cfg.finetune.steps * cfg.finetune.batch_size / 2500.0 + 10.0)
        return Stage(f"train.{name}", folder, cfg, _run_transfer, estimate_s=est)
    if kind == "fewshot":
        extra = {k: raw.pop(k) for k in _FEWSHOT_KEYS if k in raw}
        train_cfg = validate(TrainConfig, {**raw, "output": str(folder)}, where)
        cfg = validate(FewshotStage, {"train": train_cfg, **extra}, where)
        return Stage(f"train.{name}", folder, cfg, _run_fewshot,
                     estimate_s=len(cfg.seeds) * _train_estimate(train_cfg))
    cfg = validate(TrainConfig, {**raw, "output": str(folder)}, where)
    return Stage(f"train.{name}", folder, cfg, _run_train, estimate_s=_train_estimate(cfg))


class ReportStage(StrictModel):
    output: str
    title: str
    eval_dir: str
    curation: str | None = None
    datasets: list[str] = Field(default_factory=list)
    train_runs: dict[str, str] = Field(default_factory=dict)
    transfer: list[str] = Field(default_factory=list)
    inspections: list[str] = Field(default_factory=list)
    adaptation: dict[str, Any] | None = None
    upstream: str = ""


def _adaptation_report(recipe: Recipe, refs: _Refs) -> dict[str, Any] | None:
    """The "Adapting the generator" table's inputs when the recipe has a shifted domain: which evaluated set is
    the shifted test set, which the original one, and the models (train entries) in recipe order."""
    if recipe.domain is None:
        return None
    return {"shifted": Path(refs.map["@domain.test"]).name, "original": recipe.evaluate.get("data",
                                                                                             "fashion_mnist:test"),
            "models": [n for n, r in recipe.train.items() if _evaluated(r)],
            "descriptions": dict(recipe.report.get("descriptions", {}))}


def _gen_estimate(cfg: Any) -> float:
    """Seconds on a 2-core CPU, roughly: the built-in generator makes ~25 images/s at 10 steps
    (bench/RESULTS.md); a Stable-Diffusion-sized UNet takes ~4 s per guided step at 512x512."""
    n = cfg.images_per_class * (len(cfg.labels) if isinstance(cfg.labels, list) else _n_classes(cfg.labels))
    steps = cfg.generator.steps or (10 if cfg.generator.backend == "classcond" else 50)
    if cfg.generator.backend == "classcond":
        return n / (25.0 * 10 / steps)
    pixels = (cfg.generator.height or 512) * (cfg.generator.width or 512)
    return n * steps * 4.0 * pixels / 512**2


def _n_classes(labels: Any) -> int:
    from synclone.labels import get_label_space

    try:
        return len(get_label_space(labels)) if isinstance(labels, str) else 10
    except UserError:
        return 10


def _train_estimate(cfg: Any) -> float:
    """Seconds on a 2-core CPU, roughly: synclone_cnn_small trains ~2.5k 28x28 images/s there; other
    (ImageNet-sized) architectures ~8 images/s at 224x224 (a ResNet-50 step costs ~12 GFLOPs per image)."""
    small = cfg.model.arch.startswith("synclone_cnn")
    # An epoch's size is unknown before the data exists: Fashion-MNIST's 60k for the small CNNs, ImageNet's
    # 1.28M per training source for the ImageNet-sized architectures.
    per_epoch = 60000 if small else 1_281_167 * sum(x is not None for x in (cfg.data.real, cfg.data.synthetic))
    steps = cfg.optim.steps or cfg.optim.epochs * per_epoch // cfg.optim.batch_size
    side = cfg.aug.train_size or cfg.data.image_size or (28 if small else 224)
    rate = 2500.0 * 28**2 / side**2 if small else 8.0 * 224**2 / side**2
    return steps * cfg.optim.batch_size / rate


def disk_estimate(stage: Stage) -> float:
    """Bytes a stage will write, roughly: PNGs (compressed ~half of raw pixels), checkpoints, caches."""
    kind = stage.name.split(".")[0]
    if kind == "generate":
        from synclone.generate.job import estimated_bytes

        cfg = stage.cfg
        n = cfg.images_per_class * (len(cfg.labels) if isinstance(cfg.labels, list) else _n_classes(cfg.labels))
        return estimated_bytes(cfg, n, stage.folder)  # the same estimate a full disk's message quotes
    if kind in ("train", "teacher"):
        return 20 * 2**20  # model, last model and the resumable checkpoint of a small CNN
    return 10 * 2**20


def _run_domain(cfg: Any, resume: bool) -> None:
    from synclone.data.shifted import make_shifted_domain

    make_shifted_domain(cfg)


def _run_finetune(cfg: Any, resume: bool) -> None:
    from synclone.generate.finetune import finetune

    finetune(cfg, progress=False)


def _run_generate(cfg: Any, resume: bool) -> None:
    from synclone.generate import generate

    generate(cfg)


def _run_train(cfg: Any, resume: bool) -> None:
    from synclone.train import train

    train(cfg, resume=resume or (Path(cfg.output) / "checkpoints").is_dir(), progress=True)


def _run_probe(cfg: Any, resume: bool) -> None:
    from synclone.train.probe import ClassifierTuningConfig, classifier_tuning, linear_probe

    # Features are cached on disk, so a re-run after an interruption encodes only what is missing.
    (classifier_tuning if isinstance(cfg, ClassifierTuningConfig) else linear_probe)(cfg)


def _run_pretrain(cfg: Any, resume: bool) -> None:
    from synclone.train.pretrain import pretrain

    pretrain(cfg, resume=resume or (Path(cfg.output) / "checkpoints").is_dir(), progress=True)


def _run_knn(cfg: Any, resume: bool) -> None:
    from synclone.train.knn import knn_classifier

    knn_classifier(cfg)


def _run_transfer(cfg: Any, resume: bool) -> None:
    from synclone.train.transfer_eval import run_transfer

    res = run_transfer(cfg)
    print((Path(cfg.output) / "table.md").read_text(encoding="utf-8") if res["rows"] else "", flush=True)


def _run_import(cfg: Any, resume: bool) -> None:
    from synclone.models.pretrained import import_timm

    import_timm(cfg)


def _run_fewshot(cfg: FewshotStage, resume: bool) -> None:
    from synclone.train.fewshot import fewshot

    fewshot(cfg.train, shots=cfg.shots, seeds=cfg.seeds, eval_data=cfg.eval_data, resume=True, progress=True)


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
                 datasets=[Path(d) for d in cfg.datasets], train_runs={k: Path(v) for k, v in cfg.train_runs.items()},
                 transfer=[Path(t) for t in cfg.transfer], inspections=[Path(p) for p in cfg.inspections],
                 adaptation=cfg.adaptation)
