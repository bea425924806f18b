"""The Fashion-MNIST loader's three sources, and its clear error when none works (network refused)."""

from __future__ import annotations

import functools
import gzip
import http.server
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import synclone.data.fashion_mnist as fm
from synclone.errors import UserError


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX (unsigned byte) writer, the inverse of read_idx, gzipped."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def small_copy(folder: Path, n: int = 50, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Four IDX files with ``n`` random images per split (the loader does not care they are not garments)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = None
    for split, (img, lbl) in fm._FILES.items():
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(folder / f"{img}.gz", x)
        write_idx(folder / f"{lbl}.gz", y)
        if split == "test":
            out = (x, y)
    return out


@pytest.fixture
def no_system_sources(monkeypatch, tmp_path):
    """Hide the Debian package and the user cache, so only the source under test can answer."""
    monkeypatch.delenv("SYNCLONE_DATA", raising=False)
    monkeypatch.setattr(fm, "debian_dir", lambda: None)
    monkeypatch.setattr(fm, "default_cache", lambda: tmp_path / "cache")


def test_data_root_comes_first(tmp_path, monkeypatch):
    x, y = small_copy(tmp_path / "root")
    ds = fm.load_fashion_mnist("test", data_root=tmp_path / "root")
    assert ds.source.startswith("data root")
    assert torch.equal(ds.images[:, 0], torch.from_numpy(x)) and torch.equal(ds.labels, torch.from_numpy(y).long())
    monkeypatch.setenv("SYNCLONE_DATA", str(tmp_path / "root"))
    assert fm.load_fashion_mnist("test").source.startswith("data root")


def test_data_root_without_files_is_an_error_not_a_fallback(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no Fashion-MNIST test files in"):
        fm.load_fashion_mnist("test", data_root=tmp_path / "empty")


@pytest.mark.skipif(fm.debian_dir() is None, reason="Debian package dataset-fashion-mnist not installed")
def test_debian_package_is_found_and_complete(monkeypatch):
    monkeypatch.delenv("SYNCLONE_DATA", raising=False)
    train, test = fm.load_fashion_mnist("train"), fm.load_fashion_mnist("test")
    assert train.source.startswith("Debian package") and test.source.startswith("Debian package")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.class_counts() == [6000] * 10 and test.class_counts() == [1000] * 10


def _serve(folder: Path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_download_path_uses_torchvision(tmp_path, monkeypatch, no_system_sources):
    """torchvision's real download code, pointed at a local mirror: the files land in the cache and load."""
    from torchvision.datasets import FashionMNIST

    x, _ = small_copy(tmp_path / "mirror")
    server = _serve(tmp_path / "mirror")
    try:
        monkeypatch.setattr(FashionMNIST, "mirrors", [f"http://127.0.0.1:{server.server_address[1]}/"])
        # torchvision checks MD5s of the real files; this mirror serves other bytes, so skip the check.
        monkeypatch.setattr(FashionMNIST, "resources", [(n, None) for n, _ in FashionMNIST.resources])
        ds = fm.load_fashion_mnist("test")
    finally:
        server.shutdown()
    assert ds.source == "torchvision download"
    assert torch.equal(ds.images[:, 0], torch.from_numpy(x))
    assert fm.load_fashion_mnist("test").source.startswith("cache")  # second call: no download


def test_no_source_and_network_refused_gives_the_clear_error(monkeypatch, no_system_sources):
    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    with pytest.raises(UserError) as err:
        fm.load_fashion_mnist("train")
    msg = str(err.value)
    assert "download failed" in msg and "apt-get install dataset-fashion-mnist" in msg and "--data-root" in msg
    assert "\n" not in msg


def test_truncated_file_is_reported(tmp_path):
    small_copy(tmp_path / "root")
    p = tmp_path / "root" / "t10k-images-idx3-ubyte.gz"
    data = gzip.decompress(p.read_bytes())
    p.write_bytes(gzip.compress(data[:-100]))
    with pytest.raises(UserError, match="truncated"):
        fm.load_fashion_mnist("test", data_root=tmp_path / "root")
