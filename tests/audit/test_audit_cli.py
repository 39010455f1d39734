"""``cloudfilm audit verify`` and ``cloudfilm audit purge`` as an operator runs them."""

from __future__ import annotations

from pathlib import Path

import pytest
from audit_records import append, rows, tamper
from typer.testing import CliRunner, Result

from cloudfilm.archive.ingest import Archive
from cloudfilm.cli import app


def said(stream: str) -> str:
    """What the command printed, with rich's line wrapping undone."""
    return " ".join(stream.split())


def invoke(archive: Archive, monkeypatch: pytest.MonkeyPatch, *args: str) -> Result:
    if archive.settings.database.url:
        monkeypatch.setenv("CLOUDFILM_DATABASE__URL", archive.settings.database.url)
    return CliRunner().invoke(app, ["audit", *args, "--data-dir", str(archive.settings.data_dir)])


def test_verify__intact_chain_exits_0_with_its_head(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    append(archive, 3)
    result = invoke(archive, monkeypatch, "verify")
    assert result.exit_code == 0, result.output
    assert "审计链完整 / chain intact: 3 records" in said(result.stdout)
    head = f"3:{rows(archive)[-1].hash}"
    assert head in said(result.stdout)
    assert invoke(archive, monkeypatch, "verify", "--expect", head).exit_code == 0


def test_verify__broken_chain_exits_1_naming_the_record(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    append(archive, 4)
    victim = rows(archive)[1]
    tamper(archive, "UPDATE audit_event SET outcome = 12 WHERE seq = 2")
    result = invoke(archive, monkeypatch, "verify")
    assert result.exit_code == 1
    assert f"chain broken at seq 2 (id {victim.id}): modified" in said(result.stderr)


def test_verify__deleted_newest_records_fail_the_checkpoint(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    append(archive, 4)
    head = f"4:{rows(archive)[-1].hash}"
    tamper(archive, "DELETE FROM audit_event WHERE seq = 4")
    result = invoke(archive, monkeypatch, "verify", "--expect", head)
    assert result.exit_code == 1
    assert "truncated" in said(result.stderr)
    assert invoke(archive, monkeypatch, "verify", "--expect", "4-x").exit_code == 2


def test_purge__nothing_due_today(
    archive: Archive, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    append(archive, 2)
    result = invoke(archive, monkeypatch, "purge", "--archive-to", str(tmp_path / "a.jsonl"))
    assert result.exit_code == 0, result.output
    assert "purged 0 record(s)" in said(result.stdout)
    assert [r.event_type for r in rows(archive)] == ["query", "query", "audit-purged"]


def test_purge__refuses_retention_below_six_months(
    archive: Archive, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CLOUDFILM_AUDIT__RETENTION_DAYS", "90")
    result = invoke(archive, monkeypatch, "purge", "--archive-to", str(tmp_path / "a.jsonl"))
    assert result.exit_code == 2
    assert "at least 180 days" in said(result.stderr)


def test_purge__refuses_a_broken_chain(
    archive: Archive, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    append(archive, 3)
    tamper(archive, "DELETE FROM audit_event WHERE seq = 2")
    result = invoke(archive, monkeypatch, "purge", "--archive-to", str(tmp_path / "a.jsonl"))
    assert result.exit_code == 1
    assert "broken at seq 3" in said(result.stderr)
    assert len(rows(archive)) == 2
