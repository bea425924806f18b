"""The ``synclone`` command line: generate, curate, train, evaluate, report, run, sweep, demo, inspect.

Every command takes an optional YAML config plus dotted ``key=value`` overrides, e.g.
``synclone train recipes/train_real.yaml optim.epochs=3 output=runs/real``. Bad input the user can
fix ends as one line on stderr and exit code 2; work already done (checkpoints, generated images,
caches) is kept, so re-running the corrected command resumes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from synclone.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Synthetic clones: generate, curate, train, evaluate and report.")
generator_app = typer.Typer(no_args_is_help=True,
                            help="Generators: train the built-in one, fine-tune a diffusers pipeline.")
app.add_typer(generator_app, name="generator")

ArgsT = Annotated[list[str] | None, typer.Argument(help="[CONFIG.yaml] [key=value ...] dotted overrides",
                                                     show_default=False)]


def _split_args(args: list[str] | None) -> tuple[str | None, list[str]]:
    """The first argument without '=' is the config file; the rest are overrides."""
    config, overrides = None, []
    for a in args or []:
        if "=" in a:
            overrides.append(a)
        elif config is None:
            config = a
        else:
            raise UserError(f"unexpected argument '{a}': give one config file and key=value overrides")
    return config, overrides


def _load(cls, args: list[str] | None, extra: list[str] = ()):  # noqa: ANN001, ANN202
    from synclone.config import load_config

    config, overrides = _split_args(args)
    return load_config(cls, config, [*extra, *overrides])


def _locked(folder: str, command: str, args: list[str] | None = None):  # noqa: ANN202
    """The output-folder lock (one writer per folder; a second is refused naming the holder)."""
    from synclone.util.lock import output_lock

    return output_lock(folder, " ".join(["synclone", command, *(args or [])]))


def _done(path: object) -> None:
    if os.environ.get("RANK", "0") == "0":  # one line, not one per process under accelerate launch
        typer.echo(str(path))


@app.command()
def train(
    args: ArgsT = None,
    kind: Annotated[str, typer.Option(
        help="supervised | pretrain | classifier-tuning | linear-probe | knn | fewshot | pretrained")] = "supervised",
    resume: Annotated[bool, typer.Option(help="continue an interrupted run from its last checkpoint")] = False,
    output: Annotated[str | None, typer.Option(help="run folder (same as output=...)")] = None,
    quiet: Annotated[bool, typer.Option(help="no progress bar")] = False,
    shots: Annotated[int, typer.Option(help="fewshot: real images per class")] = 10,
    seeds: Annotated[str, typer.Option(help="fewshot: comma-separated seeds, mean and spread reported")] = "0,1,2",
) -> None:
    """Train a classifier on real, synthetic or mixed data; writes <output>/model (safetensors + config.json)."""
    extra = [f"output={output}"] if output else []
    if kind == "supervised":
        from synclone.train import TrainConfig
        from synclone.train import train as run_train

        cfg = _load(TrainConfig, args, extra)
        with _locked(cfg.output, "train", args):
            _done(run_train(cfg, resume=resume, progress=not quiet))
    elif kind == "pretrain":
        from synclone.train.pretrain import PretrainConfig, pretrain

        cfg = _load(PretrainConfig, args, extra)
        with _locked(cfg.output, "train", args):
            _done(pretrain(cfg, resume=resume, progress=not quiet))
    elif kind == "knn":
        from synclone.train.knn import KnnConfig, knn_classifier

        cfg = _load(KnnConfig, args, extra)
        with _locked(cfg.output, "train", args):
            _done(knn_classifier(cfg))
    elif kind in ("classifier-tuning", "linear-probe"):
        from synclone.train.probe import ClassifierTuningConfig, LinearProbeConfig, classifier_tuning, linear_probe

        cls, fn = ((ClassifierTuningConfig, classifier_tuning) if kind == "classifier-tuning"
                   else (LinearProbeConfig, linear_probe))
        cfg = _load(cls, args, extra)
        with _locked(cfg.output, "train", args):
            res = fn(cfg)
        _done(getattr(res, "folder", res))
    elif kind == "fewshot":
        from synclone.train import TrainConfig
        from synclone.train.fewshot import fewshot

        seed_list = [int(x) for x in seeds.split(",") if x.strip()]
        cfg = _load(TrainConfig, args, extra)
        with _locked(cfg.output, "train", args):
            res = fewshot(cfg, shots=shots, seeds=seed_list)
        spread = "" if res["std"] is None else f" +- {100 * res['std']:.2f}"  # one seed has no spread
        typer.echo(f"top-1 over {res['n']} seed(s): {100 * res['mean']:.2f}{spread} %", err=True)
        _done(Path(_load(TrainConfig, args, extra).output) / "fewshot.json")
    elif kind == "pretrained":
        _done(_import_checkpoint(args, extra))
    else:
        raise UserError(f"unknown --kind '{kind}': use supervised, pretrain, classifier-tuning, linear-probe, knn, "
                        "fewshot or pretrained")


def _import_checkpoint(args: list[str] | None, extra: list[str]) -> Path:
    from synclone.models.pretrained import PretrainedConfig, import_timm

    return import_timm(_load(PretrainedConfig, args, extra))


@app.command("import")
def import_(
    args: ArgsT = None,
    output: Annotated[str | None, typer.Option(help="run folder (same as output=...)")] = None,
) -> None:
    """Import a trained classifier (timm arch + checkpoint file or timm's weights) as a synclone model folder.

    ``synclone import arch=tf_efficientnet_lite0 pretrained=weights.pth key_map=auto output=runs/lite0``;
    released checkpoints of other layouts are converted (``convert``: auto, synclr, stablerep, mae, mocov3,
    dinov2, imagenet_sd, synthclip) and a released linear head file is used as the classifier (``head``).
    """
    import warnings

    extra = [f"output={output}"] if output else []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        folder = _import_checkpoint(args, extra)
    for w in caught:  # the preprocessing doubts, one line each, before the folder
        typer.echo(f"warning: {w.message}", err=True)
    _done(folder)


@app.command()
def evaluate(
    models: Annotated[list[str] | None,
                      typer.Argument(help="model folders, or NAME=FOLDER", show_default=False)] = None,
    config: Annotated[str | None, typer.Option("--config", "-c", help="YAML evaluation config")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="dotted override key=value (repeatable)")] = None,
    data: Annotated[str | None, typer.Option(help="clean test set (default fashion_mnist:test)")] = None,
    probes: Annotated[str | None, typer.Option(help="comma-separated probes with default settings")] = None,
    output: Annotated[str | None, typer.Option(help="results folder")] = None,
    max_images: Annotated[int | None, typer.Option(help="cap on images per dataset")] = None,
    data_root: Annotated[str | None, typer.Option(help="folder holding the Fashion-MNIST .gz files")] = None,
    quiet: bool = False,
) -> None:
    """Run the robustness suite on models; writes results.parquet/.csv and artifacts.json."""
    import yaml

    from synclone.config import apply_overrides, load_yaml, validate
    from synclone.evaluate import EvaluateConfig, model_names
    from synclone.evaluate import evaluate as run_evaluate

    raw = load_yaml(config) if config else {}
    if models:
        raw["models"] = {**raw.get("models", {}), **model_names(models)}
    if probes:
        raw["probes"] = {p.strip(): raw.get("probes", {}).get(p.strip(), {}) for p in probes.split(",") if p.strip()}
    for key, value in (("data", data), ("output", output), ("max_images", max_images), ("data_root", data_root)):
        if value is not None:
            raw[key] = value
    cfg = validate(EvaluateConfig, apply_overrides(raw, set_ or []), source=config or "evaluate")
    with _locked(cfg.output, "evaluate", models):
        df = run_evaluate(cfg, progress=not quiet)
    head = df[df.metric == "top1"][["model", "probe", "dataset", "value"]]
    if len(head) and not quiet:
        typer.echo(yaml.safe_dump(head.head(20).to_dict("records"), sort_keys=False).rstrip(), err=True)
    _done(cfg.output)


@app.command()
def report(
    results: Annotated[list[str], typer.Argument(help="evaluation folders (written by synclone evaluate)")],
    output: Annotated[str, typer.Option(help="folder for report.html and report.md")] = "runs/report",
    title: Annotated[str, typer.Option(help="report title")] = "synclone report",
    inspect: Annotated[list[str] | None, typer.Option("--inspect", help="synclone inspect output folder "
                                                                          "(repeatable): a dataset section")] = None,
) -> None:
    """Turn evaluation results into report.html (self-contained) and report.md."""
    from synclone.report import build_report

    _done(build_report([Path(r) for r in results], Path(output), title=title,
                       inspections=[Path(p) for p in inspect or []]))


@app.command()
def generate(
    args: ArgsT = None,
    dry_run: Annotated[bool, typer.Option(help="write the plan, time one batch, estimate time and disk")] = False,
) -> None:
    """Generate a labelled synthetic dataset; resumable, sharded over processes.

    Several processes (also on the CPU): ``accelerate launch --multi_gpu --num_processes N -m synclone.generate
    CONFIG``.
    """
    from synclone.generate import GenerateConfig
    from synclone.generate import generate as run_generate

    cfg = _load(GenerateConfig, args)
    with _locked(cfg.output, "generate", args):
        _done(run_generate(cfg, dry_run=dry_run))


@app.command()
def curate(args: ArgsT = None) -> None:
    """Score a dataset folder with CLIP or a teacher model, filter it and write a curated folder."""
    from synclone.curate import CurateConfig
    from synclone.curate import curate as run_curate

    cfg = _load(CurateConfig, args)
    with _locked(cfg.output, "curate", args):
        _done(run_curate(cfg))


@app.command()
def shard(
    folder: Annotated[str, typer.Argument(help="dataset folder (synclone, <class>/<image>, or an ImageNet layout)")],
    output: Annotated[str | None, typer.Option(help="shard folder (default: FOLDER-shards)")] = None,
    shard_size: Annotated[str, typer.Option(help="largest shard, e.g. 1GB, 500MB")] = "1GB",
    split: Annotated[str, typer.Option(help="split of a synclone dataset folder")] = "train",
) -> None:
    """Pack a dataset folder into webdataset tar shards (for network filesystems and object stores); train on
    them with data.real=SHARD_FOLDER."""
    from synclone.data.sources import shard_dataset

    out = output or f"{str(folder).rstrip('/')}-shards"
    _done(shard_dataset(folder, out, shard_size, split))


@app.command()
def inspect(
    dataset: Annotated[str, typer.Argument(help="synthetic dataset folder (or a built-in name:split)")],
    reference: Annotated[str, typer.Option(help="real set with the same classes, e.g. fashion_mnist:test")],
    features: Annotated[str | None, typer.Option(help="MODEL_FOLDER (offline default) | clip[:NAME[@PRETRAINED]] "
                                                      "| dinov2 | timm:NAME[@CKPT] | pixels[:SIZE]")] = None,
    output: Annotated[str | None, typer.Option(help="folder for the table and grids (default <dataset>/inspect)")]
    = None,
    classifier: Annotated[str | None, typer.Option(help="model folder for classifiability (default: the "
                                                        "features' model when it is a classifier)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="dotted override key=value, e.g. k=3")] = None,
) -> None:
    """Dataset diagnostics: fidelity, diversity, coverage, classifiability per class, against real images."""
    from synclone.config import apply_overrides, validate
    from synclone.inspect import InspectConfig, inspect_dataset

    raw = {"dataset": dataset, "reference": reference, "features": features, "output": output,
           "classifier": classifier}
    cfg = validate(InspectConfig, apply_overrides(raw, set_ or []), source="inspect")
    inspect_dataset(cfg)
    from synclone.inspect.run import default_output

    _done(cfg.output or default_output(cfg.dataset))


@generator_app.command("train")
def generator_train(args: ArgsT = None, quiet: bool = False) -> None:
    """Train the small class-conditional pixel-space diffusion generator (resumable)."""
    from synclone.generate.classcond_train import GeneratorTrainConfig, train_generator

    _done(train_generator(_load(GeneratorTrainConfig, args), progress=not quiet))


@generator_app.command("finetune")
def generator_finetune(args: ArgsT = None, quiet: bool = False) -> None:
    """Fine-tune a diffusers text-to-image pipeline on real images: a LoRA adapter or the whole UNet (resumable)."""
    from synclone.generate.finetune import FinetuneConfig, finetune

    _done(finetune(_load(FinetuneConfig, args), progress=not quiet))


@app.command()
def run(
    recipe: Annotated[str, typer.Argument(help="recipe YAML: generate -> curate -> train -> evaluate -> report")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option(help="validate the recipe and print the plan only")] = False,
    quick: Annotated[bool, typer.Option(help="apply the recipe's own 'quick:' overrides (a miniature run)")] = False,
) -> None:
    """Run a whole experiment from one recipe; finished stages are skipped, interrupted ones resumed."""
    from synclone.recipe import load_recipe, run_recipe

    cfg = load_recipe(recipe, overrides or [], quick=quick)
    if dry_run:  # writes nothing
        _done(run_recipe(cfg, dry_run=True))
        return
    with _locked(cfg.output, "run", [recipe, *(overrides or [])]):
        _done(run_recipe(cfg))


@app.command()
def sweep(
    recipe: Annotated[str, typer.Argument(help="recipe YAML whose vars: the grid sets")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides of the recipe",
                                                          show_default=False)] = None,
    grid: Annotated[list[str] | None, typer.Option(
        help="vars.NAME=V1,V2,... (repeatable; every combination is one run; adds to the recipe's sweep.grid)")] = None,
    seeds: Annotated[str | None, typer.Option(help="values of vars.seed, e.g. 0,1,2: each grid point once per seed")]
    = None,
    metric: Annotated[list[str] | None, typer.Option(
        help="metric to draw (repeatable): clean_top1, ece, mce, ..., PROBE/METRIC or inspect/METRIC")] = None,
    out: Annotated[str | None, typer.Option(help="sweep folder (default: the recipe's output)")] = None,
    quick: Annotated[bool, typer.Option(help="apply the recipe's own 'quick:' overrides (a miniature sweep)")] = False,
    dry_run: Annotated[bool, typer.Option(help="check the grid, plan every run, print what is shared; run nothing")]
    = False,
) -> None:
    """Run a recipe at every point of a grid of its variables (x seeds), sharing stages; one table and a report."""
    from synclone.recipe.sweep import dry_run as plan_sweep
    from synclone.recipe.sweep import load_sweep, run_sweep

    sw = load_sweep(recipe, grid=grid, seeds=seeds, metrics=metric, output=out, overrides=overrides, quick=quick)
    if dry_run:
        plan_sweep(sw)
        return
    with _locked(str(sw.output), "sweep", [recipe, *(overrides or [])]):
        _done(run_sweep(sw))


@app.command("er")
def er(
    table: Annotated[str, typer.Argument(help="CSV of accuracies: one row per model, one column per test set")],
    id_col: Annotated[str, typer.Option("--id", help="in-distribution accuracy column (e.g. val)")],
    shift_col: Annotated[str, typer.Option("--shift", help="shifted accuracy column (e.g. imagenet-r)")],
    models: Annotated[str | None, typer.Option(help="comma-separated rows to score (default: every row)")] = None,
    baselines: Annotated[str | None, typer.Option(
        help="comma-separated rows (shell patterns) that form the trend (default: every row not in --models)")] = None,
    filter_: Annotated[list[str] | None, typer.Option(
        "--filter", help="keep rows with COLUMN=VALUE (repeatable; e.g. the testbed's model type)")] = None,
    scale: Annotated[str, typer.Option(help="auto | percent | fraction")] = "auto",
    model_column: Annotated[str | None, typer.Option(help="column naming the rows (default: model/name)")] = None,
    types: Annotated[str | None, typer.Option(
        help="model types (CSV model,type or JSON) joined as column 'type', e.g. --filter type=STANDARD")] = None,
) -> None:
    """Effective robustness from accuracies alone: the logit-linear fit over baseline rows and each model's ER."""
    from synclone.probes.shift import er_from_table

    if scale not in ("auto", "percent", "fraction"):
        raise UserError(f"--scale '{scale}': use auto, percent or fraction")
    filters: dict[str, list[str]] = {}
    for f in filter_ or []:
        col, sep, value = f.partition("=")
        if not sep or not col:
            raise UserError(f"--filter '{f}': write COLUMN=VALUE")
        filters.setdefault(col.strip(), []).append(value.strip())
    split = (lambda text: [t.strip() for t in text.split(",") if t.strip()] if text else None)  # noqa: E731
    res = er_from_table(table, id_col, shift_col, models=split(models), baselines=split(baselines),
                        filter=filters, scale=scale, model_column=model_column, types=types)
    fit = res.fit
    typer.echo(f"fit: logit({shift_col}) = {fit.a:.6g} * logit({id_col}) + {fit.b:.6g}   R^2 = {fit.r2:.6g}   "
               f"n = {fit.n} baselines   (accuracies read as {res.scale}"
               + (f"; {res.dropped_blank} rows blank in either column left out" if res.dropped_blank else "") + ")")
    width = max(len(m) for m in res.er)
    typer.echo(f"{'model':<{width}}  {id_col:>10}  {shift_col:>10}  {'ER (pp)':>9}")
    for m, value in res.er.items():
        a_id, a_shift = res.acc[m]
        typer.echo(f"{m:<{width}}  {100 * a_id:>10.2f}  {100 * a_shift:>10.2f}  {value:>+9.2f}")


@app.command()
def demo(
    quick: Annotated[bool, typer.Option(help="a ~2-minute version on subsets (what the tests run)")] = False,
    output: Annotated[str, typer.Option(help="demo folder")] = "runs/demo",
    dry_run: Annotated[bool, typer.Option(help="print the plan only")] = False,
) -> None:
    """The built-in Fashion-MNIST synthetic-clone experiment, end to end, offline."""
    from synclone.recipe import demo_recipe, run_recipe

    if dry_run:
        _done(run_recipe(demo_recipe(output, quick=quick), dry_run=True))
        return
    with _locked(output, "demo", ["--output", output] + (["--quick"] if quick else [])):
        _done(run_recipe(demo_recipe(output, quick=quick)))


def main(argv: list[str] | None = None) -> int:
    """Console entry point: UserError -> one line on stderr and exit code 2, no traceback."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app(args=argv, standalone_mode=False)
    except UserError as err:
        typer.echo(f"error: {err}", err=True)
        return UserError.exit_code
    except KeyboardInterrupt:
        typer.echo("interrupted; re-run the same command to resume", err=True)
        return 130
    except typer.Exit as e:
        return e.exit_code
    except Exception as e:  # a full disk (however a library reports it); click's usage errors
        import click

        from synclone.util.disk import disk_full_error, disk_full_message

        full = disk_full_error(e)
        if full is not None:
            typer.echo(f"error: {disk_full_message(full)}", err=True)
            return UserError.exit_code

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            return 2
        if isinstance(e, click.exceptions.Abort):
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
