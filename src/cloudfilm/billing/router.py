"""Billing over HTTP (``/api/billing``): the charges, the import of the HIS's charge
list, the reconciliation as JSON and as an XLSX workbook.

Every route needs ``billing:reconcile`` (the built-in role ``finance``, 财务/统计). Every
import (refused ones too), reconciliation and export is audited by the request
middleware with what it did. Errors are ``{"error": ..., "message": "中文 · English"}``.
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from cloudfilm.audit.enums import AuditAction, AuditEventType
from cloudfilm.auth.guard import Permit
from cloudfilm.auth.permissions import Permission
from cloudfilm.auth.principal import Principal
from cloudfilm.billing import service
from cloudfilm.billing.importer import ImportRefused, import_file
from cloudfilm.billing.models import ChargeState
from cloudfilm.billing.reconcile import Reconciliation, reconcile, to_xlsx
from cloudfilm.errors import BadRequest, Conflict
from cloudfilm.httpaudit import note
from cloudfilm.orders.service import LOCAL_ZONE

if TYPE_CHECKING:
    from cloudfilm.archive.ingest import Archive

router = APIRouter(prefix="/api/billing", tags=["billing"])

_Finance = Annotated[Principal, Depends(Permit(Permission.BILLING_RECONCILE))]
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"description": "bad parameters, or a file that is not a CSV/XLSX charge list"},
    401: {"description": "not signed in"},
    403: {"description": "not permitted (billing:reconcile)"},
}
_XLSX = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"
_MAX_DAYS = 366


def _archive(request: Request) -> Archive:
    archive: Archive = request.app.state.archive
    return archive


def _range(first: date | None, last: date | None) -> tuple[date, date]:
    if first is None or last is None:
        raise BadRequest("需要起止日期 from 与 to · from and to (YYYY-MM-DD) are required")
    if last < first:
        raise BadRequest("结束日期早于开始日期 · to is before from")
    if (last - first).days >= _MAX_DAYS:
        raise BadRequest(f"对账期间最长 {_MAX_DAYS} 天 · at most {_MAX_DAYS} days at once")
    return first, last


_From = Annotated[date | None, Query(alias="from", description="First day (YYYY-MM-DD, CST).")]
_To = Annotated[date | None, Query(alias="to", description="Last day, included.")]
_Department = Annotated[str | None, Query(max_length=64, description="One department only.")]


def _run(request: Request, first: date, last: date, department: str | None) -> Reconciliation:
    archive = _archive(request)
    with archive.db.read_session() as session:
        return reconcile(
            session,
            billing=archive.settings.billing,
            first_day=first,
            last_day=last,
            department=department or None,
        )


def _detail(result: Reconciliation) -> dict[str, Any]:
    return {
        "from": result.first_day.isoformat(),
        "to": result.last_day.isoformat(),
        "department": result.department,
        "counts": result.counts(),
    }


@router.get(
    "/charges",
    summary="Charges and reversals by delivery time, newest first",
    responses=_ERRORS,
)
def list_charges(
    request: Request,
    _caller: _Finance,
    first: _From = None,
    last: _To = None,
    department: _Department = None,
    state: Annotated[str | None, Query(max_length=16)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> JSONResponse:
    if state is not None and state not in {s.value for s in ChargeState}:
        raise BadRequest(
            f"状态 {state!r} 未知 · unknown state (one of "
            f"{', '.join(s.value for s in ChargeState)})"
        )
    start = datetime.combine(first, time(), LOCAL_ZONE) if first else None
    end = datetime.combine(last + timedelta(days=1), time(), LOCAL_ZONE) if last else None
    note(request, AuditEventType.QUERY, AuditAction.READ, "charge", None,
         detail={"from": str(first), "to": str(last), "department": department})  # fmt: skip
    with _archive(request).db.read_session() as session:
        rows = service.list_charges(
            session, start=start, end=end, department=department, state=state,
            limit=limit, offset=offset,
        )  # fmt: skip
        body = [service.charge_dict(row) for row in rows]
    return JSONResponse({"charges": body, "next_offset": offset + len(body) if body else None})


@router.post(
    "/imports",
    summary="Import the HIS's charge list (CSV UTF-8/GB18030 or XLSX; raw body or multipart)",
    responses={**_ERRORS, 409: {"description": "this file was imported already"}},
)
async def import_charge_list(
    request: Request,
    _caller: _Finance,
    file_name: Annotated[str | None, Query(max_length=255)] = None,
) -> JSONResponse:
    archive = _archive(request)
    billing = archive.settings.billing
    name = file_name or ""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > billing.import_max_bytes + 65536:
        too_large = {"bytes": int(declared), "reason": "too large"}
        note(request, AuditEventType.BILLING_IMPORT_REFUSED, AuditAction.CREATE,
             "billing-import", None, detail=too_large)  # fmt: skip
        raise ImportRefused(
            f"文件过大（上限 {billing.import_max_bytes} 字节） · the upload is larger than "
            f"billing.import_max_bytes ({billing.import_max_bytes} bytes)"
        )
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form(max_files=1, max_fields=4, max_part_size=billing.import_max_bytes)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise BadRequest("表单缺少文件字段 file · the form has no file field named 'file'")
        data = await upload.read(billing.import_max_bytes + 1)
        name = name or upload.filename or ""
    else:
        data = b""
        async for chunk in request.stream():
            data += chunk
            if len(data) > billing.import_max_bytes:
                break
    actor = request.state.actor

    def run() -> dict[str, Any]:
        with archive.db.session() as session:
            return import_file(
                session, data=data, file_name=name, billing=billing, actor=actor, audited=False
            ).as_dict()

    try:
        result = await run_in_threadpool(run)
    except (ImportRefused, Conflict) as exc:
        note(request, AuditEventType.BILLING_IMPORT_REFUSED, AuditAction.CREATE,
             "billing-import", None,
             detail={"file_name": name[:255], "bytes": len(data), "reason": str(exc)})  # fmt: skip
        raise
    note(request, AuditEventType.BILLING_IMPORTED, AuditAction.CREATE, "billing-import",
         str(result["batch_id"]),
         detail={k: result[k] for k in ("batch_id", "file_name", "format", "kept",
                                        "rejected")})  # fmt: skip
    return JSONResponse(result, status_code=201)


@router.get(
    "/reconciliation",
    summary="Reconcile the archive's charges with the HIS's lines for a date range",
    responses=_ERRORS,
)
def reconciliation(
    request: Request,
    _caller: _Finance,
    first: _From = None,
    last: _To = None,
    department: _Department = None,
) -> JSONResponse:
    first_day, last_day = _range(first, last)
    result = _run(request, first_day, last_day, department)
    note(request, AuditEventType.BILLING_RECONCILED, AuditAction.EXECUTE, "billing", None,
         detail=_detail(result))  # fmt: skip
    return JSONResponse(result.as_dict())


@router.get(
    "/reconciliation.xlsx",
    summary="The reconciliation as an XLSX workbook (summary + one sheet per category)",
    responses={**_ERRORS, 200: {"content": {_XLSX: {}}}},
)
def reconciliation_xlsx(
    request: Request,
    _caller: _Finance,
    first: _From = None,
    last: _To = None,
    department: _Department = None,
) -> Response:
    first_day, last_day = _range(first, last)
    result = _run(request, first_day, last_day, department)
    note(request, AuditEventType.BILLING_EXPORTED, AuditAction.READ, "billing", None,
         detail=_detail(result))  # fmt: skip
    name = f"reconciliation-{first_day.isoformat()}-{last_day.isoformat()}.xlsx"
    return Response(
        to_xlsx(result),
        media_type=_XLSX,
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )
