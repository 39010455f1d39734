"""The query WebService's use cases: envelope keys, the replay guard, and the two
queries (exam list, one exam). No HTTP or SOAP here; the router is the edge."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from sqlalchemy import and_, delete, exists, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from cloudfilm.archive.models import Patient, Study
from cloudfilm.auth.models import ApiClient
from cloudfilm.config import Settings
from cloudfilm.crypto.keys import application_secret
from cloudfilm.db import Database
from cloudfilm.errors import BadRequest, Conflict, NotFound
from cloudfilm.mpi import service as mpi
from cloudfilm.orders import service as orders
from cloudfilm.orders.models import ImagingOrder
from cloudfilm.reports import service as reports
from cloudfilm.soap.models import WebServiceNonce

Q = TypeVar("Q", bound=BaseModel)

#: Most exams one list answer holds.
MAX_EXAMS = 200


# ------------------------------------------------------------------ keys


@dataclass(frozen=True, slots=True)
class ClientKey:
    client_id: str
    key_id: str
    key: bytes


def client_key(secret: bytes, *, client_id: str, client_pk: int, version: int) -> ClientKey:
    """The envelope key of one API client: HKDF-SHA256 of the application secret with the
    client's name, its row id and the key generation as ``info``.

    Derived, not stored: every server process computes the same key from the shared
    ``secret_key`` without a database read, and the database holds no key material. The
    row id makes a client re-created under the same name get a new key; raising
    ``webservice.key_version`` renews every client's key. ``key_id`` names the key
    (generation and the first 32 bits of its SHA-256) without revealing it.
    """
    info = f"cloudfilm-webservice-envelope|{version}|{client_pk}|{client_id}".encode()
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)
    return ClientKey(client_id, f"ws{version}.{hashlib.sha256(key).hexdigest()[:8]}", key)


def key_of(*, session: Session, settings: Settings, name: str) -> ClientKey | None:
    """The current envelope key of API client ``name`` (``None``: no such client)."""
    client_pk = session.scalar(select(ApiClient.id).where(ApiClient.name == name))
    if client_pk is None:
        return None
    return client_key(
        application_secret(settings), client_id=name, client_pk=client_pk,
        version=settings.webservice.key_version,
    )  # fmt: skip


def take_nonce(
    *, db: Database, client_id: str, nonce: str, expires_at: datetime, now: datetime
) -> bool:
    """Record a request nonce; ``False`` if this client used it before (a replay).

    Committed before the query runs, in its own transaction: the unique constraint decides
    between two processes that receive the same request at once.
    """
    try:
        with db.session() as session:
            session.execute(delete(WebServiceNonce).where(WebServiceNonce.expires_at < now))
            session.add(WebServiceNonce(client_id=client_id, nonce=nonce, expires_at=expires_at))
    except IntegrityError:
        return False
    return True


# ------------------------------------------------------------------ parameters


class PatientIdentifier(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str = Field(default="PI", max_length=16)
    """HL7 table 0203 code: PI (hospital patient ID), NNCHN (ID card), MC, MR, OP, IP..."""
    authority: str = Field(default="", max_length=64)
    value: str = Field(min_length=1, max_length=64)


class ExamsQuery(BaseModel):
    """Exam list: by patient identifier or by accession number (one of the two)."""

    model_config = ConfigDict(extra="forbid")

    patient: PatientIdentifier | None = None
    accession_number: str | None = Field(default=None, min_length=1, max_length=64)
    limit: int = Field(default=50, ge=1, le=MAX_EXAMS)

    @model_validator(mode="after")
    def _one_key(self) -> ExamsQuery:
        if (self.patient is None) == (self.accession_number is None):
            raise ValueError("give either patient or accession_number")
        return self


class ExamQuery(BaseModel):
    """One exam: by Study Instance UID or by accession number (one of the two)."""

    model_config = ConfigDict(extra="forbid")

    study_instance_uid: str | None = Field(default=None, min_length=1, max_length=64)
    accession_number: str | None = Field(default=None, min_length=1, max_length=64)

    @model_validator(mode="after")
    def _one_key(self) -> ExamQuery:
        if (self.study_instance_uid is None) == (self.accession_number is None):
            raise ValueError("give either study_instance_uid or accession_number")
        return self


def parse(kind: type[Q], params: Any) -> Q:
    """The query's parameters, or :class:`BadRequest` naming what is wrong (never a value)."""
    if not isinstance(params, dict):
        raise BadRequest("参数应为JSON对象 · the parameters are a JSON object")
    try:
        return kind.model_validate(params)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'parameters'}: {e['msg']}"
            for e in exc.errors()
        )
        raise BadRequest(f"参数无效 · invalid parameters: {problems}") from None


# ------------------------------------------------------------------ queries


@dataclass(frozen=True, slots=True)
class Links:
    dicomweb: str
    """Base URL of DICOMweb (``.../dicom-web``)."""
    viewer: str
    """Base URL of the web viewer (``.../ohif/viewer``)."""


def _accession(value: str) -> ColumnElement[bool]:
    # The study's own (0008,0050), or an order with this accession number naming the study.
    by_order = exists(
        select(ImagingOrder.id).where(
            ImagingOrder.accession_number == value,
            ImagingOrder.study_instance_uid != "",
            ImagingOrder.study_instance_uid == Study.study_instance_uid,
        )
    )
    return or_(Study.accession_number == value, by_order)


def _patient_condition(session: Session, ident: PatientIdentifier) -> ColumnElement[bool]:
    """Archive patients of the identifier: through the master index when it knows the
    person (all the person's identifiers; ID-card numbers through the blind index), and a
    hospital patient ID also directly against the archive's PatientID."""
    checked = mpi.identifier(ident.type, ident.authority, ident.value)
    parts: list[ColumnElement[bool]] = []
    person = mpi.find(session=session, ident=checked)
    if person is not None:
        rows = mpi.identifiers_of(session=session, person=mpi.resolve(session, person))
        parts.append(mpi.patients_condition(rows))
    if checked.id_type == "PI":
        same = Patient.patient_id == checked.value
        parts.append(
            and_(same, Patient.issuer_of_patient_id == checked.authority)
            if checked.authority
            else same
        )
    return or_(*parts) if parts else Patient.id.is_(None)


def find_exams(
    *, session: Session, query: ExamsQuery, scope: ColumnElement[bool] | None, links: Links
) -> list[dict[str, Any]]:
    """The exams matching ``query`` within the caller's data scope, newest first."""
    stmt = select(Study).join(Patient, Study.patient_pk == Patient.id)
    if query.patient is not None:
        stmt = stmt.where(_patient_condition(session, query.patient))
    else:
        stmt = stmt.where(_accession(query.accession_number or ""))
    if scope is not None:
        stmt = stmt.where(scope)
    stmt = stmt.order_by(Study.study_date.desc(), Study.study_time.desc(), Study.id.desc())
    studies = list(session.scalars(stmt.limit(query.limit)))
    by_study = orders.orders_by_study(session=session, study_ids=[s.id for s in studies])
    return [_exam(s, by_study.get(s.id, []), links) for s in studies]


def find_exam(
    *, session: Session, query: ExamQuery, scope: ColumnElement[bool] | None, links: Links
) -> dict[str, Any]:
    """One exam with its status and report, or :class:`NotFound` (also outside the scope)."""
    stmt = select(Study)
    if query.study_instance_uid is not None:
        stmt = stmt.where(Study.study_instance_uid == query.study_instance_uid)
    else:
        stmt = stmt.where(_accession(query.accession_number or ""))
    if scope is not None:
        stmt = stmt.where(scope)
    studies = list(session.scalars(stmt.limit(2)))
    if not studies:
        raise NotFound("无此检查（或不在您的数据范围内） · no such exam in your data scope")
    if len(studies) > 1:
        raise Conflict(
            "此检查号对应多个检查，请按 study_instance_uid 查询 · the accession number names "
            "several exams; ask by study_instance_uid (the exam list shows them)"
        )
    study = studies[0]
    exam = _exam(study, orders.orders_of_study(session=session, study=study), links)
    exam["report"] = report_of(session=session, study=study)
    return exam


def report_of(*, session: Session, study: Study) -> dict[str, Any] | None:
    """The exam's diagnostic report (:mod:`cloudfilm.reports`): status, version, exam,
    findings, impression, doctors, approval and release times, whether it is released to
    the patient; ``None`` when the exam has none yet."""
    report = reports.find_report(
        session,
        accession_number=study.accession_number,
        study_instance_uid=study.study_instance_uid,
    )
    if report is None:
        return None
    out = reports.describe(session, report)
    for key in ("patient_id", "study_instance_uid", "key_images"):
        out.pop(key, None)
    out["released"] = reports.is_released(report)
    return out


def _exam(study: Study, linked: list[ImagingOrder], links: Links) -> dict[str, Any]:
    patient = study.patient
    order = linked[-1] if linked else None
    uid = study.study_instance_uid
    return {
        "study_instance_uid": uid,
        "accession_number": study.accession_number or (order.accession_number if order else ""),
        "study_date": study.study_date,
        "study_time": study.study_time,
        "modalities": [m for m in study.modalities_in_study.split("\\") if m],
        "description": study.study_description,
        "institution": study.institution_name,
        "department": study.department,
        "number_of_series": study.number_of_series,
        "number_of_images": study.number_of_instances,
        "patient": {
            "patient_id": patient.patient_id,
            "issuer": patient.issuer_of_patient_id,
            "name": patient.patient_name,
            "sex": patient.patient_sex,
            "birth_date": patient.patient_birth_date,
        },
        "order": None
        if order is None
        else {
            "status": order.status,
            "procedure": order.procedure_text,
            "procedure_code": order.procedure_code,
            "requesting_doctor": order.requesting_doctor,
            "visit_type": order.visit_type,
        },
        "status": "images-available" if study.number_of_instances else "registered",
        "dicomweb_url": f"{links.dicomweb}/studies/{uid}",
        "viewer_url": f"{links.viewer}?StudyInstanceUIDs={uid}",
    }


def now_utc() -> datetime:
    return datetime.now(UTC)


def expiry(timestamp: int, skew: int) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC) + timedelta(seconds=skew)
