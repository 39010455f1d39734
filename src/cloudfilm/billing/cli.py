"""``cloudfilm billing``: import the HIS's charge list, reconcile, list and resend charges."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

billing_app = typer.Typer(
    help="云胶片收费与对账 Billing: HIS charge lists, reconciliation, charge delivery.",
    no_args_is_help=True,
)

DataDir = typer.Option(
    None,
    "--data-dir",
    help="Folder for cloudfilm.db and storage/ (env CLOUDFILM_DATA_DIR; default ./var).",
)


@contextmanager
def _archive(data_dir: Path | None) -> Iterator[Any]:
    from cloudfilm.cli import _open_archive, _settings

    archive = _open_archive(_settings(data_dir), migrate=False)
    try:
        yield archive
    finally:
        archive.close()


def _actor(command: str) -> Any:
    from cloudfilm.audit.service import Actor

    return Actor.cli(f"billing {command}", source=os.environ.get("USER"))


def _day(value: str, flag: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(
            f"{flag} 需要日期 YYYY-MM-DD · {flag} is a date YYYY-MM-DD"
        ) from None


@billing_app.command("import")
def import_(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, readable=True),
    data_dir: Path | None = DataDir,
) -> None:
    """Import a HIS charge list (CSV in UTF-8 or GB18030, or XLSX); bad lines are listed
    and the good ones kept."""
    from cloudfilm.audit import service as audit
    from cloudfilm.audit.enums import AuditAction, AuditEventType, AuditOutcome
    from cloudfilm.billing.importer import ImportRefused, import_file
    from cloudfilm.errors import Conflict

    console = Console()
    actor = _actor("import")
    with _archive(data_dir) as archive:
        data = file.read_bytes()
        try:
            with archive.db.session() as session:
                result = import_file(
                    session,
                    data=data,
                    file_name=file.name,
                    billing=archive.settings.billing,
                    actor=actor,
                )
        except (ImportRefused, Conflict) as exc:
            with archive.db.session() as session:
                audit.record(
                    session=session,
                    actor=actor,
                    event_type=AuditEventType.BILLING_IMPORT_REFUSED,
                    action=AuditAction.CREATE,
                    outcome=AuditOutcome.MINOR_FAILURE,
                    object_type="billing-import",
                    message=str(exc)[:1024],
                    detail={"file_name": file.name[:255], "bytes": len(data)},
                )
            console.print(f"[red]{exc}[/red]", soft_wrap=True)
            raise typer.Exit(2) from None
    for error in result.errors:
        console.print(f"  [yellow]{error.message}[/yellow]", soft_wrap=True)
    console.print(
        f"批次 batch {result.batch_id}: 导入 kept {result.kept} 行 lines, "
        f"拒收 rejected {len(result.errors)}"
    )
    if result.errors:
        raise typer.Exit(1)


@billing_app.command("reconcile")
def reconcile_command(
    first: str = typer.Option(..., "--from", help="First day, YYYY-MM-DD (China time)."),
    last: str = typer.Option(..., "--to", help="Last day, included."),
    department: str | None = typer.Option(None, "--department", help="One department only."),
    xlsx: Path | None = typer.Option(None, "--xlsx", help="Also write the workbook here."),
    data_dir: Path | None = DataDir,
) -> None:
    """Reconcile the archive's charges with the imported HIS lines; prints the totals."""
    from cloudfilm.audit import service as audit
    from cloudfilm.audit.enums import AuditAction, AuditEventType
    from cloudfilm.billing.reconcile import reconcile, to_xlsx

    first_day, last_day = _day(first, "--from"), _day(last, "--to")
    if last_day < first_day:
        raise typer.BadParameter("--to 早于 --from · --to is before --from")
    actor = _actor("reconcile")
    with _archive(data_dir) as archive:
        with archive.db.read_session() as session:
            result = reconcile(
                session,
                billing=archive.settings.billing,
                first_day=first_day,
                last_day=last_day,
                department=department,
            )
        detail = {
            "from": first_day.isoformat(),
            "to": last_day.isoformat(),
            "department": department,
            "counts": result.counts(),
        }
        if xlsx is not None:
            xlsx.write_bytes(to_xlsx(result))
        with archive.db.session() as session:
            audit.record(
                session=session,
                actor=actor,
                event_type=AuditEventType.BILLING_RECONCILED,
                action=AuditAction.EXECUTE,
                object_type="billing",
                message="收费对账 · billing reconciliation",
                detail=detail,
            )
            if xlsx is not None:
                audit.record(
                    session=session,
                    actor=actor,
                    event_type=AuditEventType.BILLING_EXPORTED,
                    action=AuditAction.READ,
                    object_type="billing",
                    message=f"对账导出 · reconciliation exported to {xlsx.name}"[:1024],
                    detail=detail,
                )
    table = Table("类别 category", "笔数 count", "系统 system", "HIS", "差额 difference")
    for category, totals in result.totals().items():
        table.add_row(
            category.label,
            str(totals.count),
            f"{totals.system_amount:.2f}",
            f"{totals.his_amount:.2f}",
            f"{totals.his_amount - totals.system_amount:.2f}",
        )
    Console().print(table)
    if xlsx is not None:
        Console().print(f"已写入 written: {xlsx}")


@billing_app.command("send")
def send(data_dir: Path | None = DataDir) -> None:
    """Send the charges that are due now (``cloudfilm serve`` does it by itself)."""
    from cloudfilm.billing.sender import Sender

    with _archive(data_dir) as archive:
        sender = Sender(archive)
        total = sender.run_once()
        pending = sender.pending()
    Console().print(
        f"已确认 acknowledged {total.acknowledged}, 拒收 refused {total.failed}, 重试 retrying "
        f"{total.retried}, 放弃 given up {total.given_up}; 待发送 still due {pending}"
    )


@billing_app.command("resend")
def resend(
    charge_id: list[int] | None = typer.Argument(None, help="Charge ids; none: every failed."),
    data_dir: Path | None = DataDir,
) -> None:
    """Queue failed and given-up charges again."""
    from cloudfilm.billing.service import resend as requeue

    with _archive(data_dir) as archive, archive.db.session() as session:
        count = requeue(session, charge_ids=charge_id or None)
    Console().print(f"重新排队 queued again: {count}")


@billing_app.command("charges")
def charges(
    limit: int = typer.Option(50, help="Newest first, at most this many."),
    state: str | None = typer.Option(None, help="pending, sent, acknowledged, failed, …"),
    data_dir: Path | None = DataDir,
) -> None:
    """List charges (no patient data beyond the patient ID)."""
    from cloudfilm.billing.service import list_charges

    with _archive(data_dir) as archive, archive.db.read_session() as session:
        rows = list_charges(session, state=state, limit=limit)
        table = Table("id", "kind", "event at", "accession", "modality", "amount", "state",
                      "attempts", "error")  # fmt: skip
        for row in rows:
            table.add_row(
                str(row.id),
                row.kind,
                row.event_at.strftime("%Y-%m-%d %H:%M"),
                row.accession_number,
                row.modality,
                f"{row.amount:.2f}",
                row.state,
                str(row.attempts),
                (row.last_error or "")[:60],
            )
    Console().print(table)
