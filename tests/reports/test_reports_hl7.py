"""ORU^R01 over MLLP → report versions → PDF with QR code → registry, DICOM, release."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from report_messages import (
    FINDINGS,
    IMPRESSION,
    ack_code,
    ingest_ct,
    listening,
    oru,
    pdf_page_png,
    pdf_text,
    qr_codes,
    send,
)
from sqlalchemy import select

from cloudfilm.archive.ingest import Archive
from cloudfilm.archive.models import Instance, Series, Study
from cloudfilm.audit.models import AuditEvent
from cloudfilm.hl7.listener import HL7Listener
from cloudfilm.reports.models import Document, Report, ReportVersion
from cloudfilm.reports.worker import ENCAPSULATED_PDF, ReportWorker
from cloudfilm.sharing import tokens


@pytest.fixture
def listener(archive: Archive) -> Iterator[HL7Listener]:
    with listening(archive) as server:
        yield server


def report_of(archive: Archive, accession: str) -> tuple[Report, list[ReportVersion]]:
    with archive.db.read_session() as session:
        report = session.scalars(select(Report).where(Report.accession_number == accession)).one()
        versions = list(
            session.scalars(
                select(ReportVersion)
                .where(ReportVersion.report_id == report.id)
                .order_by(ReportVersion.version)
            )
        )
        session.expunge_all()
    return report, versions


def documents(archive: Archive, report_id: int, kind: str) -> list[Document]:
    with archive.db.read_session() as session:
        found = list(
            session.scalars(
                select(Document)
                .where(Document.report_id == report_id, Document.kind == kind)
                .order_by(Document.id)
            )
        )
        session.expunge_all()
    return found


def test_final_report_becomes_a_pdf_with_a_qr_code_for_this_exam(
    archive: Archive, listener: HL7Listener, tmp_path: Path
) -> None:
    study_uid, sop_uid = ingest_ct(archive, "ACC100")
    acks = send(listener, oru("R1", study_uid=study_uid, key_images=[sop_uid]))
    assert ack_code(acks[0]) == "AA", str(acks[0])

    report, versions = report_of(archive, "ACC100")
    assert report.status == "final" and report.render_pending
    assert [v.status for v in versions] == ["final"]
    v1 = versions[0]
    assert v1.findings == FINDINGS and v1.impression == IMPRESSION
    assert (v1.reviewing_doctor, v1.reporting_doctor, v1.examining_doctor) == (
        "张主任",
        "李医生",
        "赵技师",
    )
    assert v1.exam_name == "胸部CT平扫" and v1.body_part == "胸部"
    assert report.study_instance_uid == study_uid and report.person_id is not None

    done = ReportWorker(archive).run_once()
    assert done.rendered == [report.id] and not done.failed
    assert done.released == [report.id]  # no release delay configured

    [doc] = documents(archive, report.id, "report-pdf")
    pdf = archive.storage.read(doc.storage_key)
    assert pdf.startswith(b"%PDF-") and doc.size == len(pdf)
    text = pdf_text(pdf, tmp_path)
    compact = "".join(text.split())
    assert "右肺上叶见一直径约8mm磨玻璃结节" in compact
    assert "建议三个月后复查" in compact and "王小明" in compact and "张主任" in compact

    png = pdf_page_png(pdf, tmp_path)
    [url] = qr_codes(png)
    assert url.startswith(tokens.portal_base(archive.settings) + tokens.PORTAL_ENTRY_PATH)
    token = url.rsplit("/", 1)[1]
    assert len(token) >= 22 and "P100" not in url and "ACC100" not in url
    with archive.db.read_session() as session:
        entry = tokens.resolve(session, token)
        assert entry is not None and entry.report_id == report.id
        assert entry.study_instance_uid == study_uid
        assert tokens.resolve(session, token[:-1] + ("A" if token[-1] != "A" else "B")) is None

    # The same PDF is an Encapsulated PDF instance of the study, for DICOM viewers.
    with archive.db.read_session() as session:
        row = session.scalars(
            select(Instance).where(Instance.sop_class_uid == ENCAPSULATED_PDF)
        ).one()
        series = session.get(Series, row.series_pk)
        study = session.get(Study, series.study_pk) if series else None
        assert study is not None and study.study_instance_uid == study_uid
        assert row.sop_instance_uid == doc.uid
    ds = dcmread(io.BytesIO(archive.storage.read(row.storage_key)))
    assert ds.Modality == "DOC" and ds.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert ds.EncapsulatedDocument[: ds.EncapsulatedDocumentLength] == pdf
    assert ds.PatientID == "P100" and ds.AccessionNumber == "ACC100"

    with archive.db.read_session() as session:
        kinds = [
            e.event_type
            for e in session.scalars(
                select(AuditEvent)
                .where(AuditEvent.object_type == "report")
                .order_by(AuditEvent.seq)
            )
        ]
    assert kinds == ["report-received", "report-rendered", "report-released"]


def test_correction_keeps_the_first_version_and_the_qr_code(
    archive: Archive, listener: HL7Listener, tmp_path: Path
) -> None:
    send(listener, oru("C1", accession="ACC200"))
    worker = ReportWorker(archive)
    worker.run_once()
    report, _ = report_of(archive, "ACC200")
    [first] = documents(archive, report.id, "report-pdf")
    url_first = qr_codes(pdf_page_png(archive.storage.read(first.storage_key), tmp_path, "a"))

    acks = send(listener, oru("C2", accession="ACC200", impression="右肺上叶磨玻璃结节（更正）。"))
    assert ack_code(acks[0]) == "AA"
    report, versions = report_of(archive, "ACC200")
    assert [v.status for v in versions] == ["final", "corrected"]
    assert versions[0].impression == IMPRESSION  # never erased
    assert report.status == "corrected" and report.render_pending
    worker.run_once()
    old, new = documents(archive, report.id, "report-pdf")
    assert old.status == "deprecated" and old.replaced_by_id == new.id and new.status == "current"
    pdf = archive.storage.read(new.storage_key)
    assert "（更正）" in pdf_text(pdf, tmp_path) and "更正报告" in pdf_text(pdf, tmp_path)
    assert qr_codes(pdf_page_png(pdf, tmp_path, "b")) == url_first


def test_preliminary_after_final_is_refused_and_kept(
    archive: Archive, listener: HL7Listener
) -> None:
    first, late = send(
        listener, oru("P1", accession="ACC300"), oru("P2", accession="ACC300", status="P")
    )
    assert ack_code(first) == "AA"
    assert ack_code(late) == "AE"
    assert "不能改回初步报告" in str(late) and "corrected report" in str(late)
    report, versions = report_of(archive, "ACC300")
    assert report.status == "final" and len(versions) == 1


def test_withdrawn_report_is_hidden_and_a_later_final_reinstates_it(
    archive: Archive, listener: HL7Listener
) -> None:
    send(listener, oru("W1", accession="ACC400"))
    ReportWorker(archive).run_once()
    send(listener, oru("W2", accession="ACC400", status="X"))
    report, versions = report_of(archive, "ACC400")
    assert report.status == "withdrawn" and report.withdrawn_at is not None
    assert [v.status for v in versions] == ["final", "withdrawn"]
    send(listener, oru("W3", accession="ACC400"))
    report, versions = report_of(archive, "ACC400")
    assert report.status == "final" and report.withdrawn_at is None and len(versions) == 3


def test_source_pdf_is_registered(archive: Archive, listener: HL7Listener) -> None:
    source = b"%PDF-1.4\n% RIS report\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"
    [ack] = send(listener, oru("S1", accession="ACC500", pdf=source))
    assert ack_code(ack) == "AA"
    report, versions = report_of(archive, "ACC500")
    [doc] = documents(archive, report.id, "source-pdf")
    assert archive.storage.read(doc.storage_key) == source
    assert versions[0].source_document_id == doc.id


@pytest.mark.parametrize(
    ("message", "needle"),
    [
        (oru("B1", accession="ACC600", pdf=b"not a pdf at all"), "not a PDF"),
        (oru("B2", accession="ACC601", status="I"), "OBR-25"),
        (oru("B3", accession="", placer=""), "names no exam"),
        (oru("B4", accession="ACC603", findings="x" * 70_000), "longer than"),
    ],
)
def test_bad_report_messages_are_answered_ae_and_nothing_is_lost(
    archive: Archive, listener: HL7Listener, message: bytes, needle: str
) -> None:
    send(listener, oru("G1", accession="ACC699"))
    [ack] = send(listener, message)
    assert ack_code(ack) == "AE"
    assert needle in str(ack), str(ack)
    report, versions = report_of(archive, "ACC699")
    assert len(versions) == 1
    with archive.db.read_session() as session:
        assert session.scalars(select(Report)).all() == [session.get(Report, report.id)]


def test_broken_base64_pdf_is_answered_ae(archive: Archive, listener: HL7Listener) -> None:
    raw = oru("E1", accession="ACC700", pdf=b"%PDF-1.4 x").replace(b"Base64^", b"Base64^#!")
    [ack] = send(listener, raw)
    assert ack_code(ack) == "AE" and "Base64" in str(ack)


def test_an_id_card_number_first_in_pid3_never_becomes_the_reports_patient_id(
    archive: Archive, listener: HL7Listener, tmp_path: Path
) -> None:
    number = "110105198003151234"
    [ack] = send(listener, oru("I1", accession="ACC800", id_card=number, id_card_first=True))
    assert ack_code(ack) == "AA"
    ReportWorker(archive).run_once()
    report, _ = report_of(archive, "ACC800")
    assert report.patient_id == "P100"
    [doc] = documents(archive, report.id, "report-pdf")
    assert number not in pdf_text(archive.storage.read(doc.storage_key), tmp_path)
