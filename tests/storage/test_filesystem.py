"""The filesystem backend: durable writes, key discipline, sweeping."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cloudfilm.errors import NotFound
from cloudfilm.storage import new_key, open_backend
from cloudfilm.storage.filesystem import FilesystemBackend


@pytest.fixture
def backend(tmp_path: Path) -> FilesystemBackend:
    storage = open_backend((tmp_path / "store").as_uri())
    assert isinstance(storage, FilesystemBackend)
    return storage


def test_put_open_range_delete(backend: FilesystemBackend) -> None:
    key = new_key()
    backend.put(key, b"0123456789")
    backend.put(new_key(), io.BytesIO(b"streamed"))
    assert backend.read(key) == b"0123456789"
    assert backend.open_range(key, 2, 5) == b"234"
    assert backend.stat(key).size == 10
    assert len(list(backend.iter_objects())) == 2
    backend.delete(key)
    backend.delete(key)  # absent is fine
    with pytest.raises(NotFound):
        backend.read(key)


def test_new_key__random_and_not_from_uids() -> None:
    keys = {new_key() for _ in range(1000)}
    assert len(keys) == 1000
    assert all(len(k.rsplit("/", 1)[1]) == 36 for k in keys)  # 32 hex + ".dcm"


@pytest.mark.parametrize(
    "key",
    [
        "../etc/passwd",
        "/abs/path.dcm",
        "a/../../b.dcm",
        "1.2.840.113619/x.dcm",
        "a\x00b.dcm",
        "A/B.dcm",
    ],
)
def test_put__refuses_keys_that_are_not_ours(backend: FilesystemBackend, key: str) -> None:
    with pytest.raises(ValueError, match="not a storage key"):
        backend.put(key, b"x")
    assert list(backend.root.rglob("*.dcm")) == []


def test_sweep_temporary__dead_writer_and_old_files(backend: FilesystemBackend) -> None:
    tmp = backend.root / "tmp"
    # A writer process that has exited: its partial file goes at once.
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    host = backend._host
    (tmp / f"{host}-{dead.stdout.strip()}-aaaa.part").write_bytes(b"partial")
    # Our own live writer: kept until it is too old.
    mine = tmp / f"{host}-{os.getpid()}-bbbb.part"
    mine.write_bytes(b"in flight")
    # Another host's file: kept until it is too old.
    other = tmp / "otherhost-1-cccc.part"
    other.write_bytes(b"remote")
    assert backend.sweep_temporary(max_age_seconds=600) == 1
    assert sorted(p.name for p in tmp.iterdir()) == sorted([mine.name, other.name])
    old = time.time() - 3600
    os.utime(other, (old, old))
    assert backend.sweep_temporary(max_age_seconds=600) == 1
    assert [p.name for p in tmp.iterdir()] == [mine.name]


def test_open_backend__unknown_scheme() -> None:
    with pytest.raises(ValueError, match="no storage backend for 'ftp'"):
        open_backend("ftp://example/store")
