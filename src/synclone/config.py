"""Typed configs: YAML files plus dotted command-line overrides, and the run snapshot.

Every config is a pydantic model that forbids unknown keys, so a typo ("epocs") is an error that
names the key instead of a silently ignored setting. ``load_config`` merges, in order: the model's
defaults, a YAML file, then ``key.sub=value`` overrides from the command line.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from synclone.errors import UserError
from synclone.util.files import write_text_atomic

C = TypeVar("C", bound=BaseModel)


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def _parse_value(text: str) -> Any:
    """Parse an override's value as YAML so ``3``, ``0.1``, ``true``, ``[a, b]`` get their types."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides to a nested dict (returns a new dict)."""
    out = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' is not of the form key=value (e.g. optim.epochs=3)")
        key, value = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise UserError(f"override '{item}' has an empty key")
        node = out
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise UserError(f"override '{item}': '{p}' is a value, not a section")
            node = nxt
        node[parts[-1]] = _parse_value(value)
    return out


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    """One line naming each bad key, e.g. ``unknown config key 'optim.epocs'``."""
    msgs = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        where = f"{prefix}{loc}" if loc else prefix.rstrip(".") or "config"
        if e["type"] == "extra_forbidden":
            msgs.append(f"unknown config key '{where}'")
        elif e["type"] == "missing":
            msgs.append(f"missing config key '{where}'")
        else:
            msgs.append(f"bad value for '{where}': {e['msg']} (got {e.get('input')!r})")
    return "; ".join(msgs)


def _non_finite(data: Any, path: str = "") -> str | None:
    """The dotted key of the first NaN / infinite float in plain config data, or None."""
    if isinstance(data, float) and not math.isfinite(data):
        return path or "config"
    if isinstance(data, dict):
        items = data.items()
    elif isinstance(data, list | tuple):
        items = enumerate(data)
    else:
        return None
    for k, v in items:
        found = _non_finite(v, f"{path}.{k}" if path else str(k))
        if found:
            return found
    return None


def validate(cls: type[C], data: dict, source: str = "config") -> C:
    """``data`` validated into ``cls``; any problem (unknown key, bad value, NaN / infinity) is one UserError line."""
    bad = _non_finite(data)
    if bad:
        raise UserError(f"{source}: bad value for '{bad}': it is not a finite number; give a finite value")
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise UserError(f"{source}: {format_validation_error(err)}") from None


def read_json(path: str | Path, kind: type = dict) -> Any:
    """A JSON file that must hold a ``kind`` (object or list); any problem is a one-line UserError."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read '{p}': {err}") from None
    if not isinstance(data, kind):
        raise UserError(f"'{p}' must hold a JSON {'object' if kind is dict else kind.__name__}")
    return data


# A config is a few hundred values; anchors and aliases that expand past this many nodes are a "YAML bomb"
# (each level of aliases multiplies the size), refused before anything copies the expanded tree.
YAML_NODE_BUDGET = 100_000
YAML_MAX_BYTES = 16 << 20


def _expanded_nodes(node: yaml.Node, memo: dict[int, int], path: set[int]) -> int:
    """How many nodes ``node`` becomes once every alias is expanded (memoised per node, cycles refused)."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in path:
        raise RecursionError
    path.add(key)
    total = 1
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            total += _expanded_nodes(k, memo, path) + _expanded_nodes(v, memo, path)
            if total > YAML_NODE_BUDGET:
                break
    elif isinstance(node, yaml.SequenceNode):
        for v in node.value:
            total += _expanded_nodes(v, memo, path)
            if total > YAML_NODE_BUDGET:
                break
    path.discard(key)
    memo[key] = total
    return total


def parse_yaml(text: str, source: str) -> Any:
    """YAML text -> plain data, refusing alias expansions over :data:`YAML_NODE_BUDGET` nodes and cycles."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        try:
            size = _expanded_nodes(node, {}, set())
        except RecursionError:
            raise UserError(f"{source}: its anchors and aliases refer to themselves (a cycle); write the values "
                            "out") from None
        if size > YAML_NODE_BUDGET:
            raise UserError(f"{source}: its anchors and aliases expand to more than {YAML_NODE_BUDGET:,} values; "
                            "write the config without nested aliases")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def load_yaml(path: str | Path) -> dict:
    """A YAML config file as a dict; a missing file, bad encoding, bad YAML or a YAML bomb is one UserError line."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file '{p}' does not exist")
    if p.stat().st_size > YAML_MAX_BYTES:
        raise UserError(f"config file '{p}' is larger than {YAML_MAX_BYTES >> 20} MB; a config is a few kB")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"config file '{p}' is not UTF-8 text (byte {err.start}: {err.reason}); save it as "
                        "UTF-8") from None
    try:
        data = parse_yaml(text, f"config file '{p}'") or {}
    except yaml.YAMLError as err:
        raise UserError(f"config file '{p}' is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file '{p}' must hold a mapping of keys, not {type(data).__name__}")
    return data


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Defaults <- YAML file <- dotted overrides, validated into ``cls``."""
    data = load_yaml(path) if path else {}
    data = apply_overrides(data, overrides or [])
    return validate(cls, data, source=str(path) if path else "config")


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# --- run snapshot -------------------------------------------------------------------------------

_TRACKED_PACKAGES = (
    "synclone", "torch", "torchvision", "timm", "accelerate", "numpy", "diffusers", "transformers",
    "open_clip_torch", "safetensors", "pandas",
)


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_sha() -> str:
    """The git commit of the synclone source tree (or 'unknown' when installed from a wheel)."""
    here = Path(__file__).resolve().parent
    try:
        res = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=False
        )
        sha = res.stdout.strip()
        if res.returncode == 0 and sha:
            # --no-optional-locks: status would otherwise refresh the index under index.lock, which a run killed
            # at that moment (kill -9 of a sweep or a recipe run) leaves behind, blocking the user's next git command.
            dirty = subprocess.run(
                ["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                capture_output=True, text=True, timeout=5, check=False,
            ).stdout.strip()
            return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def _cpu_model() -> str:
    try:  # Linux names the model here; platform.processor() is often empty there
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def host_info() -> dict:
    """The machine a run is made on: platform, CPU count, CPU model and torch's CPU kernel level.

    The same code, config and data give bit-identical weights on one machine, but not across CPUs: torch and
    oneDNN pick kernels by the instruction set they find (``cpu_capability``: AVX2, AVX512, ...), the float
    rounding of those kernels differs, and training carries the difference to every digit. Two runs whose
    numbers differ are comparable only when these fields agree.
    """
    import torch  # every caller runs torch work; kept out of the module so config loading stays light

    return {"platform": platform.platform(), "cpus": os.cpu_count(), "cpu": _cpu_model(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def write_run_info(out_dir: str | Path, cfg: BaseModel | None = None, command: str | None = None) -> dict:
    """Write ``config.yaml`` (resolved) and ``run.json`` (versions, git sha, command, time) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg is not None:
        write_text_atomic(out / "config.yaml", dump_config(cfg))
    info = {
        "command": command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": git_sha(),
        "versions": package_versions(),
        "host": host_info(),
    }
    write_text_atomic(out / "run.json", json.dumps(info, indent=2) + "\n")
    return info
