"""The patient master index end to end, on SQLite and PostgreSQL: python-hl7's MLLP
client sends ADT A01/A08/A40 with Chinese names in UTF-8 and GB 18030, DICOM studies
come in, and PIX/PDQ over HTTP answer with the merged person; unmerge reverses it."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hl7.client import MLLPClient
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

import hl7
from cloudfilm.archive.ingest import Archive
from cloudfilm.audit.models import AuditEvent
from cloudfilm.audit.service import Actor
from cloudfilm.config import HL7Settings
from cloudfilm.hl7.listener import HL7Listener, process
from cloudfilm.hl7.models import HL7Message
from cloudfilm.hl7.sealing import open_raw

from conftest import DATA, LiveServer

ID_CARD = "11010519491231002X"
CHARSET = {"utf-8": "UNICODE UTF-8", "gb18030": "GB 18030-2000"}


def adt(
    trigger: str,
    control_id: str,
    pid3: str,
    name: str,
    *,
    encoding: str = "utf-8",
    mrg: str | None = None,
    phone: str = "",
    birth: str = "19491231",
    sex: str = "F",
) -> bytes:
    structure = "ADT_A39" if trigger == "A40" else "ADT_A01"
    segments = [
        f"MSH|^~\\&|HIS|人民医院|CLOUDFILM|影像科|20261128083000||ADT^{trigger}^{structure}|"
        f"{control_id}|P|2.5|||AL|NE|CHN|{CHARSET[encoding]}",
        f"EVN|{trigger}|20261128083000",
        f"PID|1||{pid3}||{name}^^^^^^L||{birth}|{sex}|||北京市海淀区中关村大街1号^^北京^^100080"
        f"||{phone}",
    ]
    if trigger != "A40":
        segments.append("PV1|1|O|放射科^^^人民医院")
    if mrg is not None:
        segments.append(f"MRG|{mrg}")
    return ("\r".join(segments) + "\r").encode(encoding)


def send(port: int, raw: bytes, encoding: str = "utf-8") -> Any:
    with MLLPClient("127.0.0.1", port, encoding=encoding) as client:
        answer = client.send_message(raw)
    return hl7.parse(answer[1:-2].decode(encoding))


def ack_code(ack: Any) -> str:
    return str(ack.segment("MSA")[1])


@pytest.fixture
def listener(archive: Archive) -> Iterator[HL7Listener]:
    server = HL7Listener(archive.db, HL7Settings(port=0, idle_timeout_seconds=5))
    server.start()
    yield server
    server.stop()


def _study(archive: Archive, patient_id: str, issuer: str) -> str:
    ds = dcmread(DATA / "ct_small.dcm")
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientID, ds.IssuerOfPatientID = patient_id, issuer
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    assert archive.ingest(buffer.getvalue(), actor=Actor.cli("pytest")).ok
    return str(ds.StudyInstanceUID)


def _pix(server: LiveServer, value: str, **params: str) -> httpx.Response:
    return httpx.get(
        f"{server.url}/api/mpi/pix", params={"value": value, **params}, headers=server.headers
    )


def test_adt_merge_then_pix_pdq_and_unmerge(
    archive: Archive, listener: HL7Listener, live_server: LiveServer
) -> None:
    port = listener.port
    # Two registrations of one woman under two hospital numbers, in two character sets.
    first = adt("A01", "M1", f"P100^^^HIS^PI~{ID_CARD}^^^CHN^NNCHN", "张^小燕",
                phone="^PRN^PH^^^^^^^^^13800138000")  # fmt: skip
    assert ack_code(send(port, first)) == "AA"
    second = adt("A04", "M2", "P200^^^HIS^PI~C200^^^HIS^MC", "張小燕", encoding="gb18030")
    assert ack_code(send(port, second, "gb18030")) == "AA"
    new_study, old_study = _study(archive, "P100", "HIS"), _study(archive, "P200", "")
    with archive.db.read_session() as session:
        stored_raw = b"".join(session.scalars(select(HL7Message.raw)))
        assert ID_CARD.encode() not in stored_raw and b"13800138000" not in stored_raw
    # A08 corrects the name of the first one; the change is kept in the history.
    update = adt("A08", "M3", "P100^^^HIS^PI", "张晓燕", encoding="gb18030")
    assert ack_code(send(port, update, "gb18030")) == "AA"
    # A merge naming a patient nobody registered: AE with ERR 204, stored for replay.
    unknown = adt("A40", "M4", "P100^^^HIS^PI", "张晓燕", mrg="P999^^^HIS^PI")
    refused = send(port, unknown)
    assert ack_code(refused) == "AE" and str(refused.segment("MSA")[2]) == "M4"
    err = refused.segment("ERR")
    assert str(err[3][0][0]) == "204" and "MRG-1" in str(err[8])
    assert str(err[2]) == "MRG^1^1"
    # The real merge: P200's person into P100's.
    merged = adt("A40", "M5", "P100^^^HIS^PI", "张晓燕", mrg="P200^^^HIS^PI")
    assert ack_code(send(port, merged)) == "AA"

    by_old = _pix(live_server, "P200", authority="HIS")
    assert by_old.status_code == 200, by_old.text
    person = by_old.json()["person"]
    assert person["name"] == "张晓燕" and person["name_pinyin"] == "zhangxiaoyan"
    assert person["birth_date"] == "19491231" and person["sex"] == "F"
    assert person["address"].startswith("北京市海淀区中关村大街1号")
    idents = {(i["type"], i["authority"], i["value"]) for i in person["identifiers"]}
    assert {("PI", "HIS", "P100"), ("PI", "HIS", "P200"), ("MC", "HIS", "C200")} <= idents
    assert ("NNCHN", "CHN", "110105********002X") in idents
    assert ("PHONE", "", "138****8000") in idents
    assert {s["study_instance_uid"] for s in person["studies"]} == {new_study, old_study}
    survivor = person["id"]
    assert _pix(live_server, "P100", authority="HIS").json()["person"]["id"] == survivor

    # PIX by ID-card number goes in the body; reveal shows it (and is audited).
    by_card = httpx.post(
        f"{live_server.url}/api/mpi/pix", params={"reveal": "true"}, headers=live_server.headers,
        json={"type": "NNCHN", "authority": "CHN", "value": ID_CARD.lower()},
    )  # fmt: skip
    assert by_card.status_code == 200, by_card.text
    revealed = {i["value"] for i in by_card.json()["person"]["identifiers"]}
    assert ID_CARD in revealed and "13800138000" in revealed

    for params in ({"pinyin": "zhangxiaoyan"}, {"pinyin": "zxy", "sex": "F"},
                   {"name": "张晓", "birth_date": "1949-12-31"}):  # fmt: skip
        found = httpx.get(
            f"{live_server.url}/api/mpi/pdq", params=params, headers=live_server.headers
        ).json()
        assert [p["id"] for p in found["persons"]] == [survivor], params
    by_id_card = httpx.post(
        f"{live_server.url}/api/mpi/pdq", json={"id_card": ID_CARD}, headers=live_server.headers
    )
    assert [p["id"] for p in by_id_card.json()["persons"]] == [survivor]

    detail = httpx.get(
        f"{live_server.url}/api/mpi/persons/{survivor}", headers=live_server.headers
    ).json()
    assert [h["after"].get("name") for h in detail["history"]] == ["张小燕", "张晓燕"]

    # Unmerge: P200 and its study go back to a person of their own.
    prior = next(row.prior_id for row in _merges(archive) if row.survivor_id == survivor)
    undone = httpx.post(
        f"{live_server.url}/api/mpi/persons/{prior}/unmerge", headers=live_server.headers
    )
    assert undone.status_code == 200, undone.text
    apart = _pix(live_server, "P200", authority="HIS").json()["person"]
    assert apart["id"] == prior and apart["merged_into"] is None
    assert [s["study_instance_uid"] for s in apart["studies"]] == [old_study]
    again = _pix(live_server, "P100", authority="HIS").json()["person"]
    assert [s["study_instance_uid"] for s in again["studies"]] == [new_study]

    # The refused merge, replayed once its patient exists (`cloudfilm hl7 replay`).
    assert ack_code(send(port, adt("A28", "M6", "P999^^^HIS^PI", "王芳"))) == "AA"
    with archive.db.read_session() as session:
        stored = session.scalars(select(HL7Message).where(HL7Message.control_id == "M4")).one()
        assert (stored.status, stored.ack_code) == ("failed", "AE")
        assert open_raw(archive.settings, stored.raw) == unknown
        events = session.scalars(
            select(AuditEvent.event_type).where(AuditEvent.event_type.like("patient-%"))
        ).all()
        assert sorted(events) == ["patient-merged", "patient-unmerged"]
    assert process(archive.db, stored.id) == "processed"
    assert _pix(live_server, "P999", authority="HIS").json()["person"]["id"] == survivor


def _merges(archive: Archive) -> list[Any]:
    from cloudfilm.mpi.models import PersonMerge

    with archive.db.read_session() as session:
        return list(session.scalars(select(PersonMerge)))


def test_adt__bad_identifiers_answered_ae_and_kept(archive: Archive, listener: HL7Listener) -> None:
    port = listener.port
    bad_card = adt("A01", "B1", "P1^^^HIS^PI~110105194912310021^^^CHN^NNCHN", "李小龙")
    answer = send(port, bad_card)
    assert ack_code(answer) == "AE"
    assert str(answer.segment("ERR")[3][0][0]) == "102"
    assert "校验位" in str(answer.segment("ERR")[8])
    no_id = adt("A08", "B2", "", "李小龙")
    answer = send(port, no_id)
    assert ack_code(answer) == "AE" and str(answer.segment("ERR")[3][0][0]) == "101"
    no_mrg = adt("A40", "B3", "P1^^^HIS^PI", "李小龙")
    assert ack_code(send(port, no_mrg)) == "AE"
    with archive.db.read_session() as session:
        rows = session.scalars(select(HL7Message).order_by(HL7Message.id)).all()
        assert [(r.control_id, r.status, r.ack_code) for r in rows] == [
            ("B1", "failed", "AE"), ("B2", "failed", "AE"), ("B3", "failed", "AE"),
        ]  # fmt: skip
        assert all(r.error for r in rows)
        failed = session.scalars(
            select(AuditEvent).where(AuditEvent.event_type == "hl7-message-failed")
        ).all()
        assert [(e.object_id, e.detail["code"], e.outcome) for e in failed] == [
            (str(rows[0].id), "102", 4), (str(rows[1].id), "101", 4), (str(rows[2].id), "100", 4),
        ]  # fmt: skip
    # The sender's corrected resend under the same MSH-10 is taken as new.
    fixed = adt("A01", "B1", f"P1^^^HIS^PI~{ID_CARD}^^^CHN^NNCHN", "李小龙")
    assert ack_code(send(port, fixed)) == "AA"
