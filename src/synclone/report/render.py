"""Write the sections as one self-contained HTML file (figures as base64 PNG data URIs) and as Markdown.

The HTML needs no other file: CSS is inline, there is no script, fonts are the system's. The
Markdown holds the same tables and links the same figures, written as PNG files under ``figures/``.
"""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape
from PIL import Image

from synclone.report.sections import Section

# Sections whose tables hold words rather than numbers: left-aligned and wrapping.
TEXT_SECTIONS = ("datasets", "training", "provenance")
_OWN_FIGURE = re.compile(r"^\d{2}-[a-z0-9-]+-\d+\.png$")


def _env() -> Environment:
    return Environment(loader=PackageLoader("synclone.report", "templates"), autoescape=select_autoescape(["j2"]),
                       trim_blocks=True, lstrip_blocks=True)


def write_figures(sections: list[Section], folder: Path) -> None:
    """Name every figure and write it under ``folder``; figures an earlier report wrote there are removed first."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        if old.is_file() and _OWN_FIGURE.match(old.name):
            old.unlink()
    for i, sec in enumerate(sections):
        for k, fig in enumerate(sec.figures):
            fig.name = f"{i:02d}-{sec.id}-{k + 1}.png"
            (folder / fig.name).write_bytes(fig.png)


def render_html(title: str, meta: str, summary: str, sections: list[Section], version: str, n_folders: int) -> str:
    """The report as one HTML string."""
    views = []
    for s in sections:
        figs = []
        for f in s.figures:
            w, h = Image.open(io.BytesIO(f.png)).size
            figs.append({"data": base64.b64encode(f.png).decode("ascii"), "caption": f.caption, "width": w,
                         "height": h})
        views.append({"id": s.id, "title": s.title, "text": s.text, "tables": s.tables, "figures": figs,
                      "code": s.code})
    return _env().get_template("report.html.j2").render(
        title=title, meta=meta, summary=summary, sections=views, version=version, n_folders=n_folders,
        text_sections=TEXT_SECTIONS)


def render_markdown(title: str, meta: str, summary: str, sections: list[Section], figures_dir: str) -> str:
    """The report as Markdown: the same tables, figures linked from ``figures_dir``."""
    out = [f"# {title}", "", f"_{meta}_", "", summary, ""]
    for s in sections:
        out += [f"## {s.title}", ""]
        if s.text:
            out += [s.text, ""]
        for f in s.figures:
            out += [f"![{f.caption}]({figures_dir}/{f.name})", "", f"_{f.caption}_", ""]
        for t in s.tables:
            out += [t.to_markdown(), ""]
        for label, text in s.code:
            out += [f"<details><summary>{label}</summary>", "", "```yaml", text.rstrip(), "```", "", "</details>", ""]
    return "\n".join(out).rstrip() + "\n"
