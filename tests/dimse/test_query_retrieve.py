"""Query/Retrieve SCP with real peers: dcmtk's findscu, movescu (to a dcmtk storescp),
getscu, and pynetdicom SCUs where exact statuses are checked. Every test runs on SQLite
and PostgreSQL (the ``archive`` fixture)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    MRImageStorage,
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from sqlalchemy import select

from cloudfilm.archive.ingest import Archive
from cloudfilm.audit.models import AuditEvent
from cloudfilm.audit.service import Actor
from cloudfilm.config import DimseSettings, Settings
from cloudfilm.dimse import identifiers
from cloudfilm.dimse.handlers import Operation
from cloudfilm.dimse.nodes import NodeTable, Service
from cloudfilm.dimse.server import DIMSEServer

from conftest import DATA, free_port, require_tool


@pytest.fixture(autouse=True)
def _stored_as_sent(settings: Settings) -> None:
    """These tests check that objects come back byte for byte as sent: compression off
    (compression at ingest is tested in tests/archive/test_compression.py)."""
    settings.compression.at_ingest = False


pytestmark = pytest.mark.dcmtk

FILES = ("ct_small", "mr_small", "chr_iso_ir_192", "chr_gb18030", "emri_small_jpeg_ls_lossless")


@dataclass
class Sample:
    path: Path
    ds: Dataset


@pytest.fixture
def samples(archive: Archive) -> dict[str, Sample]:
    """The bundled files, ingested: five patients, five studies, five series."""
    loaded = {}
    for name in FILES:
        path = DATA / f"{name}.dcm"
        assert archive.ingest(path.read_bytes(), actor=Actor.cli("pytest")).ok
        loaded[name] = Sample(path, dcmread(path))
    return loaded


@dataclass
class StoreSCP:
    """dcmtk's storescp as a C-MOVE destination, writing into ``folder``."""

    port: int
    folder: Path

    def received(self) -> dict[str, Dataset]:
        """What arrived, by SOP Instance UID."""
        found = (dcmread(p) for p in sorted(self.folder.iterdir()) if p.is_file())
        return {str(ds.SOPInstanceUID): ds for ds in found}


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[StoreSCP]:
    tool = require_tool("storescp")
    folder = tmp_path / "storescp"
    folder.mkdir()
    port = free_port()
    process = subprocess.Popen(
        [tool, "-aet", "STORESCP", "+xa", "-od", str(folder), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    try:
        _wait_for_port(port, process)
        yield StoreSCP(port, folder)
    finally:
        process.terminate()
        process.wait(timeout=10)


def _wait_for_port(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        assert process.poll() is None, "storescp exited"
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise AssertionError("storescp did not start")


def _settings(storescp_port: int | None = None, **overrides: Any) -> DimseSettings:
    nodes: dict[str, Any] = {
        # dcmtk's tools, all under one title: the workstation
        "WS01": {"host": "127.0.0.1", "allow_find": True, "allow_move": True, "allow_get": True},
        "PYNETDICOM": {"host": "*", "allow_find": True, "allow_move": True, "allow_get": True},
        "CT01": {"host": "127.0.0.1"},  # a modality: store only (the default)
        "DOWN": {"host": "127.0.0.1", "port": free_port()},  # a destination not listening
    }
    if storescp_port is not None:
        nodes["STORESCP"] = {"host": "127.0.0.1", "port": storescp_port, "allow_store": False}
    return DimseSettings(port=free_port(), nodes=nodes, **overrides)


@pytest.fixture
def scp(archive: Archive, storescp: StoreSCP) -> Iterator[DIMSEServer]:
    server = DIMSEServer(archive, _settings(storescp.port))
    server.start()
    yield server
    server.stop()


def _run(tool: str, *args: str, timeout: float = 60, check: bool = True) -> str:
    done = subprocess.run(
        [require_tool(tool), *args],
        capture_output=True,
        timeout=timeout,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    output = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode == 0 or not check, output[-3000:]
    return output


def findscu(
    scp: DIMSEServer, tmp_path: Path, model: str, *keys: str, aet: str = "WS01"
) -> list[Dataset]:
    """Run findscu with ``-k`` keys; the response identifiers in order."""
    folder = tmp_path / f"find{time.monotonic_ns()}"
    folder.mkdir()
    args = [model, "-aet", aet, "-aec", "CLOUDFILM", "-X", "-od", str(folder)]
    for key in keys:
        args += ["-k", key]
    _run("findscu", *args, "127.0.0.1", str(scp.port))
    return [dcmread(p) for p in sorted(folder.glob("rsp*.dcm"))]


def _audit(archive: Archive) -> list[AuditEvent]:
    with archive.db.read_session() as session:
        return list(
            session.scalars(
                select(AuditEvent)
                .where(AuditEvent.event_type.in_(["query", "retrieve"]))
                .order_by(AuditEvent.id)
            )
        )


def _uids(results: list[Dataset], keyword: str = "StudyInstanceUID") -> set[str]:
    return {str(ds.get(keyword)) for ds in results}


# -- C-FIND


def test_findscu__patient_root_at_every_level(
    scp: DIMSEServer, archive: Archive, samples: dict[str, Sample], tmp_path: Path
) -> None:
    ct = samples["ct_small"].ds

    patients = findscu(
        scp,
        tmp_path,
        "-P",
        "QueryRetrieveLevel=PATIENT",
        "PatientName=wang*",  # case-insensitive wild card (PN, PS3.4 C.2.2.2.4)
        "PatientID",
        "PatientBirthDate",
        "NumberOfPatientRelatedStudies",
        "NumberOfPatientRelatedInstances",
    )
    assert sorted(str(p.PatientID) for p in patients) == ["X1EXAMPLE", "X2EXAMPLE"]
    for patient in patients:
        assert patient.QueryRetrieveLevel == "PATIENT"
        assert patient.SpecificCharacterSet == "ISO_IR 192"  # the ideographic group
        assert str(patient.PatientName).startswith("Wang^XiaoDong=王^小")
        assert patient.NumberOfPatientRelatedStudies == 1
        assert patient.NumberOfPatientRelatedInstances == 1
        assert "PatientBirthDate" in patient and not patient.PatientBirthDate

    studies = findscu(
        scp,
        tmp_path,
        "-P",
        "QueryRetrieveLevel=STUDY",
        f"PatientID={ct.PatientID}",
        "StudyInstanceUID",
        "StudyDate",
        "NumberOfStudyRelatedInstances",
    )
    assert [(s.StudyInstanceUID, s.StudyDate) for s in studies] == [
        (ct.StudyInstanceUID, ct.StudyDate)
    ]
    assert "SpecificCharacterSet" not in studies[0]  # all ASCII

    series = findscu(
        scp,
        tmp_path,
        "-P",
        "QueryRetrieveLevel=SERIES",
        f"PatientID={ct.PatientID}",
        f"StudyInstanceUID={ct.StudyInstanceUID}",
        "SeriesInstanceUID",
        "Modality",
        "SeriesNumber",
        "NumberOfSeriesRelatedInstances",
    )
    assert len(series) == 1
    assert (series[0].SeriesInstanceUID, series[0].Modality, series[0].SeriesNumber) == (
        ct.SeriesInstanceUID,
        "CT",
        ct.SeriesNumber,
    )
    assert series[0].NumberOfSeriesRelatedInstances == 1

    images = findscu(
        scp,
        tmp_path,
        "-P",
        "QueryRetrieveLevel=IMAGE",
        f"PatientID={ct.PatientID}",
        f"StudyInstanceUID={ct.StudyInstanceUID}",
        f"SeriesInstanceUID={ct.SeriesInstanceUID}",
        "SOPInstanceUID",
        "SOPClassUID",
        "InstanceNumber",
        "Rows",
        "AvailableTransferSyntaxUID",
    )
    assert len(images) == 1
    image = images[0]
    assert (image.SOPInstanceUID, image.SOPClassUID, image.InstanceNumber, image.Rows) == (
        ct.SOPInstanceUID,
        ct.SOPClassUID,
        ct.InstanceNumber,
        512,
    )
    assert image.AvailableTransferSyntaxUID == ct.file_meta.TransferSyntaxUID
    assert image.QueryRetrieveLevel == "IMAGE"

    events = _audit(archive)
    assert [(e.event_type, e.action, e.outcome, e.actor_id) for e in events] == [
        ("query", "E", 0, "WS01")
    ] * 4
    assert [e.detail["results"] for e in events if e.detail] == [2, 1, 1, 1]
    assert events[1].patient_id == ct.PatientID
    assert events[2].study_instance_uid == ct.StudyInstanceUID


def test_findscu__study_root_matching_keys(
    scp: DIMSEServer, archive: Archive, samples: dict[str, Sample], tmp_path: Path
) -> None:
    ct, mr = samples["ct_small"].ds, samples["mr_small"].ds
    emri = samples["emri_small_jpeg_ls_lossless"].ds

    def studies(*keys: str) -> list[Dataset]:
        return findscu(scp, tmp_path, "-S", "QueryRetrieveLevel=STUDY", *keys)

    # range matching on a date (20120706, 20040826, 20000101 are inside)
    in_range = studies("StudyDate=20000101-20121231", "StudyInstanceUID")
    assert [s.StudyDate for s in in_range] == ["20120706", "20040826", "20000101"]  # newest first
    assert _uids(studies("StudyDate=-20050101")) == {mr.StudyInstanceUID, emri.StudyInstanceUID}
    assert _uids(studies("StudyDate=20040826")) == {mr.StudyInstanceUID}
    # list of UIDs
    listed = studies(f"StudyInstanceUID={ct.StudyInstanceUID}\\{mr.StudyInstanceUID}")
    assert _uids(listed) == {ct.StudyInstanceUID, mr.StudyInstanceUID}
    # wild cards on a person name and on text; ModalitiesInStudy
    assert _uids(studies("PatientName=COMPRESSED*", "StudyInstanceUID")) == {mr.StudyInstanceUID}
    assert _uids(studies("PatientID=X?EXAMPLE", "StudyInstanceUID")) == {
        samples["chr_iso_ir_192"].ds.StudyInstanceUID,
        samples["chr_gb18030"].ds.StudyInstanceUID,
    }
    assert _uids(studies("ModalitiesInStudy=MR", "StudyInstanceUID")) == {
        mr.StudyInstanceUID,
        emri.StudyInstanceUID,
    }
    # requested keys come back filled; keys we do not index come back empty
    (result,) = studies(
        f"AccessionNumber={ct.AccessionNumber or '*'}",
        f"StudyInstanceUID={ct.StudyInstanceUID}",
        "StudyDescription",
        "PatientComments",
        "ModalitiesInStudy",
        "RetrieveAETitle",
    )
    assert result.StudyDescription == ct.StudyDescription
    assert result.ModalitiesInStudy == "CT"
    assert result.RetrieveAETitle == "CLOUDFILM"
    assert "PatientComments" in result and not result.PatientComments

    # series level: Modality; the study UID comes back even when not asked for
    series = findscu(
        scp, tmp_path, "-S", "QueryRetrieveLevel=SERIES", "Modality=MR", "SeriesInstanceUID"
    )
    assert _uids(series, "SeriesInstanceUID") == {mr.SeriesInstanceUID, emri.SeriesInstanceUID}
    assert _uids(series) == {mr.StudyInstanceUID, emri.StudyInstanceUID}
    # image level: SOP Class UID list
    images = findscu(
        scp,
        tmp_path,
        "-S",
        "QueryRetrieveLevel=IMAGE",
        f"SOPClassUID={CTImageStorage}\\{MRImageStorage}",
        "SOPInstanceUID",
    )
    assert _uids(images, "SOPInstanceUID") == {ct.SOPInstanceUID, mr.SOPInstanceUID}
    assert len(_audit(archive)) == 10


def _find(
    scp: DIMSEServer, query: Dataset, model: str, aet: str = "PYNETDICOM"
) -> tuple[list[Dataset], Dataset]:
    """C-FIND with pynetdicom: (pending identifiers, final status)."""
    ae = AE(ae_title=aet)
    ae.add_requested_context(model)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="CLOUDFILM")
    assert assoc.is_established
    results, final = [], Dataset()
    for rsp_status, identifier in assoc.send_c_find(query, model):
        if rsp_status.Status in (0xFF00, 0xFF01):
            results.append(identifier)
        else:
            final = rsp_status
    assoc.release()
    return results, final


def _query(level: str, **keys: Any) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def test_c_find__gb18030_requester_is_answered_in_gb18030(
    scp: DIMSEServer, samples: dict[str, Sample]
) -> None:
    query = _query("PATIENT", PatientName="王^小东", PatientID="")
    query.SpecificCharacterSet = "GB18030"
    results, final = _find(scp, query, PatientRootQueryRetrieveInformationModelFind)
    assert final.Status == 0x0000
    assert [r.PatientID for r in results] == ["X2EXAMPLE"]  # 东, not 東
    assert results[0].SpecificCharacterSet == "GB18030"
    assert str(results[0].PatientName) == "Wang^XiaoDong=王^小东"
    # groups given with "=" match group by group
    query = _query("PATIENT", PatientName="Wang^XiaoDong=王^小東", PatientID="")
    query.SpecificCharacterSet = "ISO_IR 192"
    results, _ = _find(scp, query, PatientRootQueryRetrieveInformationModelFind)
    assert [r.PatientID for r in results] == ["X1EXAMPLE"]


def test_c_find__refusals_and_bad_identifiers(
    scp: DIMSEServer, archive: Archive, samples: dict[str, Sample]
) -> None:
    model = StudyRootQueryRetrieveInformationModelFind
    results, final = _find(scp, _query("STUDY", StudyInstanceUID=""), model, aet="CT01")
    assert (results, final.Status) == ([], 0x0124)  # a modality may store, not query
    assert "allow_find" in final.ErrorComment

    _, final = _find(scp, _query("STUDY", StudyDate="2012-07-06"), model)
    assert final.Status == 0xA900
    assert "date" in final.ErrorComment
    _, final = _find(scp, _query("STUDY", StudyInstanceUID="1.2.*"), model)
    assert final.Status == 0xA900
    _, final = _find(scp, _query("PATIENT", PatientID=""), model)  # not a Study Root level
    assert final.Status == 0xA900
    _, final = _find(scp, _query("FRAME", PatientID=""), model)
    assert final.Status == 0xA900
    results, final = _find(scp, _query("STUDY", StudyInstanceUID=""), model)
    assert (len(results), final.Status) == (5, 0x0000)

    events = _audit(archive)
    assert [(e.outcome, e.detail["status"] if e.detail else None) for e in events] == [
        (8, "0x0124"),
        (4, "0xA900"),
        (4, "0xA900"),
        (4, "0xA900"),
        (4, "0xA900"),
        (0, "0x0000"),
    ]
    assert events[0].actor_id == "CT01" and "allow_find" in (events[0].message or "")


def test_c_find__unscreenable_request_aborts_the_association(
    scp: DIMSEServer, samples: dict[str, Sample], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_args: Any) -> bool:
        raise RuntimeError("screening broke")

    monkeypatch.setattr(scp.qr, "screen", broken)
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="CLOUDFILM")
    responses = list(
        assoc.send_c_find(
            _query("STUDY", StudyInstanceUID=""), StudyRootQueryRetrieveInformationModelFind
        )
    )
    # pynetdicom reports an aborted association as one empty status, no identifier
    assert [(len(rsp_status), identifier) for rsp_status, identifier in responses] == [(0, None)]
    deadline = time.monotonic() + 5
    while not assoc.is_aborted and time.monotonic() < deadline:
        time.sleep(0.01)  # the requester's reactor notices the A-ABORT on its own thread
    assert assoc.is_aborted


def test_c_find__unknown_caller_may_store_but_not_query(
    archive: Archive, samples: dict[str, Sample]
) -> None:
    server = DIMSEServer(archive, _settings(accept_unknown_callers=True))
    server.start()
    try:
        _, final = _find(
            server,
            _query("STUDY", StudyInstanceUID=""),
            StudyRootQueryRetrieveInformationModelFind,
            aet="STRANGER",
        )
    finally:
        server.stop()
    assert final.Status == 0x0124
    assert [e.actor_id for e in _audit(archive)] == ["STRANGER"]


def test_c_find__at_most_max_find_results(archive: Archive, samples: dict[str, Sample]) -> None:
    server = DIMSEServer(archive, _settings(max_find_results=2))
    server.start()
    try:
        results, final = _find(
            server, _query("STUDY", StudyInstanceUID=""), StudyRootQueryRetrieveInformationModelFind
        )
    finally:
        server.stop()
    assert (len(results), final.Status) == (2, 0x0000)
    (event,) = _audit(archive)
    assert event.detail is not None
    assert (event.detail["results"], event.detail["truncated"]) == (2, True)


def test_c_find__cancel_stops_matching(archive: Archive, samples: dict[str, Sample]) -> None:
    """C-CANCEL between two matches ends the response with Cancel (PS3.4 C.4.1.3.2)."""
    server = DIMSEServer(archive, _settings())
    model = identifiers.MODELS[str(StudyRootQueryRetrieveInformationModelFind)]
    assoc = object()
    operation = Operation(model, Actor.ae("PYNETDICOM", "127.0.0.1:1"))
    operation.find = identifiers.parse_find(_query("STUDY", StudyInstanceUID=""), model)
    server.qr._operations[(assoc, 7)] = operation  # as screen() leaves it
    event = SimpleNamespace(assoc=assoc, message_id=7, is_cancelled=False)
    responses = []
    for response in server.qr.on_find(event):  # type: ignore[arg-type]
        responses.append(response)
        event.is_cancelled = True  # the C-CANCEL arrives after the first match
    assert [int(r[0]) for r in responses] == [0xFF00, 0xFE00]


def test_audit__operation_cut_off_by_the_connection_is_still_audited(archive: Archive) -> None:
    server = DIMSEServer(archive, _settings())
    model = identifiers.MODELS[str(StudyRootQueryRetrieveInformationModelMove)]
    assoc, other = object(), object()
    operation = Operation(model, Actor.ae("PYNETDICOM", "127.0.0.1:1"), destination="WS01")
    server.qr._operations[(assoc, 3)] = operation  # as screen() leaves it
    server.qr._operations[(other, 3)] = Operation(model, Actor.ae("OTHER", None))
    server.qr.on_closed(SimpleNamespace(assoc=assoc))  # type: ignore[arg-type]
    (event,) = _audit(archive)
    assert (event.event_type, event.outcome, event.actor_id) == ("retrieve", 8, "PYNETDICOM")
    assert "ended before the final response" in (event.message or "")
    assert list(server.qr._operations) == [(other, 3)]


# -- C-MOVE


def movescu(scp: DIMSEServer, model: str, destination: str, *keys: str, check: bool = True) -> str:
    args = [model, "-v", "-aet", "WS01", "-aec", "CLOUDFILM", "-aem", destination]
    for key in keys:
        args += ["-k", key]
    return _run("movescu", *args, "127.0.0.1", str(scp.port), check=check)


def _assert_identical(received: Dataset, sample: Sample) -> None:
    assert received.SOPInstanceUID == sample.ds.SOPInstanceUID
    assert received.file_meta.TransferSyntaxUID == sample.ds.file_meta.TransferSyntaxUID
    assert received.PixelData == sample.ds.PixelData
    assert received.PatientID == sample.ds.PatientID


def test_movescu__study_series_and_image_level_to_storescp(
    scp: DIMSEServer,
    archive: Archive,
    samples: dict[str, Sample],
    storescp: StoreSCP,
) -> None:
    ct, mr = samples["ct_small"], samples["mr_small"]
    emri = samples["emri_small_jpeg_ls_lossless"]
    # study level, two studies at once (a UID list), one of them JPEG-LS compressed
    output = movescu(
        scp,
        "-S",
        "STORESCP",
        "QueryRetrieveLevel=STUDY",
        f"StudyInstanceUID={ct.ds.StudyInstanceUID}\\{emri.ds.StudyInstanceUID}",
    )
    assert "Final Move Response (Success)" in output
    received = storescp.received()
    assert set(received) == {ct.ds.SOPInstanceUID, emri.ds.SOPInstanceUID}
    _assert_identical(received[ct.ds.SOPInstanceUID], ct)
    _assert_identical(received[emri.ds.SOPInstanceUID], emri)  # sent as stored: JPEG-LS

    # series level, patient root
    movescu(
        scp,
        "-P",
        "STORESCP",
        "QueryRetrieveLevel=SERIES",
        f"PatientID={mr.ds.PatientID}",
        f"StudyInstanceUID={mr.ds.StudyInstanceUID}",
        f"SeriesInstanceUID={mr.ds.SeriesInstanceUID}",
    )
    _assert_identical(storescp.received()[mr.ds.SOPInstanceUID], mr)

    # image level
    chinese = samples["chr_gb18030"]
    movescu(
        scp,
        "-S",
        "STORESCP",
        "QueryRetrieveLevel=IMAGE",
        f"StudyInstanceUID={chinese.ds.StudyInstanceUID}",
        f"SeriesInstanceUID={chinese.ds.SeriesInstanceUID}",
        f"SOPInstanceUID={chinese.ds.SOPInstanceUID}",
    )
    moved = storescp.received()[chinese.ds.SOPInstanceUID]
    assert str(moved.PatientName) == "Wang^XiaoDong=王^小东"
    assert moved.SpecificCharacterSet == "GB18030"  # the data set as stored
    assert len(storescp.received()) == 4

    events = _audit(archive)
    assert [(e.event_type, e.action, e.outcome) for e in events] == [("retrieve", "R", 0)] * 3
    assert [e.detail and e.detail["completed"] for e in events] == [2, 1, 1]
    assert [e.detail and e.detail["failed"] for e in events] == [0, 0, 0]
    assert {e.detail and e.detail["destination"] for e in events} == {"STORESCP"}
    assert events[1].study_instance_uid == mr.ds.StudyInstanceUID
    assert events[0].study_instance_uid is None and events[0].detail is not None
    assert len(events[0].detail["studies"]) == 2


def test_movescu__unknown_destination_is_a801(
    scp: DIMSEServer, archive: Archive, samples: dict[str, Sample], storescp: StoreSCP
) -> None:
    study = f"StudyInstanceUID={samples['ct_small'].ds.StudyInstanceUID}"
    output = movescu(scp, "-S", "NOSUCHAE", "QueryRetrieveLevel=STUDY", study, check=False)
    assert "MoveDestinationUnknown" in output
    # a node without a port cannot be a destination either
    output = movescu(scp, "-S", "CT01", "QueryRetrieveLevel=STUDY", study, check=False)
    assert "MoveDestinationUnknown" in output
    # a listed destination that does not answer: pynetdicom reports it as A801 as well
    output = movescu(scp, "-S", "DOWN", "QueryRetrieveLevel=STUDY", study, check=False)
    assert "MoveDestinationUnknown" in output
    assert storescp.received() == {}
    events = _audit(archive)
    assert [(e.outcome, e.detail and e.detail["status"]) for e in events] == [(4, "0xA801")] * 3
    assert events[2].detail and events[2].detail["instances"] == 1
    assert "NOSUCHAE" in (events[0].message or "")


def _move(scp: DIMSEServer, query: Dataset, destination: str, aet: str) -> Dataset:
    ae = AE(ae_title=aet)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="CLOUDFILM")
    assert assoc.is_established
    final = Dataset()
    for rsp_status, _ in assoc.send_c_move(
        query, destination, StudyRootQueryRetrieveInformationModelMove
    ):
        final = rsp_status
    assoc.release()
    return final


def test_c_move__refusals(
    scp: DIMSEServer, archive: Archive, samples: dict[str, Sample], storescp: StoreSCP
) -> None:
    uid = samples["ct_small"].ds.StudyInstanceUID
    final = _move(scp, _query("STUDY", StudyInstanceUID=uid), "STORESCP", aet="CT01")
    assert final.Status == 0x0124 and "allow_move" in final.ErrorComment
    # the unique key of the level is required: an empty one must not move the archive
    final = _move(scp, _query("STUDY", StudyInstanceUID=""), "STORESCP", aet="PYNETDICOM")
    assert final.Status == 0xA900 and "StudyInstanceUID" in final.ErrorComment
    final = _move(scp, _query("STUDY", StudyInstanceUID="1.2.3*"), "STORESCP", aet="PYNETDICOM")
    assert final.Status == 0xA900
    # nothing matches: success with no sub-operations, and no association to the destination
    final = _move(scp, _query("STUDY", StudyInstanceUID="1.2.3"), "STORESCP", aet="PYNETDICOM")
    assert (final.Status, final.NumberOfCompletedSuboperations) == (0x0000, 0)
    assert storescp.received() == {}
    assert [(e.outcome, e.detail and e.detail["status"]) for e in _audit(archive)] == [
        (8, "0x0124"),
        (4, "0xA900"),
        (4, "0xA900"),
        (0, "0x0000"),
    ]


# -- C-GET


def getscu(scp: DIMSEServer, folder: Path, model: str, *keys: str) -> str:
    folder.mkdir()
    args = [model, "-v", "-aet", "WS01", "-aec", "CLOUDFILM", "-od", str(folder)]
    for key in keys:
        args += ["-k", key]
    return _run("getscu", *args, "127.0.0.1", str(scp.port))


def _files(folder: Path) -> dict[str, Dataset]:
    found = (dcmread(p) for p in sorted(folder.iterdir()))
    return {str(ds.SOPInstanceUID): ds for ds in found}


def test_getscu__study_and_series_level(
    scp: DIMSEServer, archive: Archive, samples: dict[str, Sample], tmp_path: Path
) -> None:
    ct, mr = samples["ct_small"], samples["mr_small"]
    output = getscu(
        scp,
        tmp_path / "study",
        "-S",
        "QueryRetrieveLevel=STUDY",
        f"StudyInstanceUID={ct.ds.StudyInstanceUID}",
    )
    assert "Number of Completed Suboperations : 1" in output
    (received,) = _files(tmp_path / "study").values()
    assert received.SOPInstanceUID == ct.ds.SOPInstanceUID
    assert received.PixelData == ct.ds.PixelData

    getscu(
        scp,
        tmp_path / "series",
        "-P",
        "QueryRetrieveLevel=SERIES",
        f"PatientID={mr.ds.PatientID}",
        f"StudyInstanceUID={mr.ds.StudyInstanceUID}",
        f"SeriesInstanceUID={mr.ds.SeriesInstanceUID}",
    )
    (received,) = _files(tmp_path / "series").values()
    assert received.SOPInstanceUID == mr.ds.SOPInstanceUID
    assert received.PixelData == mr.ds.PixelData

    events = _audit(archive)
    assert [(e.event_type, e.outcome, e.detail and e.detail["completed"]) for e in events] == [
        ("retrieve", 0, 1)
    ] * 2
    assert [e.study_instance_uid for e in events] == [
        ct.ds.StudyInstanceUID,
        mr.ds.StudyInstanceUID,
    ]


def test_getscu__compressed_object_needs_its_transfer_syntax(
    scp: DIMSEServer, archive: Archive, samples: dict[str, Sample], tmp_path: Path
) -> None:
    """A losslessly compressed object is decoded (exactly) for a requester that offers
    only native encodings; one that offers JPEG-LS gets the stored bytes."""
    emri = samples["emri_small_jpeg_ls_lossless"]
    study = f"StudyInstanceUID={emri.ds.StudyInstanceUID}"
    output = getscu(scp, tmp_path / "native", "-S", "QueryRetrieveLevel=STUDY", study)
    assert "Number of Failed Suboperations    : 0" in output
    native = dcmread(next((tmp_path / "native").iterdir()))
    assert native.file_meta.TransferSyntaxUID.is_little_endian
    assert not native.file_meta.TransferSyntaxUID.is_compressed
    assert native.SOPInstanceUID == emri.ds.SOPInstanceUID
    assert np.array_equal(native.pixel_array, emri.ds.pixel_array)
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(emri.ds.SOPClassUID, emri.ds.file_meta.TransferSyntaxUID)
    received: list[Dataset] = []

    def on_store(event: Any) -> int:
        received.append(event.dataset)
        return 0x0000

    role = build_role(emri.ds.SOPClassUID, scp_role=True)
    assoc = ae.associate(
        "127.0.0.1",
        scp.port,
        ae_title="CLOUDFILM",
        ext_neg=[role],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    statuses = [
        s.Status
        for s, _ in assoc.send_c_get(
            _query("STUDY", StudyInstanceUID=emri.ds.StudyInstanceUID),
            StudyRootQueryRetrieveInformationModelGet,
        )
    ]
    assoc.release()
    assert statuses[-1] == 0x0000
    assert [r.PixelData for r in received] == [emri.ds.PixelData]
    assert [e.outcome for e in _audit(archive)] == [0, 0]  # both delivered


def test_c_get__refused_without_allow_get(
    scp: DIMSEServer, archive: Archive, samples: dict[str, Sample]
) -> None:
    ae = AE(ae_title="CT01")
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelGet)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="CLOUDFILM")
    query = _query("PATIENT", PatientID=samples["ct_small"].ds.PatientID)
    statuses = [
        s.Status for s, _ in assoc.send_c_get(query, PatientRootQueryRetrieveInformationModelGet)
    ]
    assoc.release()
    assert statuses == [0x0124]
    (event,) = _audit(archive)
    assert (event.event_type, event.outcome, event.actor_id) == ("retrieve", 8, "CT01")


# -- the 134-slice CT


def test_ct_134__move_and_get_whole_study_byte_identical(
    archive: Archive, ct_files: list[Path], storescp: StoreSCP, tmp_path: Path
) -> None:
    for path in ct_files:
        assert archive.ingest(path.read_bytes(), actor=Actor.cli("pytest")).ok
    originals = {str(ds.SOPInstanceUID): ds for ds in map(dcmread, ct_files)}
    study = next(iter(originals.values())).StudyInstanceUID
    server = DIMSEServer(archive, _settings(storescp.port))
    server.start()
    try:
        movescu(server, "-S", "STORESCP", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}")
        getscu(
            server, tmp_path / "get", "-S", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study}"
        )
        images = findscu(
            server, tmp_path, "-S", "QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study}"
        )
    finally:
        server.stop()
    for received in (storescp.received(), _files(tmp_path / "get")):
        assert set(received) == set(originals)
        for uid, ds in received.items():
            assert ds.PixelData == originals[uid].PixelData
    assert len(images) == 134
    move, get, find = _audit(archive)
    assert (move.detail and move.detail["completed"], get.detail and get.detail["completed"]) == (
        134,
        134,
    )
    assert find.detail and find.detail["results"] == 134


# -- the node table


def test_node_table__addresses_names_and_permissions() -> None:
    nodes = NodeTable(
        DimseSettings(
            accept_unknown_callers=True,
            nodes={
                "WS01": {"host": "localhost", "port": 104, "allow_find": True},
                "CT01": {"host": "10.1.2.3"},
                "ANY": {"host": "*", "allow_store": False, "allow_get": True},
            },
        )
    )
    assert nodes.caller_allowed("WS01", "127.0.0.1")  # a host name, resolved
    assert nodes.caller_allowed("CT01", "::ffff:10.1.2.3")  # IPv4-mapped IPv6
    assert not nodes.caller_allowed("CT01", "10.1.2.4")  # a known title from elsewhere
    assert nodes.caller_allowed("STRANGER", "10.7.7.7")  # accept_unknown_callers
    assert nodes.may("WS01", "127.0.0.1", Service.FIND)
    assert not nodes.may("WS01", "127.0.0.1", Service.MOVE)
    assert nodes.may("CT01", "10.1.2.3", Service.STORE)
    assert not nodes.may("CT01", "10.1.2.3", Service.FIND)
    assert not nodes.may("ANY", "10.5.5.5", Service.STORE)
    assert nodes.may("ANY", "10.5.5.5", Service.GET)
    assert nodes.may("STRANGER", "10.7.7.7", Service.STORE)
    assert not any(
        nodes.may("STRANGER", "10.7.7.7", s) for s in (Service.FIND, Service.MOVE, Service.GET)
    )
    destination = nodes.destination("WS01")
    assert destination is not None and destination.port == 104
    assert nodes.destination("CT01") is None  # no port
    assert nodes.destination("NOSUCH") is None


def test_c_store__refused_without_allow_store(
    scp: DIMSEServer, archive: Archive, storescp: StoreSCP
) -> None:
    """STORESCP is in the table as a destination with allow_store = false."""
    ds = dcmread(DATA / "ct_small.dcm")
    ae = AE(ae_title="STORESCP")
    ae.add_requested_context(CTImageStorage, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="CLOUDFILM")
    rsp = assoc.send_c_store(ds)
    assoc.release()
    assert rsp.Status == 0x0124 and "allow_store" in rsp.ErrorComment
    with archive.db.read_session() as session:
        events = list(session.scalars(select(AuditEvent)))
    assert [(e.event_type, e.actor_id) for e in events] == [("instance-rejected", "STORESCP")]
