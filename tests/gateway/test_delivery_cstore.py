"""Delivery by DICOM C-STORE to the archive's DIMSE port (``gateway.delivery = "cstore"``)."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom
import pytest
from pynetdicom import AE, StoragePresentationContexts, evt
from sqlalchemy import select
from test_end_to_end import SMALL, assert_archived, drain, load
from test_faults import run_until, state, study_of

from cloudfilm.archive.models import Instance
from cloudfilm.config import DimseSettings
from cloudfilm.dimse.server import DIMSEServer
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
def dimse(live_server: LiveServer) -> Iterator[DIMSEServer]:
    """The archive's DICOM listener, with the gateway's AE in its node table."""
    from pacs_fixtures import GATEWAY_AET

    server = DIMSEServer(
        live_server.archive,
        DimseSettings(port=free_port(), nodes={GATEWAY_AET: {"host": "127.0.0.1"}}),
    )
    server.start()
    yield server
    server.stop()


def cstore_gateway(
    tmp_path: Path, orthanc: OrthancPACS, gateway_port: int, live_server: LiveServer, port: int
) -> Gateway:
    from pacs_fixtures import client_secret, gateway_settings

    settings = gateway_settings(
        tmp_path,
        orthanc=orthanc,
        gateway_port=gateway_port,
        archive_url=live_server.url,
        secret=client_secret(live_server.archive, live_server.clock),
        delivery="cstore",
        archive_host="127.0.0.1",
        archive_port=port,
    )
    gw = Gateway(settings)
    gw.start()
    return gw


def test_cstore__small_samples__archive_holds_every_instance(
    tmp_path: Path,
    orthanc: OrthancPACS,
    gateway_port: int,
    live_server: LiveServer,
    dimse: DIMSEServer,
) -> None:
    originals = load(orthanc, [DATA / name for name in SMALL])
    gw = cstore_gateway(tmp_path, orthanc, gateway_port, live_server, dimse.port)
    try:
        assert gw.poll("pacs") == len(SMALL)
        drain(gw)
        assert_archived(live_server, originals)
        assert gw.queue.summary()["instances"] == {InstanceState.DELIVERED: len(SMALL)}
        assert list(gw.queue.spooled()) == []
        # Resending a delivered instance is harmless: the archive answers success again.
        assert gw.archive.send(*_one(originals)).delivered == [next(iter(originals))]
    finally:
        gw.close()


def _one(originals: dict[str, bytes]) -> tuple[str, list[tuple[str, bytes]]]:
    uid, data = next(iter(originals.items()))
    study_uid = str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).StudyInstanceUID)
    return study_uid, [(uid, data)]


def test_cstore__poison_instance__dead_letter_with_status_and_comment(
    tmp_path: Path,
    orthanc: OrthancPACS,
    gateway_port: int,
    live_server: LiveServer,
    dimse: DIMSEServer,
) -> None:
    study_uid, files = study_of(3, poison=0)
    for data in files:
        orthanc.upload(data)
    poison_uid = str(pydicom.dcmread(io.BytesIO(files[0])).SOPInstanceUID)
    gw = cstore_gateway(tmp_path, orthanc, gateway_port, live_server, dimse.port)
    try:
        gw.poll("pacs")
        run_until(gw, lambda: state(gw, study_uid) == StudyState.DELIVERED)
        rows = {i.sop_instance_uid: i for i in gw.queue.instances(study_uid)}
        assert rows[poison_uid].state == InstanceState.DEAD
        error = rows[poison_uid].last_error or ""
        assert error.startswith("C-STORE status 0xC"), error
        assert ": " in error  # the archive's Error Comment follows the status
        others = [i.state for u, i in rows.items() if u != poison_uid]
        assert others == [InstanceState.DELIVERED] * 2
        with live_server.archive.db.read_session() as session:
            assert set(session.scalars(select(Instance.sop_instance_uid))) == set(rows) - {
                poison_uid
            }
    finally:
        gw.close()


def test_cstore__gateway_not_in_node_table__failed_with_reason(
    tmp_path: Path, orthanc: OrthancPACS, gateway_port: int, live_server: LiveServer
) -> None:
    server = DIMSEServer(live_server.archive, DimseSettings(port=free_port(), nodes={}))
    server.start()
    study_uid, files = study_of(1)
    orthanc.upload(files[0])
    gw = cstore_gateway(tmp_path, orthanc, gateway_port, live_server, server.port)
    try:
        gw.poll("pacs")
        gw.retrieve_next()
        gw.deliver_next()
        study = gw.queue.study(study_uid)
        assert study is not None and study.state == StudyState.FAILED
        assert study.step == Step.DELIVER
        assert "dimse.nodes" in (study.last_error or "")
        assert len(list(gw.queue.spooled())) == 1  # kept for the next attempt
    finally:
        gw.close()
        server.stop()


class OutOfResourcesSCP:
    """A scripted archive: 0xA700 with an Error Comment for the first ``full`` C-STOREs."""

    def __init__(self, full: int) -> None:
        self.full = full
        self.calls = 0
        self.stored: list[str] = []
        self.lock = threading.Lock()
        self.port = free_port()
        ae = AE(ae_title="CLOUDFILM")
        ae.supported_contexts = StoragePresentationContexts
        self.server = ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._store)],
        )

    def _store(self, event: Any) -> Any:
        with self.lock:
            self.calls += 1
            if self.calls <= self.full:
                status = pydicom.Dataset()
                status.Status = 0xA700
                status.ErrorComment = "disk full"
                return status
            self.stored.append(str(event.request.AffectedSOPInstanceUID))
            return 0x0000


def test_cstore__out_of_resources__retried_later_then_delivered(
    tmp_path: Path, orthanc: OrthancPACS, gateway_port: int, live_server: LiveServer
) -> None:
    peer = OutOfResourcesSCP(full=2)
    study_uid, files = study_of(2)
    for data in files:
        orthanc.upload(data)
    gw = cstore_gateway(tmp_path, orthanc, gateway_port, live_server, peer.port)
    try:
        gw.poll("pacs")
        gw.retrieve_next()
        gw.deliver_next()
        assert state(gw, study_uid) == StudyState.FAILED
        rows = gw.queue.instances(study_uid)
        assert {i.state for i in rows} == {InstanceState.FAILED}
        assert {i.last_error for i in rows} == {"C-STORE status 0xA700: disk full"}
        run_until(gw, lambda: state(gw, study_uid) == StudyState.DELIVERED)
        assert {i.state for i in gw.queue.instances(study_uid)} == {InstanceState.DELIVERED}
        assert sorted(peer.stored) == sorted(i.sop_instance_uid for i in rows)
    finally:
        gw.close()
        peer.server.shutdown()
