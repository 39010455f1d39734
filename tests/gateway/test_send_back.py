"""The way back: archive (WADO-RS) → gateway spool → C-STORE to a hospital node (Orthanc)."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, StoragePresentationContexts
from test_end_to_end import same_pixels

from cloudfilm.audit.service import Actor
from cloudfilm.gateway.models import SendBackState
from cloudfilm.gateway.service import Gateway
from cloudfilm.storage import new_key

from conftest import DATA, LiveServer, free_port

if TYPE_CHECKING:
    from pacs_fixtures import OrthancPACS

pytest_plugins = ["pacs_fixtures", "gw_postgres"]

FILES = ["ct_small.dcm", "mr_small.dcm"]
ACTOR = Actor.cli("pytest")


@pytest.fixture
def backend() -> str:
    return "sqlite"


def back_gateway(
    tmp_path: Path,
    live_server: LiveServer,
    orthanc: OrthancPACS,
    gateway_port: int,
    *,
    secret: str | None = None,
    **gw: Any,
) -> Gateway:
    from pacs_fixtures import client_secret, gateway_settings

    settings = gateway_settings(
        tmp_path,
        orthanc=orthanc,
        gateway_port=gateway_port,
        archive_url=live_server.url,
        secret=secret or client_secret(live_server.archive, live_server.clock),
        sources={},
        destinations={
            "pacs": {"aet": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port},
            **gw.pop("destinations", {}),
        },
        http_port=free_port(),
        **gw,
    )
    gateway = Gateway(settings)
    gateway.start()
    return gateway


def run_until_done(gw: Gateway, job_id: int, *, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        gw.send_back.run_next()
        job = gw.send_back.jobs.job(job_id)
        assert job is not None
        if job["state"] in (SendBackState.SENT, SendBackState.DEAD):
            return job
        time.sleep(0.05)
    raise AssertionError(f"send-back did not finish: {gw.send_back.jobs.job(job_id)}")


def test_send_back__archive_to_orthanc__pixels_identical(
    tmp_path: Path, live_server: LiveServer, orthanc: OrthancPACS, gateway_port: int
) -> None:
    originals: dict[str, bytes] = {}
    for name in FILES:
        data = (DATA / name).read_bytes()
        assert live_server.archive.ingest(data, actor=ACTOR).ok
        ds = pydicom.dcmread(DATA / name, stop_before_pixels=True)
        originals[str(ds.SOPInstanceUID)] = data
    study_uid = str(pydicom.dcmread(DATA / FILES[0], stop_before_pixels=True).StudyInstanceUID)
    gw = back_gateway(tmp_path, live_server, orthanc, gateway_port)
    try:
        gw.start_api()
        assert gw.api is not None
        answer = httpx.post(
            f"http://127.0.0.1:{gw.gw.http_port}/send-back",
            json={"study_instance_uid": study_uid, "destination": "pacs"},
            timeout=10,
        )
        assert answer.status_code == 202, answer.text
        job = run_until_done(gw, answer.json()["id"])
        assert job["state"] == SendBackState.SENT, job
        assert job["sent"] == job["fetched"] >= 1
        status = httpx.get(f"http://127.0.0.1:{gw.gw.http_port}/status", timeout=10).json()
        assert status["send_back_by_state"] == {SendBackState.SENT: 1}
        listed = httpx.get(f"http://127.0.0.1:{gw.gw.http_port}/send-back", timeout=10).json()
        assert listed[0]["state"] == SendBackState.SENT
        unknown = httpx.post(
            f"http://127.0.0.1:{gw.gw.http_port}/send-back",
            json={"study_instance_uid": study_uid, "destination": "nowhere"},
            timeout=10,
        )
        assert unknown.status_code == 404
        assert list(gw.send_back.jobs.spool.iter_objects()) == []
    finally:
        gw.close()
    # Every instance of the study is in Orthanc, pixel data identical to the original.
    in_study = {
        uid: data
        for uid, data in originals.items()
        if str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).StudyInstanceUID)
        == study_uid
    }
    found = httpx.post(
        f"{orthanc.url}/tools/find",
        json={"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}, "Expand": True},
        timeout=10,
    ).json()
    received = {
        item["MainDicomTags"]["SOPInstanceUID"]: httpx.get(
            f"{orthanc.url}/instances/{item['ID']}/file", timeout=10
        ).content
        for item in found
    }
    assert set(received) == set(in_study)
    for uid, data in in_study.items():
        assert same_pixels(data, received[uid]), uid
        sent, got = pydicom.dcmread(io.BytesIO(data)), pydicom.dcmread(io.BytesIO(received[uid]))
        if sent.file_meta.TransferSyntaxUID == got.file_meta.TransferSyntaxUID:
            assert sent.PixelData == got.PixelData, uid


@pytest.fixture
def refusing_node() -> Iterator[int]:
    """A DICOM node that rejects every association (called AE title must be REFUSER)."""
    ae = AE(ae_title="REFUSER")
    ae.require_called_aet = True
    ae.supported_contexts = StoragePresentationContexts
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    yield port
    server.shutdown()


def test_send_back__refused_association__retried_then_dead_letter(
    tmp_path: Path,
    live_server: LiveServer,
    orthanc: OrthancPACS,
    gateway_port: int,
    refusing_node: int,
) -> None:
    data = (DATA / "ct_small.dcm").read_bytes()
    assert live_server.archive.ingest(data, actor=ACTOR).ok
    study_uid = str(pydicom.dcmread(DATA / "ct_small.dcm").StudyInstanceUID)
    gw = back_gateway(
        tmp_path,
        live_server,
        orthanc,
        gateway_port,
        destinations={"ws": {"aet": "WORKSTATION", "host": "127.0.0.1", "port": refusing_node}},
        dead_letter_attempts=3,
        backoff_initial_seconds=0.1,
        backoff_max_seconds=0.2,
    )
    try:
        job = gw.send_back.jobs.request(study_uid, "ws")
        done = run_until_done(gw, job["id"])
        assert done["state"] == SendBackState.DEAD
        assert done["attempts"] == 3
        assert done["step"] == "send"
        assert "WORKSTATION" in done["last_error"] and "rejected" in done["last_error"]
        assert done["fetched"] == 1 and done["sent"] == 0
        # The spooled copy stays for a manual retry.
        assert len(list(gw.send_back.jobs.spool.iter_objects())) == 1
        assert gw.send_back.jobs.retry(job["id"]) == 1
        assert gw.send_back.jobs.job(job["id"])["state"] == SendBackState.FETCHED  # type: ignore[index]
    finally:
        gw.close()
    log = (tmp_path / "gateway" / "messages.log").read_text()
    assert "WADO-RS-RSP" in log


@pytest.mark.parametrize("state_db", ["sqlite", "postgresql"])
def test_send_back__interrupted_fetch__recovered_and_orphans_dropped(
    tmp_path: Path,
    live_server: LiveServer,
    orthanc: OrthancPACS,
    gateway_port: int,
    state_db: str,
    request: pytest.FixtureRequest,
) -> None:
    from pacs_fixtures import client_secret

    state: dict[str, Any] = {}
    if state_db == "postgresql":
        state["database_url"] = request.getfixturevalue("gateway_postgres_url")
    data = (DATA / "mr_small.dcm").read_bytes()
    assert live_server.archive.ingest(data, actor=ACTOR).ok
    study_uid = str(pydicom.dcmread(DATA / "mr_small.dcm").StudyInstanceUID)
    secret = client_secret(live_server.archive, live_server.clock)
    gw = back_gateway(tmp_path, live_server, orthanc, gateway_port, secret=secret, **state)
    job = gw.send_back.jobs.request(study_uid, "pacs")
    task = gw.send_back.jobs.next_task()  # claimed: "fetching" is committed ...
    assert task is not None
    gw.send_back.jobs.spool.put(new_key(), b"half written")  # ... then the process died
    gw.close()
    gw = back_gateway(tmp_path, live_server, orthanc, gateway_port, secret=secret, **state)
    try:
        assert gw.send_back.jobs.job(job["id"])["state"] == SendBackState.QUEUED  # type: ignore[index]
        assert list(gw.send_back.jobs.spool.iter_objects()) == []
        assert run_until_done(gw, job["id"])["state"] == SendBackState.SENT
    finally:
        gw.close()
    assert orthanc.count() == 1


def test_send_back__cli_unknown_destination(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cloudfilm.cli import app

    env = {
        "CLOUDFILM_GATEWAY__DATA_DIR": str(tmp_path / "gw"),
        "CLOUDFILM_GATEWAY__DESTINATIONS": '{"ws": {"aet": "WS", "host": "127.0.0.1"}}',
    }
    result = CliRunner().invoke(
        app, ["gateway", "send-back", "--study", "1.2.3", "--to", "nope"], env=env
    )
    assert result.exit_code == 1
    result = CliRunner().invoke(app, ["gateway", "send-back", "--study", "1.2.3"], env=env)
    assert result.exit_code == 0, result.output
    assert '"destination": "ws"' in result.output


def test_send_back__node_without_jpeg_ls__gets_it_decoded(
    tmp_path: Path, live_server: LiveServer, orthanc: OrthancPACS, gateway_port: int
) -> None:
    from pynetdicom import evt
    from pynetdicom.sop_class import EnhancedMRImageStorage  # type: ignore[attr-defined]

    data = (DATA / "emri_small_jpeg_ls_lossless.dcm").read_bytes()
    assert live_server.archive.ingest(data, actor=ACTOR).ok
    original = pydicom.dcmread(io.BytesIO(data))
    received: list[pydicom.Dataset] = []

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.append(ds)
        return 0x0000

    ae = AE(ae_title="WORKSTATION")
    ae.add_supported_context(
        EnhancedMRImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    )
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    gw = back_gateway(
        tmp_path,
        live_server,
        orthanc,
        gateway_port,
        destinations={"ws": {"aet": "WORKSTATION", "host": "127.0.0.1", "port": port}},
    )
    try:
        job = gw.send_back.jobs.request(str(original.StudyInstanceUID), "ws")
        assert run_until_done(gw, job["id"])["state"] == SendBackState.SENT
    finally:
        gw.close()
        server.shutdown()
    [got] = received
    assert got.file_meta.TransferSyntaxUID in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    assert np.array_equal(got.pixel_array, original.pixel_array)
