"""``build_report``: evaluation folders (+ optional curation, datasets, training runs) -> report.html + report.md."""

from __future__ import annotations

import datetime as _dt
from importlib import metadata
from pathlib import Path

from synclone.errors import UserError
from synclone.report import figures as F
from synclone.report.inputs import read_curation, read_dataset, read_train_run
from synclone.report.inspection import find_inspection, inspection_section, read_inspection
from synclone.report.load import Evaluations, load_evaluations
from synclone.report.metrics import best_flags, fmt, metric_info
from synclone.report.render import render_html, render_markdown, write_figures
from synclone.report.sections import (
    Section,
    dataset_sections,
    probe_sections,
    provenance_section,
    training_section,
)
from synclone.report.verdict import verdict_columns, verdict_table
from synclone.util.files import write_text_atomic

FIGURES_DIR = "figures"


def _version() -> str:
    try:
        return metadata.version("synclone")
    except metadata.PackageNotFoundError:
        return "dev"


def _names(items: list[str], limit: int = 6) -> str:
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def summary_text(ev: Evaluations) -> str:
    """One paragraph: what was evaluated, and which model is best on each headline metric."""
    models = ev.models
    probes = list(dict.fromkeys(ev.results["probe"]))
    datasets = list(dict.fromkeys(ev.results["dataset"]))
    text = (f"{len(models)} model{'s' if len(models) != 1 else ''} ({_names(models)}) evaluated with "
            f"{len(probes)} probe{'s' if len(probes) != 1 else ''} ({_names(probes, 10)}) on "
            f"{_names(datasets)}.")
    bests = []
    for c in verdict_columns(ev.results, ev.artifacts):
        info = metric_info(c.probe, c.metric)
        names = list(c.values)
        values = [c.values[m] for m in names]
        winners = [m for m, b in zip(names, best_flags(values, info.better), strict=True) if b]
        if winners:
            bests.append(f"{c.label}: {' and '.join(winners)} ({fmt(c.values[winners[0]], info.unit)})")
    if bests:
        text += " Best per headline metric — " + "; ".join(bests) + "."
    return text


def build_report(eval_dirs: list[Path] | Path, output: Path, *, title: str = "synclone report",
                 curation: Path | None = None, datasets: list[Path] | None = None,
                 train_runs: dict[str, Path] | None = None, inspections: list[Path] | None = None,
                 transfer: list[Path] | None = None, adaptation: dict | None = None) -> Path:
    """Write ``report.html`` (self-contained), ``report.md`` and ``figures/*.png`` into ``output``.

    ``eval_dirs``: one or more output folders of ``synclone evaluate`` (later folders win on rows
    measured twice). ``curation``: a curated dataset folder (sample grids of kept and dropped images);
    ``datasets``: generated dataset folders (sample grids); ``train_runs``: model name -> training run
    folder (``metrics.json``: which split chose the checkpoint, training curves); ``inspections``: output
    folders of ``synclone inspect`` (a dataset folder's own ``inspect/`` is found without being named);
    ``transfer``: folders of ``kind: transfer`` stages (the "Pre-training" section); ``adaptation``: the "Adapting
    the generator" table's settings (``shifted`` test set name, ``original``, ``models``). Sections without data
    are left out. Returns the path of ``report.html``. Bad input raises :class:`UserError`.
    """
    ev = load_evaluations(eval_dirs)
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise UserError(f"report output '{output}' exists and is not a folder; give a folder to write report.html in")
    cur = read_curation(curation) if curation is not None else None
    data = [read_dataset(p) for p in (datasets or [])]
    runs = [read_train_run(m, p) for m, p in (train_runs or {}).items()]
    models = ev.models + [r.model for r in runs if r.model not in ev.models]
    style = F.Style(models)

    sections: list[Section] = []
    table = verdict_table(ev.results, ev.artifacts, ev.models)
    if table is not None:
        sections.append(Section("verdict", "Verdict", "Headline metrics per model; the best value of each column is "
                                                      "marked (★ in HTML, bold in Markdown).", tables=[table]))
    sections += dataset_sections(data, cur)
    found = [p for d in [*(datasets or []), *([curation] if curation else [])] if (p := find_inspection(d))]
    if (sec := inspection_section([read_inspection(p) for p in dict.fromkeys([*(inspections or []), *found])])):
        sections.append(sec)
    if (sec := training_section(runs, style)) is not None:
        sections.append(sec)
    from synclone.report.pretraining import pretraining_section

    if (sec := pretraining_section(list(transfer or []))) is not None:
        sections.append(sec)
    if adaptation is not None:
        from synclone.report.adaptation import adaptation_section

        if (sec := adaptation_section(ev.results, adaptation)) is not None:
            sections.append(sec)
    sections += probe_sections(ev, style)
    sections.append(provenance_section(ev, runs))
    sections = [s for s in sections if not s.empty]

    shas = sorted({str(f.run.get("git_sha")) for f in ev.folders if f.run.get("git_sha")})
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    meta = f"Generated {now} by synclone {_version()}" + (f" · git {', '.join(shas)}" if shas else "") + \
        f" · {len(ev.folders)} evaluation folder{'s' if len(ev.folders) != 1 else ''}"
    summary = summary_text(ev)

    output.mkdir(parents=True, exist_ok=True)
    write_figures(sections, output / FIGURES_DIR)
    html = render_html(title, meta, summary, sections, _version(), len(ev.folders))
    write_text_atomic(output / "report.md", render_markdown(title, meta, summary, sections, FIGURES_DIR))
    path = output / "report.html"
    write_text_atomic(path, html)  # a browser tab reloading mid-write never sees half a report
    return path
