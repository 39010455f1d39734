"""Orders over MLLP (SQLite and PostgreSQL): python-hl7's client sends ORM^O01 and OMI^O23
with Chinese names in UTF-8 and GB 18030; orders link to their studies whichever comes
first; cancels, duplicates, out-of-order status messages and bad messages."""

from __future__ import annotations

import io
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from hl7.client import MLLPClient
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select
from typer.testing import CliRunner

import hl7
from cloudfilm.archive.ingest import Archive
from cloudfilm.archive.models import Study
from cloudfilm.audit.service import Actor
from cloudfilm.config import HL7Settings
from cloudfilm.hl7.cli import hl7_app
from cloudfilm.hl7.listener import HL7Listener
from cloudfilm.hl7.models import HL7Message
from cloudfilm.hl7.orm import parse_ts
from cloudfilm.mpi.models import Person
from cloudfilm.orders import service as orders
from cloudfilm.orders.models import Encounter, ImagingOrder

from conftest import DATA

CHARSET = {"utf-8": "UNICODE UTF-8", "gb18030": "GB 18030-2000"}


def order_message(
    control_id: str,
    *,
    kind: str = "ORM^O01",
    control: str = "NW",
    placer: str = "HIS001",
    filler: str = "RIS001",
    accession: str = "ACC001",
    status: str = "",
    encoding: str = "utf-8",
    name: str = "张三丰",
    doctor: str = "D01^李^医生",
    study_uid: str = "",
    obr: bool = True,
    pid: bool = True,
) -> bytes:
    """An order message as a RIS sends it: PID, PV1 (inpatient, ward 心内科一病区, room 301,
    bed 12, visit V001), ORC and OBR (chest CT), and for OMI TQ1 and IPC."""
    structure = "ORM_O01" if kind == "ORM^O01" else "OMI_O23"
    segments = [
        f"MSH|^~\\&|RIS|人民医院|CLOUDFILM|影像科|20261128083000||{kind}^{structure}|"
        f"{control_id}|P|2.5|||AL|NE|CHN|{CHARSET[encoding]}",
    ]
    if pid:
        segments.append(f"PID|1||P900^^^HIS^PI||{name}^^^^^^L||19800101|M")
    segments.append(
        "PV1|1|I|心内科一病区^301^12^人民医院|||||||心内科|||||||||V001"
        + "|" * 25
        + "20261127100000"
    )
    segments.append(
        f"ORC|{control}|{placer}|{filler}||{status}||||20261128080000|||{doctor}|||||心内^心内科"
    )
    if kind == "OMI^O23":
        segments.append("TQ1|1||||||20261128093000")
    if obr:
        segments.append(
            f"OBR|1|{placer}|{filler}|CT001^胸部CT平扫^LOCAL||||||||||||{doctor}||{accession}"
            "||||||CT" + "|" * 12 + "20261128090000"
        )
    if kind == "OMI^O23":
        segments.append(f"IPC|{accession}|RP1|{study_uid}|SPS1|MR")
    return ("\r".join(segments) + "\r").encode(encoding)


@pytest.fixture
def listener(archive: Archive) -> Iterator[HL7Listener]:
    server = HL7Listener(archive.db, HL7Settings(port=0, idle_timeout_seconds=5))
    server.start()
    yield server
    server.stop()


def send(listener: HL7Listener, *messages: bytes, encoding: str = "utf-8") -> list[Any]:
    """Each message on one connection; the parsed ACKs."""
    acks = []
    with MLLPClient("127.0.0.1", listener.port, encoding=encoding) as client:
        for raw in messages:
            answer = client.send_message(raw)
            acks.append(hl7.parse(answer[1:-2].decode(encoding)))
    return acks


def aware(value: datetime | None) -> datetime | None:
    """SQLite gives timestamps back without their zone (stored as UTC)."""
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


def ack_code(ack: Any) -> str:
    return str(ack.segment("MSA")[1])


def ingest(archive: Archive, accession: str, uid: str | None = None) -> str:
    ds = dcmread(DATA / "ct_small.dcm")
    ds.StudyInstanceUID = uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.AccessionNumber = accession
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    assert archive.ingest(buffer.getvalue(), actor=Actor.cli("pytest")).ok
    return str(ds.StudyInstanceUID)


def the_orders(archive: Archive) -> list[ImagingOrder]:
    with archive.db.read_session() as session:
        found = list(session.scalars(select(ImagingOrder).order_by(ImagingOrder.id)))
        session.expunge_all()
    return found


def linked(archive: Archive, uid: str) -> list[str]:
    """The placer numbers of the orders the study ``uid`` belongs to."""
    with archive.db.read_session() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
        return [o.placer_order_number for o in orders.orders_of_study(session=session, study=study)]


def test_orm_new__order_then_study_linked(archive: Archive, listener: HL7Listener) -> None:
    [ack] = send(listener, order_message("M1"))
    assert ack_code(ack) == "AA"
    [order] = the_orders(archive)
    assert (order.placer_order_number, order.filler_order_number) == ("HIS001", "RIS001")
    assert order.accession_number == "ACC001" and order.status == "new"
    assert (order.procedure_code, order.procedure_text, order.procedure_system) == (
        "CT001",
        "胸部CT平扫",
        "LOCAL",
    )
    assert order.modality == "CT" and order.department == "心内科"
    assert (order.ward, order.room, order.bed) == ("心内科一病区", "301", "12")
    assert (order.visit_type, order.visit_number) == ("inpatient", "V001")
    assert order.requesting_doctor == "李医生"
    assert aware(order.scheduled_at) == datetime(2026, 11, 28, 1, 0, tzinfo=UTC)  # 09:00 +08:00
    assert order.patient_id == "P900"
    with archive.db.read_session() as session:
        person = session.get(Person, order.person_id)
        assert person is not None and person.name == "张三丰"
        encounter = session.get(Encounter, order.encounter_id)
        assert encounter is not None and encounter.visit_number == "V001"
        assert encounter.bed == "12" and encounter.person_id == person.id
        assert aware(encounter.admitted_at) == datetime(2026, 11, 27, 2, 0, tzinfo=UTC)
        [change] = orders.history_of(session=session, order=order)
        assert (change.status_from, change.status_to, change.control) == (None, "new", "NW")
        rows = list(session.scalars(select(HL7Message)))
        assert [r.status for r in rows] == ["processed"]
    uid = ingest(archive, "ACC001")
    assert linked(archive, uid) == ["HIS001"]
    with archive.db.read_session() as session:
        # What a clinician's search by ward and bed joins through.
        found = session.scalars(
            select(Study.study_instance_uid).where(
                orders.studies_ordered(ward="心内科一病区", bed="12")
            )
        ).all()
        assert found == [uid]
        assert not session.scalars(select(Study.id).where(orders.studies_ordered(bed="13"))).all()
        [study] = orders.studies_of_order(session=session, order=order)
        assert study.study_instance_uid == uid
        other = session.scalars(select(Study.id).where(Study.study_instance_uid != uid)).all()
        by_study = orders.orders_by_study(session=session, study_ids=[study.id, *other])
        assert {k: [o.placer_order_number for o in v] for k, v in by_study.items()} == {
            study.id: ["HIS001"]
        }


def test_omi__study_first_then_order_linked(archive: Archive, listener: HL7Listener) -> None:
    by_accession = ingest(archive, "ACC777")
    by_uid = ingest(archive, "")
    [ack] = send(
        listener,
        order_message("O1", kind="OMI^O23", accession="ACC777", placer="HIS7", filler="RIS7"),
    )
    assert ack_code(ack) == "AA"
    [ack] = send(
        listener,
        order_message("O2", kind="OMI^O23", accession="", placer="HIS8", filler="RIS8",
                      study_uid=by_uid),
    )  # fmt: skip
    assert ack_code(ack) == "AA"
    assert linked(archive, by_accession) == ["HIS7"]
    assert linked(archive, by_uid) == ["HIS8"]
    first, second = the_orders(archive)
    # OMI: IPC-1 accession, IPC-3 UID; OBR-24 modality wins over IPC-5; TQ1 not needed
    # when OBR-36 is given.
    assert first.accession_number == "ACC777" and second.study_instance_uid == by_uid
    assert first.modality == "CT"


def test_orm__cancel_unknown_is_ae_then_replayed(
    archive: Archive, listener: HL7Listener, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    [ack] = send(listener, order_message("C1", control="CA", placer="HIS404", filler=""))
    assert ack_code(ack) == "AE"
    err = ack.segment("ERR")
    assert str(err[3]).startswith("204^")
    assert "HIS404" in str(err[8]) and "unknown order" in str(err[8])
    assert the_orders(archive) == []
    with archive.db.read_session() as session:
        failed = session.scalars(select(HL7Message)).one()
        assert (failed.status, failed.ack_code) == ("failed", "AE")
    # The order arrives; the cancel kept in the store is replayed by the operator.
    [ack] = send(listener, order_message("C2", placer="HIS404", filler=""))
    assert ack_code(ack) == "AA"
    if backend == "postgresql":
        monkeypatch.setenv("CLOUDFILM_DATABASE__URL", archive.settings.database.url)
    result = CliRunner().invoke(
        hl7_app, ["replay", str(failed.id), "--data-dir", str(archive.settings.data_dir)]
    )
    assert result.exit_code == 0, result.output
    [order] = the_orders(archive)
    assert order.status == "cancelled"
    # A late NW or SC never reopens a cancelled order.
    acks = send(
        listener,
        order_message("C3", placer="HIS404", filler=""),
        order_message("C4", control="SC", status="IP", placer="HIS404", filler=""),
    )
    assert [ack_code(a) for a in acks] == ["AA", "AA"]
    [order] = the_orders(archive)
    assert order.status == "cancelled"
    with archive.db.read_session() as session:
        history = orders.history_of(session=session, order=order)
        assert [(h.status_to, h.control) for h in history] == [("new", "NW"), ("cancelled", "CA")]


def test_orm__duplicates_and_repeats_update_one_order(
    archive: Archive, listener: HL7Listener
) -> None:
    first = order_message("D1")
    acks = send(
        listener,
        first,
        first,  # the sender lost our ACK: same MSH-10, a duplicate, processed once
        order_message("D2", doctor="D02^王^主任"),  # a resent NW: updates
        order_message("D3", control="SC", status="SC"),
        order_message("D4", control="XO", status="CM", accession="ACC002", doctor="D02^王^主任"),
        order_message("D5", control="SC", status="IP"),  # late: stays completed
    )
    assert [ack_code(a) for a in acks] == ["AA"] * 6
    [order] = the_orders(archive)
    assert order.requesting_doctor == "王主任" and order.accession_number == "ACC002"
    assert order.status == "completed"
    with archive.db.read_session() as session:
        history = orders.history_of(session=session, order=order)
        assert [(h.status_to, h.control) for h in history] == [
            ("new", "NW"),
            ("scheduled", "SC"),
            ("completed", "XO"),
        ]
        statuses = [r.status for r in session.scalars(select(HL7Message).order_by(HL7Message.id))]
        assert statuses == ["processed", "duplicate"] + ["processed"] * 4


def test_orm__gb18030_chinese_names(archive: Archive, listener: HL7Listener) -> None:
    raw = order_message("G1", encoding="gb18030", name="欧阳娜娜", doctor="D9^欧阳^修")
    [ack] = send(listener, raw, encoding="gb18030")
    assert ack_code(ack) == "AA"
    [order] = the_orders(archive)
    assert order.requesting_doctor == "欧阳修" and order.ward == "心内科一病区"
    with archive.db.read_session() as session:
        person = session.get(Person, order.person_id)
        assert person is not None and person.name == "欧阳娜娜"
        assert session.scalars(select(HL7Message.encoding)).one() == "gb18030"


@pytest.mark.parametrize(
    ("kwargs", "code", "where", "says"),
    [
        ({"obr": False}, "100", "OBR^1", "not followed by an OBR"),
        ({"pid": False}, "100", "PID", "PID segment missing"),
        ({"control": "ZZ"}, "102", "ORC^1^1", "'ZZ' is not supported"),
        ({"control": "SC"}, "101", "ORC^1^5", "ORC-5 order status"),
        ({"placer": "", "filler": ""}, "101", "ORC^1^2", "neither placer"),
    ],
)
def test_orm__bad_message_answered_ae_and_stored(
    archive: Archive,
    listener: HL7Listener,
    kwargs: dict[str, Any],
    code: str,
    where: str,
    says: str,
) -> None:
    if kwargs.get("control") == "SC":  # a status change of a known order without ORC-5
        send(listener, order_message("B0"))
    [ack] = send(listener, order_message("B1", **kwargs))
    assert ack_code(ack) == "AE"
    err = ack.segment("ERR")
    assert str(err[3]).split("^")[0] == code
    assert str(err[2]) == where
    assert says in str(err[8])
    with archive.db.read_session() as session:
        row = session.scalars(select(HL7Message).where(HL7Message.control_id == "B1")).one()
        assert (row.status, row.ack_code) == ("failed", "AE")
    assert len(the_orders(archive)) == (1 if kwargs.get("control") == "SC" else 0)


def test_adt_pv1__records_the_visit(archive: Archive, listener: HL7Listener) -> None:
    def adt(control_id: str, admitted: str) -> bytes:
        return (
            "MSH|^~\\&|HIS|人民医院|CLOUDFILM|影像科|20261128083000||ADT^A01^ADT_A01|"
            f"{control_id}|P|2.5|||AL|NE|CHN|UNICODE UTF-8\r"
            "PID|1||P901^^^HIS^PI||王芳^^^^^^L||19900101|F\r"
            "PV1|1|E|急诊留观^2^3|||||||急诊科|||||||||E0001" + "|" * 25 + admitted + "\r"
        ).encode()

    # An ADT is about the person: a PV1 time that is no date is left out, not refused.
    acks = send(listener, adt("A1", "yesterday"), adt("A2", "20261128070000"))
    assert [ack_code(a) for a in acks] == ["AA", "AA"]
    with archive.db.read_session() as session:
        encounter = session.scalars(select(Encounter)).one()
    assert (encounter.visit_number, encounter.visit_type) == ("E0001", "emergency")
    assert (encounter.ward, encounter.department) == ("急诊留观", "急诊科")
    assert aware(encounter.admitted_at) == datetime(2026, 11, 27, 23, 0, tzinfo=UTC)


def test_orm__same_filler_number_of_another_placer_is_another_order(
    archive: Archive, listener: HL7Listener
) -> None:
    acks = send(
        listener,
        order_message("F1", placer="HISA", filler="RISX"),
        order_message("F2", placer="HISB", filler="RISX"),
        order_message("F3", placer="", filler="RISY"),
        order_message("F4", placer="HISC", filler="RISY"),  # the placer number arrives later
    )
    assert [ack_code(a) for a in acks] == ["AA"] * 4
    assert [o.placer_order_number for o in the_orders(archive)] == ["HISA", "HISB", "HISC"]


def test_parse_ts__zones_and_precision() -> None:
    assert parse_ts("20261128", "X") == datetime(2026, 11, 27, 16, 0, tzinfo=UTC)
    assert parse_ts("202611280930+0000", "X") == datetime(2026, 11, 28, 9, 30, tzinfo=UTC)
    assert parse_ts("20261128093015.123", "X") == datetime(2026, 11, 28, 1, 30, 15, tzinfo=UTC)
    assert parse_ts("", "X") is None
    with pytest.raises(Exception, match="not an HL7 date/time"):
        parse_ts("yesterday", "OBR^1^36")
    with pytest.raises(Exception, match="invalid date"):
        parse_ts("20261340", "OBR^1^36")
