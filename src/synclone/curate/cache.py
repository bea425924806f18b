"""On-disk caches of what a model computed per image and per text, keyed by content hash.

Layout under the cache folder::

    files.json                      path -> [size, mtime_ns, sha1 of the bytes]: re-runs skip re-hashing
    <scorer id>/meta.json           e.g. the CLIP model's logit scale, so a fully cached run loads no model
    <scorer id>/images-*.safetensors  rows of embedding / logits / pixel stats, metadata "keys" = sha1s
    <scorer id>/texts-*.safetensors   text embeddings keyed by sha1 of the text
    <scorer id>/classes-*.safetensors zero-shot class embeddings keyed by label space + templates

Keying by the bytes (not the path) means a moved or copied dataset still hits, a re-generated image with
the same name does not, and identical files are scored once. Each scoring run appends one shard file
(written to a temporary name, then renamed), so an interrupted run keeps what it had finished.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from synclone.errors import UserError
from synclone.util.files import atomic_path, write_text_atomic


def sha1_bytes(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def sha1_text(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


class FileKeys:
    """Content hashes of files, remembered by (path, size, mtime) so unchanged files are not read again."""

    def __init__(self, root: Path) -> None:
        self.path = root / "files.json"
        self.entries: dict[str, list] = {}
        if self.path.is_file():
            try:
                self.entries = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                self.entries = {}  # a damaged index only costs re-hashing
        self.dirty = False

    def lookup(self, path: Path) -> str | None:
        """The file's sha1 if its size and mtime still match the remembered ones, else None."""
        try:
            st = path.stat()
        except OSError:
            return None
        hit = self.entries.get(str(path))
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return hit[2]
        return None

    def remember(self, path: Path, data: bytes) -> str:
        key = sha1_bytes(data)
        try:
            st = path.stat()
            self.entries[str(path)] = [st.st_size, st.st_mtime_ns, key]
            self.dirty = True
        except OSError:
            pass
        return key

    def key_of(self, path: Path) -> str | None:
        """The file's sha1 (streamed, remembered); None if it cannot be read."""
        hit = self.lookup(path)
        if hit is not None:
            return hit
        h = hashlib.sha1()
        try:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            st = path.stat()
        except OSError:
            return None
        self.entries[str(path)] = [st.st_size, st.st_mtime_ns, h.hexdigest()]
        self.dirty = True
        return h.hexdigest()

    def save(self) -> None:
        if self.dirty:
            write_text_atomic(self.path, json.dumps(self.entries))
            self.dirty = False


class TensorStore:
    """Rows of named float32 arrays keyed by strings, stored as append-only safetensors shards.

    Every shard holds the same array names for its rows (e.g. ``embedding`` (n, d), ``stats`` (n, 5));
    ``errors`` (metadata) maps keys of rows that failed (unreadable images) to their message.
    """

    def __init__(self, folder: Path, prefix: str) -> None:
        self.folder = folder
        self.prefix = prefix
        self.index: dict[str, tuple[int, int]] = {}  # key -> (shard, row)
        self.errors: dict[str, str] = {}
        self.shards: list[dict[str, np.ndarray]] = []
        for f in sorted(folder.glob(f"{prefix}-*.safetensors")):
            self._load_shard(f)

    def _load_shard(self, f: Path) -> None:
        try:
            with safe_open(str(f), framework="numpy") as sf:
                meta = sf.metadata() or {}
            arrays = load_file(str(f))
            keys = json.loads(meta.get("keys", "[]"))
            errors = json.loads(meta.get("errors", "{}"))
        except (SafetensorError, OSError, json.JSONDecodeError, ValueError):
            return  # a damaged shard is skipped; its rows are simply computed again
        s = len(self.shards)
        self.shards.append(arrays if keys else {})
        for row, k in enumerate(keys):
            self.index[k] = (s, row)
        self.errors.update(errors)

    def __contains__(self, key: str) -> bool:
        return key in self.index or key in self.errors

    def __len__(self) -> int:
        return len(self.index)

    def missing(self, keys: list[str]) -> list[str]:
        """The distinct keys not stored yet, in first-seen order."""
        out, seen = [], set()
        for k in keys:
            if k not in self.index and k not in self.errors and k not in seen:
                seen.add(k)
                out.append(k)
        return out

    def add(self, keys: list[str], arrays: dict[str, np.ndarray], errors: dict[str, str] | None = None) -> Path | None:
        """Append rows (one per key) and failed keys (``errors``) as a new shard file; returns its path."""
        errors = dict(errors or {})
        if not keys and not errors:
            return None
        for name, a in arrays.items():
            if len(a) != len(keys):
                raise ValueError(f"array '{name}' has {len(a)} rows for {len(keys)} keys")
        self.folder.mkdir(parents=True, exist_ok=True)
        arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()} if keys else {}
        name = f"{self.prefix}-{uuid.uuid4().hex[:12]}.safetensors"
        meta = {"keys": json.dumps(keys), "errors": json.dumps(errors)}
        with atomic_path(self.folder / name) as tmp:
            # safetensors needs at least one tensor; a shard of only failed keys carries a placeholder.
            save_file(arrays or {"_placeholder": np.zeros(1, dtype=np.float32)}, str(tmp), metadata=meta)
        s = len(self.shards)
        self.shards.append(arrays)
        for row, k in enumerate(keys):
            self.index[k] = (s, row)
        self.errors.update(errors)
        return self.folder / name

    def get(self, keys: list[str], name: str) -> np.ndarray:
        """Stack array ``name`` for ``keys`` (every key must be stored), gathering shard by shard."""
        if not keys:
            return np.zeros((0,), dtype=np.float32)
        where = np.array([self.index[k] for k in keys], dtype=np.int64)
        out: np.ndarray | None = None
        for s in np.unique(where[:, 0]):
            arrays = self.shards[s]
            if name not in arrays:
                raise KeyError(f"cache shard has no array '{name}'")
            rows = np.nonzero(where[:, 0] == s)[0]
            part = arrays[name][where[rows, 1]]
            if out is None:
                out = np.empty((len(keys), *part.shape[1:]), dtype=part.dtype)
            out[rows] = part
        return out

    def compact(self, max_shards: int = 16) -> None:
        """Merge the shards into one when there are more than ``max_shards`` (keeps loading fast)."""
        files = sorted(self.folder.glob(f"{self.prefix}-*.safetensors"))
        if len(files) <= max_shards:
            return
        filled = [set(s) for s in self.shards if s]
        names = set.intersection(*filled) if filled else set()
        keys = list(self.index) if names else []
        arrays = {n: self.get(keys, n) for n in names}
        errors = dict(self.errors)
        self.shards, self.index, self.errors = [], {}, {}
        keep = self.add(keys, arrays, errors)
        for f in files:
            if f != keep:
                f.unlink(missing_ok=True)


class ScorerCache:
    """The cache of one scorer: image rows, text embeddings, class embeddings, and small facts (meta.json)."""

    def __init__(self, root: str | Path, scorer_id: str) -> None:
        self.root = Path(root)
        self.folder = self.root / scorer_id
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create the embedding cache '{self.folder}' ({err.strerror}); "
                            "set cache_dir to a writable folder") from None
        self.files = FileKeys(self.root)
        self.images = TensorStore(self.folder, "images")
        self.texts = TensorStore(self.folder, "texts")
        self.classes = TensorStore(self.folder, "classes")
        meta_path = self.folder / "meta.json"
        self.meta: dict = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}

    def set_meta(self, **kv) -> None:
        if all(self.meta.get(k) == v for k, v in kv.items()):
            return
        self.meta.update(kv)
        write_text_atomic(self.folder / "meta.json", json.dumps(self.meta, indent=2))
