"""Find a pretrained model as a local folder or in the Hugging Face cache, before anything is loaded.

Checking first turns "unknown model id while offline" into one clear :class:`UserError` raised
before any image is made, instead of a deep stack trace from ``from_pretrained`` halfway through a run.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from synclone.errors import UserError

_TRUE = {"1", "true", "yes", "on"}


def hub_offline() -> bool:
    """True when the Hugging Face libraries are told not to use the network."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model comes from: ``source`` as the user wrote it, ``location`` to pass to ``from_pretrained``."""

    source: str
    location: str
    revision: str | None
    local_folder: bool
    local_files_only: bool


BUILTIN_PREFIX = "builtin:"


def builtin_generator(name: str) -> Path:
    """The folder of a generator shipped inside the package (``builtin:fashion_mnist``)."""
    root = Path(__file__).resolve().parent.parent / "assets" / "generators"
    folder = root / name
    if not name or "/" in name or not (folder / "model_index.json").is_file():
        known = sorted(p.name for p in root.iterdir() if (p / "model_index.json").is_file())
        raise UserError(f"unknown built-in generator '{name}': use one of {', '.join(known)}")
    return folder


def resolve_model(
    name: str, revision: str | None = None, *, marker: str = "model_index.json", what: str = "model",
    local_files_only: bool | None = None,
) -> ResolvedModel:
    """Resolve ``name`` (a folder or a hub id) without loading it; :class:`UserError` if it can't be found.

    A folder must hold ``marker`` (``model_index.json`` for a diffusers pipeline, ``config.json`` for
    a transformers model); its revision is a fingerprint of its config files and weight sizes. A hub
    id must be in the local cache when offline (``HF_HUB_OFFLINE=1`` or ``local_files_only``);
    online, its existence and commit are checked with one metadata request.
    """
    if not name or not str(name).strip():
        raise UserError(f"no {what} given: set it to a hub id (e.g. 'org/name') or a local folder")
    name = source = str(name)
    if name.startswith(BUILTIN_PREFIX):
        # Recorded as written (builtin:NAME), not as the folder it resolves to: a dataset's metadata then does
        # not depend on where the package is installed; the revision fingerprints the weights.
        name = str(builtin_generator(name[len(BUILTIN_PREFIX):]))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / marker).is_file():
            raise UserError(f"{what} folder '{name}' has no {marker}: is it a saved {what} folder?")
        return ResolvedModel(source, str(path), revision or _folder_fingerprint(path), True, True)
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1)
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        looks_like_path = True
    if looks_like_path:
        raise UserError(f"{what} '{name}' is neither an existing folder nor a valid Hugging Face hub id")
    offline = hub_offline() if local_files_only is None else local_files_only
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name, marker, revision=revision)
    if isinstance(cached, str):
        commit = Path(cached).parent.name  # .../snapshots/<commit>/<marker>
        return ResolvedModel(name, name, commit, False, offline)
    if offline:
        raise UserError(
            f"{what} '{name}' is not a local folder and is not in the Hugging Face cache, and the hub is offline "
            f"(HF_HUB_OFFLINE=1): download it first (huggingface-cli download {name}) or give a local folder"
        )
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi().model_info(name, revision=revision)
    except (RepositoryNotFoundError, RevisionNotFoundError):
        rev = revision or "main"
        raise UserError(f"{what} '{name}' (revision {rev}) was not found on the Hugging Face hub") from None
    except OSError as err:  # requests' connection errors are OSErrors
        raise UserError(f"cannot reach the Hugging Face hub to find {what} '{name}': {err}") from None
    return ResolvedModel(name, name, info.sha, False, False)


def _folder_fingerprint(path: Path) -> str:
    """A cheap content fingerprint of a model folder: its JSON configs' bytes and its weight files' sizes."""
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        h.update(rel.encode())
        if f.suffix in (".json", ".txt", ".model"):
            h.update(f.read_bytes())
        else:
            h.update(str(f.stat().st_size).encode())
    return "local:" + h.hexdigest()[:16]
