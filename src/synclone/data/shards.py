"""Sharded tar datasets (webdataset format) for network filesystems and object stores.

``synclone shard FOLDER --shard-size 1GB`` packs a dataset folder (synclone, plain class folders or an
ImageNet layout) into ``shard-000000.tar, ...`` written by ``webdataset.ShardWriter``: one sample per image,
``<key>.<jpg|png|...>`` (the file's bytes, unchanged), ``<key>.cls`` (label) and ``<key>.json`` (id, class
name, source file). Any webdataset reader reads them. Beside them synclone writes ``shards.json`` (label
space, shard names, sizes and counts) and ``index.npz`` (for every image: shard, byte offset, size, label),
so a :class:`ShardImageSet` can read any image with one ranged read and training keeps its exact,
step-addressed order: the order of an epoch is a seeded permutation that visits shards in a shuffled order
and shuffles images within a window of a few shards (reads stay local to the shards being visited).
"""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from synclone.data.decode import BadImage, decode_rgb, resize_center_crop
from synclone.data.imageset import ImageSet
from synclone.errors import UserError
from synclone.labels import LabelSpace
from synclone.util.files import atomic_path, write_json_atomic

INDEX_JSON = "shards.json"
INDEX_NPZ = "index.npz"
PATTERN = "shard-%06d.tar"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30}


def parse_size(text: str | int) -> int:
    """Bytes in ``1GB``, ``500MB``, ``2GiB`` or a plain integer."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise UserError(f"shard size '{text}' is not a size such as 1GB, 500MB or 2GiB")
    n = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if n < 10_000:
        raise UserError(f"shard size '{text}' is too small (at least 10 kB)")
    return n


def write_shards(paths: Sequence[Path], labels: Sequence[int], ids: Sequence[str], label_space: LabelSpace,
                 output: str | Path, shard_size: int, source: str = "") -> Path:
    """Pack image files into webdataset shards of at most ``shard_size`` bytes; returns the output folder."""
    import webdataset as wds

    out = Path(output)
    if (out / INDEX_JSON).exists():
        raise UserError(f"'{out}' already holds shards; choose another output folder")
    out.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(out / PATTERN), maxsize=shard_size, maxcount=10**9, verbose=0) as sink:
        for i, (p, label, iid) in enumerate(zip(paths, labels, ids, strict=True)):
            try:
                data = Path(p).read_bytes()
            except OSError as err:
                raise UserError(f"cannot read '{p}': {err.strerror or err}") from None
            ext = Path(p).suffix.lower().lstrip(".").replace("jpeg", "jpg") or "img"
            sink.write({"__key__": f"{i:09d}", ext: data, "cls": int(label),
                        "json": {"id": str(iid), "class_name": label_space.classes[int(label)], "file": str(p)}})
    shards = sorted(out.glob("shard-*.tar"))
    shard_idx, offsets, sizes = np.zeros(len(paths), np.int32), np.zeros(len(paths), np.int64), \
        np.zeros(len(paths), np.int64)
    entries = []
    for s, path in enumerate(shards):
        count = 0
        with tarfile.open(path) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                if ext in ("cls", "json"):
                    continue
                i = int(key)
                shard_idx[i], offsets[i], sizes[i] = s, m.offset_data, m.size
                count += 1
        entries.append({"name": path.name, "bytes": path.stat().st_size, "images": count})
    with atomic_path(out / INDEX_NPZ) as tmp, open(tmp, "wb") as f:
        np.savez(f, shard=shard_idx, offset=offsets, size=sizes, label=np.asarray(labels, np.int64))
    write_json_atomic(out / INDEX_JSON, {"format": "webdataset", "writer": "synclone shard", "images": len(paths),
                                         "label_space": label_space.to_dict(), "source": source, "shards": entries})
    return out


def is_shard_folder(path: Path) -> bool:
    return (Path(path) / INDEX_JSON).is_file()


class ShardImageSet(ImageSet):
    """The images of a shard folder, read by byte range: a streamed set like ``FileImageSet``.

    Items decode at ``input_size`` with the evaluation preprocessing (resize to size / 0.875, centre crop);
    the training loader reads the raw bytes (:meth:`read_bytes`) and applies its own augmentation.
    """

    def __init__(self, root: str | Path, input_size: Sequence[int] = (3, 224, 224), name: str | None = None,
                 _select: torch.Tensor | None = None, _meta: dict | None = None) -> None:
        self.root = Path(root)
        info = _meta or self._open()
        self._info = info
        self.label_space = LabelSpace.from_dict(info["json"]["label_space"])
        sel = torch.arange(len(info["label"])) if _select is None else _select
        self._sel = sel
        self.labels = torch.as_tensor(info["label"])[sel].long()
        self.shard_ids = torch.as_tensor(info["shard"])[sel].long()
        self.input_size = tuple(int(v) for v in input_size)
        self.name = name or self.root.name
        self.source = str(self.root)
        self.extra: dict = {}

    def _open(self) -> dict:
        try:
            meta = json.loads((self.root / INDEX_JSON).read_text(encoding="utf-8"))
            with np.load(self.root / INDEX_NPZ, allow_pickle=False) as z:
                arrays = {k: z[k] for k in ("shard", "offset", "size", "label")}
        except (OSError, ValueError, KeyError) as err:
            raise UserError(f"shard folder '{self.root}': cannot read its index ({err}); "
                            "re-run synclone shard") from None
        for s, entry in enumerate(meta["shards"]):
            path = self.root / entry["name"]
            have = path.stat().st_size if path.is_file() else -1
            m = arrays["shard"] == s
            need = int((arrays["offset"][m] + arrays["size"][m]).max()) if m.any() else 0
            if have < need or (have != entry["bytes"]):
                what = "is missing" if have < 0 else f"is cut short ({have} of {entry['bytes']} bytes)"
                raise UserError(f"shard '{path}' {what}; copy it again or re-run synclone shard")
        return {"json": meta, **arrays}

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.input_size  # type: ignore[return-value]

    def shard_path(self, s: int) -> Path:
        return self.root / self._info["json"]["shards"][s]["name"]

    def read_bytes(self, i: int) -> bytes:
        """The stored file bytes of image ``i`` (one ranged read)."""
        j = int(self._sel[i])
        s, off, size = int(self._info["shard"][j]), int(self._info["offset"][j]), int(self._info["size"][j])
        path = self.shard_path(s)
        try:
            with open(path, "rb") as f:
                f.seek(off)
                data = f.read(size)
        except OSError as err:
            raise BadImage(f"shard '{path}': {err.strerror or err}") from None
        if len(data) != size:
            raise BadImage(f"shard '{path}' is cut short (image {j} needs bytes {off}..{off + size})")
        return data

    def describe(self, i: int) -> str:
        j = int(self._sel[i])
        return f"{self.shard_path(int(self._info['shard'][j])).name}#{j}"

    def decode(self, i: int, size: Sequence[int]) -> torch.Tensor:
        c, h, _ = (int(v) for v in size)
        try:
            im = decode_rgb(self.read_bytes(i), min_side=int(h / 0.875), name=self.describe(i))
        except BadImage as err:
            raise UserError(f"cannot read image {err}") from None
        x = resize_center_crop(im, h)
        return x.float().mean(0, keepdim=True).round().to(torch.uint8) if c == 1 else x

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.decode(i, self.image_shape).float() / 255.0, int(self.labels[i])

    def iter_batches(self, batch_size: int, input_size: Sequence[int] | None = None,
                     indices: Sequence[int] | None = None) -> Iterator[torch.Tensor]:
        order = list(range(len(self))) if indices is None else [int(i) for i in indices]
        for start in range(0, len(order), max(1, batch_size)):
            yield torch.stack([self.decode(i, self.image_shape) for i in order[start:start + batch_size]])

    def batch(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        chosen = torch.arange(len(self))[idx] if isinstance(idx, slice) else torch.as_tensor(idx).reshape(-1)
        parts = list(self.iter_batches(max(1, len(chosen)), indices=chosen.tolist()))
        x = torch.cat(parts) if parts else torch.empty((0, *self.image_shape), dtype=torch.uint8)
        return x.float().div_(255.0), self.labels[chosen]

    def subset(self, idx: torch.Tensor, name: str | None = None) -> ShardImageSet:
        idx = torch.as_tensor(idx).reshape(-1)
        return ShardImageSet(self.root, self.input_size, name or self.name, self._sel[idx], self._info)

    def class_counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=len(self.label_space)).tolist()

    def fingerprint(self) -> str:
        h = hashlib.sha1()
        h.update(json.dumps(self._info["json"], sort_keys=True).encode())
        h.update(repr(self.input_size).encode())
        h.update(self._sel.numpy().tobytes())
        return h.hexdigest()[:16]


def iter_webdataset(root: str | Path) -> Iterator[dict]:
    """The samples of a shard folder read back sequentially by webdataset itself (``__key__`` and raw fields)."""
    import webdataset as wds

    meta = json.loads((Path(root) / INDEX_JSON).read_text(encoding="utf-8"))
    urls = [str(Path(root) / e["name"]) for e in meta["shards"]]
    yield from wds.WebDataset(urls, shardshuffle=False, empty_check=False)


__all__ = ["ShardImageSet", "is_shard_folder", "iter_webdataset", "parse_size", "write_shards"]
