"""``cloudfilm hl7``: see the message store and replay messages."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

hl7_app = typer.Typer(
    help="HL7 v2 消息 messages received over MLLP: list and replay.", no_args_is_help=True
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


@hl7_app.command("messages")
def messages(
    status: str | None = typer.Option(
        None, "--status", help="received, processed, failed or duplicate."
    ),
    message_type: str | None = typer.Option(
        None, "--type", help="ADT (every trigger) or ADT^A01 (one)."
    ),
    limit: int = typer.Option(100, help="Newest first, at most this many."),
    data_dir: Path | None = DataDir,
) -> None:
    """List stored messages (no message text: it holds patient data)."""
    from cloudfilm.hl7.models import MessageStatus
    from cloudfilm.hl7.service import list_messages

    if status is not None and status not in {s.value for s in MessageStatus}:
        raise typer.BadParameter(f"--status is one of {', '.join(s.value for s in MessageStatus)}")
    with _archive(data_dir) as archive, archive.db.read_session() as session:
        rows = list_messages(session=session, status=status, message_type=message_type, limit=limit)
        table = Table("id", "received", "sender", "MSH-10", "type", "enc", "ACK", "status",
                      "error")  # fmt: skip
        for row in rows:
            table.add_row(
                str(row.id),
                row.received_at.strftime("%Y-%m-%d %H:%M:%S"),
                "^".join(p for p in (row.sending_application, row.sending_facility) if p),
                row.control_id or "",
                row.message_type or "",
                row.encoding or "",
                row.ack_code,
                row.status + (f" (of #{row.duplicate_of})" if row.duplicate_of else ""),
                row.error or "",
            )
    Console().print(table)


@hl7_app.command("replay")
def replay(
    message_id: int = typer.Argument(..., help="The message's id (`cloudfilm hl7 messages`)."),
    data_dir: Path | None = DataDir,
) -> None:
    """Run the handler of a stored message again (after a fix, or once a handler exists)."""
    from cloudfilm.audit import service as audit
    from cloudfilm.audit.enums import AuditAction, AuditEventType
    from cloudfilm.hl7 import handlers
    from cloudfilm.hl7.listener import process
    from cloudfilm.hl7.models import HL7Message, MessageStatus

    out = Console()
    with _archive(data_dir) as archive:
        with archive.db.read_session() as session:
            row = session.get(HL7Message, message_id)
        if row is None:
            out.print(f"no HL7 message {message_id} · 无此消息")
            raise typer.Exit(1)
        if row.status == MessageStatus.DUPLICATE.value:
            out.print(f"#{message_id} is a duplicate of #{row.duplicate_of}: replay that one")
            raise typer.Exit(1)
        if handlers.handler_for(row.message_type) is None:
            out.print(
                f"no handler is registered for {row.message_type or 'this message'} yet · "
                "尚无处理程序: the message stays stored as received"
            )
            raise typer.Exit(1)
        status = process(archive.db, message_id)
        with archive.db.session() as session:
            audit.record(
                session=session,
                actor=audit.Actor.cli("hl7 replay"),
                event_type=AuditEventType.HL7_MESSAGE_REPLAYED,
                action=AuditAction.EXECUTE,
                object_type="hl7-message",
                object_id=str(message_id),
                detail={"control_id": row.control_id, "status": status},
            )
    out.print(f"#{message_id} {row.message_type}: {status}")
    if status == MessageStatus.FAILED.value:
        raise typer.Exit(1)
