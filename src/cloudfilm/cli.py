"""The ``cloudfilm`` command: serve, import, demo, migrate, storage upkeep."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cloudfilm import __version__
from cloudfilm.archive.tiers_cli import register as register_tier_commands
from cloudfilm.billing.cli import billing_app
from cloudfilm.config import Environment, Settings
from cloudfilm.gateway.cli import gateway_app
from cloudfilm.hl7.cli import hl7_app

app = typer.Typer(
    help="云胶片 Cloud Film: archive, share and view a hospital's imaging exams.",
    no_args_is_help=True,
    add_completion=False,
)
storage_app = typer.Typer(help="Storage upkeep.", no_args_is_help=True)
app.add_typer(storage_app, name="storage")
register_tier_commands(storage_app)
client_app = typer.Typer(
    help="Integration clients (bearer tokens for the HTTP interfaces).", no_args_is_help=True
)
app.add_typer(client_app, name="client")
user_app = typer.Typer(help="Staff accounts (for operators at the server).", no_args_is_help=True)
app.add_typer(user_app, name="user")
audit_app = typer.Typer(
    help="审计日志 Audit trail: check the hash chain, purge records past retention.",
    no_args_is_help=True,
)
app.add_typer(audit_app, name="audit")
app.add_typer(billing_app, name="billing")
app.add_typer(gateway_app, name="gateway")
app.add_typer(hl7_app, name="hl7")
console = Console(stderr=True)

DataDir = typer.Option(
    None,
    "--data-dir",
    help="Folder for cloudfilm.db and storage/ (env CLOUDFILM_DATA_DIR; default ./var).",
)


class Role(StrEnum):
    ALL = "all"
    API = "api"
    DIMSE = "dimse"


def _settings(data_dir: Path | None = None, **overrides: Any) -> Settings:
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    try:
        return Settings(**overrides)
    except ValueError as exc:
        console.print(f"[red]配置错误 · configuration error:[/red] {exc}")
        raise typer.Exit(2) from exc


def _open_archive(settings: Settings, *, migrate: bool) -> Any:
    from cloudfilm import migrations
    from cloudfilm.archive.ingest import Archive
    from cloudfilm.db import Database

    db = Database(settings)
    if migrate or db.is_sqlite:
        migrations.upgrade(db.engine)
    else:
        _require_current_schema(db)
        _require_least_privilege(settings, db)
    _configure_audit(settings)
    return Archive(settings, db=db)


def _configure_audit(settings: Settings) -> None:
    from cloudfilm.audit import service as audit

    audit.configure(settings.audit)


def _require_least_privilege(settings: Settings, db: Any) -> None:
    """Refuse to serve as a superuser or owner role in production (docs/install.md)."""
    from cloudfilm.dbroles import startup_refusal

    refusal = startup_refusal(settings, db.engine)
    if refusal is not None:
        db.dispose()
        console.print(refusal, style="red", markup=False, soft_wrap=True)
        raise typer.Exit(2)


def _require_current_schema(db: Any) -> None:
    from alembic.script import ScriptDirectory

    from cloudfilm import migrations

    head = ScriptDirectory.from_config(migrations.alembic_config()).get_current_head()
    current = migrations.current(db.engine)
    if current != head:
        console.print(
            f"[red]the database schema is at {current or 'nothing'}, the program needs {head}: "
            "run `cloudfilm migrate` with the schema owner's credentials first[/red]"
        )
        raise typer.Exit(2)


def _configure_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)


@app.command()
def serve(
    demo: bool = typer.Option(
        False,
        "--demo",
        help="Load demo data and accept local DICOM senders of any AE title (not in production).",
    ),
    data_dir: Path | None = DataDir,
    host: str | None = typer.Option(None, help="HTTP address (env CLOUDFILM_HTTP__HOST)."),
    http_port: int | None = typer.Option(None, help="HTTP port (env CLOUDFILM_HTTP__PORT)."),
    dicom_port: int | None = typer.Option(None, help="DICOM port (env CLOUDFILM_DIMSE__PORT)."),
    mllp_port: int | None = typer.Option(
        None, help="HL7 v2 MLLP port, e.g. 2575 (env CLOUDFILM_HL7__PORT; default off)."
    ),
    role: Role = typer.Option(Role.ALL, help="Which services this process runs."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run the archive: HTTP, DICOM listener, and (with --demo) demo data."""
    _configure_logging(verbose)
    overrides: dict[str, Any] = {}
    if host or http_port:
        overrides["http"] = {k: v for k, v in (("host", host), ("port", http_port)) if v}
    dimse: dict[str, Any] = {}
    if dicom_port is not None:
        dimse["port"] = dicom_port
    if demo:
        dimse["accept_unknown_callers"] = True
    if dimse:
        overrides["dimse"] = dimse
    if mllp_port is not None:
        overrides["hl7"] = {"port": mllp_port}
    settings = _settings(data_dir, **overrides)
    _refuse_open_mllp(settings)
    if demo and settings.environment is Environment.PRODUCTION:
        console.print("[red]--demo is refused in production[/red]")
        raise typer.Exit(2)

    from cloudfilm.archive import recompress, stats
    from cloudfilm.billing import sender as billing
    from cloudfilm.dimse.server import DIMSEServer
    from cloudfilm.notify import service as notify
    from cloudfilm.reports import worker as report_worker
    from cloudfilm.storage.monitor import MonitorLoop

    archive = _open_archive(settings, migrate=False)
    swept = archive.storage.sweep_temporary(settings.storage.temp_max_age_seconds)
    if swept:
        console.print(f"swept {swept} abandoned temporary upload file(s)")
    if demo:
        with archive.db.read_session() as session:
            empty = stats.counts(session=session).instances == 0
        if empty:
            _load_demo(archive)

    credentials = _first_start(archive, demo) if role in (Role.ALL, Role.API) else []

    dimse_server = None
    if role in (Role.ALL, Role.DIMSE):
        dimse_server = DIMSEServer(archive, settings.dimse)
        dimse_server.start()
    hl7_listener = None
    if settings.hl7.port is not None and role in (Role.ALL, Role.DIMSE):
        from cloudfilm.hl7.listener import HL7Listener

        hl7_listener = HL7Listener(archive.db, settings.hl7)
        hl7_listener.start()
    # Every role watches its storage (alarms are raised once, whichever process sees it).
    monitor_loop = MonitorLoop(archive.monitor)
    monitor_loop.start()
    integrity_loops = _start_integrity_loops(archive)
    background = contextlib.ExitStack()  # compression queued by ingest (compression.deferred)
    background.enter_context(recompress.running(archive))
    background.enter_context(billing.running(archive))  # charges to the HIS (billing.delivery)
    background.enter_context(notify.running(archive))  # the SMS / WeChat outbox
    background.enter_context(report_worker.running(archive))  # report PDFs and releases
    tier_runner = None
    if settings.tiers.backends:  # migration and recall jobs, the planner in its windows
        from cloudfilm.archive.tiering import TierRunner

        tier_runner = TierRunner(archive.tiering)
        tier_runner.start()
    url = f"http://{settings.http.host}:{settings.http.port}/"
    _banner(settings, url, role)
    _print_credentials(credentials)
    try:
        if role in (Role.ALL, Role.API) and settings.http.workers > 1:
            given = {**overrides, **({"data_dir": data_dir} if data_dir else {})}
            _HTTPServer.serve_workers(settings, given)
        elif role in (Role.ALL, Role.API):
            from cloudfilm.app import serving_app

            _HTTPServer.serve_app(serving_app(archive), settings)
        else:
            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            signal.signal(signal.SIGINT, lambda *_: stop.set())
            # Wake up regularly: the kernel may deliver the signal to another thread, and
            # Python runs handlers only in the main thread, between waits.
            while not stop.wait(0.5):
                pass
    finally:
        background.close()
        if tier_runner is not None:
            tier_runner.stop()
        for loop in integrity_loops:
            loop.stop()
        monitor_loop.stop()
        if dimse_server is not None:
            dimse_server.stop()
        if hl7_listener is not None:
            hl7_listener.stop()
        archive.close()


def _refuse_open_mllp(settings: Settings) -> None:
    """Plain MLLP carries patient data in clear text: in production it listens on loopback
    only, behind a TLS tunnel (SECURITY-CHECKS H7; docs/hl7.md)."""
    import ipaddress

    hl7 = settings.hl7
    if hl7.port is None or settings.environment is not Environment.PRODUCTION:
        return
    try:
        loopback = ipaddress.ip_address(hl7.host).is_loopback
    except ValueError:
        loopback = hl7.host == "localhost"
    if not loopback:
        console.print(
            f"[red]hl7.host {hl7.host} would expose plain MLLP in production: keep it on "
            "127.0.0.1 and put a TLS tunnel (stunnel, mutual TLS) in front (docs/hl7.md)[/red]"
        )
        raise typer.Exit(2)


def _start_integrity_loops(archive: Any) -> list[Any]:
    """The mirror copier (with a mirror) and the daily scrub, as daemon threads."""
    from cloudfilm.archive import integrity
    from cloudfilm.storage.mirror import PeriodicLoop
    from cloudfilm.storage.tiers import online_backend

    loops = []
    storage = archive.settings.storage
    sync = integrity.mirror_sync(archive)
    if sync is not None:
        copier = PeriodicLoop("mirror-sync", sync.run_once, storage.mirror_sync_interval_seconds)
        online: Any = online_backend(archive.storage)
        online.on_enqueue(copier.wake)
        loops.append(copier)
    if storage.scrub_share_per_day > 0:
        loops.append(PeriodicLoop("storage-scrub", lambda: integrity.scrub_if_due(archive), 3600))
    for loop in loops:
        loop.start()
    return loops


class _HTTPServer:
    """uvicorn, minus its habit of re-raising SIGTERM after a graceful shutdown (which would
    kill the process before the DICOM listener and the database are closed)."""

    @staticmethod
    def serve_app(asgi_app: Any, settings: Settings) -> None:
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                previous = {
                    sig: signal.signal(sig, self.handle_exit)
                    for sig in (signal.SIGINT, signal.SIGTERM)
                }
                try:
                    yield
                finally:
                    for sig, handler in previous.items():
                        signal.signal(sig, handler)

        config = uvicorn.Config(
            asgi_app,
            host=settings.http.host,
            port=settings.http.port,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=20,
        )
        Server(config).run()

    @staticmethod
    def serve_workers(settings: Settings, arguments: dict[str, Any]) -> None:
        """``http.workers`` processes on one listening socket (uvicorn's supervisor, which
        also replaces a worker that dies and restarts them one by one on SIGHUP). Each
        builds its app from ``arguments``, the settings given on the command line."""
        import uvicorn
        from uvicorn.supervisors import Multiprocess

        from cloudfilm.app import WORKER_SETTINGS

        os.environ[WORKER_SETTINGS] = json.dumps(arguments, default=str)
        config = uvicorn.Config(
            "cloudfilm.app:worker_app",
            factory=True,
            host=settings.http.host,
            port=settings.http.port,
            workers=settings.http.workers,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=20,
        )
        sock = config.bind_socket()
        try:
            Multiprocess(config, sockets=[sock]).run()
        finally:
            sock.close()


def _first_start(archive: Any, demo: bool) -> list[Any]:
    """Built-in roles, the first administrators and (demo) two doctors; their one-time
    passwords are returned to be printed once."""
    from cloudfilm.auth.accounts import Accounts
    from cloudfilm.auth.bootstrap import demo_users, first_start

    accounts = Accounts(archive.settings)
    with archive.db.session() as session:
        created = first_start(session, accounts)
        if demo:
            created += demo_users(session, accounts)
    return created


def _print_credentials(credentials: list[Any]) -> None:
    if not credentials:
        return
    lines = [
        "[bold yellow]初始账户（一次性口令，仅显示这一次，首次登录须修改；管理员须绑定认证器）",
        "Initial accounts (one-time passwords, shown only now; change at first login; "
        "administrators enrol an authenticator app):[/bold yellow]",
    ]
    lines += [f"  {c.username:<12} {c.password}   {c.role}" for c in credentials]
    console.print("\n".join(lines), soft_wrap=True, highlight=False)


def _banner(settings: Settings, url: str, role: Role) -> None:
    lines = [f"[bold]云胶片 Cloud Film {__version__}[/bold] ({settings.environment.value})"]
    if role in (Role.ALL, Role.API):
        lines.append(f"  网页 Web:        {url}")
        lines.append(f"  登录 Sign in:    {url}login")
        lines.append(f"  阅片 OHIF:       {url}ohif/")
        lines.append(f"  接口 API docs:   {url}api/docs")
    if role in (Role.ALL, Role.DIMSE):
        lines.append(
            f"  DICOM:           AE {settings.dimse.ae_title} "
            f"{settings.dimse.host}:{settings.dimse.port}"
        )
    lines.append(f"  数据 Data:       {settings.database_url.split('?')[0]}")
    lines.append("  停止 Stop:       Ctrl+C")
    console.print("\n".join(lines), soft_wrap=True)


def _progress() -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def _load_demo(archive: Any) -> None:
    from cloudfilm.archive.demo import load_demo, sample_data_dir

    source = sample_data_dir() or "tests/data (shared sample data not found)"
    console.print(f"loading demo studies from {source} ...")
    start = time.perf_counter()
    results = load_demo(archive)
    stored = sum(1 for r in results if r.ok)
    console.print(f"demo: {stored} objects for 6 patients in {time.perf_counter() - start:.1f} s")
    from cloudfilm.reports.demo import load_demo_reports

    if added := load_demo_reports(archive):
        console.print(f"demo: {added} reports (their PDFs render in `cloudfilm serve`)")


@app.command("import")
def import_(
    paths: list[Path] = typer.Argument(..., help="Files, folders, DICOMDIRs or ZIP archives."),
    data_dir: Path | None = DataDir,
    processes: int = typer.Option(2, help="Worker processes (1 = in this process)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Import DICOM files into the archive and print what happened to each."""
    from cloudfilm.archive.importer import import_paths
    from cloudfilm.audit.service import Actor

    settings = _settings(data_dir)
    archive = _open_archive(settings, migrate=False)
    start = time.perf_counter()
    progress = _progress()
    task = progress.add_task("导入 importing", total=None)
    try:
        with progress if not quiet else _NullContext():
            summary = import_paths(
                archive,
                paths,
                actor=Actor.cli("cloudfilm import"),
                processes=processes,
                on_result=lambda *_: progress.advance(task),
            )
    finally:
        archive.close()
    elapsed = time.perf_counter() - start
    table = Table(title="导入结果 Import summary", show_header=False)
    table.add_row("已导入 imported", str(summary.imported))
    if summary.replaced:
        table.add_row("已替换 replaced", str(summary.replaced))
    table.add_row("重复 duplicates", str(summary.duplicates))
    table.add_row("拒收 rejected", str(len(summary.rejected)))
    table.add_row("跳过 skipped", str(len(summary.skipped)))
    table.add_row("检查 studies", str(len(summary.studies)))
    rate = summary.total / elapsed if elapsed else 0.0
    table.add_row(
        "用时 time",
        f"{elapsed:.1f} s ({rate:.0f} objects/s, "
        f"{summary.bytes_read / 1e6 / max(elapsed, 1e-9):.0f} MB/s)",
    )
    out = Console()
    out.print(table)
    for label, reason in summary.rejected:
        # One line per file, never wrapped: operators grep and copy these paths.
        out.print(f"[red]拒收 rejected[/red] {label}: {reason}", highlight=False, soft_wrap=True)
    for label, reason in summary.skipped:
        out.print(
            f"[yellow]跳过 skipped[/yellow] {label}: {reason}", highlight=False, soft_wrap=True
        )
    if summary.rejected:
        raise typer.Exit(1)


class _NullContext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: object) -> None:
        return None


@app.command()
def demo(
    data_dir: Path | None = DataDir,
    large_ct: int | None = typer.Option(
        None,
        "--large-ct",
        help="Also synthesise an N-image CT (e.g. 1000) from the real 134-slice CT.",
    ),
    output: Path | None = typer.Option(
        None,
        "--output",
        help="With --large-ct: write the files to this folder instead of the archive.",
    ),
) -> None:
    """Load demo patients (Chinese names) with real sample studies."""
    from cloudfilm.archive.demo import CT_134, encode, sample_data_dir, synthesize_large_ct
    from cloudfilm.audit.service import Actor

    if output is None:
        settings = _settings(data_dir)
        archive = _open_archive(settings, migrate=False)
        _load_demo(archive)
    if large_ct is None:
        return
    shared = sample_data_dir()
    if shared is None:
        console.print(
            "[red]--large-ct needs the real 134-slice CT (../shared/data or "
            "CLOUDFILM_SAMPLE_DATA)[/red]"
        )
        raise typer.Exit(2)
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
    actor = Actor.cli("cloudfilm demo --large-ct")
    with _progress() as progress:
        task = progress.add_task(f"合成 synthesising {large_ct}-image CT", total=large_ct)
        for ds in synthesize_large_ct(shared / CT_134, large_ct):
            data = encode(ds)
            if output is not None:
                (output / f"{int(ds.InstanceNumber):05d}.dcm").write_bytes(data)
            else:
                result = archive.ingest(data, actor=actor)
                if not result.ok:
                    console.print(f"[red]{result.reason}[/red]")
                    raise typer.Exit(1)
            progress.advance(task)
    console.print(
        f"synthetic CT: {large_ct} images {'in ' + str(output) if output else 'in the archive'}"
    )


@app.command()
def migrate(
    data_dir: Path | None = DataDir,
    grant_to: str | None = typer.Option(
        None,
        "--grant-to",
        metavar="ROLE",
        help="Then give this PostgreSQL business role row access and nothing more "
        "(env CLOUDFILM_DATABASE__APP_ROLE).",
    ),
) -> None:
    """Create or upgrade the database schema (run with the schema owner's credentials)."""
    from cloudfilm import dbroles, migrations
    from cloudfilm.db import Database

    settings = _settings(data_dir)
    role = grant_to or settings.database.app_role
    db = Database(settings)
    try:
        if role is not None:
            dbroles.check_business_role(db.engine, role)
        migrations.upgrade(db.engine)
        console.print(f"schema at {migrations.current(db.engine)}")
        if role is not None:
            dbroles.grant_business_role(db.engine, role)
            append_only = ", ".join(dbroles.APPEND_ONLY_TABLES)
            console.print(
                f"已授权业务角色 {role}：读写数据行，{append_only} 只可追加 · "
                f"granted {role} row access; {append_only} append-only",
                markup=False,
                soft_wrap=True,
            )
    except dbroles.PrivilegeError as exc:
        console.print(str(exc), style="red", markup=False, soft_wrap=True)
        raise typer.Exit(2) from exc
    finally:
        db.dispose()


@storage_app.command("sweep")
def storage_sweep(
    data_dir: Path | None = DataDir,
    orphan_age_minutes: int = typer.Option(60, help="Only blobs older than this are orphans."),
) -> None:
    """Remove abandoned temporary files and blobs that no index row points to."""
    settings = _settings(data_dir)
    archive = _open_archive(settings, migrate=False)
    try:
        temporary, orphans = archive.sweep(orphan_age=timedelta(minutes=orphan_age_minutes))
    finally:
        archive.close()
    Console().print(f"removed {temporary} temporary file(s) and {orphans} orphan object(s)")


def _size(value: float | None) -> str:
    if value is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


@storage_app.command("report")
def storage_report(
    data_dir: Path | None = DataDir,
    by: str = typer.Option(
        "modality", "--by", help="Rows per 'modality' (default) or per 'study' as well."
    ),
    study: str | None = typer.Option(None, "--study", help="Only this Study Instance UID."),
) -> None:
    """Lossless compression: sizes as received and as stored, and ratios."""
    from cloudfilm.archive import compression

    if by not in ("modality", "study"):
        raise typer.BadParameter("--by is 'modality' or 'study'")
    settings = _settings(data_dir)
    archive = _open_archive(settings, migrate=False)
    try:
        with archive.db.read_session() as session:
            report = compression.report(
                session=session, study_instance_uid=study, by_study=by == "study"
            )
    finally:
        archive.close()
    rows = [("modality", r) for r in report.by_modality]
    rows += [("study", r) for r in report.by_study]
    table = Table(
        "", "key", "instances", "as received", "stored", "ratio", title="压缩 Compression"
    )
    for kind, row in [*rows, ("overall", report.overall)]:
        table.add_row(
            kind,
            row.key or "—",
            str(row.instances),
            _size(row.original_bytes),
            _size(row.stored_bytes),
            f"{row.ratio:.2f}:1",
        )
    codec = settings.compression.codec.value if settings.compression.at_ingest else "off"
    console = Console()
    console.print(table)
    console.print(f"at ingest: {codec}")


@storage_app.command("status")
def storage_status(
    data_dir: Path | None = DataDir,
    check: bool = typer.Option(
        False, "--check", help="Also run one monitor pass: record a sample, raise/clear alarms."
    ),
) -> None:
    """Capacity, used, free, growth per day, days until full, and active alarms."""
    settings = _settings(data_dir)
    archive = _open_archive(settings, migrate=False)
    try:
        monitor = archive.monitor
        statuses = monitor.run_once().statuses if check else monitor.status()
        alarms = monitor.active_alarms()
    finally:
        archive.close()
    table = Table(
        "backend",
        "tier",
        "capacity",
        "used",
        "free",
        "used %",
        "archive",
        "objects",
        "growth/day",
        "days until full",
        "ingest",
        title="存储 Storage",
    )
    for s in statuses:
        table.add_row(
            s.name,
            s.tier,
            _size(s.capacity_bytes),
            _size(s.used_bytes),
            _size(s.free_bytes),
            f"{s.percent_used:.1f}" if s.percent_used is not None else "—",
            _size(s.archive_bytes),
            str(s.instances),
            _size(s.growth_bytes_per_day),
            f"{s.days_until_full:.0f}" if s.days_until_full is not None else "—",
            "accepting" if s.accepting else f"[red]refused[/red] {s.error or ''}".strip(),
        )
    console = Console()
    console.print(table)
    if not alarms:
        console.print("no active alarms · 无告警")
        return
    alarm_table = Table(
        "id",
        "severity",
        "kind",
        "subject",
        "raised",
        "acknowledged",
        "message",
        title="告警 Alarms",
    )
    for a in alarms:
        colour = "red" if a.severity == "critical" else "yellow"
        alarm_table.add_row(
            str(a.id),
            f"[{colour}]{a.severity}[/{colour}]",
            a.kind,
            a.subject,
            a.raised_at.strftime("%Y-%m-%d %H:%M"),
            a.acknowledged_by or "",
            a.message,
        )
    console.print(alarm_table)


@storage_app.command("purge")
def storage_purge(data_dir: Path | None = DataDir) -> None:
    """Remove the bytes of deletions whose time in the recycle bin is over (schedule daily)."""
    from cloudfilm.archive.deletion import purge_due
    from cloudfilm.audit.service import Actor
    from cloudfilm.clock import Clock

    archive = _open_archive(_settings(data_dir), migrate=False)
    try:
        purged = purge_due(
            archive=archive, now=Clock().now(), actor=Actor.cli("cloudfilm storage purge")
        )
    finally:
        archive.close()
    Console().print(f"已清除 {purged} 项到期删除 · purged {purged} due deletion(s)")


@storage_app.command("retention")
def storage_retention(
    apply: bool = typer.Option(
        False, "--apply", help="Move the due studies to the recycle bin (default: list only)."
    ),
    data_dir: Path | None = DataDir,
) -> None:
    """Studies past their retention period (``retention.rules``); --apply deletes them
    with the reason "retention", recoverable for ``retention.recycle_days``."""
    from cloudfilm.archive.deletion import Target, request_deletion, retention_due
    from cloudfilm.audit.service import Actor
    from cloudfilm.clock import Clock

    settings = _settings(data_dir)
    archive = _open_archive(settings, migrate=False)
    now = Clock().now()
    try:
        with archive.db.read_session() as session:
            due = retention_due(session, settings.retention.rules, now)
        table = Table("study", "patient", "date", "modalities", "rule")
        for item in due:
            table.add_row(
                item.study_instance_uid,
                item.patient_id,
                item.study_date,
                item.modalities,
                item.rule,
            )
        Console().print(table)
        if apply:
            actor = Actor.cli("cloudfilm storage retention --apply")
            for item in due:
                with archive.db.session() as session:
                    request_deletion(
                        session=session,
                        target=Target(item.study_instance_uid),
                        reason=f"保留期限届满 · retention period over ({item.rule})",
                        actor=actor,
                        now=now,
                        delay=timedelta(days=settings.retention.recycle_days),
                    )
            Console().print(f"{len(due)} 项检查已移入回收站 · moved to the recycle bin")
    finally:
        archive.close()


def _cli(command: str) -> Any:
    from cloudfilm.audit.service import Actor

    return Actor.cli(command)


@storage_app.command("mirror-sync")
def storage_mirror_sync(data_dir: Path | None = DataDir) -> None:
    """Copy what the mirror (or a damaged primary) still lacks, until nothing is due."""
    from cloudfilm.archive import integrity

    settings = _settings(data_dir)
    archive = _open_archive(settings, migrate=False)
    try:
        sync = integrity.mirror_sync(archive)
        if sync is None:
            Console().print("no mirror configured (storage.mirror_url) · 未配置镜像存储")
            raise typer.Exit(1)
        result = sync.run_until_empty()
        counts = sync.journal.counts()
    finally:
        archive.close()
    console = Console()
    console.print(
        f"copied {result.copied}, already present {result.already_present}, "
        f"dropped {result.dropped} (on neither copy), failed {result.failed}"
    )
    for error in result.errors[:20]:
        console.print(f"  [red]{error}[/red]", markup=True, soft_wrap=True)
    for target, row in counts.items():
        console.print(f"still owed to {target}: {row['pending']} (failing {row['failing']})")
    if result.failed:
        raise typer.Exit(1)


@storage_app.command("compress")
def storage_compress(data_dir: Path | None = DataDir) -> None:
    """Run the background compression jobs that are due now (the server runs them by
    itself; this is for a server that is stopped, or to see the result at once)."""
    from cloudfilm.archive.recompress import Compressor

    archive = _open_archive(_settings(data_dir), migrate=False)
    compressor = Compressor(archive)
    failed = saved = compressed = kept = 0
    try:
        while (result := compressor.run_once()).worked:
            compressed += result.compressed
            kept += result.kept
            failed += result.failed
            saved += result.bytes_before - result.bytes_after
            if result.failed and not (result.compressed or result.kept or result.cleaned):
                break  # only failures left: they wait for their back-off
        pending = compressor.pending()
    finally:
        compressor.close()
        archive.close()
    Console().print(
        f"压缩 compressed {compressed}, 保持原样 kept as received {kept}, 失败 failed "
        f"{failed}, 节省 saved {saved / 1e6:.1f} MB; 待处理 still queued {pending}"
    )
    if failed:
        raise typer.Exit(1)


@storage_app.command("scrub")
def storage_scrub(
    data_dir: Path | None = DataDir,
    share: float | None = typer.Option(
        None, "--share", min=0.0, max=1.0, help="Share of the objects (default: the setting)."
    ),
    all_objects: bool = typer.Option(False, "--all", help="Verify every object."),
) -> None:
    """Re-read objects, check their checksums, repair bad copies from good ones."""
    from cloudfilm.archive import integrity

    settings = _settings(data_dir)
    archive = _open_archive(settings, migrate=False)
    try:
        chosen = None if all_objects else share or settings.storage.scrub_share_per_day
        result = integrity.scrub(archive, share=chosen, actor=_cli("cloudfilm storage scrub"))
    finally:
        archive.close()
    console = Console()
    console.print(
        f"checked {result.checked}: sound {result.sound}, repaired {result.repaired} "
        f"cop(ies), damaged {result.damaged} (no good copy), unreachable {result.unreachable}"
    )
    for problem in result.problems[:50]:
        console.print(f"  {problem['key']}: {problem['problem']}", markup=False, soft_wrap=True)
    if result.damaged:
        raise typer.Exit(2)


@storage_app.command("orphans")
def storage_orphans(
    data_dir: Path | None = DataDir,
    grace_minutes: int = typer.Option(
        60, "--grace-minutes", help="Objects younger than this are never orphans (in flight)."
    ),
    delete: bool = typer.Option(
        False, "--delete", help="Delete the unreferenced objects found (never index rows)."
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Report bytes without index rows and index rows without bytes; --delete removes
    only the unreferenced bytes older than the grace period."""
    import json

    from cloudfilm.archive import integrity

    settings = _settings(data_dir)
    archive = _open_archive(settings, migrate=False)
    try:
        report = integrity.find_orphans(archive, older_than=timedelta(minutes=grace_minutes))
        removed = (
            integrity.remove_orphans(
                archive, report, actor=_cli("cloudfilm storage orphans --delete")
            )
            if delete
            else 0
        )
    finally:
        archive.close()
    console = Console()
    if as_json:
        console.print_json(json.dumps(report.as_dict() | {"removed": removed}))
    else:
        console.print(f"unreferenced objects (older than {grace_minutes} min): "
                      f"{len(report.unreferenced)}")  # fmt: skip
        for copy, info in report.unreferenced:
            console.print(f"  {copy}: {info.key} ({info.size} bytes)", markup=False)
        console.print(f"index rows without bytes: {len(report.missing)}")
        for m in report.missing:
            console.print(f"  {m.study_instance_uid} / {m.sop_instance_uid}: {m.key}", markup=False)
        if delete:
            console.print(f"removed {removed} unreferenced object(s)")
    if report.missing:
        raise typer.Exit(2)


@storage_app.command("integrity")
def storage_integrity(data_dir: Path | None = DataDir) -> None:
    """Last scrub pass, damaged objects, copies owed to the mirror (JSON)."""
    import json

    from cloudfilm.archive import integrity

    settings = _settings(data_dir)
    archive = _open_archive(settings, migrate=False)
    try:
        status = integrity.integrity_status(archive)
    finally:
        archive.close()
    Console().print_json(json.dumps(status))


@client_app.command("create")
def client_create(
    name: str = typer.Argument(..., help="The client id: who the client is, e.g. ris, ohif."),
    scope: list[str] = typer.Option(
        None,
        "--scope",
        help="A permission the client may ask for (repeat); default: all study "
        "permissions (study:search study:read study:download study:store archive:stats).",
    ),
    expires_days: int | None = typer.Option(None, help="The secret stops working after N days."),
    data_dir: Path | None = DataDir,
) -> None:
    """Create a client and print its secret (shown once, stored only as a hash). The client
    trades it for short-lived bearer tokens at POST /api/oauth/token."""
    from cloudfilm.auth import service as auth
    from cloudfilm.clock import Clock
    from cloudfilm.errors import Conflict

    archive = _open_archive(_settings(data_dir), migrate=False)
    now = Clock().now()
    try:
        with archive.db.session() as session:
            client, secret = auth.create_client(
                session=session,
                name=name,
                now=now,
                scopes=scope or None,
                expires_at=now + timedelta(days=expires_days) if expires_days else None,
            )
            scopes = " ".join(client.scopes)
    except Conflict as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    finally:
        archive.close()
    console.print(
        f"client {name!r} created (scopes: {scopes}); its secret, shown only now — "
        "POST /api/oauth/token with grant_type=client_credentials, client_id, client_secret:"
    )
    typer.echo(secret)


@client_app.command("disable")
def client_disable(name: str, data_dir: Path | None = DataDir) -> None:
    """Disable a client: its secret and every token it holds stop working at once."""
    from cloudfilm.auth import service as auth
    from cloudfilm.errors import NotFound

    archive = _open_archive(_settings(data_dir), migrate=False)
    try:
        with archive.db.session() as session:
            auth.set_enabled(session=session, name=name, enabled=False)
    except NotFound as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    finally:
        archive.close()
    console.print(f"client {name!r} disabled")


@client_app.command("webservice-key")
def client_webservice_key(name: str, data_dir: Path | None = DataDir) -> None:
    """Print a client's key for the query WebService's envelopes (key id and the key in
    base64). Hand it to the client's integrator out of band, like its secret."""
    import base64

    from cloudfilm.soap import service as webservice

    settings = _settings(data_dir)
    archive = _open_archive(settings, migrate=False)
    try:
        with archive.db.read_session() as session:
            key = webservice.key_of(session=session, settings=settings, name=name)
    finally:
        archive.close()
    if key is None:
        console.print(f"[red]no client named {name!r}[/red]")
        raise typer.Exit(1)
    typer.echo(f"key_id: {key.key_id}")
    typer.echo(f"key:    {base64.b64encode(key.key).decode('ascii')}")


@client_app.command("list")
def client_list(data_dir: Path | None = DataDir) -> None:
    """List the clients (never their tokens)."""
    from sqlalchemy import select

    from cloudfilm.auth.models import ApiClient

    archive = _open_archive(_settings(data_dir), migrate=False)
    try:
        with archive.db.read_session() as session:
            clients = list(session.scalars(select(ApiClient).order_by(ApiClient.name)))
    finally:
        archive.close()
    table = Table("name", "enabled", "created")
    for client in clients:
        table.add_row(
            client.name,
            "yes" if client.enabled else "no",
            client.created_at.strftime("%Y-%m-%d %H:%M"),
        )
    Console().print(table)


@contextlib.contextmanager
def _accounts_session(data_dir: Path | None) -> Iterator[tuple[Any, Any]]:
    """A write session and the account service; domain errors end the command cleanly."""
    from cloudfilm.auth.accounts import Accounts, WeakPassword
    from cloudfilm.auth.roles import seed_builtin_roles
    from cloudfilm.errors import Conflict, NotFound

    archive = _open_archive(_settings(data_dir), migrate=False)
    accounts = Accounts(archive.settings)
    try:
        with archive.db.session() as session:
            seed_builtin_roles(session, accounts.clock.now())
            yield session, accounts
    except (Conflict, NotFound, WeakPassword) as exc:
        console.print(str(exc), style="red", markup=False, soft_wrap=True)
        raise typer.Exit(1) from exc
    finally:
        archive.close()


def _user_named(session: Any, username: str) -> Any:
    from sqlalchemy import select

    from cloudfilm.auth.models import User
    from cloudfilm.errors import NotFound

    user = session.scalars(select(User).where(User.username == username)).one_or_none()
    if user is None:
        raise NotFound(f"没有此用户 · no user {username!r}")
    return user


def _audit_cli(session: Any, command: str, event: str, username: str) -> None:
    from cloudfilm.audit import service as audit
    from cloudfilm.audit.enums import AuditAction, AuditEventType
    from cloudfilm.audit.service import Actor

    audit.record(
        session=session,
        actor=Actor.cli(command),
        event_type=AuditEventType(event),
        action=AuditAction.UPDATE,
        object_type="user",
        object_id=username,
    )


@user_app.command("create")
def user_create(
    username: str,
    role: list[str] = typer.Option(..., "--role", help="Role code (repeat), e.g. radiologist."),
    display_name: str = typer.Option("", help="Name shown in the pages, e.g. 王医生."),
    department: str | None = typer.Option(None, help="Department code."),
    data_dir: Path | None = DataDir,
) -> None:
    """Create a user with a one-time password (printed once; changed at first login)."""
    with _accounts_session(data_dir) as (session, accounts):
        _, password = accounts.create_user(
            session,
            username=username,
            display_name=display_name,
            department=department,
            roles=role,
        )
        _audit_cli(session, "user create", "user-changed", username)
    console.print(f"用户 {username} 已创建，一次性口令（仅显示这一次）· one-time password:")
    typer.echo(password)


@user_app.command("reset-password")
def user_reset_password(username: str, data_dir: Path | None = DataDir) -> None:
    """Give a user a new one-time password (ends the user's sessions, unlocks)."""
    with _accounts_session(data_dir) as (session, accounts):
        password = accounts.reset_password(session, _user_named(session, username))
        _audit_cli(session, "user reset-password", "password-changed", username)
    console.print(f"用户 {username} 的一次性口令（仅显示这一次）· one-time password:")
    typer.echo(password)


@user_app.command("unlock")
def user_unlock(username: str, data_dir: Path | None = DataDir) -> None:
    """Lift a lockout after failed logins."""
    with _accounts_session(data_dir) as (session, accounts):
        accounts.unlock(_user_named(session, username))
        _audit_cli(session, "user unlock", "user-changed", username)
    console.print(f"用户 {username} 已解锁 · unlocked")


@user_app.command("disable")
def user_disable(username: str, data_dir: Path | None = DataDir) -> None:
    """Disable a user: every session of the user ends at once."""
    with _accounts_session(data_dir) as (session, accounts):
        accounts.set_enabled(session, _user_named(session, username), False)
        _audit_cli(session, "user disable", "user-changed", username)
    console.print(f"用户 {username} 已停用 · disabled")


@user_app.command("list")
def user_list(data_dir: Path | None = DataDir) -> None:
    """List users with their roles (never a password)."""
    from sqlalchemy import select

    from cloudfilm.auth.models import User

    with _accounts_session(data_dir) as (session, accounts):
        table = Table("user", "name", "roles", "enabled", "locked until", "last login")
        for user in session.scalars(select(User).order_by(User.username)):
            roles = ", ".join(r.code for r in accounts.roles_of(session, user.id))
            table.add_row(
                user.username,
                user.display_name,
                roles,
                "yes" if user.enabled else "no",
                f"{user.locked_until:%Y-%m-%d %H:%M}" if user.locked_until else "",
                f"{user.last_login_at:%Y-%m-%d %H:%M}" if user.last_login_at else "",
            )
    Console().print(table)


def _open_audit_db(settings: Settings) -> Any:
    """The database alone, for audit upkeep: no storage, and no least-privilege refusal,
    because a purge on PostgreSQL needs the owner role on purpose."""
    from cloudfilm import migrations
    from cloudfilm.db import Database

    db = Database(settings)
    if db.is_sqlite:
        migrations.upgrade(db.engine)
    else:
        _require_current_schema(db)
    _configure_audit(settings)
    return db


@audit_app.command("verify")
def audit_verify(
    data_dir: Path | None = DataDir,
    expect: str | None = typer.Option(
        None,
        "--expect",
        metavar="SEQ:HASH",
        help="A head printed by an earlier verify and kept elsewhere: also check that it is "
        "still in the chain (a chain alone cannot show that its newest records were deleted).",
    ),
) -> None:
    """Check the audit hash chain: exit 0 when intact, 1 with the first broken link."""
    from cloudfilm.audit.verify import Checkpoint, snapshot, verify

    try:
        checkpoint = Checkpoint.parse(expect) if expect else None
    except ValueError as exc:
        console.print(str(exc), style="red", markup=False)
        raise typer.Exit(2) from exc
    db = _open_audit_db(_settings(data_dir))
    try:
        with snapshot(db) as conn:
            report = verify(conn, checkpoint=checkpoint)
    finally:
        db.dispose()
    if report.broken is not None:
        broken = report.broken
        where = f"seq {broken.seq}" + (f" (id {broken.id})" if broken.id is not None else "")
        console.print(
            f"审计链断裂 / chain broken at {where}: {broken.kind.value}: {broken.message}",
            style="red",
            markup=False,
            soft_wrap=True,
        )
        raise typer.Exit(1)
    out = Console(highlight=False)
    out.print(f"审计链完整 / chain intact: {report.records} records")
    if report.head_seq is not None:
        out.print(
            f"链头 head (keep it for --expect): {report.head_seq}:{report.head_hash}",
            soft_wrap=True,
        )


@audit_app.command("purge")
def audit_purge(
    archive_to: Path = typer.Option(
        ...,
        "--archive-to",
        help="A new file that receives the purged records (JSON Lines, hashes included) "
        "before they are deleted; keep it with the backups.",
    ),
    data_dir: Path | None = DataDir,
) -> None:
    """Remove audit records older than audit.retention_days (at least 180 days).

    The chain is verified first (a broken chain is never purged), the records are written
    to --archive-to, then deleted, and an audit-purged record anchors the chain's new
    start. On PostgreSQL run it with the schema owner's credentials: the application's
    role may insert and read audit records, never delete them.
    """
    from sqlalchemy.exc import DBAPIError

    from cloudfilm.audit.purge import purge
    from cloudfilm.audit.service import Actor
    from cloudfilm.clock import Clock
    from cloudfilm.errors import Conflict

    settings = _settings(data_dir)
    db = _open_audit_db(settings)
    try:
        result = purge(
            db,
            actor=Actor.cli("cloudfilm audit purge"),
            retention_days=settings.audit.retention_days,
            now=Clock().now(),
            archive_to=archive_to,
        )
    except Conflict as exc:
        console.print(str(exc), style="red", markup=False, soft_wrap=True)
        raise typer.Exit(1) from exc
    except DBAPIError as exc:
        console.print(
            f"清理失败 / purge failed: {exc.orig}. On PostgreSQL run it as the schema owner.",
            style="red",
            markup=False,
            soft_wrap=True,
        )
        raise typer.Exit(1) from exc
    finally:
        db.dispose()
    written = f"; written to {result.archive}" if result.archive else ""
    Console(highlight=False).print(
        f"已清理 {result.purged} 条 / purged {result.purged} record(s) older than "
        f"{result.cutoff:%Y-%m-%d %H:%M} UTC{written}"
    )


@app.command("settings")
def settings_command() -> None:
    """Print the reference of every setting (Markdown)."""
    from cloudfilm.config import settings_reference

    typer.echo(settings_reference(), nl=False)


@app.command()
def version() -> None:
    """Print the version."""
    Console().print(__version__)


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
