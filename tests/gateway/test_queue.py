"""The durable queue on its own: states, back-off, dead letter, crash recovery, spool."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from pydicom import dcmread

from cloudfilm.clock import MovableClock
from cloudfilm.config import Settings
from cloudfilm.gateway.models import InstanceState, Step, StudyState
from cloudfilm.gateway.queue import FoundStudy, GatewayQueue, Rejected

DATA = Path(__file__).parents[1] / "data"


@pytest.fixture
def clock() -> MovableClock:
    return MovableClock()


pytest_plugins = ["gw_postgres"]


@pytest.fixture(params=["sqlite", "postgresql"])
def queue(tmp_path: Path, clock: MovableClock, request: pytest.FixtureRequest) -> GatewayQueue:
    """The queue with its state on SQLite (the default) and on PostgreSQL."""
    gateway: dict[str, object] = {"data_dir": tmp_path / "gw", "dead_letter_attempts": 4}
    if request.param == "postgresql":
        gateway["database_url"] = request.getfixturevalue("gateway_postgres_url")
    settings = Settings(data_dir=tmp_path / "var", gateway=gateway)
    q = GatewayQueue(settings, clock=clock)
    yield q  # type: ignore[misc]
    q.close()


def _ct() -> tuple[bytes, str, str, str]:
    data = (DATA / "ct_small.dcm").read_bytes()
    ds = dcmread(DATA / "ct_small.dcm")
    return data, str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), str(ds.SOPClassUID)


def test_backoff__doubles_and_is_capped(queue: GatewayQueue) -> None:
    seconds = [queue.backoff(n).total_seconds() for n in range(1, 14)]
    assert seconds[:4] == [1, 2, 4, 8]
    assert max(seconds) == 600 and seconds[-1] == 600


def test_queue__retrieve_fail_backoff_dead_letter_and_manual_retry(
    queue: GatewayQueue, clock: MovableClock
) -> None:
    assert queue.discover("pacs", FoundStudy("1.2.3", expected_instances=1))
    assert not queue.discover("pacs", FoundStudy("1.2.3", expected_instances=1))
    for attempt in range(1, 5):
        job = queue.next_job(Step.RETRIEVE)
        assert job is not None
        study = queue.study("1.2.3")
        assert study is not None and study.state == StudyState.RETRIEVING  # committed first
        state = queue.step_failed(job, "association refused")
        if attempt < 4:
            assert state == StudyState.FAILED
            assert queue.next_job(Step.RETRIEVE) is None  # not due yet
            clock.advance(seconds=queue.backoff(attempt).total_seconds() + 0.01)
    assert state == StudyState.DEAD
    clock.advance(days=1)
    assert queue.next_job(Step.RETRIEVE) is None  # dead letter: only by hand
    assert queue.retry("1.2.3") == 1
    assert queue.next_job(Step.RETRIEVE) is not None
    attempts = queue.attempts("1.2.3")
    assert [a.outcome for a in attempts] == ["failed"] * 4 + [None]


def test_queue__receive_deliver_and_recover_after_crash(queue: GatewayQueue) -> None:
    data, study_uid, sop_uid, sop_class = _ct()
    with pytest.raises(Rejected):
        queue.accept(data, study_instance_uid=study_uid, sop_instance_uid=sop_uid,
                     sop_class_uid=sop_class)  # fmt: skip
    queue.discover("pacs", FoundStudy(study_uid, expected_instances=1))
    job = queue.next_job(Step.RETRIEVE)
    assert job is not None
    kwargs = {"study_instance_uid": study_uid, "sop_instance_uid": sop_uid}
    assert queue.accept(data, sop_class_uid=sop_class, **kwargs)
    assert not queue.accept(data, sop_class_uid=sop_class, **kwargs)  # once per UID
    assert len(list(queue.spooled())) == 1
    assert queue.retrieved(job) == StudyState.RETRIEVED

    job = queue.next_job(Step.DELIVER)
    assert job is not None
    [instance] = queue.instances(study_uid)
    assert instance.state == InstanceState.UPLOADING
    # The process dies here: after a restart the upload is put back in line.
    assert queue.recover() == 1
    [instance] = queue.instances(study_uid)
    assert instance.state == InstanceState.RETRIEVED
    assert queue.attempts(study_uid)[-1].outcome == "interrupted"

    job = queue.next_job(Step.DELIVER)
    assert job is not None
    [out] = queue.outgoing(job)
    assert queue.spool.read(out.spool_key) == data
    queue.delivery_results(delivered=[out.instance_id], refused={}, transient={})
    assert queue.delivery_done(job) == StudyState.DELIVERED
    assert list(queue.spooled()) == []  # delivered instances leave the spool


def test_queue__incomplete_retrieval_fails_with_reason(queue: GatewayQueue) -> None:
    queue.discover("pacs", FoundStudy("1.2.4", expected_instances=3))
    job = queue.next_job(Step.RETRIEVE)
    assert job is not None
    assert queue.retrieved(job) == StudyState.FAILED
    study = queue.study("1.2.4")
    assert study is not None and study.last_error is not None
    assert "incomplete: 0 of 3" in study.last_error
    assert study.next_attempt_at is not None


def test_queue__orphan_spool_files_are_swept(queue: GatewayQueue) -> None:
    queue.spool.put("20260101/aa/bb/aabbcc.dcm", b"orphan")
    queue.recover()
    assert list(queue.spooled()) == []


def test_queue__delivered_study_reopens_when_the_pacs_has_more(
    queue: GatewayQueue, clock: MovableClock
) -> None:
    data, study_uid, sop_uid, sop_class = _ct()
    queue.discover("pacs", FoundStudy(study_uid, expected_instances=1))
    job = queue.next_job(Step.RETRIEVE)
    assert job is not None
    queue.accept(data, study_instance_uid=study_uid, sop_instance_uid=sop_uid,
                 sop_class_uid=sop_class)  # fmt: skip
    queue.retrieved(job)
    job = queue.next_job(Step.DELIVER)
    assert job is not None
    [out] = queue.outgoing(job)
    queue.delivery_results(delivered=[out.instance_id], refused={}, transient={})
    queue.delivery_done(job)
    clock.advance(timedelta(minutes=1))
    assert not queue.discover("pacs", FoundStudy(study_uid, expected_instances=1))
    assert queue.discover("pacs", FoundStudy(study_uid, expected_instances=2))
    study = queue.study(study_uid)
    assert study is not None and study.state == StudyState.DISCOVERED
