"""The S3 backend against a real S3-protocol server (SeaweedFS on loopback): the same
behaviour as the filesystem backend, and clear errors for every way the store can fail."""

from __future__ import annotations

import hashlib
import io
import os
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from cloudfilm.config import Settings
from cloudfilm.errors import NotFound, StorageUnavailable
from cloudfilm.storage import new_key, open_backend, open_storage
from cloudfilm.storage.s3 import S3Backend

from conftest import SeaweedS3, free_port, open_backend_for


@pytest.fixture
def s3(seaweedfs: SeaweedS3) -> S3Backend:
    storage = open_backend(
        seaweedfs.url(f"unit-{secrets.token_hex(6)}"),
        access_key_id=seaweedfs.access_key_id,
        secret_access_key=seaweedfs.secret_access_key,
    )
    assert isinstance(storage, S3Backend)
    return storage


def test_put_open_range_delete(s3: S3Backend) -> None:
    key = new_key()
    s3.put(key, b"0123456789")
    s3.put(new_key(), io.BytesIO(b"streamed"))
    assert s3.read(key) == b"0123456789"
    assert s3.open_range(key, 2, 5) == b"234"
    assert s3.open_range(key, 8, 50) == b"89"
    assert s3.open_range(key, 10, 20) == b""
    assert s3.open_range(key, 4, 4) == b""
    with s3.open(key) as fh:
        assert fh.read(4) == b"0123"
        assert fh.read() == b"456789"
    info = s3.stat(key)
    assert info.key == key and info.size == 10
    assert info.modified.tzinfo is not None
    assert len(list(s3.iter_objects())) == 2
    s3.delete(key)
    s3.delete(key)  # absent is fine
    with pytest.raises(NotFound):
        s3.read(key)


def test_missing_object__not_found(s3: S3Backend) -> None:
    key = new_key()
    with pytest.raises(NotFound, match="missing"):
        s3.read(key)
    with pytest.raises(NotFound):
        s3.open(key)
    with pytest.raises(NotFound):
        s3.stat(key)
    with pytest.raises(NotFound):
        s3.open_range(key, 0, 10)


def test_put__replaces_whole_object(s3: S3Backend) -> None:
    key = new_key()
    s3.put(key, b"first version")
    s3.put(key, b"second")
    assert s3.read(key) == b"second"


@pytest.mark.parametrize("key", ["../etc/passwd", "/abs/path.dcm", "A/B.dcm", "a\x00b.dcm"])
def test_put__refuses_keys_that_are_not_ours(s3: S3Backend, key: str) -> None:
    with pytest.raises(ValueError, match="not a storage key"):
        s3.put(key, b"x")
    assert list(s3.iter_objects()) == []


def test_iter_objects__only_own_prefix(seaweedfs: SeaweedS3) -> None:
    one = open_backend_for(seaweedfs, f"a-{secrets.token_hex(4)}")
    two = open_backend_for(seaweedfs, f"b-{secrets.token_hex(4)}")
    keys = sorted(new_key() for _ in range(3))
    for key in keys:
        one.put(key, key.encode())
    two.put(new_key(), b"other")
    assert sorted(o.key for o in one.iter_objects()) == keys
    assert len(list(two.iter_objects())) == 1


def test_open_storage__from_settings(seaweedfs: SeaweedS3, tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        storage={
            "url": seaweedfs.url("from-settings"),
            "s3_access_key_id": seaweedfs.access_key_id,
            "s3_secret_access_key": seaweedfs.secret_access_key,
            "s3_connect_timeout_seconds": 1,
        },
    )
    storage = open_storage(settings)
    assert isinstance(storage, S3Backend)
    assert storage.timeouts["connect"] == 1
    key = new_key()
    storage.put(key, b"x")
    assert storage.read(key) == b"x"


def test_credentials__from_aws_environment(
    seaweedfs: SeaweedS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweedfs.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweedfs.secret_access_key)
    storage = open_backend(seaweedfs.url("from-env"))
    assert isinstance(storage, S3Backend)
    storage.put(new_key(), b"x")


def test_no_credentials__refused_before_any_request(
    seaweedfs: SeaweedS3, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    with pytest.raises(StorageUnavailable, match="no credentials.*AWS_ACCESS_KEY_ID"):
        open_backend(seaweedfs.url())


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("s3://key:secret@bucket/x?endpoint=http://127.0.0.1:1", "do not belong in the"),
        ("s3://Bad_Bucket/x", "not an S3 bucket name"),
        ("s3://bucket/x?endpont=http://127.0.0.1:1", "unknown s3 URL option"),
        ("s3://bucket/x?style=sideways", "use path or virtual"),
    ],
)
def test_url__refused_with_reason(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        S3Backend(url, access_key_id="a", secret_access_key="b")


def test_wrong_secret__storage_unavailable_naming_credentials(seaweedfs: SeaweedS3) -> None:
    good = open_backend_for(seaweedfs, "wrong-secret")
    key = new_key()
    good.put(key, b"kept")
    bad = open_backend_for(seaweedfs, "wrong-secret", secret_access_key="not-the-secret")
    for attempt in (
        lambda: bad.put(new_key(), b"x"),
        lambda: bad.read(key),
        lambda: bad.open(key),
        lambda: bad.stat(key),
        lambda: list(bad.iter_objects()),
        lambda: bad.delete(key),
    ):
        with pytest.raises(StorageUnavailable, match="credentials were not accepted") as info:
            attempt()
        assert "not-the-secret" not in str(info.value)
    assert good.read(key) == b"kept"


def test_missing_bucket__clear_message(seaweedfs: SeaweedS3) -> None:
    storage = S3Backend(
        seaweedfs.url("x", bucket="no-such-bucket"),
        access_key_id=seaweedfs.access_key_id,
        secret_access_key=seaweedfs.secret_access_key,
    )
    key = new_key()
    for attempt in (
        lambda: storage.put(key, b"x"),
        lambda: storage.put(key, io.BytesIO(b"x")),
        lambda: storage.read(key),
        lambda: storage.open(key),
        lambda: storage.stat(key),
        lambda: list(storage.iter_objects()),
        lambda: storage.sweep_temporary(600),
    ):
        with pytest.raises(StorageUnavailable, match="bucket 'no-such-bucket' does not exist"):
            attempt()


def _refused_port() -> int:
    """A loopback port nobody listens on: what a stopped server looks like."""
    return free_port()


def test_server_down__fails_within_seconds(seaweedfs: SeaweedS3) -> None:
    storage = S3Backend(
        f"s3://cloudfilm/x?endpoint=http://127.0.0.1:{_refused_port()}",
        access_key_id=seaweedfs.access_key_id,
        secret_access_key=seaweedfs.secret_access_key,
    )
    for attempt in (
        lambda: storage.put(new_key(), b"x"),
        lambda: storage.read(new_key()),
        lambda: storage.stat(new_key()),
        lambda: storage.sweep_temporary(600),
    ):
        started = time.monotonic()
        with pytest.raises(StorageUnavailable, match="S3 endpoint unreachable"):
            attempt()
        assert time.monotonic() - started < 5


@pytest.fixture
def hung_server() -> Iterator[int]:
    """A loopback port that accepts connections and never answers (a hung server)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield int(sock.getsockname()[1])


def test_hung_server__times_out(seaweedfs: SeaweedS3, hung_server: int) -> None:
    storage = S3Backend(
        f"s3://cloudfilm/x?endpoint=http://127.0.0.1:{hung_server}",
        access_key_id=seaweedfs.access_key_id,
        secret_access_key=seaweedfs.secret_access_key,
        read_timeout=0.5,
        request_timeout=1,
        max_retries=1,
        retry_timeout=2,
    )
    started = time.monotonic()
    with pytest.raises(StorageUnavailable, match="S3"):
        storage.read(new_key())
    assert time.monotonic() - started < 6


def test_big_object__streams_both_ways(s3: S3Backend, tmp_path: Path) -> None:
    size = 64 * 1024 * 1024
    source = tmp_path / "big.bin"
    digest = hashlib.sha256()
    with open(source, "wb") as fh:
        for _ in range(size // (1024 * 1024)):
            chunk = os.urandom(1024 * 1024)
            digest.update(chunk)
            fh.write(chunk)
    key = new_key()
    process = psutil.Process()
    before = process.memory_info().rss
    with open(source, "rb") as fh:
        s3.put(key, fh)  # multipart, 8 MiB parts
    assert s3.stat(key).size == size
    copy = hashlib.sha256()
    with s3.open(key) as fh:
        while chunk := fh.read(1024 * 1024):
            copy.update(chunk)
    grown = process.memory_info().rss - before
    assert copy.hexdigest() == digest.hexdigest()
    assert grown < size, f"resident memory grew by {grown >> 20} MiB for a 64 MiB object"
    assert s3.open_range(key, size - 3, size + 10) == s3.read(key)[-3:]
    assert (
        list(s3._admin_client().list_multipart_uploads(Bucket="cloudfilm").get("Uploads", [])) == []
    )


def test_sweep_temporary__aborts_stale_multipart_uploads(s3: S3Backend) -> None:
    client = s3._admin_client()
    key = f"{s3.prefix}/{new_key()}"
    upload = client.create_multipart_upload(Bucket=s3.bucket, Key=key)
    assert s3.sweep_temporary(max_age_seconds=3600) == 0
    time.sleep(1.1)
    assert s3.sweep_temporary(max_age_seconds=1) == 1
    uploads = client.list_multipart_uploads(Bucket=s3.bucket, Prefix=s3.prefix).get("Uploads", [])
    assert upload["UploadId"] not in [u["UploadId"] for u in uploads]
