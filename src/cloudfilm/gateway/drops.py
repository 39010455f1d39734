"""File-drop sources: an FTP folder (``retrieve = "ftp"``) and a watched local folder
(``retrieve = "folder"``) where a PACS or a modality leaves DICOM files.

Both are polled by listing (no inotify): a file is taken only when its size is the same in
two listings ``poll_interval`` apart, so a file still being written is left alone. A taken
file is read (FTP: downloaded into ``data_dir/incoming/<source>/`` with ``REST``, so a
transfer that breaks resumes where it stopped at the next poll), checked to be a complete
DICOM object, then kept in the spool by :meth:`GatewayQueue.accept` and its study queued as
if a C-FIND had found it. Files directly in the folder and in one level of sub-folders (one
per study, as many PACS export them) are listed.

After the take: a local file moves to ``done/`` (or to ``failed/`` with a ``.reason.txt``);
a remote file stays where it is (the gateway remembers it by path and size), or is deleted
or moved once its instance is delivered (``ftp_after``).
"""

from __future__ import annotations

import asyncio
import ftplib
import io
import logging
import os
import shutil
import warnings
from abc import ABC, abstractmethod
from pathlib import Path, PurePosixPath
from typing import IO, Any, Protocol

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

from cloudfilm.config import GatewaySettings, GatewaySource, RemoteAfter, RetrieveMethod
from cloudfilm.gateway.messages import message

logger = logging.getLogger(__name__)

_UNDEFINED = 0xFFFFFFFF
_SKIP_SUFFIXES = (".part", ".tmp", ".partial", ".filepart", ".reason.txt")
DONE, FAILED = "done", "failed"


class DropError(Exception):
    """The drop cannot be reached or listed (the whole poll fails)."""


class Incomplete(Exception):
    """A file could not be read whole this time (transfer broken); tried again later."""


class NotDicom(Exception):
    """A stable file that is not a complete DICOM object."""


class Drop(Protocol):
    def listing(self) -> dict[str, int]: ...

    def fetch(self, path: str, size: int, partial: Path) -> bytes: ...

    def taken(self, path: str) -> None: ...

    def refused(self, path: str, reason: str) -> None: ...

    def remove(self, path: str) -> None: ...

    def close(self) -> None: ...


def open_drop(settings: GatewaySettings, source: GatewaySource) -> Drop:
    if source.retrieve is RetrieveMethod.FOLDER:
        assert source.folder is not None  # checked by the settings
        return FolderDrop(source.folder)
    if source.retrieve is RetrieveMethod.SFTP:
        return SftpDrop(settings, source)
    return FtpDrop(settings, source)


def _password(source: GatewaySource) -> str | None:
    if not source.ftp_password_env:
        return None
    if source.ftp_password_env not in os.environ:
        raise DropError(f"the password variable {source.ftp_password_env} is not set")
    return os.environ[source.ftp_password_env]


def _done_target(source: GatewaySource, path: str) -> PurePosixPath:
    return PurePosixPath(source.ftp_done_path or "/done") / path


def _listed(name: str) -> bool:
    return not name.startswith(".") and not name.lower().endswith(_SKIP_SUFFIXES)


def parse(data: bytes) -> Dataset:
    """The dataset of a complete DICOM file.

    pydicom reads a file cut short without complaint (the last value just comes out
    shorter), so every top-level element's value is checked against its declared length.

    Raises
    ------
    NotDicom
        Not DICOM, or cut short.
    """
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(io.BytesIO(data))
            for item in caught:
                if "End of file" in str(item.message):  # an undefined length cut short
                    raise NotDicom(f"cut short: {item.message}")
        for tag in ds.keys():
            raw = ds.get_item(tag)
            if isinstance(raw, RawDataElement) and raw.length != _UNDEFINED:
                if raw.value is not None and len(raw.value) < raw.length:
                    raise NotDicom(
                        f"cut short: element {tag} declares {raw.length} bytes, "
                        f"the file holds {len(raw.value)}"
                    )
        uids = (ds.StudyInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID)
    except NotDicom:
        raise
    except Exception as exc:
        raise NotDicom(f"not a DICOM file ({type(exc).__name__}: {exc})") from exc
    if not all(str(uid) for uid in uids):
        raise NotDicom("no Study, SOP Instance or SOP Class UID")
    return ds


class FolderDrop:
    """A local folder (a share the modality writes to)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def listing(self) -> dict[str, int]:
        if not self.root.is_dir():
            raise DropError(f"the watch folder {self.root} does not exist")
        out: dict[str, int] = {}
        for entry in self.root.iterdir():
            if not _listed(entry.name) or entry.name in (DONE, FAILED):
                continue
            if entry.is_dir():
                for inner in entry.iterdir():
                    if _listed(inner.name) and inner.is_file():
                        out[f"{entry.name}/{inner.name}"] = inner.stat().st_size
            elif entry.is_file():
                out[entry.name] = entry.stat().st_size
        return out

    def fetch(self, path: str, size: int, partial: Path) -> bytes:  # noqa: ARG002
        data = (self.root / path).read_bytes()
        if len(data) != size:
            raise Incomplete(f"{path} changed size while read ({len(data)}, listed {size})")
        return data

    def _move(self, path: str, folder: str) -> Path:
        target = self.root / folder / path
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():  # the same name dropped twice: keep both
            target = target.with_name(f"{target.name}.{os.urandom(4).hex()}")
        shutil.move(self.root / path, target)
        parent = (self.root / path).parent
        if parent != self.root and not any(parent.iterdir()):
            parent.rmdir()
        return target

    def taken(self, path: str) -> None:
        self._move(path, DONE)

    def refused(self, path: str, reason: str) -> None:
        target = self._move(path, FAILED)
        target.with_name(target.name + ".reason.txt").write_text(reason + "\n", encoding="utf-8")

    def remove(self, path: str) -> None:  # noqa: ARG002 - local files move at once
        return

    def close(self) -> None:
        return


class _RemoteDrop(ABC):
    """What the FTP and SFTP drops share: the listing one sub-folder deep, downloads that
    resume in a partial file, and files that leave the server only after delivery."""

    source: GatewaySource
    root: PurePosixPath
    peer: str
    protocol: str  # FTP, SFTP (in messages)
    read_verb: str  # RETR, READ (in the message log)

    @abstractmethod
    def _errors(self) -> tuple[type[BaseException], ...]:
        """The exceptions of a failed transfer or listing."""

    @abstractmethod
    def _entries(self, folder: PurePosixPath) -> list[tuple[str, str, int]]:
        """(name, "file"/"dir", size) in ``folder``."""

    @abstractmethod
    def _download(self, path: str, offset: int, out: IO[bytes], size: int) -> None:
        """Append ``path`` from byte ``offset`` to ``out`` (at most ``size`` bytes in all)."""

    def listing(self) -> dict[str, int]:
        out: dict[str, int] = {}
        try:
            for name, kind, size in self._entries(self.root):
                if not _listed(name):
                    continue
                if kind == "file":
                    out[name] = size
                    continue
                for inner, inner_kind, inner_size in self._entries(self.root / name):
                    if inner_kind == "file" and _listed(inner):
                        out[f"{name}/{inner}"] = inner_size
        except self._errors() as exc:
            raise DropError(
                f"{self.protocol} listing of {self.peer}: {type(exc).__name__}: {exc}"
            ) from exc
        return out

    def fetch(self, path: str, size: int, partial: Path) -> bytes:
        """Download ``path`` into ``partial``, resuming what an earlier attempt left there;
        the bytes once the file holds all ``size`` of them."""
        partial.parent.mkdir(parents=True, exist_ok=True)
        offset = partial.stat().st_size if partial.exists() else 0
        if offset > size:  # the remote file was replaced by a shorter one: start again
            partial.unlink()
            offset = 0
        error: str | None = None
        with partial.open("ab") as out:
            if offset < size:
                try:
                    self._download(path, offset, out, size)
                except self._errors() as exc:
                    error = f"{type(exc).__name__}: {exc}"
            out.flush()
            os.fsync(out.fileno())
        got = partial.stat().st_size
        message(
            f"{self.protocol}-{self.read_verb}",
            direction="in",
            peer=self.peer,
            file=path,
            offset=offset,
            bytes=got - offset,
            size=size,
            result="ok" if got == size and error is None else (error or "short"),
        )
        if got != size:
            raise Incomplete(
                f"{path}: {got} of {size} bytes after the transfer"
                + (f" ({error})" if error else "")
                + "; resumed at the next poll"
            )
        return partial.read_bytes()

    def taken(self, path: str) -> None:  # noqa: ARG002 - removed after delivery, if at all
        return

    def refused(self, path: str, reason: str) -> None:  # noqa: ARG002 - the queue remembers
        return


class FtpDrop(_RemoteDrop):
    """A folder on an FTP (or FTPS) server, with ftplib."""

    def __init__(self, settings: GatewaySettings, source: GatewaySource) -> None:
        self.source = source
        self.root = PurePosixPath(source.ftp_path or "/")
        self.peer = f"ftp://{source.host}:{source.port}{self.root}"
        self.protocol, self.read_verb = "FTP", "RETR"
        password = _password(source) or ""
        ftp: ftplib.FTP = ftplib.FTP_TLS() if source.ftp_tls else ftplib.FTP()
        try:
            ftp.connect(source.host or "", source.port, timeout=settings.network_timeout)
            ftp.login(source.ftp_user, password)
            if isinstance(ftp, ftplib.FTP_TLS):
                ftp.prot_p()
        except (OSError, EOFError, ftplib.Error) as exc:
            ftp.close()
            message("FTP-LOGIN", direction="out", peer=self.peer, result=str(exc)[:200])
            raise DropError(f"FTP {self.peer}: {type(exc).__name__}: {exc}") from exc
        self.ftp = ftp

    def _entries(self, folder: PurePosixPath) -> list[tuple[str, str, int]]:
        """(name, "file"/"dir", size) in ``folder``: MLSD (RFC 3659), else LIST-less NLST +
        SIZE."""
        try:
            out = []
            for name, facts in self.ftp.mlsd(str(folder), facts=["type", "size"]):
                kind = facts.get("type", "")
                if kind in ("file", "dir"):
                    out.append((name, kind, int(facts.get("size", 0) or 0)))
            return out
        except ftplib.error_perm as exc:
            if not str(exc).startswith(("500", "502")):
                raise
        out = []
        self.ftp.voidcmd("TYPE I")
        for full in self.ftp.nlst(str(folder)):
            name = PurePosixPath(full).name
            try:
                size = self.ftp.size(str(folder / name))
            except ftplib.error_perm:  # a folder has no size
                out.append((name, "dir", 0))
                continue
            out.append((name, "file", int(size or 0)))
        return out

    def _errors(self) -> tuple[type[BaseException], ...]:
        return (OSError, EOFError, ftplib.Error)

    def _download(self, path: str, offset: int, out: IO[bytes], size: int) -> None:  # noqa: ARG002
        self.ftp.retrbinary(f"RETR {self.root / path}", out.write, rest=offset or None)

    def remove(self, path: str) -> None:
        """After delivery: delete the remote file or move it into ``ftp_done_path``."""
        remote = str(self.root / path)
        try:
            if self.source.ftp_after is RemoteAfter.DELETE:
                self.ftp.delete(remote)
            elif self.source.ftp_after is RemoteAfter.MOVE:
                done = PurePosixPath(self.source.ftp_done_path or "/done")
                target = _done_target(self.source, path)
                folder = PurePosixPath(done.anchor or ".")
                for part in target.parent.parts[len(folder.parts) :]:
                    folder = folder / part
                    try:
                        self.ftp.mkd(str(folder))
                    except ftplib.error_perm:
                        pass  # it exists
                self.ftp.rename(remote, str(target))
        except ftplib.Error as exc:
            raise DropError(f"FTP {self.source.ftp_after} of {path}: {exc}") from exc
        message("FTP-" + str(self.source.ftp_after).upper(), direction="out", peer=self.peer,
                file=path)  # fmt: skip

    def close(self) -> None:
        try:
            self.ftp.quit()
        except (OSError, EOFError, ftplib.Error):
            self.ftp.close()


class SftpDrop(_RemoteDrop):
    """A folder on an SSH server, with asyncssh's SFTP client (run on a private event loop:
    the gateway's loop is synchronous). The server's host key must be in
    ``sftp_known_hosts`` (default ``~/.ssh/known_hosts``)."""

    def __init__(self, settings: GatewaySettings, source: GatewaySource) -> None:
        import asyncssh

        self.source = source
        self.root = PurePosixPath(source.ftp_path or "/")
        self.peer = f"sftp://{source.host}:{source.port}{self.root}"
        self.protocol, self.read_verb = "SFTP", "READ"
        password = _password(source)
        options: dict[str, Any] = {
            "username": source.ftp_user,
            "connect_timeout": settings.network_timeout,
        }
        if password is not None:
            options["password"] = password
        if source.sftp_known_hosts is not None:
            options["known_hosts"] = str(source.sftp_known_hosts)
        self._loop = asyncio.new_event_loop()
        try:
            self._conn = self._run(asyncssh.connect(source.host or "", source.port, **options))
            self._sftp = self._run(self._conn.start_sftp_client())
        except (OSError, asyncssh.Error) as exc:
            self._loop.close()
            message("SFTP-LOGIN", direction="out", peer=self.peer, result=str(exc)[:200])
            raise DropError(f"SFTP {self.peer}: {type(exc).__name__}: {exc}") from exc

    def _run(self, coroutine: Any) -> Any:
        return self._loop.run_until_complete(coroutine)

    def _entries(self, folder: PurePosixPath) -> list[tuple[str, str, int]]:
        import asyncssh

        out = []
        for entry in self._run(self._sftp.readdir(str(folder))):
            name = str(entry.filename)
            if name in (".", ".."):
                continue
            kind = entry.attrs.type
            if kind == asyncssh.FILEXFER_TYPE_DIRECTORY:
                out.append((name, "dir", 0))
            elif kind == asyncssh.FILEXFER_TYPE_REGULAR:
                out.append((name, "file", int(entry.attrs.size or 0)))
        return out

    def _errors(self) -> tuple[type[BaseException], ...]:
        import asyncssh

        return (OSError, asyncssh.Error)

    def _download(self, path: str, offset: int, out: IO[bytes], size: int) -> None:
        async def copy() -> None:
            position = offset
            async with self._sftp.open(str(self.root / path), "rb") as remote:
                while position < size:
                    chunk = await remote.read(min(262_144, size - position), position)
                    if not chunk:
                        return
                    out.write(chunk)
                    position += len(chunk)

        self._run(copy())

    def remove(self, path: str) -> None:
        """After delivery: delete the remote file or move it into ``ftp_done_path``."""
        import asyncssh

        remote = str(self.root / path)
        try:
            if self.source.ftp_after is RemoteAfter.DELETE:
                self._run(self._sftp.remove(remote))
            elif self.source.ftp_after is RemoteAfter.MOVE:
                target = _done_target(self.source, path)
                self._run(self._sftp.makedirs(str(target.parent), exist_ok=True))
                self._run(self._sftp.rename(remote, str(target)))
        except (OSError, asyncssh.Error) as exc:
            raise DropError(f"SFTP {self.source.ftp_after} of {path}: {exc}") from exc
        message("SFTP-" + str(self.source.ftp_after).upper(), direction="out", peer=self.peer,
                file=path)  # fmt: skip

    def close(self) -> None:
        try:
            self._sftp.exit()
            self._conn.close()
            self._run(self._conn.wait_closed())
        except Exception:  # a broken connection: nothing left to close cleanly
            logger.debug("SFTP close of %s failed", self.peer, exc_info=True)
        finally:
            self._loop.close()
