"""``cloudfilm gateway``: run the front service, show its queue, request and retry studies."""

from __future__ import annotations

import json
import logging
import signal
import threading
from types import FrameType
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

gateway_app = typer.Typer(
    help="前置服务 Gateway: pull exams from the PACS and deliver them to the archive. "
    "Without a subcommand: run it (poll, retrieve, deliver) until SIGTERM.",
    invoke_without_command=True,
)
console = Console(stderr=True)


def _settings() -> Any:
    from cloudfilm.config import Settings

    try:
        return Settings()
    except ValueError as exc:
        console.print(f"[red]配置错误 · configuration error:[/red] {exc}")
        raise typer.Exit(2) from exc


@gateway_app.callback()
def serve(ctx: typer.Context) -> None:
    """Run the gateway: Storage SCP, then poll → retrieve → deliver until SIGTERM/SIGINT."""
    if ctx.invoked_subcommand is not None:
        return
    from cloudfilm.gateway.api import APIConfigError, check_exposure
    from cloudfilm.gateway.service import Gateway

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    settings = _settings()
    gw = Gateway(settings)
    stop = threading.Event()

    def _stop(signum: int, _frame: FrameType | None) -> None:
        logging.getLogger(__name__).info("gateway: signal %d, stopping after this step", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        check_exposure(settings.gateway)
    except APIConfigError as exc:
        gw.close()
        console.print(f"[red]配置错误 · configuration error:[/red] {exc}")
        raise typer.Exit(2) from exc
    gw.start()
    try:
        gw.start_api()
    except APIConfigError as exc:
        gw.close()
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    try:
        gw.start_hl7()
    except OSError as exc:
        gw.close()
        console.print(f"[red]HL7 MLLP listener: {exc}[/red]")
        raise typer.Exit(2) from exc
    api = (
        f", status API http://{settings.gateway.http_host}:{settings.gateway.http_port}"
        if settings.gateway.http_port
        else ""
    )
    console.print(
        f"cloudfilm gateway: {settings.gateway.ae_title} on "
        f"{settings.gateway.scp_host}:{settings.gateway.scp_port}, "
        f"{len(settings.gateway.sources)} source(s), archive {settings.gateway.archive_url}{api}"
        + (
            f", HL7 MLLP {settings.gateway.hl7_host}:{settings.gateway.hl7_port}"
            if settings.gateway.hl7_port is not None
            else ""
        )
    )
    try:
        gw.run(stop)
    finally:
        gw.close()


@gateway_app.command("status")
def status(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    limit: int = typer.Option(50, help="Most recent studies shown."),
) -> None:
    """Backlog per state and source, each source's last poll and error, recent studies."""
    from cloudfilm.gateway.queue import GatewayQueue

    queue = GatewayQueue(_settings())
    try:
        summary = queue.summary()
        studies = queue.studies(limit=limit)
    finally:
        queue.close()
    if as_json:
        typer.echo(json.dumps({**summary, "recent": studies}, ensure_ascii=False, indent=2))
        return
    out = Console()
    out.print(f"待处理 backlog: {summary['backlog']} study(ies); by state: {summary['studies']}")
    out.print(f"instances by state: {summary['instances']}")
    sources = Table("source", "studies", "polled through", "last poll", "last error")
    for row in summary["sources"]:
        sources.add_row(
            row["name"],
            json.dumps(row["studies"]),
            row["polled_through"] or "—",
            row["last_poll_at"] or "—",
            row["last_error"] or "",
        )
    out.print(sources)
    table = Table("study", "state", "step", "attempts", "recv/exp", "delivered", "refused",
                  "next attempt", "last error")  # fmt: skip
    for row in studies:
        table.add_row(
            row["study_instance_uid"],
            row["state"],
            row["step"],
            str(row["attempts"]),
            f"{row['received']}/{row['expected'] if row['expected'] is not None else '?'}",
            str(row["delivered"]),
            str(row["refused"]),
            row["next_attempt_at"] or "",
            row["last_error"] or "",
        )
    out.print(table)


@gateway_app.command("fetch")
def fetch(
    source: str = typer.Option("", help="PACS source name (default: the only one)."),
    study: str = typer.Option("", "--study", help="Study Instance UID."),
    accession: str = typer.Option("", "--accession", help="Accession Number."),
    patient_id: str = typer.Option("", "--patient-id", help="Patient ID."),
    date_from: str = typer.Option("", "--from", help="First StudyDate, YYYYMMDD."),
    date_to: str = typer.Option("", "--to", help="Last StudyDate, YYYYMMDD."),
    now: bool = typer.Option(
        False, "--now", help="A date-range back-fill ignores gateway.schedule_hours too."
    ),
) -> None:
    """Queue studies by hand, found by C-FIND. One study (UID, accession, patient ID) moves
    outside the schedule; a back-fill by date range keeps to gateway.schedule_hours unless
    --now. Uploads keep to gateway.bandwidth_bytes_per_second either way."""
    from cloudfilm.gateway.pacs import PacsError
    from cloudfilm.gateway.service import Gateway

    settings = _settings()
    names = list(settings.gateway.sources)
    name = source or (names[0] if len(names) == 1 else "")
    if not name:
        console.print("[red]name the source with --source[/red]: " + ", ".join(names))
        raise typer.Exit(2)
    dates = f"{date_from}-{date_to}" if (date_from or date_to) else None
    gw = Gateway(settings)
    try:
        found = gw.fetch(
            name,
            study_instance_uid=study or None,
            accession_number=accession or None,
            patient_id=patient_id or None,
            study_date=dates,
            now=now,
        )
    except (PacsError, ValueError) as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    finally:
        gw.close()
    for item in found:
        typer.echo(f"{item.study_instance_uid}\t{item.expected_instances or '?'} instance(s)")
    console.print(f"{len(found)} study(ies) queued from {name}")


@gateway_app.command("retry")
def retry(study: str = typer.Option("", "--study", help="One study; default: all dead.")) -> None:
    """Put dead-lettered and failed studies and refused instances back in line."""
    from cloudfilm.errors import NotFound
    from cloudfilm.gateway.queue import GatewayQueue

    queue = GatewayQueue(_settings())
    try:
        count = queue.retry(study or None)
    except NotFound as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    finally:
        queue.close()
    console.print(f"{count} study(ies) put back in line")


@gateway_app.command("send-back")
def send_back(
    study: str = typer.Option(..., "--study", help="Study Instance UID in the archive."),
    to: str = typer.Option("", "--to", help="Destination (default: the only one)."),
    now: bool = typer.Option(
        False,
        "--now",
        help="Run it in this process (fetch, then C-STORE) instead of "
        "leaving it to the running gateway; stops at the first failure.",
    ),
) -> None:
    """回传 The way back: queue a study from the archive for a hospital node (C-STORE)."""
    from cloudfilm.errors import NotFound
    from cloudfilm.gateway.delivery import ArchiveClient
    from cloudfilm.gateway.models import SendBackState
    from cloudfilm.gateway.queue import GatewayQueue
    from cloudfilm.gateway.sendback import SendBack

    settings = _settings()
    names = list(settings.gateway.destinations)
    name = to or (names[0] if len(names) == 1 else "")
    if not name:
        console.print(
            "[red]name the destination with --to[/red]: " + (", ".join(names) or "none configured")
        )
        raise typer.Exit(2)
    queue = GatewayQueue(settings)
    runner = SendBack(queue, ArchiveClient(settings.gateway))
    try:
        try:
            job = runner.jobs.request(study, name)
        except NotFound as exc:
            console.print(f"[red]{exc}[/red]")
            raise typer.Exit(1) from exc
        if now:
            while True:
                task = runner.run_next()
                row = runner.jobs.job(job["id"])
                assert row is not None
                job = row
                if task is None or job["state"] in (
                    SendBackState.SENT,
                    SendBackState.FAILED,
                    SendBackState.DEAD,
                ):
                    break
    finally:
        runner.archive.close()
        queue.close()
    typer.echo(json.dumps(job, ensure_ascii=False, indent=2))
    if job["state"] in (SendBackState.FAILED, SendBackState.DEAD):
        raise typer.Exit(1)
