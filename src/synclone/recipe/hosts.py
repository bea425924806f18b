"""Which CPUs made a run's stages.

A recipe repeats bit for bit on one machine, but torch and oneDNN pick their kernels by the CPU they find and
those kernels round differently, so a stage made elsewhere (a run or sweep folder moved to another machine and
continued there) gives numbers that match a one-machine run only up to run-to-run noise. Every stage's
``run.json`` names its CPU (:func:`synclone.config.host_info`); this reads them back.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from synclone.config import read_json
from synclone.errors import UserError


def stage_hosts(folders: Iterable[Path]) -> dict[str, list[str]]:
    """``"CPU model, kernel level"`` -> names of the stage folders made on it, from each folder's ``run.json``.

    Folders without that record (not run yet, or made before ``run.json`` named the CPU) are left out.
    """
    hosts: dict[str, list[str]] = {}
    for folder in dict.fromkeys(Path(f) for f in folders):
        try:
            host = read_json(folder / "run.json").get("host")
        except UserError:  # missing or unreadable: that stage tells nothing about its CPU
            continue
        if isinstance(host, dict) and host.get("cpu_capability"):
            hosts.setdefault(f"{host.get('cpu') or 'unknown CPU'}, {host['cpu_capability']}", []).append(folder.name)
    return hosts


def mixed_hosts_note(folders: Iterable[Path]) -> str | None:
    """A one-line note when the stages in ``folders`` were made on more than one CPU, else ``None``."""
    hosts = stage_hosts(folders)
    if len(hosts) < 2:
        return None
    made = "; ".join(f"{len(names)} on {host} ({names[0]}{', ...' if len(names) > 1 else ''})"
                     for host, names in sorted(hosts.items()))
    return (f"note: these stages were made on different CPUs: {made}. Their kernels round differently, so the "
            "numbers match a run made on one machine up to run-to-run noise, not digit for digit")
