"""``POST /trigger`` on the gateway's status API ("exam X is final"): the study is found in
Orthanc and fetched at once, outside the schedule window; a study the PACS does not hold yet
is queued by its UID and fetched once its images are there."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pydicom
import pytest
from test_end_to_end import archived

from cloudfilm.gateway.models import StudyState
from cloudfilm.gateway.service import Gateway

from conftest import DATA, LiveServer, free_port

if TYPE_CHECKING:
    from pacs_fixtures import OrthancPACS

pytest_plugins = ["pacs_fixtures"]

TOKEN = "trigger-token-0123456789-abcdefghijkl"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def backend() -> str:
    return "sqlite"


@pytest.fixture
def gateway(
    tmp_path: Path, orthanc: OrthancPACS, gateway_port: int, live_server: LiveServer
) -> Iterator[Gateway]:
    from pacs_fixtures import client_secret, gateway_settings

    hour = datetime.now().astimezone().hour
    settings = gateway_settings(
        tmp_path,
        orthanc=orthanc,
        gateway_port=gateway_port,
        archive_url=live_server.url,
        secret=client_secret(live_server.archive, live_server.clock),
        source={"poll_interval": 3600},
        http_port=free_port(),
        api_token=TOKEN,
        # Polled studies wait for a window that is not now; triggered ones do not.
        schedule_hours=f"{(hour + 2) % 24}-{(hour + 3) % 24}",
    )
    gw = Gateway(settings)
    gw.start()
    gw.start_api()
    yield gw
    gw.close()


def _post(
    gw: Gateway, body: dict[str, str], headers: dict[str, str] | None = None
) -> httpx.Response:
    return httpx.post(
        f"http://127.0.0.1:{gw.gw.http_port}/trigger",
        json=body,
        headers=AUTH if headers is None else headers,
        timeout=30.0,
    )


def test_trigger__by_accession_and_by_uid__fetched_at_once(
    orthanc: OrthancPACS, gateway: Gateway, live_server: LiveServer
) -> None:
    header = pydicom.dcmread(DATA / "ct_small.dcm")
    header.AccessionNumber = "A20261128001"  # the RIS's number for the exam
    buffer = io.BytesIO()
    header.save_as(buffer, enforce_file_format=True)
    orthanc.upload(buffer.getvalue())
    mr_header = pydicom.dcmread(DATA / "mr_small.dcm", stop_before_pixels=True)
    orthanc.upload(DATA.joinpath("mr_small.dcm").read_bytes())
    assert gateway.poll("pacs") == 2  # both known, neither due: outside the schedule
    assert gateway.retrieve_next(in_schedule=gateway.in_schedule()) is None

    assert _post(gateway, {"accession_number": "x"}, headers={}).status_code == 401
    assert _post(gateway, {}).status_code == 400
    assert _post(gateway, {"study_instance_uid": "1.2", "source": "nope"}).status_code == 400
    assert _post(gateway, {"accession_number": "NO-SUCH-ACC"}).status_code == 404

    stop = threading.Event()
    loop = threading.Thread(target=gateway.run, args=(stop,), kwargs={"idle_seconds": 0.05})
    loop.start()
    try:
        accession = str(header.AccessionNumber)
        response = _post(gateway, {"accession_number": accession})
        assert response.status_code == 202, response.text
        [queued] = response.json()["queued"]
        assert queued["study_instance_uid"] == str(header.StudyInstanceUID)
        assert queued["expected"] == 1

        # A study the PACS has not received yet: queued by its UID, retried until it is there.
        late = pydicom.dcmread(DATA / "emri_small_jpeg_ls_lossless.dcm")
        response = _post(gateway, {"study_instance_uid": str(late.StudyInstanceUID)})
        assert response.status_code == 202, response.text
        assert "not in the PACS yet" in response.json()["note"]
        deadline = datetime.now().timestamp() + 30
        while datetime.now().timestamp() < deadline:
            study = gateway.queue.study(str(late.StudyInstanceUID))
            if study is not None and study.last_error:
                break
            threading.Event().wait(0.05)
        assert study is not None and study.last_error  # Orthanc: C-MOVE 0xC000
        attempts = gateway.queue.attempts(str(late.StudyInstanceUID))
        assert "failed" in [a.outcome for a in attempts]
        orthanc.upload(DATA.joinpath("emri_small_jpeg_ls_lossless.dcm").read_bytes())
        while datetime.now().timestamp() < deadline:
            if len(archived(live_server)) == 2:
                break
            threading.Event().wait(0.1)
    finally:
        stop.set()
        loop.join(timeout=30)
    assert set(archived(live_server)) == {str(header.SOPInstanceUID), str(late.SOPInstanceUID)}
    states = {s["study_instance_uid"]: s["state"] for s in gateway.queue.studies()}
    assert states == {
        str(header.StudyInstanceUID): StudyState.DELIVERED,
        str(late.StudyInstanceUID): StudyState.DELIVERED,
        str(mr_header.StudyInstanceUID): StudyState.DISCOVERED,  # still waits for its window
    }
    log = (gateway.gw.data_dir / "messages.log").read_text()
    assert log.count('"msg": "TRIGGER"') == 2
