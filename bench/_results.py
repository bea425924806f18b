"""Writing one section of bench/RESULTS.md from a benchmark script (``--write``)."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def write_section(section: str, text: str) -> None:
    """Replace (or append) the section headed ``section`` (e.g. "## Corruptions") with ``text``, leaving the
    other sections alone."""
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    start = old.find(section + "\n")
    if start < 0:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    else:
        end = old.find("\n## ", start + len(section))
        new = old[:start] + text + ("\n\n" + old[end + 1:] if end >= 0 else "\n")
    RESULTS.write_text(new)
