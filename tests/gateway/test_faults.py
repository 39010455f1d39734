"""Faults on either side of the gateway: archive down, PACS refusing or short, poison objects."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from cloudfilm.archive.models import Instance
from cloudfilm.clock import as_utc
from cloudfilm.config import Settings
from cloudfilm.gateway.models import InstanceState, Step, StudyState
from cloudfilm.gateway.service import Gateway

from conftest import DATA, LiveServer, free_port

if TYPE_CHECKING:
    from pacs_fixtures import OrthancPACS

pytest_plugins = ["pacs_fixtures"]


@pytest.fixture
def backend() -> str:
    return "sqlite"


@pytest.fixture
def gateway(gw_settings: Settings) -> Iterator[Gateway]:
    gw = Gateway(gw_settings)
    gw.start()
    yield gw
    gw.close()


def study_of(count: int, *, poison: int | None = None) -> tuple[str, list[bytes]]:
    """``count`` instances of one new study (copies of ct_small.dcm with fresh UIDs);
    instance ``poison`` loses its Pixel Data (a CT image without pixels: the archive
    refuses it, Orthanc keeps it)."""
    study_uid, series_uid = generate_uid(), generate_uid()
    out = []
    for n in range(count):
        ds = pydicom.dcmread(DATA / "ct_small.dcm")
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = n + 1
        if n == poison:
            del ds.PixelData
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        out.append(buffer.getvalue())
    return study_uid, out


def run_until(gw: Gateway, done: object, *, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        gw.run_once()
        if callable(done) and done():
            return
        time.sleep(0.05)
    raise AssertionError(f"condition not reached: {gw.queue.studies()}")


def state(gw: Gateway, study_uid: str) -> str:
    study = gw.queue.study(study_uid)
    assert study is not None
    return study.state


def test_archive_unreachable__backs_off_then_drains(
    orthanc: OrthancPACS, gateway: Gateway, live_server: LiveServer
) -> None:
    study_uid, files = study_of(3)
    for data in files:
        orthanc.upload(data)
    real_url = gateway.archive.http.base_url
    gateway.archive.http.base_url = f"http://127.0.0.1:{free_port()}"  # nobody listens
    gateway.poll("pacs")
    run_until(gateway, lambda: len(deliveries(gateway, study_uid)) >= 4, timeout=20)
    failed = deliveries(gateway, study_uid)
    assert all(a.outcome == "failed" for a in failed)
    assert all("archive unreachable" in (a.detail or "") for a in failed)
    starts = [as_utc(a.started_at) for a in failed]
    gaps = [(b - a).total_seconds() for a, b in zip(starts, starts[1:], strict=False)]
    # back-off 0.2 s, 0.4 s, 0.8 s, then capped at 1 s (gateway.backoff_*_seconds)
    for gap, wanted in zip(gaps, [0.2, 0.4, 0.8], strict=False):
        assert gap >= wanted - 0.02, gaps
    assert state(gateway, study_uid) == StudyState.FAILED
    assert len(list(gateway.queue.spooled())) == 3  # nothing lost while waiting

    gateway.archive.http.base_url = real_url  # the archive is back
    run_until(gateway, lambda: state(gateway, study_uid) == StudyState.DELIVERED)
    assert {i.state for i in gateway.queue.instances(study_uid)} == {InstanceState.DELIVERED}
    with live_server.archive.db.read_session() as session:
        count = len(session.scalars(select(Instance.id)).all())
    assert count == 3


def deliveries(gw: Gateway, study_uid: str) -> list[object]:
    return [a for a in gw.queue.attempts(study_uid) if a.step == Step.DELIVER and a.outcome]


def test_pacs_refuses_association__failed_with_reason_then_retried(
    orthanc: OrthancPACS, gateway: Gateway, live_server: LiveServer
) -> None:
    study_uid, files = study_of(2)
    for data in files:
        orthanc.upload(data)
    assert gateway.poll("pacs") == 1
    source = gateway.gw.sources["pacs"]
    real_port = source.port
    source.port = free_port()  # the PACS is down / refuses us
    gateway.retrieve_next()
    study = gateway.queue.study(study_uid)
    assert study is not None and study.state == StudyState.FAILED
    assert study.last_error is not None and "association" in study.last_error
    assert study.attempts == 1 and study.next_attempt_at is not None
    source.port = real_port
    run_until(gateway, lambda: state(gateway, study_uid) == StudyState.DELIVERED)
    assert len(gateway.queue.instances(study_uid)) == 2


def test_pacs_sends_fewer_than_announced__incomplete_then_retried(
    orthanc: OrthancPACS, gateway: Gateway, live_server: LiveServer
) -> None:
    study_uid, files = study_of(3)
    ids = [orthanc.upload(data) for data in files]
    assert gateway.poll("pacs") == 1  # C-FIND announces 3 instances
    orthanc.delete_instance(ids[2])  # ... but the PACS then has only 2
    gateway.retrieve_next()
    study = gateway.queue.study(study_uid)
    assert study is not None and study.state == StudyState.FAILED
    assert study.last_error == "incomplete: 2 of 3 instances announced by the PACS"
    assert gateway.deliver_next() is None  # an incomplete study is not delivered
    orthanc.upload(files[2])  # the missing image reaches the PACS
    run_until(gateway, lambda: state(gateway, study_uid) == StudyState.DELIVERED)
    assert len(gateway.queue.instances(study_uid)) == 3
    outcomes = [(a.step, a.outcome) for a in gateway.queue.attempts(study_uid)]
    assert outcomes[0] == (Step.RETRIEVE, "failed")
    assert (Step.RETRIEVE, "ok") in outcomes and outcomes[-1] == (Step.DELIVER, "ok")


def test_poison_instance__dead_letter_with_archive_reason__rest_delivered(
    orthanc: OrthancPACS, gateway: Gateway, live_server: LiveServer
) -> None:
    study_uid, files = study_of(4, poison=1)
    for data in files:
        orthanc.upload(data)
    poison_uid = str(pydicom.dcmread(io.BytesIO(files[1])).SOPInstanceUID)
    gateway.poll("pacs")
    run_until(gateway, lambda: state(gateway, study_uid) == StudyState.DELIVERED)
    rows = {i.sop_instance_uid: i for i in gateway.queue.instances(study_uid)}
    assert rows[poison_uid].state == InstanceState.DEAD
    assert "0xC000" in (rows[poison_uid].last_error or "")
    assert [i.state for u, i in rows.items() if u != poison_uid] == [InstanceState.DELIVERED] * 3
    with live_server.archive.db.read_session() as session:
        stored = set(session.scalars(select(Instance.sop_instance_uid)))
    assert stored == set(rows) - {poison_uid}
    study = gateway.queue.study(study_uid)
    assert study is not None and "1 instance(s) refused" in (study.last_error or "")
    # The refused object stays in the spool for a manual retry after it is fixed.
    assert len(list(gateway.queue.spooled())) == 1
    assert gateway.queue.retry(study_uid) == 1
    run_until(gateway, lambda: state(gateway, study_uid) == StudyState.DELIVERED)
    again = {i.sop_instance_uid: i.state for i in gateway.queue.instances(study_uid)}
    assert again[poison_uid] == InstanceState.DEAD  # refused again, the rest untouched
