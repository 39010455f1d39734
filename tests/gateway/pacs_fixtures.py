"""Orthanc as the hospital PACS, the archive's ``live_server``, and a gateway between them."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from cloudfilm.archive.ingest import Archive
from cloudfilm.auth.service import create_client
from cloudfilm.clock import Clock
from cloudfilm.config import Settings

from conftest import LiveServer, free_port

ORTHANC = Path("/usr/sbin/Orthanc")
#: Debian package orthanc-dicomweb: the PACS's WADO-RS for ``retrieve = "wado"``.
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
ORTHANC_AET = "ORTHANC"
GATEWAY_AET = "CF_GATEWAY"


@dataclass
class OrthancPACS:
    """Orthanc from Debian on loopback: REST for loading and checking, DICOM Q/R for us.

    The configuration follows bench/ingest.py's ``OrthancServer`` (closed: no remote
    access, no plugins) plus the gateway as the one known modality, so that Orthanc
    answers its C-FIND/C-MOVE and can reach its Storage SCP as the C-MOVE destination.
    """

    http_port: int
    dicom_port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def wado_url(self) -> str:
        return f"{self.url}/dicom-web"

    def upload(self, data: bytes) -> str:
        response = httpx.post(f"{self.url}/instances", content=data, timeout=30.0)
        response.raise_for_status()
        return str(response.json()["ID"])

    def delete_instance(self, orthanc_id: str) -> None:
        httpx.delete(f"{self.url}/instances/{orthanc_id}", timeout=30.0).raise_for_status()

    def count(self) -> int:
        response = httpx.get(f"{self.url}/statistics", timeout=10.0)
        return int(response.json()["CountInstances"])


def orthanc_config(
    base: Path, http_port: int, dicom_port: int, gateway_port: int
) -> dict[str, Any]:
    (base / "storage").mkdir(parents=True)
    return {
        "Name": "cloudfilm-gateway-test",
        "StorageDirectory": str(base / "storage"),
        "IndexDirectory": str(base / "storage"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomAet": ORTHANC_AET,
        "DicomCheckCalledAet": False,
        "Plugins": [str(DICOMWEB_PLUGIN)] if DICOMWEB_PLUGIN.exists() else [],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "LuaScripts": [],
        "DicomModalities": {"gateway": [GATEWAY_AET, "127.0.0.1", gateway_port]},
        "OrthancPeers": {},
        "StorageCompression": False,
    }


@pytest.fixture
def gateway_port() -> int:
    return free_port()


@pytest.fixture
def orthanc(tmp_path: Path, gateway_port: int) -> Iterator[OrthancPACS]:
    if not os.access(ORTHANC, os.X_OK):
        pytest.fail("Orthanc is not installed: `make test` installs it (Debian package orthanc)")
    base = tmp_path / "orthanc"
    http_port, dicom_port = free_port(), free_port()
    config = base / "orthanc.json"
    base.mkdir()
    config.write_text(json.dumps(orthanc_config(base, http_port, dicom_port, gateway_port)))
    log = base / "orthanc.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(ORTHANC), str(config)], cwd=base, stdout=out, stderr=subprocess.STDOUT
        )
    pacs = OrthancPACS(http_port, dicom_port, process, log)
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{pacs.url}/system", timeout=1.0).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"Orthanc did not start: {log.read_text()[-2000:]}")
        time.sleep(0.1)
    yield pacs
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def client_secret(archive: Archive, clock: Clock, name: str = "gateway") -> str:
    """Integration client credentials on the archive (the gateway signs in with them)."""
    with archive.db.session() as session:
        _, secret = create_client(session=session, name=name, now=clock.now())
    return secret


def gateway_settings(
    tmp_path: Path,
    *,
    orthanc: OrthancPACS,
    gateway_port: int,
    archive_url: str,
    secret: str,
    source: dict[str, Any] | None = None,
    **gateway: Any,
) -> Settings:
    options: dict[str, Any] = {
        "data_dir": tmp_path / "gateway",
        "ae_title": GATEWAY_AET,
        "scp_port": gateway_port,
        "sources": {
            "pacs": {
                "aet": ORTHANC_AET,
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
                "since": "19000101",
                "window_days": 0,
                "poll_interval": 0.5,
                **(source or {}),
            }
        },
        "archive_url": archive_url,
        "client_id": "gateway",
        "client_secret": secret,
        "backoff_initial_seconds": 0.2,
        "backoff_max_seconds": 1.0,
        "network_timeout": 20.0,
    }
    options.update(gateway)
    return Settings(data_dir=tmp_path / "gw-archive-unused", gateway=options)


@pytest.fixture
def gw_settings(
    tmp_path: Path, orthanc: OrthancPACS, gateway_port: int, live_server: LiveServer
) -> Settings:
    secret = client_secret(live_server.archive, live_server.clock)
    return gateway_settings(
        tmp_path,
        orthanc=orthanc,
        gateway_port=gateway_port,
        archive_url=live_server.url,
        secret=secret,
    )
