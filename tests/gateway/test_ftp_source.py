"""An FTP folder (``retrieve = "ftp"``, pyftpdlib as the server) → gateway → STOW-RS →
archive: stable files only, resumed after a transfer cut short, remembered or moved away
after delivery, refused files not fetched again."""

from __future__ import annotations

import hashlib
import json
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pydicom
import pytest
from test_end_to_end import archived, drain, same_pixels

from cloudfilm.config import Settings
from cloudfilm.gateway.models import StudyState
from cloudfilm.gateway.service import Gateway

from conftest import DATA, LiveServer, free_port

with warnings.catch_warnings():  # pyftpdlib on Python 3.11 still imports asyncore
    warnings.simplefilter("ignore", DeprecationWarning)
    from pyftpdlib.authorizers import DummyAuthorizer
    from pyftpdlib.filesystems import AbstractedFS
    from pyftpdlib.handlers import FTPHandler
    from pyftpdlib.servers import FTPServer

pytest_plugins = ["pacs_fixtures"]

PASSWORD_ENV = "CF_TEST_FTP_PASSWORD"


@pytest.fixture
def backend() -> str:
    return "sqlite"


class _CutOnce:
    """A file whose first read through the server stops half way (a transfer that breaks
    off: the client gets fewer bytes than the listing announced)."""

    def __init__(self, fd: IO[bytes], limit: int) -> None:
        self._fd, self._left = fd, limit

    def read(self, size: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        data = self._fd.read(self._left if size < 0 else min(size, self._left))
        self._left -= len(data)
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fd, name)


class _FS(AbstractedFS):
    cut_once: set[str] = set()

    def open(self, filename: str, mode: str) -> Any:
        fd = super().open(filename, mode)
        name = Path(filename).name
        if "r" in mode and name in _FS.cut_once:
            _FS.cut_once.discard(name)
            return _CutOnce(fd, Path(filename).stat().st_size // 2)
        return fd


@dataclass
class FtpPeer:
    root: Path
    port: int


@pytest.fixture
def ftp(tmp_path: Path) -> Iterator[FtpPeer]:
    root = tmp_path / "ftp-root"
    (root / "incoming").mkdir(parents=True)
    authorizer = DummyAuthorizer()
    authorizer.add_user("pacs", "s3cret-ftp", str(root), perm="elradfmwMT")
    handler = type(
        "Handler",
        (FTPHandler,),
        {
            "authorizer": authorizer,
            "abstracted_fs": _FS,
            "use_sendfile": False,
            "auth_failed_timeout": 0.1,  # not the 3 s pause after a wrong password
        },
    )
    port = free_port()
    server = FTPServer(("127.0.0.1", port), handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"timeout": 0.05, "handle_exit": False}, daemon=True
    )
    thread.start()
    yield FtpPeer(root, port)
    server.close_all()
    thread.join(timeout=5)
    _FS.cut_once.clear()


def _gateway(tmp_path: Path, ftp: FtpPeer, live_server: LiveServer, **source: Any) -> Gateway:
    from pacs_fixtures import client_secret

    settings = Settings(
        data_dir=tmp_path / "gw-archive-unused",
        gateway={
            "data_dir": tmp_path / "gateway",
            "scp_port": free_port(),
            "sources": {
                "modality-ftp": {
                    "retrieve": "ftp",
                    "host": "127.0.0.1",
                    "port": ftp.port,
                    "ftp_user": "pacs",
                    "ftp_password_env": PASSWORD_ENV,
                    "ftp_path": "/incoming",
                    "poll_interval": 0.2,
                    **source,
                }
            },
            "archive_url": live_server.url,
            "client_id": "gateway",
            "client_secret": client_secret(live_server.archive, live_server.clock),
            "backoff_initial_seconds": 0.2,
            "backoff_max_seconds": 1.0,
            "network_timeout": 10.0,
        },
    )
    gw = Gateway(settings)
    gw.start()
    return gw


@pytest.fixture
def password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSWORD_ENV, "s3cret-ftp")


def _log(gw: Gateway) -> list[dict[str, Any]]:
    path = gw.gw.data_dir / "messages.log"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _uid(data: bytes) -> str:
    import io

    return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)


@pytest.mark.usefixtures("password")
def test_ftp__cut_transfer_resumed__delivered_then_moved_away(
    tmp_path: Path, ftp: FtpPeer, live_server: LiveServer
) -> None:
    incoming = ftp.root / "incoming"
    ct = DATA.joinpath("ct_small.dcm").read_bytes()
    mr = DATA.joinpath("mr_small.dcm").read_bytes()
    (incoming / "CT0001.dcm").write_bytes(ct)
    (incoming / "1.2.3-study").mkdir()
    (incoming / "1.2.3-study" / "MR0001.dcm").write_bytes(mr)
    (incoming / "readme.txt").write_text("not an image")
    _FS.cut_once.add("CT0001.dcm")
    gw = _gateway(tmp_path, ftp, live_server, ftp_after="move", ftp_done_path="/done")
    try:
        assert gw.poll("modality-ftp") == 0  # first listing: sizes noted, nothing taken
        assert gw.poll("modality-ftp") == 1  # the MR; the CT's transfer broke off
        [study] = gw.queue.studies()
        assert study["received"] == 1
        assert _uid(ct) not in {i.sop_instance_uid for i in gw.queue.instances(_uid_study(ct))}
        assert gw.poll("modality-ftp") == 1  # the CT, resumed where it stopped
        retr = [e for e in _log(gw) if e["msg"] == "FTP-RETR" and e["file"] == "CT0001.dcm"]
        assert [(e["offset"], e["result"]) for e in retr] == [(0, "short"), (len(ct) // 2, "ok")]

        drain(gw)
        stored = archived(live_server)
        assert set(stored) == {_uid(ct), _uid(mr)}
        assert same_pixels(ct, stored[_uid(ct)])
        [spooled_ct] = gw.queue.instances(_uid_study(ct))
        assert spooled_ct.sha256 == hashlib.sha256(ct).hexdigest()  # resumed bytes identical

        gw.poll("modality-ftp")  # delivered files leave the drop folder
        done = ftp.root / "done"
        assert (done / "CT0001.dcm").read_bytes() == ct
        assert (done / "1.2.3-study" / "MR0001.dcm").read_bytes() == mr
        assert sorted(p.name for p in incoming.rglob("*") if p.is_file()) == ["readme.txt"]
        refused = [e for e in _log(gw) if e["msg"] == "FILE-REFUSED"]
        assert [e["file"] for e in refused] == ["readme.txt"]  # refused once, not fetched again
        assert not list((gw.gw.data_dir / "incoming").rglob("*.part"))
    finally:
        gw.close()


def _uid_study(data: bytes) -> str:
    import io

    return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).StudyInstanceUID)


@pytest.mark.usefixtures("password")
def test_ftp__kept_files_not_fetched_twice__file_cut_short_refused(
    tmp_path: Path, ftp: FtpPeer, live_server: LiveServer
) -> None:
    incoming = ftp.root / "incoming"
    ct = DATA.joinpath("ct_small.dcm").read_bytes()
    emri = DATA.joinpath("emri_small_jpeg_ls_lossless.dcm").read_bytes()
    (incoming / "CT0001.dcm").write_bytes(ct)
    (incoming / "EMRI.dcm").write_bytes(emri[: len(emri) // 2])  # the modality's upload broke
    gw = _gateway(tmp_path, ftp, live_server)
    try:
        gw.poll("modality-ftp")
        assert gw.poll("modality-ftp") == 1
        drain(gw)
        for _ in range(2):
            assert gw.poll("modality-ftp") == 0
        retr = [e["file"] for e in _log(gw) if e["msg"] == "FTP-RETR"]
        assert sorted(retr) == ["CT0001.dcm", "EMRI.dcm"]  # each fetched once
        assert (incoming / "CT0001.dcm").exists()  # ftp_after = keep
        assert set(archived(live_server)) == {_uid(ct)}
        [refused] = [e for e in _log(gw) if e["msg"] == "FILE-REFUSED"]
        assert refused["file"] == "EMRI.dcm" and refused["reason"].startswith("cut short")
        assert gw.queue.summary()["studies"] == {StudyState.DELIVERED: 1}

        # The modality sends the whole file again under the same name: taken this time.
        (incoming / "EMRI.dcm").write_bytes(emri)
        gw.poll("modality-ftp")
        assert gw.poll("modality-ftp") == 1
        drain(gw)
        assert _uid(emri) in archived(live_server)
    finally:
        gw.close()


def test_ftp__password_variable_missing__poll_error_recorded(
    tmp_path: Path, ftp: FtpPeer, live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    gw = _gateway(tmp_path, ftp, live_server)
    try:
        assert gw.poll("modality-ftp") == 0
        state = gw.queue.source_state("modality-ftp")
        assert state is not None and state.last_error is not None
        assert PASSWORD_ENV in state.last_error
        monkeypatch.setenv(PASSWORD_ENV, "wrong")
        gw.poll("modality-ftp")
        state = gw.queue.source_state("modality-ftp")
        assert state is not None and state.last_error is not None
        assert "530" in state.last_error  # login refused
    finally:
        gw.close()
