"""Local filesystem (or NAS mount) backend.

Writes follow the order that survives a crash (Pillai et al., OSDI '14): write to a
temporary file in the same file system → ``fsync`` → ``rename`` to the final path →
``fsync`` the directory. A crash leaves either no object or the whole object; partial
files stay under ``tmp/`` where :meth:`sweep_temporary` removes them.
"""

from __future__ import annotations

import errno
import os
import secrets
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlparse

from cloudfilm.errors import NotFound, StorageFull, StorageUnavailable
from cloudfilm.storage.base import ObjectInfo, check_key

_TMP = "tmp"
_CHUNK = 1024 * 1024


class FilesystemBackend:
    """Objects as files under ``root``; ``file:///srv/cloudfilm/storage``."""

    def __init__(self, url: str, *, fsync: bool = True) -> None:
        parsed = urlparse(url)
        if parsed.scheme != "file":
            raise ValueError(f"not a file URL: {url}")
        self.url = url
        self.root = Path(unquote(parsed.path))
        self.fsync = fsync
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / _TMP).mkdir(exist_ok=True)
        self._host = socket.gethostname().replace("-", "_")

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key: str, data: bytes | BinaryIO) -> None:
        final = self._path(key)
        tmp = self.root / _TMP / f"{self._host}-{os.getpid()}-{secrets.token_hex(8)}.part"
        try:
            with open(tmp, "wb") as fh:
                if isinstance(data, bytes | bytearray | memoryview):
                    fh.write(data)
                else:
                    while chunk := data.read(_CHUNK):
                        fh.write(chunk)
                fh.flush()
                if self.fsync:
                    os.fsync(fh.fileno())
            created = self._makedirs(final.parent)
            os.replace(tmp, final)
            if self.fsync:
                for directory in [final.parent, *created]:
                    _fsync_dir(directory)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise _unavailable(exc, "write") from exc

    def _makedirs(self, directory: Path) -> list[Path]:
        """Create ``directory``; return the parents whose entries changed (to fsync them)."""
        created: list[Path] = []
        missing = []
        current = directory
        while not current.exists():
            missing.append(current)
            current = current.parent
        for path in reversed(missing):
            path.mkdir(exist_ok=True)
            created.append(path.parent)
        return created

    def open(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError as exc:
            raise NotFound(f"storage object {key} is missing") from exc
        except OSError as exc:
            raise _unavailable(exc, "read") from exc

    def open_range(self, key: str, start: int, end: int) -> bytes:
        with self.open(key) as fh:
            fh.seek(start)
            return fh.read(max(0, end - start))

    def read(self, key: str) -> bytes:
        with self.open(key) as fh:
            return fh.read()

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise _unavailable(exc, "delete") from exc

    def stat(self, key: str) -> ObjectInfo:
        try:
            st = self._path(key).stat()
        except FileNotFoundError as exc:
            raise NotFound(f"storage object {key} is missing") from exc
        return ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC))

    def iter_objects(self) -> Iterator[ObjectInfo]:
        for dirpath, dirnames, filenames in os.walk(self.root):
            if Path(dirpath) == self.root and _TMP in dirnames:
                dirnames.remove(_TMP)
            for name in filenames:
                path = Path(dirpath) / name
                key = path.relative_to(self.root).as_posix()
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                yield ObjectInfo(key, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC))

    def sweep_temporary(self, max_age_seconds: float) -> int:
        """Remove partial uploads whose writer has died (same host) or that are too old."""
        removed = 0
        now = time.time()
        for path in (self.root / _TMP).glob("*.part"):
            host, _, rest = path.name.partition("-")
            pid_text = rest.partition("-")[0]
            try:
                age = now - path.stat().st_mtime
            except FileNotFoundError:
                continue
            writer_gone = host == self._host and pid_text.isdigit() and not _alive(int(pid_text))
            if writer_gone or age > max_age_seconds:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def usage(self) -> tuple[int, int]:
        """(bytes free, bytes total) of the file system that holds the objects."""
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unavailable(exc: OSError, what: str) -> StorageUnavailable:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(f"storage is out of space; could not {what} (free space or add a tier)")
    return StorageUnavailable(f"storage {what} failed: {exc.strerror or exc}")
