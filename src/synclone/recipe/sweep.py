"""``synclone sweep``: a recipe run at every point of a grid of its variables (x seeds), collected into one table.

Each point is an ordinary recipe run (:func:`synclone.recipe.run.run_recipe`) with ``vars`` set to the point's
values and its own output folder ``<sweep>/points/<point>`` (evaluation, report, timings). Every other stage is
placed in the shared store ``<sweep>/stages`` at a folder keyed by its config (:func:`synclone.recipe.plan.plan`
with ``store``), so points share what they have in common: a generation that does not depend on the seed serves
every seed, a real-data model that does not depend on the grid serves every grid point, and the stages' own
``stage.json`` check skips what any earlier point (or an earlier, killed sweep) finished. Interrupted stages resume
as in ``synclone run`` (generation and training exactly).

Points run one after another in this process, in grid order; a stage's own executor (``executor: {kind: ray}`` on
generate, curate and evaluate) is used as the recipe configures it. Results do not depend on the order: every
stage's output depends only on its config.

When every point is done, the sweep writes into its folder ``results.parquet`` / ``results.csv`` (every point's
evaluation rows, with one column per swept variable, ``seed`` and ``point``), ``diagnostics.parquet`` / ``.csv``
(every point's dataset diagnostics, when the recipe has an ``inspect:`` section, with ``inspected`` naming the
dataset and ``stage`` the inspection's folder: points that share an inspection repeat its rows), ``sweep.json``
and the report (``report.html``, ``report.md``: the "Sweep" section of :mod:`synclone.report.sweep`).
"""

from __future__ import annotations

import itertools
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from synclone.errors import UserError
from synclone.recipe.hosts import mixed_hosts_note
from synclone.recipe.plan import Problems, Recipe, load_recipe, plan
from synclone.recipe.run import _duration, run_recipe
from synclone.util.files import atomic_path, write_text_atomic

SEED = "seed"
# Columns of the collected tables that a variable may not be named after.
_RESERVED = ("point", "model", "probe", "dataset", "variant", "metric", "value", "n", "convention", "source",
             "reference", "features", "class", "inspected")
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Point:
    """One run of the sweep: a value per swept variable (and the seed)."""

    values: tuple[tuple[str, Any], ...]

    @property
    def id(self) -> str:
        """The point's folder name: ``images_per_class-100__guidance-2__seed-0``."""
        return "__".join(f"{k}-{_SAFE.sub('_', str(v))}" for k, v in self.values)

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.values)


@dataclass
class Sweep:
    """A checked sweep: the recipe, the grid, the seeds, the metrics to draw and the folder."""

    recipe: str
    overrides: list[str]
    quick: bool
    base: Recipe
    grid: dict[str, list[Any]]
    seeds: list[int] | None
    metrics: list[str]
    models: list[str] | None
    output: Path
    points: list[Point] = field(default_factory=list)

    @property
    def store(self) -> Path:
        return self.output / "stages"

    def point_folder(self, point: Point) -> Path:
        return self.output / "points" / point.id

    def point_recipe(self, point: Point) -> Recipe:
        """The recipe of one point: its variables set, its output folder inside the sweep."""
        sets = [f"vars.{k}={json.dumps(v)}" for k, v in point.values]
        return load_recipe(self.recipe, [*self.overrides, *sets, f"output={json.dumps(str(self.point_folder(point)))}"],
                           quick=self.quick)


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """``["vars.a=1,2", "b=x,y"]`` -> ``{"a": [1, 2], "b": ["x", "y"]}`` (values typed as YAML scalars; a key
    without values maps to ``[]``, which :func:`load_sweep` refuses naming the recipe's variables)."""
    import yaml

    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--grid '{item}': write --grid vars.NAME=V1,V2,... (e.g. vars.guidance=1,2,4)")
        name = key.removeprefix("vars.")
        values = []
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            try:
                v = yaml.safe_load(part)
            except yaml.YAMLError:
                v = part
            if isinstance(v, (list, dict)):
                raise UserError(f"--grid {key}: value '{part}' is not a single value")
            values.append(v)
        grid[name if key.startswith("vars.") or "." not in key else key] = values
    return grid


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds '{text}': give whole numbers separated by commas, e.g. --seeds 0,1,2") from None
    if not seeds:
        raise UserError("--seeds lists no seed; give e.g. --seeds 0,1,2")
    return seeds


def load_sweep(recipe: str | Path, grid: list[str] | None = None, seeds: str | None = None,
               metrics: list[str] | None = None, output: str | None = None, overrides: list[str] | None = None,
               quick: bool = False) -> Sweep:
    """Check a sweep before anything runs: the grid names variables of the recipe, it is not empty, seeds have a
    ``seed`` variable to set, every metric is one the report can draw. Each problem is one :class:`UserError`."""
    from synclone.report.sweep import parse_metric

    base = load_recipe(recipe, overrides or [], quick=quick)
    names = sorted(base.vars)
    known = f"this recipe's variables: {', '.join(names)}" if names else "this recipe defines no variables (vars:)"
    cli = parse_grid(grid or [])
    settings = base.sweep
    merged = {**settings.grid, **cli}
    for key, values in merged.items():
        if key not in base.vars:
            raise UserError(f"grid key '{key}' is not a variable of {recipe}; {known} (a sweep sets vars: entries, "
                            "which the recipe uses as ${name})")
        if not values:
            raise UserError(f"grid key '{key}' lists no values: the grid is empty; give at least one (--grid "
                            f"vars.{key}=V1,V2); {known}")
        dup = next((v for i, v in enumerate(values) if v in values[:i]), None)
        if dup is not None:
            raise UserError(f"grid key '{key}' lists the value {dup!r} twice; give each value once")
        if key in _RESERVED:
            raise UserError(f"variable '{key}' cannot be swept: the results table already has a column '{key}'; "
                            "rename the variable")
    if not merged:
        raise UserError(f"the grid is empty: give --grid vars.NAME=V1,V2 (or a sweep.grid section); {known}")
    seed_list = parse_seeds(seeds) if seeds is not None else settings.seeds
    if seed_list is not None:
        if SEED not in base.vars:
            raise UserError(f"--seeds sets the variable 'seed', which {recipe} does not have; {known} (add "
                            "vars: {seed: 0} and use ${seed} where a seed should change)")
        if SEED in merged:
            raise UserError("'seed' is both a grid key and --seeds; give the seeds once, with --seeds")
        if len(set(seed_list)) != len(seed_list):
            raise UserError(f"--seeds lists a seed twice ({','.join(map(str, seed_list))})")
    metric_list = [m.strip() for item in (metrics or []) for m in item.split(",") if m.strip()] or \
        settings.metrics or ["clean_top1"]
    for m in metric_list:
        parse_metric(m)
    sweep = Sweep(str(recipe), list(overrides or []), quick, base, merged, seed_list, metric_list, settings.models,
                  Path(output or base.output))
    combos = itertools.product(*merged.values(), *([seed_list] if seed_list is not None else []))
    keys = [*merged, *([SEED] if seed_list is not None else [])]
    sweep.points = [Point(tuple(zip(keys, c, strict=True))) for c in combos]
    ids = [p.id for p in sweep.points]
    if len(set(ids)) != len(ids):
        raise UserError("two grid values give the same folder name; make the values differ in letters or digits")
    return sweep


def dry_run(sweep: Sweep) -> dict:
    """Plan every point without running anything: how many stages there are and how many the points share."""
    distinct: dict[Path, Any] = {}
    planned = 0
    problems = Problems()
    for p in sweep.points:
        stages = plan(sweep.point_recipe(p), problems, store=sweep.store)
        planned += len(stages)
        for s in stages:
            distinct.setdefault(s.folder, s)
    if problems:
        raise UserError(f"the recipe has problems at some points: {problems.items[0]} (run synclone run --dry-run "
                        "on it for the full list)")
    todo = [s for s in distinct.values() if s.state() != "done"]
    estimate = sum(s.estimate_s for s in todo)
    print(f"sweep -> {sweep.output}: {len(sweep.points)} runs, {planned} stages planned, {len(distinct)} distinct "
          f"(the rest shared), {len(todo)} to run, ~{_duration(estimate)} by the stages' own estimates", flush=True)
    return {"points": len(sweep.points), "planned": planned, "distinct": len(distinct), "todo": len(todo),
            "estimate_s": estimate}


def run_sweep(sweep: Sweep) -> Path:
    """Run every point not yet finished, collect the tables and write the report; returns ``report.html``."""
    from synclone.report.sweep import build_sweep_report

    # A grid value that breaks the recipe (a config error at some point) stops the sweep before anything runs;
    # what a point's machine lacks is checked by its run, as in synclone run.
    folders: list[Path] = []
    for p in sweep.points:
        problems = Problems()
        folders += [s.folder for s in plan(sweep.point_recipe(p), problems, store=sweep.store)]
        if problems.errors:
            more = f" (and {len(problems.errors) - 1} more)" if len(problems.errors) > 1 else ""
            raise UserError(f"sweep point {p.describe()}: {problems.errors[0]}{more}; nothing was run")
    out = sweep.output
    out.mkdir(parents=True, exist_ok=True)
    _write_info(sweep)
    t_all = time.perf_counter()
    for i, p in enumerate(sweep.points, 1):
        print(f"=== sweep point {i}/{len(sweep.points)}: {p.describe()}", flush=True)
        t0 = time.perf_counter()
        run_recipe(sweep.point_recipe(p), store=sweep.store, note_hosts=False)
        times = json.loads((sweep.point_folder(p) / "timings.json").read_text(encoding="utf-8"))
        ran = [k for k, v in times.items() if v.get("ran")]
        print(f"=== point {i}/{len(sweep.points)} done in {time.perf_counter() - t0:.0f} s: {len(ran)} stage(s) ran, "
              f"{len(times) - len(ran)} finished before", flush=True)
    results, diagnostics = collect(sweep)
    _write_table(results, out / "results")
    if not diagnostics.empty:
        _write_table(diagnostics, out / "diagnostics")
    report = build_sweep_report(out, title=sweep.base.title)
    # Once for the whole sweep rather than per run: a moved sweep continued on another machine mixes CPUs.
    # Stage folders are keyed by config, so those planned before the run are the ones it filled.
    if note := mixed_hosts_note(folders):
        print(note, file=sys.stderr, flush=True)
    print(f"sweep of {len(sweep.points)} runs: {time.perf_counter() - t_all:.0f} s", flush=True)
    return report


def collect(sweep: Sweep) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every point's evaluation rows and dataset diagnostics, with the point's variables as columns, in grid order."""
    results, diags = [], []
    for p in sweep.points:
        recipe = sweep.point_recipe(p)
        folder = sweep.point_folder(p)
        path = folder / "eval" / "results.parquet"
        if not path.is_file():
            raise UserError(f"sweep point {p.describe()} has no results ({path}); re-run the sweep to finish it")
        results.append(_tag(pd.read_parquet(path), p))
        for s in plan(recipe, store=sweep.store):
            if s.name.startswith("inspect.") and (s.folder / "results.parquet").is_file():
                df = pd.read_parquet(s.folder / "results.parquet")
                diags.append(_tag(df.assign(inspected=s.name.removeprefix("inspect."), stage=s.folder.name), p))
    res = pd.concat(results, ignore_index=True)
    return res, (pd.concat(diags, ignore_index=True) if diags else pd.DataFrame())


def _tag(df: pd.DataFrame, p: Point) -> pd.DataFrame:
    """``df`` with the point's id and values as its first columns."""
    df = df.copy()
    tags = {"point": p.id, **dict(p.values)}
    for k, v in reversed(list(tags.items())):
        df.insert(0, k, [v] * len(df))
    return df


def _write_table(df: pd.DataFrame, stem: Path) -> None:
    with atomic_path(stem.with_suffix(".parquet")) as tmp:
        df.to_parquet(tmp, index=False)
    with atomic_path(stem.with_suffix(".csv")) as tmp:
        df.to_csv(tmp, index=False)


def _write_info(sweep: Sweep) -> None:
    info = {"recipe": sweep.recipe, "title": sweep.base.title, "quick": sweep.quick, "overrides": sweep.overrides,
            "grid": sweep.grid, "seeds": sweep.seeds, "metrics": sweep.metrics, "models": sweep.models,
            "points": [{"id": p.id, "values": dict(p.values), "folder": str(sweep.point_folder(p))}
                       for p in sweep.points]}
    write_text_atomic(sweep.output / "sweep.json", json.dumps(info, indent=2) + "\n")
