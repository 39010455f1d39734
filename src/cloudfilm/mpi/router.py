"""The patient master index over HTTP (``/api/mpi``): PIX, PDQ, persons, merge, unmerge.

Looking up needs ``patient:read``; merging and unmerging ``patient:merge``. Every call is
audited by the request middleware with what it looked for (the record keeps the query
string; an ID-card number is never put in a query string by this API's answers, and a
PDQ by ID-card number should be sent as ``POST /api/mpi/pdq``). Errors are
``{"error": ..., "message": "中文 · English"}`` with 400, 404 or 409.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from cloudfilm.audit.enums import AuditAction, AuditEventType
from cloudfilm.auth.guard import Permit
from cloudfilm.auth.permissions import Permission
from cloudfilm.auth.principal import Principal
from cloudfilm.errors import NotFound
from cloudfilm.httpaudit import note
from cloudfilm.mpi import service as mpi
from cloudfilm.mpi.keys import keys_of
from cloudfilm.mpi.models import Person

if TYPE_CHECKING:
    from cloudfilm.archive.ingest import Archive

router = APIRouter(prefix="/api/mpi", tags=["mpi"])

_Reader = Annotated[Principal, Depends(Permit(Permission.PATIENT_READ))]
_Merger = Annotated[Principal, Depends(Permit(Permission.PATIENT_MERGE))]
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "malformed parameters (an invalid ID-card number, no criterion)"},
    401: {"description": "not signed in"},
    403: {"description": "not permitted (patient:read, patient:merge)"},
    404: {"description": "no such person or identifier in the index"},
}


class IdentifierIn(BaseModel):
    """An identifier: type (HL7 table 0203: PI, MC, NNCHN, PPN, PHONE, OP, IP…),
    assigning authority and value."""

    model_config = ConfigDict(extra="forbid")

    type: Annotated[str, Field(min_length=1, max_length=16)] = "PI"
    authority: Annotated[str, Field(max_length=64)] = ""
    value: Annotated[str, Field(min_length=1, max_length=64)]

    def checked(self) -> mpi.Identifier:
        return mpi.identifier(self.type, self.authority, self.value)


class MergeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    survivor: IdentifierIn
    """An identifier of the person that stays."""
    prior: IdentifierIn
    """An identifier of the person merged into it (HL7 MRG-1)."""


class PDQIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str | None, Field(max_length=100)] = None
    pinyin: Annotated[str | None, Field(max_length=64)] = None
    birth_date: Annotated[str | None, Field(max_length=10)] = None
    sex: Annotated[str | None, Field(max_length=1)] = None
    id_card: Annotated[str | None, Field(max_length=32)] = None
    limit: Annotated[int, Field(ge=1, le=100)] = 20


def _archive(request: Request) -> Archive:
    archive: Archive = request.app.state.archive
    return archive


def _actor(request: Request) -> Any:
    return request.state.actor


def _person(
    session: Any, person: Person, *, reveal: bool, studies: bool, caller: Principal | None = None
) -> dict[str, Any]:
    keys = keys_of(session)
    body: dict[str, Any] = {
        "id": person.id,
        "name": person.name,
        "name_pinyin": person.name_pinyin,
        "sex": person.sex,
        "birth_date": person.birth_date,
        "address": person.address,
        "merged_into": person.merged_into,
        "updated_at": person.updated_at.isoformat(),
        "identifiers": [
            mpi.describe_identifier(keys, row, reveal=reveal)
            for row in mpi.identifiers_of(session=session, person=person)
        ],
    }
    if studies:
        body["studies"] = [
            {
                "study_instance_uid": s.study_instance_uid,
                "study_date": s.study_date,
                "accession_number": s.accession_number,
                "modalities": s.modalities_in_study,
                "description": s.study_description,
            }
            for s in mpi.studies_of(
                session=session,
                person=person,
                scope=caller.study_scope if caller is not None else None,
            )
        ]
    return body


_Reveal = Annotated[
    bool,
    Query(description="Show ID-card and phone numbers in full (masked by default; audited)."),
]


def _pix(
    request: Request, caller: Principal, ident: mpi.Identifier, reveal: bool
) -> dict[str, Any]:
    detail = {"type": ident.id_type, "authority": ident.authority, "reveal": reveal}
    note(request, AuditEventType.QUERY, AuditAction.EXECUTE, "mpi", "pix", detail=detail)
    with _archive(request).db.read_session() as session:
        person = mpi.find(session=session, ident=ident)
        if person is None:
            raise NotFound(
                "患者主索引中没有持有该标识的人 · no person in the index holds this identifier"
            )
        note(request, AuditEventType.QUERY, AuditAction.EXECUTE, "mpi-person", str(person.id),
             patient_id=ident.value if ident.id_type == "PI" else None, detail=detail)  # fmt: skip
        return {"person": _person(session, person, reveal=reveal, studies=True, caller=caller)}


@router.get(
    "/pix",
    summary="PIX: one identifier in, the person and all its identifiers out",
    responses=_ERRORS,
)
def pix(
    request: Request,
    caller: _Reader,
    value: Annotated[str, Query(min_length=1, max_length=64, description="CX.1 ID number")],
    id_type: Annotated[
        str,
        Query(alias="type", min_length=1, max_length=16, description="CX.5 type code (PI)"),
    ] = "PI",
    authority: Annotated[str, Query(max_length=64, description="CX.4 authority")] = "",
    reveal: _Reveal = False,
) -> dict[str, Any]:
    ident = mpi.identifier(id_type, authority, value)
    if ident.sealed:
        # A URL ends up in proxy logs and in the request's audit record.
        raise mpi.InvalidIdentifier(
            "身份证号和电话号码请用 POST /api/mpi/pix 查询，不要放在网址中 · look ID-card and "
            "phone numbers up with POST /api/mpi/pix, never in a URL"
        )
    return _pix(request, caller, ident, reveal)


@router.post(
    "/pix",
    summary="PIX with the identifier in the body (required for ID-card and phone numbers)",
    responses=_ERRORS,
)
def pix_post(
    request: Request, caller: _Reader, body: IdentifierIn, reveal: _Reveal = False
) -> dict[str, Any]:
    return _pix(request, caller, body.checked(), reveal)


def _pdq(request: Request, query: PDQIn, reveal: bool) -> dict[str, Any]:
    detail = {k: v for k, v in query.model_dump().items() if v is not None and k != "id_card"}
    note(request, AuditEventType.QUERY, AuditAction.EXECUTE, "mpi", "pdq",
         detail={**detail, "id_card": query.id_card is not None, "reveal": reveal})  # fmt: skip
    demographic = mpi.DemographicQuery(
        name=query.name,
        pinyin=query.pinyin,
        birth_date=query.birth_date,
        sex=query.sex,
        id_card=query.id_card,
        limit=query.limit,
    )
    with _archive(request).db.read_session() as session:
        persons = mpi.pdq(session=session, query=demographic)
        return {
            "count": len(persons),
            "persons": [_person(session, p, reveal=reveal, studies=False) for p in persons],
        }


@router.get(
    "/pdq",
    summary="PDQ: persons by name or pinyin, birth date, sex (every criterion must match)",
    responses=_ERRORS,
)
def pdq(
    request: Request,
    _caller: _Reader,
    name: Annotated[str | None, Query(max_length=100, description="Name or its start")] = None,
    pinyin: Annotated[
        str | None, Query(max_length=64, description="Full pinyin or initials, or the start")
    ] = None,
    birth_date: Annotated[
        str | None, Query(max_length=10, description="YYYYMMDD or YYYY-MM-DD")
    ] = None,
    sex: Annotated[str | None, Query(max_length=1, description="M, F, O, U")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    reveal: _Reveal = False,
) -> dict[str, Any]:
    query = PDQIn(name=name, pinyin=pinyin, birth_date=birth_date, sex=sex, limit=limit)
    return _pdq(request, query, reveal)


@router.post(
    "/pdq",
    summary="PDQ with the criteria in the body (use it for an ID-card number: no URL logs)",
    responses=_ERRORS,
)
def pdq_post(request: Request, _caller: _Reader, query: PDQIn, reveal: _Reveal = False) -> Any:
    return _pdq(request, query, reveal)


@router.get(
    "/persons/{id}",
    summary="One person: demographics, identifiers, history, merge state, studies",
    responses=_ERRORS,
)
def read_person(
    request: Request,
    caller: _Reader,
    id: int,  # noqa: A002
    reveal: _Reveal = False,
) -> dict[str, Any]:
    note(request, AuditEventType.QUERY, AuditAction.READ, "mpi-person", str(id),
         detail={"reveal": reveal})  # fmt: skip
    with _archive(request).db.read_session() as session:
        person = mpi.get_person(session=session, person_id=id)
        body = _person(session, person, reveal=reveal, studies=True, caller=caller)
        body["history"] = [
            {
                "changed_at": h.changed_at.isoformat(),
                "source": h.source,
                "before": h.before,
                "after": h.after,
            }
            for h in mpi.history_of(session=session, person=person)
        ]
        return body


@router.post(
    "/merge",
    summary="Merge the person of `prior` into the person of `survivor` (ADT A40)",
    responses={**_ERRORS, 409: {"description": "both identifiers name the same person"}},
)
def merge(request: Request, _caller: _Merger, body: MergeIn) -> dict[str, Any]:
    note(request, AuditEventType.HTTP_REQUEST, AuditAction.UPDATE, "mpi", "merge")
    survivor, prior = body.survivor.checked(), body.prior.checked()
    actor = _actor(request)
    with _archive(request).db.session() as session:
        done = mpi.merge(
            session=session, survivor=survivor, prior=prior, actor=actor,
            source=f"api:{actor.id}",
        )  # fmt: skip
        return {
            "merge": done.id,
            "survivor": done.survivor_id,
            "prior": done.prior_id,
            "identifiers_moved": len(done.identifier_ids),
        }


@router.post(
    "/persons/{id}/unmerge",
    summary="Reverse the last merge of person `id` (the prior person of that merge)",
    responses=_ERRORS,
)
def unmerge(request: Request, _caller: _Merger, id: int) -> dict[str, Any]:  # noqa: A002
    note(request, AuditEventType.HTTP_REQUEST, AuditAction.UPDATE, "mpi-person", str(id))
    actor = _actor(request)
    with _archive(request).db.session() as session:
        done = mpi.unmerge(session=session, prior_id=id, actor=actor, source=f"api:{actor.id}")
        return {
            "merge": done.id,
            "survivor": done.survivor_id,
            "prior": done.prior_id,
            "identifiers_returned": len(done.identifier_ids),
        }
