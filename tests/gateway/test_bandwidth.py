"""Bandwidth limit (token bucket) on uploads, and back-fill by date range inside the schedule."""

from __future__ import annotations

import io
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
import pytest
from test_end_to_end import assert_archived, load

from cloudfilm.gateway.bandwidth import Throttle
from cloudfilm.gateway.models import StudyState
from cloudfilm.gateway.service import Gateway

from conftest import DATA, LiveServer

if TYPE_CHECKING:
    from pacs_fixtures import OrthancPACS

pytest_plugins = ["pacs_fixtures"]

FILES = ["mr_small.dcm", "emri_small_jpeg_ls_lossless.dcm"]
RATE = 20_000


@pytest.fixture
def backend() -> str:
    return "sqlite"


def test_throttle__threads_share_one_bucket() -> None:
    bucket = Throttle(100_000, burst=10_000)
    start = time.monotonic()
    workers = [
        threading.Thread(target=lambda: [bucket.take(5_000) for _ in range(10)]) for _ in range(3)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    # 150 kB through 100 kB/s with a 10 kB burst: at least 1.4 s.
    assert time.monotonic() - start >= (150_000 - 10_000) / 100_000
    assert b"".join(bucket.chunks([b"a" * 25_000, b"b"])) == b"a" * 25_000 + b"b"


def outside_now() -> str:
    """A schedule window that does not contain the current hour."""
    hour = datetime.now().astimezone().hour
    return f"{(hour + 1) % 24}-{(hour + 2) % 24}"


def test_bandwidth__backfill_keeps_schedule_and_limit(
    tmp_path: Path, orthanc: OrthancPACS, gateway_port: int, live_server: LiveServer
) -> None:
    from pacs_fixtures import client_secret, gateway_settings

    originals = load(orthanc, [DATA / name for name in FILES])
    dates = sorted(
        str(pydicom.dcmread(DATA / name, stop_before_pixels=True).StudyDate) for name in FILES
    )
    settings = gateway_settings(
        tmp_path,
        orthanc=orthanc,
        gateway_port=gateway_port,
        archive_url=live_server.url,
        secret=client_secret(live_server.archive, live_server.clock),
        schedule_hours=outside_now(),
        bandwidth_bytes_per_second=RATE,
        bandwidth_send_back=True,
        destinations={"pacs": {"aet": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}},
    )
    gw = Gateway(settings)
    gw.start()
    try:
        found = gw.fetch("pacs", study_date=f"{dates[0]}-{dates[-1]}")
        assert len(found) == len(FILES)
        # Outside the window a date-range back-fill waits, like a poll would.
        assert not gw.in_schedule()
        assert gw.retrieve_next(in_schedule=False) is None
        assert {s["state"] for s in gw.queue.studies()} == {StudyState.DISCOVERED}
        # Inside it (the night), everything is moved, and no faster than the limit.
        while gw.retrieve_next(in_schedule=True) is not None:
            pass
        start = time.monotonic()
        while gw.deliver_next() is not None:
            pass
        seconds = time.monotonic() - start
        # The way back keeps to the same limit (bandwidth_send_back).
        job = gw.send_back.jobs.request(str(found[0].study_instance_uid), "pacs")
        start = time.monotonic()
        while gw.send_back.run_next() is not None:
            pass
        back_seconds = time.monotonic() - start
        back = gw.send_back.jobs.job(job["id"])
    finally:
        gw.close()
    assert_archived(live_server, originals)
    sent = sum(len(data) for data in originals.values())
    assert gw.throttle is not None
    lower = (sent - gw.throttle.burst) / RATE
    assert seconds >= lower, (seconds, lower)
    assert back is not None and back["state"] == "sent", back
    study_bytes = sum(
        len(data)
        for data in originals.values()
        if str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).StudyInstanceUID)
        == found[0].study_instance_uid
    )
    assert back_seconds >= (study_bytes - gw.throttle.burst) / RATE
