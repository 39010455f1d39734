"""The gateway's status API (``gateway.http_port``): served in the process, read with httpx."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread

from cloudfilm.clock import MovableClock
from cloudfilm.config import Settings
from cloudfilm.gateway.api import APIConfigError, check_exposure, create_api
from cloudfilm.gateway.models import Step, StudyState
from cloudfilm.gateway.queue import FoundStudy
from cloudfilm.gateway.service import Gateway

from conftest import DATA, free_port

TOKEN = "s3cret-token-for-the-console-0123456789"


def settings(tmp_path: Path, **gateway: object) -> Settings:
    options: dict[str, object] = {
        "data_dir": tmp_path / "gw",
        "scp_port": free_port(),
        "http_port": free_port(),
        "sources": {"pacs": {"aet": "PACS", "host": "127.0.0.1", "port": free_port()}},
        "backoff_initial_seconds": 0.01,
        "dead_letter_attempts": 2,
    }
    options.update(gateway)
    return Settings(data_dir=tmp_path / "var", gateway=options)  # type: ignore[arg-type]


@pytest.fixture
def clock() -> MovableClock:
    return MovableClock()


@pytest.fixture
def gateway(tmp_path: Path, clock: MovableClock) -> Iterator[Gateway]:
    gw = Gateway(settings(tmp_path, api_token=TOKEN), clock=clock)
    gw.start()
    gw.start_api()
    yield gw
    gw.close()


def url(gw: Gateway) -> str:
    return f"http://127.0.0.1:{gw.gw.http_port}"


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def fill(gw: Gateway, clock: MovableClock) -> tuple[str, str]:
    """One delivered study (ct_small.dcm) and one dead-lettered study; their UIDs."""
    data = (DATA / "ct_small.dcm").read_bytes()
    ds = dcmread(DATA / "ct_small.dcm")
    delivered = str(ds.StudyInstanceUID)
    q = gw.queue
    q.discover("pacs", FoundStudy(delivered, expected_instances=1))
    q.accept(
        data,
        study_instance_uid=delivered,
        sop_instance_uid=str(ds.SOPInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
    )
    job = q.next_job(Step.RETRIEVE)
    assert job is not None
    q.retrieved(job)
    job = q.next_job(Step.DELIVER)
    assert job is not None
    [item] = q.outgoing(job)
    q.delivery_results(delivered=[item.instance_id], refused={}, transient={})
    q.delivery_done(job)
    dead = "1.2.3.4.5.6.7.8.9"
    q.discover("pacs", FoundStudy(dead))
    for _ in range(2):
        clock.advance(timedelta(seconds=1))
        job = q.next_job(Step.RETRIEVE)
        assert job is not None
        q.step_failed(job, "association with PACS at 127.0.0.1 rejected")
    q.polled("pacs", through=None, error="C-FIND failed with status 0xA700")
    return delivered, dead


def test_api__status_per_source__backlog_throughput_errors(
    gateway: Gateway, clock: MovableClock
) -> None:
    fill(gateway, clock)
    answer = httpx.get(f"{url(gateway)}/status", headers=AUTH)
    assert answer.status_code == 200
    body = answer.json()
    assert body["studies_by_state"] == {"delivered": 1, "dead": 1}
    [pacs] = body["sources"]
    assert pacs["name"] == "pacs" and pacs["backlog"] == 0
    assert pacs["studies_by_state"] == {"delivered": 1, "dead": 1}
    size = (DATA / "ct_small.dcm").stat().st_size
    assert pacs["last_hour"]["studies"] == 1
    assert pacs["last_hour"]["instances"] == 1 and pacs["last_hour"]["bytes"] == size
    assert pacs["last_error"] == "C-FIND failed with status 0xA700"
    assert pacs["last_poll_at"] is not None
    clock.advance(timedelta(hours=2))  # the delivery leaves the one-hour window
    later = httpx.get(f"{url(gateway)}/status", headers=AUTH).json()
    assert later["sources"][0]["last_hour"]["instances"] == 0


def test_api__studies_by_state_and_retry(gateway: Gateway, clock: MovableClock) -> None:
    delivered, dead = fill(gateway, clock)
    rows = httpx.get(f"{url(gateway)}/studies", params={"state": "dead"}, headers=AUTH).json()
    assert [r["study_instance_uid"] for r in rows] == [dead]
    assert "rejected" in rows[0]["last_error"]
    everything = httpx.get(f"{url(gateway)}/studies", headers=AUTH).json()
    assert {r["study_instance_uid"] for r in everything} == {delivered, dead}
    bad = httpx.get(f"{url(gateway)}/studies", params={"state": "lost"}, headers=AUTH)
    assert bad.status_code == 422

    answer = httpx.post(f"{url(gateway)}/studies/{dead}/retry", headers=AUTH)
    assert answer.status_code == 200 and answer.json()["requeued"] == 1
    study = gateway.queue.study(dead)
    assert study is not None and study.state == StudyState.DISCOVERED and study.attempts == 0
    missing = httpx.post(f"{url(gateway)}/studies/9.9.9/retry", headers=AUTH)
    assert missing.status_code == 404


def test_api__token_required(gateway: Gateway) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        answer = httpx.get(f"{url(gateway)}/status", headers=headers)
        assert answer.status_code == 401
        assert answer.headers["www-authenticate"] == "Bearer"
    assert httpx.post(f"{url(gateway)}/studies/1.2/retry").status_code == 401


def test_api__no_token__loopback_only(tmp_path: Path) -> None:
    with pytest.raises(APIConfigError, match="CLOUDFILM_GATEWAY__API_TOKEN"):
        check_exposure(settings(tmp_path, http_host="0.0.0.0").gateway)
    check_exposure(settings(tmp_path, http_host="0.0.0.0", api_token=TOKEN).gateway)
    check_exposure(settings(tmp_path, http_host="::1").gateway)
    # On loopback without a token the API answers without one.
    gw = Gateway(settings(tmp_path))
    try:
        create_api(gw.queue, gw.gw)
        gw.start_api()
        assert httpx.get(f"{url(gw)}/status").status_code == 200
    finally:
        gw.close()


def test_api__cli_refuses_public_address_without_token(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cloudfilm.cli import app

    result = CliRunner().invoke(
        app,
        ["gateway"],
        env={
            "CLOUDFILM_GATEWAY__DATA_DIR": str(tmp_path / "gw"),
            "CLOUDFILM_GATEWAY__HTTP_HOST": "0.0.0.0",
            "CLOUDFILM_GATEWAY__SCP_PORT": str(free_port()),
        },
    )
    assert result.exit_code == 2
    assert "CLOUDFILM_GATEWAY__API_TOKEN" in result.output
