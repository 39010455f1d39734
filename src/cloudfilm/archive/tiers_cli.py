"""``cloudfilm storage jobs|tier-plan|pin|unpin|recall|migrate|location``: storage tiers
from the command line (:mod:`cloudfilm.archive.tiering`)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

jobs_app = typer.Typer(help="Tier migration and recall jobs.", no_args_is_help=True)
console = Console()
DataDir = typer.Option(None, "--data-dir", envvar="CLOUDFILM_DATA_DIR", help="Data folder.")


@contextmanager
def _tiering(data_dir: Path | None) -> Iterator[Any]:
    from cloudfilm.cli import _open_archive, _settings

    archive = _open_archive(_settings(data_dir), migrate=False)
    try:
        yield archive.tiering
    finally:
        archive.close()


def _fail(exc: Exception) -> typer.Exit:
    console.print(f"[red]{exc}[/red]", soft_wrap=True)
    return typer.Exit(1)


@jobs_app.command("run")
def jobs_run(
    data_dir: Path | None = DataDir,
    once: bool = typer.Option(False, "--once", help="One pass over the due jobs, then exit."),
) -> None:
    """Run due jobs until none is due (waiting out the lease of a runner that died)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    with _tiering(data_dir) as tiering:
        finished = tiering.run_due()
        while not once and tiering.due_count() > 0:
            time.sleep(0.2)
            finished += tiering.run_due()
        waiting = tiering.jobs(states=["queued", "copying", "switching", "cleaning"])
    console.print(f"finished {finished} job(s); {len(waiting)} waiting (back-off or lease)")


@jobs_app.command("list")
def jobs_list(
    data_dir: Path | None = DataDir,
    state: list[str] = typer.Option([], "--state", help="Only these states (repeatable)."),
    limit: int = typer.Option(100, "--limit"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Recent jobs, newest first."""
    with _tiering(data_dir) as tiering:
        jobs = tiering.jobs(states=state or None, limit=limit)
    if as_json:
        console.print_json(json.dumps(jobs))
        return
    table = Table("id", "kind", "study", "from → to", "state", "objects", "attempts", "error")
    for j in jobs:
        table.add_row(
            str(j["id"]), j["kind"], j["study"] or "", f"{j['source']} → {j['target']}",
            j["state"], f"{j['objects_done']}/{j['objects_total']}", str(j["attempts"]),
            (j["last_error"] or "")[:60],
        )  # fmt: skip
    console.print(table)


@jobs_app.command("retry")
def jobs_retry(
    job_id: int | None = typer.Argument(None, help="One job; default: every failed job."),
    data_dir: Path | None = DataDir,
) -> None:
    """Put failed jobs back in the queue (they resume safely from copying)."""
    with _tiering(data_dir) as tiering:
        count = tiering.retry(job_id)
    console.print(f"{count} job(s) queued again")


def tier_plan(
    data_dir: Path | None = DataDir,
    apply: bool = typer.Option(False, "--apply", help="Queue the migrations (default: list)."),
) -> None:
    """Studies the tier policies would migrate now (ignoring schedule windows)."""
    with _tiering(data_dir) as tiering:
        planned = tiering.plan(apply=apply)
    for p in planned:
        job = f" job {p.job_id}" if p.job_id is not None else ""
        console.print(f"{p.study_instance_uid}: {p.source} → {p.target} (policy {p.policy}){job}")
    console.print(f"{len(planned)} stud(ies) {'queued' if apply else 'would be migrated'}")


def pin(study: str = typer.Argument(...), data_dir: Path | None = DataDir) -> None:
    """Keep a study online (recalls what is on a lower tier)."""
    from cloudfilm.errors import CloudFilmError

    with _tiering(data_dir) as tiering:
        try:
            console.print_json(json.dumps(tiering.set_pinned(study, True, "cli")))
        except CloudFilmError as exc:
            raise _fail(exc) from exc


def unpin(study: str = typer.Argument(...), data_dir: Path | None = DataDir) -> None:
    """Let the tier policies move a study again."""
    from cloudfilm.errors import CloudFilmError

    with _tiering(data_dir) as tiering:
        try:
            console.print_json(json.dumps(tiering.set_pinned(study, False, "cli")))
        except CloudFilmError as exc:
            raise _fail(exc) from exc


def recall(study: str = typer.Argument(...), data_dir: Path | None = DataDir) -> None:
    """Queue the recall of a study to the online tier."""
    from cloudfilm.errors import CloudFilmError

    with _tiering(data_dir) as tiering:
        try:
            job = tiering.request_recall(study, "cli")
        except CloudFilmError as exc:
            raise _fail(exc) from exc
    console.print_json(json.dumps({"job": job}))


def migrate(
    study: str = typer.Argument(...),
    target: str = typer.Option(..., "--to", help="Target tier."),
    source: str = typer.Option("online", "--from", help="Source tier."),
    data_dir: Path | None = DataDir,
) -> None:
    """Queue the migration of one study between tiers."""
    from cloudfilm.errors import CloudFilmError

    with _tiering(data_dir) as tiering:
        try:
            job = tiering.migrate(study, source, target, "cli")
        except CloudFilmError as exc:
            raise _fail(exc) from exc
    console.print_json(json.dumps({"job": job}))


def location(study: str = typer.Argument(...), data_dir: Path | None = DataDir) -> None:
    """Which tier holds each series of a study, and its current job."""
    from cloudfilm.errors import CloudFilmError

    with _tiering(data_dir) as tiering:
        try:
            console.print_json(json.dumps(tiering.location(study)))
        except CloudFilmError as exc:
            raise _fail(exc) from exc


def register(storage_app: typer.Typer) -> None:
    """Add the tier commands under ``cloudfilm storage``."""
    storage_app.add_typer(jobs_app, name="jobs")
    storage_app.command("tier-plan")(tier_plan)
    storage_app.command("pin")(pin)
    storage_app.command("unpin")(unpin)
    storage_app.command("recall")(recall)
    storage_app.command("migrate")(migrate)
    storage_app.command("location")(location)
