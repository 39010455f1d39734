"""dcmtk's ``dcmqrscp`` as a second, stricter PACS: C-FIND polling by modality, a manual
fetch by Study Instance UID, C-MOVE to the gateway's Storage SCP, STOW-RS to the archive.

dcmqrscp runs with ``--check-find`` and ``--check-move`` (queries must follow the strict
DICOM identifier rules), knows the gateway as its one peer (unknown calling AEs are refused,
the C-MOVE destination is looked up in its host table), and supports only the query keys
of its index: Modalities in Study (0008,0061) is silently dropped, which the gateway's
poll by modality must make up for.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from test_end_to_end import archived, drain, same_pixels

from cloudfilm.archive.ingest import Archive
from cloudfilm.auth.service import create_client
from cloudfilm.clock import Clock
from cloudfilm.config import Settings
from cloudfilm.gateway.models import InstanceState, StudyState
from cloudfilm.gateway.pacs import PacsClient, PacsError
from cloudfilm.gateway.service import Gateway

from conftest import DATA, LiveServer, free_port

QR_AET = "DCMQRSCP"
GATEWAY_AET = "CF_GATEWAY"
#: Uncompressed files: dcmqrscp proposes only uncompressed transfer syntaxes for its C-MOVE
#: sub-operations by default (and does not transcode).
FILES = ["ct_small.dcm", "mr_small.dcm"]

pytestmark = pytest.mark.dcmtk


@pytest.fixture
def backend() -> str:
    return "sqlite"


@dataclass
class DcmQrScp:
    port: int
    gateway_port: int
    """Where dcmqrscp sends the C-STORE sub-operations of a C-MOVE (the gateway's SCP)."""
    storage: Path
    process: subprocess.Popen[bytes]
    log: Path


def dcmqrscp_config(storage: Path, port: int, gateway_port: int) -> str:
    """dcmqrscp.cfg (dcmtk's dcmqrcnf.txt): the gateway as the one peer of the archive AE,
    under both names its loopback address may be reported as."""
    return f"""\
NetworkTCPPort  = {port}
MaxPDUSize      = 65536
MaxAssociations = 8

HostTable BEGIN
gateway = ({GATEWAY_AET}, 127.0.0.1, {gateway_port}), ({GATEWAY_AET}, localhost, {gateway_port})
HostTable END

VendorTable BEGIN
VendorTable END

AETable BEGIN
{QR_AET}  {storage}  RW  (20, 64mb)  gateway
AETable END
"""


@pytest.fixture
def dcmqrscp(tmp_path: Path) -> Iterator[DcmQrScp]:
    """dcmqrscp on a free loopback port, its storage area indexed with dcmqridx."""
    server, indexer = shutil.which("dcmqrscp"), shutil.which("dcmqridx")
    if server is None or indexer is None:
        pytest.skip("dcmtk's dcmqrscp and dcmqridx are not installed (Debian package dcmtk)")
    base = tmp_path / "dcmqrscp"
    storage = base / "storage"
    storage.mkdir(parents=True)
    files = []
    for name in FILES:
        shutil.copy(DATA / name, storage / name)
        files.append(str(storage / name))
    subprocess.run([indexer, str(storage), *files], check=True, capture_output=True, timeout=30)
    port = free_port()
    gateway_port = free_port()
    config = base / "dcmqrscp.cfg"
    config.write_text(dcmqrscp_config(storage, port, gateway_port))
    log = base / "dcmqrscp.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [server, "--check-find", "--check-move", "--disable-get", "-c", str(config),
             str(port)],
            cwd=base, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"dcmqrscp did not start: {log.read_text()[-2000:]}")
        time.sleep(0.05)
    yield DcmQrScp(port, gateway_port, storage, process, log)
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _secret(archive: Archive, clock: Clock) -> str:
    with archive.db.session() as session:
        _, secret = create_client(session=session, name="gateway", now=clock.now())
    return secret


@pytest.fixture
def gateway(tmp_path: Path, dcmqrscp: DcmQrScp, live_server: LiveServer) -> Iterator[Gateway]:
    settings = Settings(
        data_dir=tmp_path / "gw-archive-unused",
        gateway={
            "data_dir": tmp_path / "gateway",
            "ae_title": GATEWAY_AET,
            "scp_port": dcmqrscp.gateway_port,
            "sources": {
                "qr": {
                    "aet": QR_AET,
                    "host": "127.0.0.1",
                    "port": dcmqrscp.port,
                    "modalities": ["CT"],
                    "since": "19000101",
                    "window_days": 0,
                    "poll_interval": 3600,
                }
            },
            "archive_url": live_server.url,
            "client_id": "gateway",
            "client_secret": _secret(live_server.archive, live_server.clock),
            "backoff_initial_seconds": 0.2,
            "backoff_max_seconds": 1.0,
            "network_timeout": 20.0,
        },
    )
    gw = Gateway(settings)
    gw.start()
    yield gw
    gw.close()


def test_dcmqrscp__poll_by_modality_and_fetch_by_uid__moved_to_the_archive(
    dcmqrscp: DcmQrScp, gateway: Gateway, live_server: LiveServer
) -> None:
    headers = {n: pydicom.dcmread(DATA / n, stop_before_pixels=True) for n in FILES}
    ct, mr = headers["ct_small.dcm"], headers["mr_small.dcm"]

    # A calling AE dcmqrscp does not know is refused at association.
    stranger = gateway.gw.model_copy(update={"ae_title": "STRANGER"})
    with pytest.raises(PacsError, match="rejected"):
        PacsClient(stranger, gateway.gw.sources["qr"]).find_studies(study_date="19000101-")

    # The poll asks for CT only: dcmqrscp ignores Modalities in Study and answers both
    # studies; the series-level check keeps the CT.
    assert gateway.poll("qr") == 1
    assert [s["study_instance_uid"] for s in gateway.queue.studies()] == [str(ct.StudyInstanceUID)]
    # A manual request by Study Instance UID brings the MR.
    [found] = gateway.fetch("qr", study_instance_uid=str(mr.StudyInstanceUID))
    # dcmqrscp's index does not answer NumberOfStudyRelatedInstances: the completeness check
    # falls back to the C-MOVE's sub-operation counts.
    assert found.expected_instances is None
    drain(gateway)

    stored = archived(live_server)
    assert set(stored) == {str(h.SOPInstanceUID) for h in headers.values()}
    for name, header in headers.items():
        assert same_pixels((DATA / name).read_bytes(), stored[str(header.SOPInstanceUID)])
    summary = gateway.queue.summary()
    assert summary["studies"] == {StudyState.DELIVERED: 2}
    assert summary["instances"] == {InstanceState.DELIVERED: 2}
    log = (gateway.gw.data_dir / "messages.log").read_text()
    assert "ModalitiesInStudy not supported" in log
