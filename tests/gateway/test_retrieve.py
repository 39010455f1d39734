"""Retrieval by C-GET and by WADO-RS from Orthanc (with orthanc-dicomweb), then STOW-RS."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
import pytest
from test_end_to_end import SMALL, archived, assert_archived, drain, load, same_pixels

from cloudfilm.config import Settings
from cloudfilm.gateway.models import InstanceState, StudyState
from cloudfilm.gateway.service import Gateway

from conftest import CT_134, DATA, LiveServer

if TYPE_CHECKING:
    from pacs_fixtures import OrthancPACS

pytest_plugins = ["pacs_fixtures"]


@pytest.fixture
def backend() -> str:
    return "sqlite"


def _gateway(
    tmp_path: Path, orthanc: OrthancPACS, gateway_port: int, live_server: LiveServer, method: str
) -> Gateway:
    from pacs_fixtures import client_secret, gateway_settings

    settings: Settings = gateway_settings(
        tmp_path,
        orthanc=orthanc,
        gateway_port=gateway_port,
        archive_url=live_server.url,
        secret=client_secret(live_server.archive, live_server.clock),
        source={"retrieve": method, "wado_url": orthanc.wado_url},
    )
    gw = Gateway(settings)
    gw.start()
    return gw


@pytest.fixture(params=["get", "wado"])
def method_gateway(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    orthanc: OrthancPACS,
    gateway_port: int,
    live_server: LiveServer,
) -> Iterator[Gateway]:
    gw = _gateway(tmp_path, orthanc, gateway_port, live_server, request.param)
    # Nothing may arrive through the C-MOVE destination: stop listening there.
    gw.scp.stop()
    yield gw
    gw.close()


def test_retrieve__get_and_wado__archive_holds_every_instance(
    orthanc: OrthancPACS, method_gateway: Gateway, live_server: LiveServer
) -> None:
    originals = load(orthanc, [DATA / name for name in SMALL])
    assert method_gateway.poll("pacs") == len(SMALL)
    drain(method_gateway)
    assert_archived(live_server, originals)
    summary = method_gateway.queue.summary()
    assert summary["studies"] == {StudyState.DELIVERED: len(SMALL)}
    assert summary["instances"] == {InstanceState.DELIVERED: len(SMALL)}
    assert list(method_gateway.queue.spooled()) == []


def test_retrieve__134_slice_ct(
    orthanc: OrthancPACS, method_gateway: Gateway, live_server: LiveServer
) -> None:
    if not CT_134.is_dir():
        pytest.skip(f"shared sample data not found at {CT_134}")
    files = sorted(CT_134.glob("*.dcm"))
    originals = load(orthanc, files)
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    [found] = method_gateway.fetch("pacs", study_instance_uid=study_uid)
    assert found.expected_instances == len(files)
    drain(method_gateway, timeout=120)
    stored = archived(live_server)
    assert set(stored) == set(originals)
    for uid in list(originals)[:: max(1, len(originals) // 10)]:
        assert same_pixels(originals[uid], stored[uid])


@pytest.mark.parametrize("method", ["get", "wado"])
def test_retrieve__fewer_instances_than_announced__failed_incomplete(
    method: str,
    tmp_path: Path,
    orthanc: OrthancPACS,
    gateway_port: int,
    live_server: LiveServer,
) -> None:
    """The C-FIND answer counted 3; one is deleted from the PACS before the retrieval."""
    from test_faults import study_of

    study_uid, files = study_of(3)
    ids = [orthanc.upload(data) for data in files]
    gw = _gateway(tmp_path, orthanc, gateway_port, live_server, method)
    try:
        [found] = gw.fetch("pacs", study_instance_uid=study_uid)
        assert found.expected_instances == 3
        orthanc.delete_instance(ids[0])
        gw.retrieve_next()
        study = gw.queue.study(study_uid)
        assert study is not None and study.state == StudyState.FAILED
        assert study.last_error == "incomplete: 2 of 3 instances announced by the PACS"
        assert len(gw.queue.instances(study_uid)) == 2
    finally:
        gw.close()
