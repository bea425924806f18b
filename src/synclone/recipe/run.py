"""``synclone run``: check a recipe, then execute its stages in order, skipping finished ones (``stage.json``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from synclone.config import validate, write_run_info
from synclone.errors import UserError
from synclone.recipe.check import check
from synclone.recipe.hosts import mixed_hosts_note
from synclone.recipe.plan import Problems, Recipe, disk_estimate, model_folders, plan
from synclone.util.files import write_text_atomic


def run_recipe(recipe: Recipe, dry_run: bool = False, store: str | Path | None = None,
               note_hosts: bool = True) -> Path:
    """Run (or with ``dry_run`` only check and print) the recipe; returns the report path or the output folder.

    Every problem found before work starts (configs, references, data, weights, label spaces) is listed
    together; then a :class:`UserError` stops the run (``run`` and ``--dry-run`` alike) before anything is made.
    ``store``: a folder of stages shared with other runs (:func:`synclone.recipe.plan.plan`; ``synclone sweep``).
    ``note_hosts``: say so when the stages were made on different CPUs (a sweep says it once for all its runs).
    """

    problems = Problems()
    stages = plan(recipe, problems, store=store)
    out = Path(recipe.output)
    planned = {str(f) for n, r in recipe.train.items() for _, f in model_folders(out / "train" / n, r)}
    planned |= {str(f) for s in stages if s.name.startswith("train.")
                for _, f in model_folders(s.folder, recipe.train[s.name.removeprefix("train.")])}
    check(stages, problems, planned)
    lines = [f"recipe -> {out}"]
    total = disk = 0.0
    for s in stages:
        st = s.state()
        est = 0.0 if st == "done" else s.estimate_s
        total += est
        disk += 0 if st == "done" else disk_estimate(s)
        lines.append(f"  {s.name:<26} {st:<8} ~{_duration(est):>9}  {s.folder}")
    lines.append(f"  estimated: ~{_duration(total)} on a 2-core CPU, ~{_size(disk)} of disk")
    print("\n".join(lines), flush=True)
    if problems:
        if problems.errors:
            print(f"{len(problems.errors)} error(s) in the recipe:", file=sys.stderr)
            print("\n".join(f"  - {p}" for p in problems.errors), file=sys.stderr)
        if problems.missing:
            print(f"{len(problems.missing)} thing(s) this recipe needs that are not on this machine:", file=sys.stderr)
            print("\n".join(f"  - {p}" for p in problems.missing), file=sys.stderr)
        verdict = "the recipe is valid, but" if not problems.errors else "recipe not ready:"
        raise UserError(f"{verdict} {len(problems.items)} problem(s) to fix before it can run (listed above); "
                        "nothing was run")
    if dry_run:
        return out
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "recipe.yaml", json.dumps(recipe.model_dump(mode="json"), indent=2))
    write_run_info(out, recipe)
    times = {}
    for s in stages:
        print(f"== {s.name}", flush=True)
        took = s.run()
        # A stage skipped now still reports the seconds it took when it ran (kept in its stage.json).
        times[s.name] = {"seconds": s.recorded_seconds() if took is None else round(took, 1), "ran": took is not None}
    write_text_atomic(out / "timings.json", json.dumps(times, indent=2) + "\n")
    if note_hosts and (note := mixed_hosts_note(s.folder for s in stages)):
        print(note, file=sys.stderr, flush=True)
    return out / "report.html" if (out / "report.html").is_file() else out


def _duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 86400 * 3:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:,.0f} days"


def _size(n: float) -> str:
    return f"{n / 2**20:.0f} MB" if n < 2**30 else f"{n / 2**30:.1f} GB"


def demo_recipe(output: str = "runs/demo", quick: bool = False) -> Recipe:
    """The built-in Fashion-MNIST synthetic-clone experiment (``recipes/demo.yaml`` holds the same)."""
    from importlib import resources

    import yaml

    name = "demo_quick.yaml" if quick else "demo.yaml"
    data = yaml.safe_load((resources.files("synclone") / "recipes" / name).read_text(encoding="utf-8"))
    data["output"] = output
    return validate(Recipe, data, source=f"built-in recipe {name}")
