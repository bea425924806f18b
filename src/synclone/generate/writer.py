"""The dataset folder: atomic PNG writes on a background thread, the ledger, and the final metadata.

Layout (Hugging Face ``imagefolder`` conventions; ``label`` is written explicitly)::

    dataset.json                 label space, generator, prompts, plan, counts, versions
    plan.jsonl                   one job per image, written before any image
    ledger/ledger-<rank>.jsonl   append-only record of every image made or skipped, one file per process
    train/<slug>/<id>.png        the images
    train/metadata.jsonl         one row per image, sorted by id (assembled by :func:`finalize`)
    skipped.jsonl                images the safety checker kept flagging, with the reason

Each image is encoded and written by a writer thread while the model computes the next batch; it
goes to a temporary file that is fsync'd and renamed into place, and only then is its ledger line
appended (and fsync'd). So after a crash (even ``kill -9``) every ledger line points at a complete
file, and a file without a ledger line is simply made again, with the same bytes.
"""

from __future__ import annotations

import hashlib
import heapq
import io
import json
import os
import queue
import threading
from collections.abc import Iterator
from itertools import groupby
from pathlib import Path

from synclone.errors import UserError
from synclone.generate.plan import Job
from synclone.labels import LabelSpace
from synclone.util.files import file_sha256, write_bytes_atomic, write_json_atomic

DATASET_JSON = "dataset.json"
TRAIN_DIR = "train"
METADATA = "metadata.jsonl"
SKIPPED = "skipped.jsonl"
LEDGER_DIR = "ledger"

# Columns of train/metadata.jsonl, in order.
METADATA_FIELDS = (
    "file_name", "id", "label", "class_name", "prompt", "negative_prompt", "seed", "attempt", "strategy",
    "backend", "generator", "generator_revision", "scheduler", "steps", "guidance_scale", "height", "width",
    "batch_size", "reference", "attributes",
)


def ledger_path(out_dir: str | Path, rank: int) -> Path:
    return Path(out_dir) / LEDGER_DIR / f"ledger-{rank:05d}.jsonl"


def safe_image_path(train_dir: Path, file_name: str) -> Path:
    """``train_dir / file_name``, refusing anything that would land outside ``train_dir``."""
    path = (train_dir / file_name).resolve()
    if not path.is_relative_to(train_dir.resolve()):
        raise UserError(f"image path '{file_name}' would be written outside the dataset folder '{train_dir}'")
    return path


def _repair_tail(path: Path) -> None:
    """Cut a torn last line (a crash mid-append) so the next append starts on a fresh line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        f.truncate(data.rfind(b"\n") + 1)


class DatasetWriter:
    """Writes images and ledger lines on a background thread; :meth:`submit` only blocks when it is behind.

    ``row_base`` holds the columns every row shares (generator, scheduler, steps, batch size...).
    """

    def __init__(self, out_dir: str | Path, rank: int, row_base: dict, max_pending: int = 64):
        self.out = Path(out_dir)
        self.train = self.out / TRAIN_DIR
        self.rank = rank
        self.row_base = dict(row_base)
        self.ledger = ledger_path(self.out, rank)
        self.ledger.parent.mkdir(parents=True, exist_ok=True)
        _repair_tail(self.ledger)
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._made_dirs: set[str] = set()
        self.written = 0
        self.skipped = 0
        self._thread = threading.Thread(target=self._run, name="synclone-writer", daemon=True)
        self._thread.start()

    def submit(self, job: Job, image, reason: str | None, seed: int, attempt: int) -> None:
        """Queue one result: a PIL image, or ``None`` with the reason it was skipped."""
        if self._error is not None:
            raise self._error
        self._queue.put((job, image, reason, seed, attempt))

    def close(self) -> None:
        """Wait for every queued image to be on disk; re-raise a failure of the writer thread."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            with open(self.ledger, "a", encoding="utf-8") as ledger:
                while True:
                    item = self._queue.get()
                    if item is None:
                        break
                    if self._error is not None:
                        continue  # keep draining so submit() never blocks forever
                    try:
                        ledger.write(json.dumps(self._write(*item), ensure_ascii=False) + "\n")
                        ledger.flush()
                        if self._queue.empty():  # group commit: one fsync per burst, not per image
                            os.fsync(ledger.fileno())
                    except BaseException as err:  # noqa: BLE001 - handed to the main thread
                        self._error = err
                ledger.flush()
                os.fsync(ledger.fileno())
        except BaseException as err:  # noqa: BLE001 - the last flush or close (a full disk): the main thread reports
            self._error = self._error or err

    def _write(self, job: Job, image, reason: str | None, seed: int, attempt: int) -> dict:
        row = {
            "file_name": job.file_name, "id": job.id, "label": job.label, "class_name": job.class_name,
            "prompt": job.prompt, "negative_prompt": job.negative_prompt, "seed": seed, "attempt": attempt,
            "strategy": job.strategy, **self.row_base, "reference": job.reference, "attributes": job.attributes,
        }
        if image is None:
            self.skipped += 1
            return {**row, "status": "skipped", "reason": reason}
        row["width"], row["height"] = image.size
        path = safe_image_path(self.train, job.file_name)
        if job.slug not in self._made_dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._made_dirs.add(job.slug)
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        data = buf.getvalue()
        write_bytes_atomic(path, data, fsync=True)
        self.written += 1
        return {**row, "status": "ok", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


# --- reading the ledgers ---------------------------------------------------------------------------


def ledger_files(out_dir: str | Path) -> list[Path]:
    return sorted((Path(out_dir) / LEDGER_DIR).glob("ledger-*.jsonl"))


def _rows(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a crash; the image it describes is made again


def row_is_valid(out_dir: Path, row: dict, verify: str = "size") -> bool:
    """A skipped row always counts; an image row counts if its file is there with the recorded size (or hash)."""
    if row.get("status") == "skipped":
        return True
    path = Path(out_dir) / TRAIN_DIR / row["file_name"]
    try:
        if path.stat().st_size != row["bytes"]:
            return False
    except OSError:
        return False
    return verify != "sha256" or file_sha256(path) == row["sha256"]


def done_ids(out_dir: str | Path, n_jobs: int, verify: str = "size") -> tuple[bytearray, int]:
    """A byte per plan id (1 = made or skipped, verified on disk) and how many are done; streams the ledgers."""
    done = bytearray(n_jobs)
    count = 0
    for ledger in ledger_files(out_dir):
        for row in _rows(ledger):
            i = row.get("id")
            if isinstance(i, int) and 0 <= i < n_jobs and not done[i] and row_is_valid(Path(out_dir), row, verify):
                done[i] = 1
                count += 1
    return done, count


def _sorted_rows(path: Path) -> Iterator[dict]:
    """A ledger's rows by id: streamed when already in order (the usual case), else sorted in memory."""
    last = -1
    in_order = True
    for row in _rows(path):
        if row["id"] < last:
            in_order = False
            break
        last = row["id"]
    if in_order:
        yield from _rows(path)
    else:
        yield from sorted(_rows(path), key=lambda r: r["id"])


def finalize(out_dir: str | Path, verify: str = "size") -> dict:
    """Assemble ``train/metadata.jsonl`` (sorted by id) and ``skipped.jsonl`` from every process's ledger.

    Deterministic whatever the number of processes or interruptions: the same plan gives the same
    files byte for byte. Streams (a merge of the sorted ledgers), so memory doesn't grow with the
    dataset. Raises :class:`UserError` if planned images are still missing.
    """
    out = Path(out_dir)
    info = read_dataset_json(out)
    n_jobs = int(info["plan"]["jobs"])
    merged = heapq.merge(*(_sorted_rows(p) for p in ledger_files(out)), key=lambda r: r["id"])
    counts = {"images": 0, "skipped": 0, "per_class": {c: 0 for c in info["label_space"]["classes"]}}
    seen = 0
    meta_tmp = out / TRAIN_DIR / (METADATA + ".tmp")
    skip_tmp = out / (SKIPPED + ".tmp")
    (out / TRAIN_DIR).mkdir(parents=True, exist_ok=True)
    with open(meta_tmp, "w", encoding="utf-8") as meta, open(skip_tmp, "w", encoding="utf-8") as skipped:
        for _, group in groupby(merged, key=lambda r: r["id"]):
            # An id has several rows only if a file went missing and was made again: keep a valid one.
            valid = [r for r in group if row_is_valid(out, r, verify)]
            if not valid:
                continue
            row = valid[-1]
            seen += 1
            if row["status"] == "skipped":
                counts["skipped"] += 1
                skipped.write(json.dumps({k: row.get(k) for k in (*METADATA_FIELDS, "reason")}, ensure_ascii=False)
                              + "\n")
            else:
                counts["images"] += 1
                counts["per_class"][row["class_name"]] += 1
                meta.write(json.dumps({k: row.get(k) for k in METADATA_FIELDS}, ensure_ascii=False) + "\n")
    if seen < n_jobs:
        meta_tmp.unlink()
        skip_tmp.unlink()
        raise UserError(
            f"{n_jobs - seen} of {n_jobs} planned images of '{out}' are not made yet: rerun the same command to finish"
        )
    os.replace(meta_tmp, out / TRAIN_DIR / METADATA)
    os.replace(skip_tmp, out / SKIPPED)
    for stale in (out / TRAIN_DIR).glob("*/.*.tmp*"):  # temporary files of writes a crash interrupted
        stale.unlink(missing_ok=True)
    info["counts"] = counts
    write_json_atomic(out / DATASET_JSON, info)
    return counts


def read_dataset_json(out_dir: str | Path) -> dict:
    path = Path(out_dir) / DATASET_JSON
    if not path.is_file():
        raise UserError(f"'{out_dir}' is not a generated dataset folder: {DATASET_JSON} is missing")
    return json.loads(path.read_text(encoding="utf-8"))


def dataset_label_space(out_dir: str | Path) -> LabelSpace:
    """The label space a generated dataset folder was made for."""
    return LabelSpace.from_dict(read_dataset_json(out_dir)["label_space"])


# --- loading the folder with other libraries ---------------------------------------------------------


def load_hf_dataset(out_dir: str | Path, split: str = "train"):
    """``datasets.load_dataset("imagefolder", data_dir=out_dir)`` with ``label`` cast to a ``ClassLabel``.

    ``imagefolder`` takes ``label`` from ``metadata.jsonl`` as a plain integer (it infers labels from
    folder names only without such a column, and would then number the sorted slugs); casting keeps
    our label order and adds the class names.
    """
    import datasets

    space = dataset_label_space(out_dir)
    ds = datasets.load_dataset("imagefolder", data_dir=str(out_dir), split=split)
    return ds.cast_column("label", datasets.ClassLabel(names=list(space.classes)))


def image_folder(out_dir: str | Path, **kwargs):
    """torchvision ``ImageFolder`` over ``train/`` whose targets are the dataset's labels.

    Plain ``ImageFolder`` numbers the class folders in sorted order of their names (the slugs), which
    differs from the label order whenever the slugs don't sort like the labels (Fashion-MNIST:
    'ankle_boot' would become 0). This one takes the order from ``dataset.json`` instead and accepts
    classes whose images were all skipped.
    """
    from torchvision.datasets import ImageFolder

    space = dataset_label_space(out_dir)

    class _GeneratedImageFolder(ImageFolder):
        def find_classes(self, directory):
            return list(space.slugs), {s: i for i, s in enumerate(space.slugs)}

    kwargs.setdefault("allow_empty", True)
    return _GeneratedImageFolder(str(Path(out_dir) / TRAIN_DIR), **kwargs)
