"""Retention: purge removes what is due, archives it first and keeps the chain whole (G4)."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from audit_records import append, check, rows, sqlite_archive, tamper
from sqlalchemy import select, text

from cloudfilm.archive.ingest import Archive
from cloudfilm.audit.chain import link_hash
from cloudfilm.audit.enums import AuditEventType
from cloudfilm.audit.models import AuditEvent
from cloudfilm.audit.purge import NO_DELETE_TRIGGER, NO_UPDATE_TRIGGER, purge
from cloudfilm.audit.service import Actor
from cloudfilm.audit.verify import PURGED_THROUGH_HASH, PURGED_THROUGH_SEQ
from cloudfilm.config import Settings
from cloudfilm.errors import Conflict

ACTOR = Actor.cli("cloudfilm audit purge")


def test_purge__nothing_is_due_before_retention(archive: Archive, tmp_path: Path) -> None:
    append(archive, 4)
    result = purge(
        archive.db,
        actor=ACTOR,
        retention_days=180,
        now=datetime.now(UTC) + timedelta(days=179),
        archive_to=tmp_path / "purged.jsonl",
    )
    assert (result.purged, result.through_seq, result.archive) == (0, None, None)
    assert not (tmp_path / "purged.jsonl").exists()
    stored = rows(archive)
    assert [r.seq for r in stored] == [1, 2, 3, 4, 5]
    assert stored[-1].event_type == AuditEventType.AUDIT_PURGED
    assert PURGED_THROUGH_SEQ not in stored[-1].detail
    assert check(archive).ok


def test_purge__removes_the_due_prefix_and_anchors_the_chain(
    archive: Archive, tmp_path: Path
) -> None:
    append(archive, 5)
    time.sleep(0.01)
    split = datetime.now(UTC)
    time.sleep(0.01)
    append(archive, 3, start=5)
    before = rows(archive)
    archived = tmp_path / "audit-2026.jsonl"

    result = purge(
        archive.db,
        actor=ACTOR,
        retention_days=180,
        now=split + timedelta(days=180),
        archive_to=archived,
    )

    assert (result.purged, result.through_seq, result.archive) == (5, 5, archived)
    after = rows(archive)
    assert [r.seq for r in after] == [6, 7, 8, 9]
    anchor = after[-1]
    assert anchor.event_type == AuditEventType.AUDIT_PURGED and anchor.action == "D"
    assert anchor.detail[PURGED_THROUGH_SEQ] == 5
    assert anchor.detail[PURGED_THROUGH_HASH] == before[4].hash == after[0].prev_hash
    report = check(archive)
    assert report.ok and report.first_seq == 6 and report.records == 4

    lines = [json.loads(line) for line in archived.read_text("ascii").splitlines()]
    assert [line["seq"] for line in lines] == [1, 2, 3, 4, 5]
    assert lines[0]["detail"]["姓名"] == "王小明"
    for line in lines:  # the archive verifies on its own
        at = datetime.fromisoformat(line["occurred_at"])
        assert (
            link_hash(line["hash_algorithm"], line["prev_hash"], {**line, "occurred_at": at})
            == (line["hash"])
        )


def test_purge__twice_keeps_the_latest_anchor(archive: Archive, tmp_path: Path) -> None:
    append(archive, 3)
    later = datetime.now(UTC) + timedelta(days=181)
    purge(archive.db, actor=ACTOR, retention_days=180, now=later, archive_to=tmp_path / "1")
    append(archive, 2, start=3)
    purge(
        archive.db,
        actor=ACTOR,
        retention_days=180,
        now=later + timedelta(days=1),
        archive_to=tmp_path / "2",
    )
    stored = rows(archive)
    assert [r.seq for r in stored] == [7]  # the first anchor was purged with the rest
    report = check(archive)
    assert report.ok and report.first_seq == 7


def test_purge__refuses_a_broken_chain(archive: Archive, tmp_path: Path) -> None:
    append(archive, 4)
    tamper(archive, "UPDATE audit_event SET actor_id = 'someone' WHERE seq = 2")
    with pytest.raises(Conflict, match="broken at seq 2"):
        purge(
            archive.db,
            actor=ACTOR,
            retention_days=180,
            now=datetime.now(UTC) + timedelta(days=400),
            archive_to=tmp_path / "purged.jsonl",
        )
    assert len(rows(archive)) == 4
    assert not (tmp_path / "purged.jsonl").exists()


def test_purge__refuses_to_overwrite_an_archive(archive: Archive, tmp_path: Path) -> None:
    append(archive, 2)
    existing = tmp_path / "purged.jsonl"
    existing.write_text("keep me", "utf-8")
    with pytest.raises(Conflict, match="exists"):
        purge(
            archive.db,
            actor=ACTOR,
            retention_days=180,
            now=datetime.now(UTC) + timedelta(days=400),
            archive_to=existing,
        )
    assert existing.read_text("utf-8") == "keep me"
    assert len(rows(archive)) == 2


def test_purge__refuses_less_than_six_months(archive: Archive, tmp_path: Path) -> None:
    append(archive, 2)
    with pytest.raises(ValueError, match="at least 180 days"):
        purge(
            archive.db,
            actor=ACTOR,
            retention_days=179,
            now=datetime.now(UTC) + timedelta(days=400),
            archive_to=tmp_path / "purged.jsonl",
        )
    assert len(rows(archive)) == 2


def test_purge__sqlite_keeps_the_table_append_only(
    sqlite_settings: Settings, tmp_path: Path
) -> None:
    archive = sqlite_archive(sqlite_settings)
    try:
        append(archive, 2)
        purge(
            archive.db,
            actor=ACTOR,
            retention_days=180,
            now=datetime.now(UTC) + timedelta(days=400),
            archive_to=tmp_path / "purged.jsonl",
        )
        with archive.db.read_connection() as conn:
            found = conn.execute(text("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'"))
            triggers = {row.name: row.sql for row in found}
            assert conn.execute(select(AuditEvent.seq)).scalars().all() == [3]
    finally:
        archive.close()
    assert triggers == {
        "audit_event_no_update": NO_UPDATE_TRIGGER,
        "audit_event_no_delete": NO_DELETE_TRIGGER,
    }
