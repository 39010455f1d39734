"""Retrieval by WADO-URI from Orthanc (its ``/wado``), instances listed by C-FIND or QIDO-RS,
then STOW-RS to the archive; a 404 for one instance leaves the study incomplete."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom
import pytest
from test_end_to_end import SMALL, archived, assert_archived, drain, load

from cloudfilm.gateway.models import InstanceState, StudyState
from cloudfilm.gateway.service import Gateway

from conftest import DATA, LiveServer

if TYPE_CHECKING:
    from pacs_fixtures import OrthancPACS

pytest_plugins = ["pacs_fixtures"]


@pytest.fixture
def backend() -> str:
    return "sqlite"


def _gateway(
    tmp_path: Path,
    orthanc: OrthancPACS,
    gateway_port: int,
    live_server: LiveServer,
    source: dict[str, Any],
) -> Gateway:
    from pacs_fixtures import client_secret, gateway_settings

    settings = gateway_settings(
        tmp_path,
        orthanc=orthanc,
        gateway_port=gateway_port,
        archive_url=live_server.url,
        secret=client_secret(live_server.archive, live_server.clock),
        source={"retrieve": "wado-uri", "wado_uri_url": f"{orthanc.url}/wado", **source},
    )
    gw = Gateway(settings)
    gw.start()
    gw.scp.stop()  # nothing may come in by C-MOVE
    return gw


@pytest.fixture(params=["c-find", "qido"])
def uri_gateway(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    orthanc: OrthancPACS,
    gateway_port: int,
    live_server: LiveServer,
) -> Iterator[Gateway]:
    source = {"wado_url": orthanc.wado_url} if request.param == "qido" else {}
    gw = _gateway(tmp_path, orthanc, gateway_port, live_server, source)
    yield gw
    gw.close()


def test_wado_uri__poll_and_fetch_each_instance__archive_holds_every_instance(
    orthanc: OrthancPACS, uri_gateway: Gateway, live_server: LiveServer
) -> None:
    originals = load(orthanc, [DATA / name for name in SMALL])
    assert uri_gateway.poll("pacs") == len(SMALL)
    drain(uri_gateway)
    assert_archived(live_server, originals)
    summary = uri_gateway.queue.summary()
    assert summary["studies"] == {StudyState.DELIVERED: len(SMALL)}
    assert summary["instances"] == {InstanceState.DELIVERED: len(SMALL)}
    log = (uri_gateway.gw.data_dir / "messages.log").read_text()
    assert log.count('"msg": "WADO-URI"') == len(SMALL)


def test_wado_uri__404_for_one_instance__incomplete_then_retried(
    tmp_path: Path, orthanc: OrthancPACS, gateway_port: int, live_server: LiveServer
) -> None:
    gw = _gateway(tmp_path, orthanc, gateway_port, live_server, {})
    try:
        # Two instances of one study: the CT and a copy of it with another SOP Instance UID.
        first = DATA.joinpath("ct_small.dcm").read_bytes()
        ct = pydicom.dcmread(DATA / "ct_small.dcm")
        ct.SOPInstanceUID = ct.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        buffer = io.BytesIO()
        ct.save_as(buffer, enforce_file_format=True)
        second = buffer.getvalue()
        ids = {
            str(pydicom.dcmread(DATA / "ct_small.dcm").SOPInstanceUID): orthanc.upload(first),
            str(ct.SOPInstanceUID): orthanc.upload(second),
        }
        study_uid = str(ct.StudyInstanceUID)
        assert gw.poll("pacs") == 1

        # The PACS loses the other instance once the first has arrived (someone deletes it
        # while the gateway fetches the study): its WADO-URI request is answered 404.
        keep = gw._keep_wado
        lost: list[str] = []

        def keep_then_lose(data: bytes, header: pydicom.Dataset) -> None:
            keep(data, header)
            if not lost:
                [other] = set(ids) - {str(header.SOPInstanceUID)}
                orthanc.delete_instance(ids[other])
                lost.append(other)

        gw._keep_wado = keep_then_lose  # type: ignore[method-assign]
        gw.retrieve_next()
        gw._keep_wado = keep  # type: ignore[method-assign]
        study = gw.queue.study(study_uid)
        assert study is not None
        assert study.state == StudyState.FAILED and study.next_attempt_at is not None
        assert study.last_error == (
            f"incomplete: 1 of 2 instances retrieved by WADO-URI; {lost[0]} answered 404"
        )
        assert gw.deliver_next() is None  # nothing goes out while incomplete

        # The PACS gets the object back; the retry (after the back-off) fetches only it.
        orthanc.upload(first if lost[0] != str(ct.SOPInstanceUID) else second)
        drain(gw)
        assert set(archived(live_server)) == set(ids)
        attempts = gw.queue.attempts(study_uid)
        assert [a.outcome for a in attempts if a.step == "retrieve"] == ["failed", "ok"]
        log = (gw.gw.data_dir / "messages.log").read_text()
        assert log.count('"msg": "WADO-URI"') == 3  # 2 + the one that was missing
    finally:
        gw.close()
