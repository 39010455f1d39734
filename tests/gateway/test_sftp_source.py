"""An SFTP folder (``retrieve = "sftp"``, asyncssh's SFTP server as the peer) → gateway →
STOW-RS → archive: host key checked, a read cut short resumed, delivered files deleted."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
import pydicom
import pytest
from test_end_to_end import archived, drain

from cloudfilm.config import Settings
from cloudfilm.gateway.service import Gateway

from conftest import DATA, LiveServer, free_port

pytest_plugins = ["pacs_fixtures"]

PASSWORD_ENV = "CF_TEST_SFTP_PASSWORD"


@pytest.fixture
def backend() -> str:
    return "sqlite"


class _Server(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:  # noqa: ARG002
        return True

    def password_auth_supported(self) -> bool:
        return True

    def validate_password(self, username: str, password: str) -> bool:
        return username == "pacs" and password == "s3cret-sftp"


class _CutOnceSFTP(asyncssh.SFTPServer):
    """Answers the first read of a file named in ``cut_once`` past its middle with EOF (a
    transfer that breaks off); later reads are whole."""

    cut_once: set[str] = set()
    cut_files: set[int] = set()

    def read(self, file_obj: Any, offset: int, size: int) -> bytes:
        if id(file_obj) in _CutOnceSFTP.cut_files:
            return b""  # end of file, as far as this transfer goes
        data: bytes = super().read(file_obj, offset, size)
        local = Path(os.fsdecode(file_obj.name))
        name, half = local.name, local.stat().st_size // 2
        if name in _CutOnceSFTP.cut_once and offset + len(data) > half:
            _CutOnceSFTP.cut_once.discard(name)
            _CutOnceSFTP.cut_files.add(id(file_obj))
            return data[: max(0, half - offset)]
        return data

    def close(self, file_obj: Any) -> None:
        _CutOnceSFTP.cut_files.discard(id(file_obj))
        super().close(file_obj)


@dataclass
class SftpPeer:
    root: Path
    port: int
    known_hosts: Path


@pytest.fixture
def sftp(tmp_path: Path) -> Iterator[SftpPeer]:
    root = tmp_path / "sftp-root"
    (root / "export").mkdir(parents=True)
    key = asyncssh.generate_private_key("ssh-ed25519")
    port = free_port()
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {key.export_public_key().decode()}")
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict[str, Any] = {}

    async def serve() -> None:
        holder["server"] = await asyncssh.listen(
            "127.0.0.1",
            port,
            server_host_keys=[key],
            server_factory=_Server,
            sftp_factory=lambda chan: _CutOnceSFTP(chan, chroot=str(root).encode()),
        )
        started.set()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(serve())
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(10)
    yield SftpPeer(root, port, known_hosts)

    async def stop() -> None:
        holder["server"].close()
        await holder["server"].wait_closed()

    asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=5)
    _CutOnceSFTP.cut_once.clear()


def _gateway(tmp_path: Path, sftp: SftpPeer, live_server: LiveServer, **source: Any) -> Gateway:
    from pacs_fixtures import client_secret

    settings = Settings(
        data_dir=tmp_path / "gw-archive-unused",
        gateway={
            "data_dir": tmp_path / "gateway",
            "scp_port": free_port(),
            "sources": {
                "ris-sftp": {
                    "retrieve": "sftp",
                    "host": "127.0.0.1",
                    "port": sftp.port,
                    "ftp_user": "pacs",
                    "ftp_password_env": PASSWORD_ENV,
                    "ftp_path": "/export",
                    "sftp_known_hosts": sftp.known_hosts,
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


def _log(gw: Gateway) -> list[dict[str, Any]]:
    path = gw.gw.data_dir / "messages.log"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sftp__read_cut_short_resumed__delivered_then_deleted(
    tmp_path: Path, sftp: SftpPeer, live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PASSWORD_ENV, "s3cret-sftp")
    export = sftp.root / "export"
    ct = DATA.joinpath("ct_small.dcm").read_bytes()
    (export / "study-1").mkdir()
    (export / "study-1" / "CT0001.dcm").write_bytes(ct)
    _CutOnceSFTP.cut_once.add("CT0001.dcm")
    gw = _gateway(tmp_path, sftp, live_server, ftp_after="delete")
    try:
        assert gw.poll("ris-sftp") == 0  # sizes noted
        assert gw.poll("ris-sftp") == 0  # the read broke off half way: not taken
        assert gw.queue.studies() == []
        assert gw.poll("ris-sftp") == 1  # resumed
        reads = [e for e in _log(gw) if e["msg"] == "SFTP-READ"]
        assert [(e["offset"], e["result"]) for e in reads] == [(0, "short"), (len(ct) // 2, "ok")]
        drain(gw)
        uid = str(pydicom.dcmread(DATA / "ct_small.dcm", stop_before_pixels=True).SOPInstanceUID)
        assert set(archived(live_server)) == {uid}
        [instance] = gw.queue.instances(
            str(pydicom.dcmread(DATA / "ct_small.dcm", stop_before_pixels=True).StudyInstanceUID)
        )
        assert instance.sha256 == hashlib.sha256(ct).hexdigest()
        gw.poll("ris-sftp")  # delivered: deleted on the server
        assert not (export / "study-1" / "CT0001.dcm").exists()
    finally:
        gw.close()


def test_sftp__unknown_host_key__refused(
    tmp_path: Path, sftp: SftpPeer, live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PASSWORD_ENV, "s3cret-sftp")
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode()
    sftp.known_hosts.write_text(f"[127.0.0.1]:{sftp.port} {other}")
    (sftp.root / "export" / "CT0001.dcm").write_bytes(DATA.joinpath("ct_small.dcm").read_bytes())
    gw = _gateway(tmp_path, sftp, live_server)
    try:
        assert gw.poll("ris-sftp") == 0
        state = gw.queue.source_state("ris-sftp")
        assert state is not None and state.last_error is not None
        assert "SFTP" in state.last_error and "host key" in state.last_error.lower()
    finally:
        gw.close()
