"""The DICOM listener with real peers: dcmtk's storescu/echoscu and pynetdicom SCUs."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, JPEGLSLossless
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    MRImageStorage,
    Verification,
)
from sqlalchemy import select

from cloudfilm.archive.ingest import Archive
from cloudfilm.archive.models import Instance, Study
from cloudfilm.audit.models import AuditEvent
from cloudfilm.config import DimseSettings, Settings
from cloudfilm.dimse.server import DIMSEServer

from conftest import DATA, free_port, require_tool


@pytest.fixture(autouse=True)
def _stored_as_sent(settings: Settings) -> None:
    """These tests check that objects come back byte for byte as sent: compression off
    (compression at ingest is tested in tests/archive/test_compression.py)."""
    settings.compression.at_ingest = False


@pytest.fixture
def scp(archive: Archive) -> Iterator[DIMSEServer]:
    server = DIMSEServer(
        archive,
        DimseSettings(
            port=free_port(),
            nodes={"STORESCU": {"host": "127.0.0.1"}, "PYNETDICOM": {"host": "*"}},
        ),
    )
    server.start()
    yield server
    server.stop()


def test_storescu__134_slice_ct_indexed_with_identical_bytes(
    scp: DIMSEServer, archive: Archive, ct_files: list[Path]
) -> None:
    storescu = require_tool("storescu")
    subprocess.run(
        [
            storescu,
            "-aet",
            "STORESCU",
            "-aec",
            "CLOUDFILM",
            "127.0.0.1",
            str(scp.port),
            *map(str, ct_files),
        ],
        check=True,
        capture_output=True,
        timeout=120,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
    with archive.db.read_session() as session:
        instances = {i.sop_instance_uid: i for i in session.scalars(select(Instance))}
        study = session.scalars(select(Study)).one()
        senders = set(session.scalars(select(AuditEvent.actor_id)))
    assert senders == {"STORESCU"}
    assert len(instances) == 134
    assert study.number_of_instances == 134
    for path in ct_files:
        original = path.read_bytes()
        uid = dcmread(path, stop_before_pixels=True).SOPInstanceUID
        instance = instances[uid]
        blob = archive.storage.read(instance.storage_key)
        assert instance.checksum == "sha256:" + hashlib.sha256(blob).hexdigest()
        # storescu re-encodes sequences with explicit lengths, so compare what it sends:
        # every element's value, and the pixel data byte for byte.
        stored, sent = dcmread(io.BytesIO(blob)), dcmread(io.BytesIO(original))
        assert stored == sent
        assert hashlib.sha256(stored.PixelData).digest() == hashlib.sha256(sent.PixelData).digest()
        assert "SourceApplicationEntityTitle" not in stored.file_meta  # sender: audit trail


def test_storescu__two_concurrent_senders_of_one_study(
    scp: DIMSEServer, archive: Archive, ct_files: list[Path]
) -> None:
    """Two modalities push the same study at once (one in reverse order): both succeed,
    one row per SOP Instance UID, exact counters."""
    storescu = require_tool("storescu")
    senders = [
        subprocess.Popen(
            [
                storescu,
                "-aet",
                "STORESCU",
                "-aec",
                "CLOUDFILM",
                "127.0.0.1",
                str(scp.port),
                *map(str, files),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        for files in (ct_files, list(reversed(ct_files)))
    ]
    for sender in senders:
        output = sender.communicate(timeout=180)[0].decode(errors="replace")
        assert sender.returncode == 0, output[-2000:]
    with archive.db.read_session() as session:
        study = session.scalars(select(Study)).one()
        rows = session.scalars(select(Instance.sop_instance_uid)).all()
        events = session.scalars(select(AuditEvent.event_type)).all()
    assert len(rows) == len(set(rows)) == 134
    assert study.number_of_instances == 134
    assert sorted(set(events)) == ["instance-duplicate", "instance-stored"]
    assert events.count("instance-stored") == 134 and len(events) == 268
    assert len(list(archive.storage.iter_objects())) == 134


def test_echoscu__verification(scp: DIMSEServer) -> None:
    echoscu = require_tool("echoscu")
    done = subprocess.run(
        [echoscu, "-aet", "STORESCU", "-aec", "CLOUDFILM", "127.0.0.1", str(scp.port)],
        capture_output=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr


def test_association__unknown_caller_rejected_and_audited(
    scp: DIMSEServer, archive: Archive
) -> None:
    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="CLOUDFILM")
    assert assoc.is_rejected
    assert assoc.acceptor.primitive.diagnostic == 0x03  # calling AE title not recognised
    with archive.db.read_session() as session:
        event = session.scalars(select(AuditEvent)).one()
    assert event.event_type == "association-rejected"
    assert event.actor_id == "INTRUDER"


def test_association__lossless_compression_preferred_over_lossy(scp: DIMSEServer) -> None:
    """Among the syntaxes a sender offers we take native first, lossless next, lossy last:
    a sender that can do both is never made to compress lossily."""
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(CTImageStorage, [JPEGBaseline8Bit, JPEGLSLossless])
    ae.add_requested_context(MRImageStorage, [JPEGLSLossless, ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="CLOUDFILM")
    assert assoc.is_established
    accepted = {cx.abstract_syntax: cx.transfer_syntax[0] for cx in assoc.accepted_contexts}
    assoc.release()
    assert accepted == {CTImageStorage: JPEGLSLossless, MRImageStorage: ExplicitVRLittleEndian}


def test_association__wrong_called_aet_rejected(scp: DIMSEServer) -> None:
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="NOTUS")
    assert assoc.is_rejected
    assert assoc.acceptor.primitive.diagnostic == 0x07


def test_association__known_aet_from_wrong_address_rejected(archive: Archive) -> None:
    server = DIMSEServer(
        archive, DimseSettings(port=free_port(), nodes={"CT01": {"host": "10.9.9.9"}})
    )
    server.start()
    try:
        ae = AE(ae_title="CT01")
        ae.add_requested_context(Verification)
        assert ae.associate("127.0.0.1", server.port, ae_title="CLOUDFILM").is_rejected
    finally:
        server.stop()


def test_stop__does_not_wait_for_an_idle_connection(archive: Archive) -> None:
    """A connection that never sends its A-ASSOCIATE-RQ must not hold up a shutdown for
    the ARTIM/ACSE timeout (30 s)."""
    server = DIMSEServer(archive, DimseSettings(port=free_port()))
    server.start()
    idle = socket.create_connection(("127.0.0.1", server.port))
    time.sleep(0.3)
    started = time.monotonic()
    server.stop(grace=1.0)
    idle.close()
    assert time.monotonic() - started < 5


def test_c_store__bad_object_gets_failure_status_with_reason(
    scp: DIMSEServer, archive: Archive
) -> None:
    ds = dcmread(DATA / "ct_small.dcm")
    ds.PixelData = ds.PixelData[:1000]
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2")
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="CLOUDFILM")
    assert assoc.is_established
    status = assoc.send_c_store(ds)
    good = dcmread(DATA / "ct_small.dcm")
    good.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.77"
    good_status = assoc.send_c_store(good)
    assoc.release()
    assert status.Status == 0xC000
    assert "Pixel Data has 1000 bytes" in status.ErrorComment
    assert good_status.Status == 0x0000
    with archive.db.read_session() as session:
        assert [i.sop_instance_uid for i in session.scalars(select(Instance))] == [
            good.SOPInstanceUID
        ]
        events = [e.event_type for e in session.scalars(select(AuditEvent))]
    assert events == ["instance-rejected", "instance-stored"]
