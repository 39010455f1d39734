"""Report messages → reports (:mod:`cloudfilm.reports`): ORU^R01.

References are to HL7 v2.5.1 7.3.1 ORU^R01, 4.5.3 OBR, 7.4.2 OBX; data types 2.A.24 ED,
2.A.47 NDL. One report per OBR (with the OBX segments that follow it):

* the exam: OBR-18 (placer field 1, the accession number by RIS convention), else OBR-3
  filler order number; ZDS-1 (IHE Scheduled Workflow) gives the Study Instance UID;
* status OBR-25 (table 0123): ``P``/``A``/``R`` preliminary, ``F`` final, ``C`` corrected,
  ``X``/``D`` withdrawn; ``O``/``I``/``S`` (no result yet) are refused;
* doctors: OBR-32 principal result interpreter (reviewing, who signs), OBR-33 assistant
  result interpreter (reporting, falls back to OBR-32), OBR-34 technician (examining);
  times: OBR-7 observation (examined), OBR-22 status change (reported and approved);
* OBX-3 says what an OBX holds: findings (``GDT``, LOINC 59776-5, 所见/描述), impression
  (``IMP``, 19005-8, 诊断/印象/结论/意见), recommendation (``REC``, 18783-1, 建议), key
  images (``KEY``, SOP Instance UIDs); other text goes to the findings. OBX-2 ``ED`` with
  ``application/pdf`` (OBX-5 ``^application^pdf^Base64^...``) is the RIS's own PDF;
* OBX-8 abnormal flag ``AA``/``HH``/``LL`` (or 危急) marks a critical finding.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from cloudfilm.errors import BadRequest
from cloudfilm.hl7 import handlers
from cloudfilm.hl7.adt import _field, _part, _Reader, _register, _segments, _sender
from cloudfilm.hl7.messages import AckCode, ErrorCode, MessageError
from cloudfilm.hl7.models import HL7Message
from cloudfilm.hl7.orm import _first, parse_ts
from cloudfilm.mpi import service as mpi
from cloudfilm.reports import service as reports
from cloudfilm.reports.models import ReportStatus

RESULT_STATUS = {
    "P": ReportStatus.PRELIMINARY,
    "A": ReportStatus.PRELIMINARY,
    "R": ReportStatus.PRELIMINARY,
    "F": ReportStatus.FINAL,
    "C": ReportStatus.CORRECTED,
    "X": ReportStatus.WITHDRAWN,
    "D": ReportStatus.WITHDRAWN,
}
CRITICAL_FLAGS = frozenset({"AA", "HH", "LL", "危急", "危急值"})
_FINDINGS = ("GDT", "59776-5", "FINDING", "所见", "描述", "表现")
_IMPRESSION = ("IMP", "19005-8", "IMPRESSION", "CONCLUSION", "诊断", "印象", "结论", "意见")
_RECOMMENDATION = ("REC", "18783-1", "RECOMMEND", "建议")
_KEY_IMAGES = ("KEY", "113000", "关键图像")


@dataclass(slots=True)
class _Group:
    number: int
    obr: Any
    orc: Any = None
    obxs: list[Any] = field(default_factory=list)


def _groups(message: Any) -> list[_Group]:
    groups: list[_Group] = []
    orc = None
    for segment in message:
        name = str(segment[0])
        if name == "ORC":
            orc = segment
        elif name == "OBR":
            groups.append(_Group(len(groups) + 1, segment, orc))
            orc = None
        elif name == "OBX" and groups:
            groups[-1].obxs.append(segment)
    return groups


def _ndl_name(reader: _Reader, segment: Any, number: int) -> str:
    """NDL.1 is a CNN whose subcomponents are ID & family & given: the Chinese name as
    written (family + given), else the ID."""
    raw = _field(segment, number)
    if not raw:
        return ""
    first = raw.split(reader.seps.repetition)[0].split(reader.seps.component)[0]
    subs = [reader.text(s) for s in first.split(reader.seps.subcomponent)]
    family, given = _part(subs, 2), _part(subs, 3)
    if any("\u3400" <= ch <= "\u9fff" for ch in family + given):
        return family + given
    return " ".join(p for p in (given, family) if p) or _part(subs, 1)


def _kind(identifier: str) -> str:
    text = identifier.upper()
    for kind, words in (
        ("impression", _IMPRESSION),
        ("recommendation", _RECOMMENDATION),
        ("key", _KEY_IMAGES),
        ("findings", _FINDINGS),
    ):
        if any(word.upper() in text for word in words):
            return kind
    return "findings"


def _text_value(reader: _Reader, obx: Any) -> str:
    """OBX-5 of a text OBX: repetitions are lines; FT's ``\\.br\\`` breaks become lines."""
    raw = _field(obx, 5)
    lines = [reader.text(rep) for rep in raw.split(reader.seps.repetition)]
    return "\n".join(lines).replace("\r\n", "\n").replace("\r", "\n").strip()


def _pdf(reader: _Reader, obx: Any, where: str) -> bytes | None:
    """OBX-5 of an ED: ^application^pdf^Base64^<data>; None when it is not a PDF."""
    parts = _field(obx, 5).split(reader.seps.component)
    kind, subtype, encoding = (_part(parts, n).lower() for n in (2, 3, 4))
    if kind not in ("application", "") or "pdf" not in subtype:
        return None
    if encoding != "base64":
        raise MessageError(
            AckCode.ERROR,
            ErrorCode.DATA_TYPE_ERROR,
            f"{where} 的 PDF 编码须为 Base64 · the PDF in {where} must be Base64 encoded",
            where,
        )
    try:
        return base64.b64decode("".join(_part(parts, 5).split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MessageError(
            AckCode.ERROR,
            ErrorCode.DATA_TYPE_ERROR,
            f"{where} 的 PDF 不是有效的 Base64 · the PDF in {where} is not valid Base64",
            where,
        ) from exc


def _report_data(reader: _Reader, message: Any, group: _Group) -> reports.ReportData:
    obr, n = group.obr, group.number
    code = reader.text(_field(obr, 25)).upper()[:1]
    status = RESULT_STATUS.get(code)
    if status is None:
        raise MessageError(
            AckCode.ERROR,
            ErrorCode.DATA_TYPE_ERROR if code else ErrorCode.REQUIRED_FIELD_MISSING,
            f"OBR-25 结果状态 {code or '为空'}，不是报告 · OBR-25 result status "
            f"{code or '(empty)'!r} is not a report (P, F, C, X)",
            f"OBR^{n}^25",
        )
    zds = _segments(message, "ZDS")
    reported = parse_ts(_first(reader, obr, 22), f"OBR^{n}^22")
    data = reports.ReportData(
        status=status,
        accession_number=_first(reader, obr, 18) or _first(reader, obr, 3),
        study_instance_uid=_first(reader, zds[0], 1) if zds else "",
        placer_order_number=_first(reader, group.orc, 2) or _first(reader, obr, 2),
        filler_order_number=_first(reader, group.orc, 3) or _first(reader, obr, 3),
        exam_name=_first(reader, obr, 4, 2) or _first(reader, obr, 4, 1),
        modality=_first(reader, obr, 24).upper(),
        body_part=_first(reader, obr, 15, 4) or _first(reader, obr, 15, 1),
        examined_at=parse_ts(_first(reader, obr, 7), f"OBR^{n}^7"),
        reported_at=reported,
        approved_at=reported if status.approved else None,
        reviewing_doctor=_ndl_name(reader, obr, 32),
        reporting_doctor=_ndl_name(reader, obr, 33) or _ndl_name(reader, obr, 32),
        examining_doctor=_ndl_name(reader, obr, 34),
    )
    texts: dict[str, list[str]] = {"findings": [], "impression": [], "recommendation": []}
    for number, obx in enumerate(group.obxs, start=1):
        where = f"OBX^{number}^5"
        value_type = reader.text(_field(obx, 2)).upper()
        flags = {f[0].upper() for f in reader.repetitions(obx, 8) if f and f[0]}
        if flags & CRITICAL_FLAGS:
            data.critical = True
        if value_type == "ED":
            pdf = _pdf(reader, obx, where)
            if pdf is not None:
                data.source_pdf = pdf
            continue
        identifier = " ".join(_first(reader, obx, 3, c) for c in (1, 2))
        kind = _kind(identifier)
        value = _text_value(reader, obx)
        if kind == "key":
            data.key_images.extend(uid.strip() for uid in value.split() if uid.strip())
        elif value:
            texts[kind].append(value)
    data.findings = "\n".join(texts["findings"])
    data.impression = "\n".join(texts["impression"])
    data.recommendation = "\n".join(texts["recommendation"])
    return data


@handlers.register("ORU^R01")
def on_oru(*, session: Session, message: Any, record: HL7Message) -> None:
    reader = _Reader(message)
    source = f"hl7:#{record.id}"
    groups = _groups(message)
    if not groups:
        raise MessageError(
            AckCode.ERROR, ErrorCode.SEGMENT_SEQUENCE, "缺少 OBR 段 · OBR segment missing", "OBR"
        )
    pids = _segments(message, "PID")
    person = _register(session, reader, pids[0], source) if pids else None
    # The report's patient ID: the first PID-3 repetition that is no ID-card or phone
    # number (those stay sealed in the master index, never on a report).
    patient = [
        rep
        for rep in (reader.repetitions(pids[0], 3) if pids else [])
        if mpi.TYPE_ALIASES.get(_part(rep, 5).upper(), _part(rep, 5).upper())
        not in mpi.SEALED_TYPES
    ]
    for group in groups:
        data = _report_data(reader, message, group)
        if patient:
            data.patient_id = _part(patient[0], 1)
            data.patient_authority = _part(patient[0], 4)
        try:
            reports.submit(
                session,
                data=data,
                source=source,
                actor=_sender(record),
                person_id=person.id if person is not None else None,
            )
        except BadRequest as exc:
            raise MessageError(
                AckCode.ERROR, ErrorCode.APPLICATION_ERROR, str(exc), f"OBR^{group.number}"
            ) from exc
    session.flush()
