"""The audit hash chain on SQLite and PostgreSQL: appends, concurrency, tampering (G3, F2)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from audit_records import ACTOR, TABLE, append, check, rows, sqlite_archive, tamper
from sqlalchemy import create_engine, insert, text
from sqlalchemy.exc import DBAPIError

from cloudfilm import migrations
from cloudfilm.archive.ingest import Archive
from cloudfilm.audit import service as audit
from cloudfilm.audit.chain import GENESIS, HASHED_FIELDS, link_hash
from cloudfilm.audit.purge import NO_DELETE_TRIGGER, NO_UPDATE_TRIGGER
from cloudfilm.audit.verify import BreakKind, Checkpoint, snapshot, verify
from cloudfilm.config import AuditSettings, Settings
from cloudfilm.db import Database, create_db_engine

from conftest import DATA


@pytest.fixture
def reset_algorithm() -> Iterator[None]:
    """Put the process-wide algorithm back to the default after the test."""
    yield
    audit.configure(AuditSettings())


def test_record__chains_consecutive_records_from_genesis(archive: Archive) -> None:
    append(archive, 5)
    stored = rows(archive)
    assert [r.seq for r in stored] == [1, 2, 3, 4, 5]
    assert stored[0].prev_hash == GENESIS
    assert all(b.prev_hash == a.hash for a, b in zip(stored, stored[1:], strict=False))
    assert {r.hash_algorithm for r in stored} == {"sm3"}
    assert all(r.occurred_at.microsecond % 1000 == 0 for r in stored)  # milliseconds
    assert link_hash("sm3", stored[2].prev_hash, stored[2]._asdict()) == stored[2].hash
    report = check(archive)
    assert report.ok and report.records == 5 and report.first_seq == 1
    assert (report.head_seq, report.head_hash) == (5, stored[-1].hash)


def test_record__keeps_the_fields_an_assessor_asks_for(archive: Archive) -> None:
    append(archive, 1)
    row = rows(archive)[0]
    assert (row.actor_type, row.actor_id, row.actor_role, row.source) == (
        "cli",
        "pytest",
        "auditor",
        "10.1.2.3:50000",
    )
    assert (row.event_type, row.action, row.outcome) == ("query", "E", 4)
    assert (row.patient_id, row.study_instance_uid) == ("P0000", "1.2.840.99.0")


def test_record__algorithm_switch_keeps_older_records_verifiable(
    archive: Archive, reset_algorithm: None
) -> None:
    append(archive, 2)
    audit.configure(AuditSettings(hash_algorithm="sha256"))
    append(archive, 2, start=2)
    assert [r.hash_algorithm for r in rows(archive)] == ["sm3", "sm3", "sha256", "sha256"]
    assert check(archive).ok


def test_record__concurrent_writers_chain_in_commit_order(archive: Archive) -> None:
    errors: list[BaseException] = []

    def writer(start: int) -> None:
        try:
            append(archive, 15, start=start)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n * 100,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert [r.seq for r in rows(archive)] == list(range(1, 61))
    report = check(archive)
    assert report.ok and report.records == 60


def test_record__concurrent_writers_with_ingest(archive: Archive) -> None:
    """Audit records of the ingest pipeline and of other writers share one chain."""
    thread = threading.Thread(target=append, args=(archive, 10))
    thread.start()
    for name in ("ct_small.dcm", "mr_small.dcm"):
        assert archive.ingest((DATA / name).read_bytes(), actor=ACTOR).ok
    thread.join()
    assert check(archive).ok


def test_verify__names_a_modified_record(archive: Archive) -> None:
    append(archive, 6)
    tamper(archive, "UPDATE audit_event SET patient_id = 'P9999' WHERE seq = 4")
    broken = check(archive).broken
    assert broken is not None
    assert (broken.kind, broken.seq) == (BreakKind.MODIFIED, 4)
    assert "seq 4" in broken.message


def test_verify__names_a_record_rewritten_with_its_hash(archive: Archive) -> None:
    """Recomputing the hash of the changed record moves the break to the next link."""
    append(archive, 6)
    row = rows(archive)[2]._asdict()
    row["message"] = "nothing happened"
    tamper(
        archive,
        "UPDATE audit_event SET message = :m, hash = :h WHERE seq = 3",
        m=row["message"],
        h=link_hash("sm3", row["prev_hash"], row),
    )
    broken = check(archive).broken
    assert broken is not None
    assert (broken.kind, broken.seq) == (BreakKind.RELINKED, 4)


def test_verify__names_the_gap_of_a_deleted_record(archive: Archive) -> None:
    append(archive, 6)
    tamper(archive, "DELETE FROM audit_event WHERE seq IN (3, 4)")
    broken = check(archive).broken
    assert broken is not None
    assert (broken.kind, broken.seq) == (BreakKind.MISSING, 5)
    assert "records 3..4 are missing" in broken.message


def test_verify__a_deleted_first_record_is_not_a_purge(archive: Archive) -> None:
    append(archive, 3)
    tamper(archive, "DELETE FROM audit_event WHERE seq = 1")
    broken = check(archive).broken
    assert broken is not None
    assert (broken.kind, broken.seq) == (BreakKind.UNANCHORED, 2)


def test_verify__detects_a_forged_record(archive: Archive) -> None:
    append(archive, 3)
    head = rows(archive)[-1]
    forged = {name: getattr(head, name) for name in HASHED_FIELDS}
    forged.update(seq=4, prev_hash=head.hash, hash="ab" * 32, message="forged")
    with archive.db.engine.begin() as conn:
        conn.execute(insert(TABLE), forged)
    broken = check(archive).broken
    assert broken is not None
    assert (broken.kind, broken.seq) == (BreakKind.MODIFIED, 4)


def test_verify__detects_a_record_forged_into_a_gap(archive: Archive) -> None:
    append(archive, 3)
    head = rows(archive)[-1]
    forged = {name: getattr(head, name) for name in HASHED_FIELDS}
    forged.update(seq=9, prev_hash=head.hash)
    forged["hash"] = link_hash("sm3", head.hash, forged)
    with archive.db.engine.begin() as conn:
        conn.execute(insert(TABLE), forged)
    broken = check(archive).broken
    assert broken is not None
    assert (broken.kind, broken.seq) == (BreakKind.MISSING, 9)


def test_verify__checkpoint_catches_deleted_newest_records(archive: Archive) -> None:
    append(archive, 5)
    report = check(archive)
    assert report.head_seq is not None and report.head_hash is not None
    noted = Checkpoint(report.head_seq, report.head_hash)
    assert check(archive, noted).ok
    tamper(archive, "DELETE FROM audit_event WHERE seq >= 4")
    assert check(archive).ok  # the chain alone cannot tell
    broken = check(archive, noted).broken
    assert broken is not None
    assert (broken.kind, broken.seq) == (BreakKind.TRUNCATED, 5)
    assert "4..5 were deleted" in broken.message


def test_checkpoint__parses_what_verify_prints() -> None:
    assert Checkpoint.parse("12:" + "AB" * 32) == Checkpoint(12, "ab" * 32)
    with pytest.raises(ValueError, match="SEQ:HASH"):
        Checkpoint.parse("12-abc")


def test_sqlite__update_and_delete_refused_by_triggers(sqlite_settings: Settings) -> None:
    archive = sqlite_archive(sqlite_settings)
    try:
        append(archive, 2)
        for statement in (
            "UPDATE audit_event SET message = 'x' WHERE seq = 1",
            "DELETE FROM audit_event WHERE seq = 2",
        ):
            with pytest.raises(DBAPIError, match="append-only"):
                with archive.db.engine.begin() as conn:
                    conn.execute(text(statement))
        assert check(archive).ok and len(rows(archive)) == 2
    finally:
        archive.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_migration__chains_records_stored_before_it(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    engine = _empty_database(backend, tmp_path, request)
    migrations.upgrade(engine, "6a0007d8723b")
    old_records = [
        {
            "at": f"2026-01-01 08:{i // 60 % 60:02d}:{i % 60:02d}.123456",
            "message": f"旧记录 {i}",
            "detail": f'{{"n": {i}}}',
        }
        for i in range(2500)  # more than one batch of the migration
    ]
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO audit_event (occurred_at, event_type, action, outcome, actor_type, "
                "actor_id, message, detail) VALUES (:at, 'query', 'E', 0, 'cli', 'old', "
                ":message, :detail)"
            ),
            old_records,
        )
    migrations.upgrade(engine)
    settings = Settings(data_dir=tmp_path, database={"url": engine.url.render_as_string(False)})
    engine.dispose()
    db = Database(settings)
    try:
        with snapshot(db) as conn:
            report = verify(conn)
        assert report.ok and report.records == 2500 and report.first_seq == 1
        if db.is_sqlite:
            with db.read_connection() as conn:
                found = conn.execute(
                    text("SELECT name, sql FROM sqlite_master WHERE type = 'trigger'")
                )
                triggers = {row.name: row.sql for row in found}
            assert triggers == {
                "audit_event_no_update": NO_UPDATE_TRIGGER,
                "audit_event_no_delete": NO_DELETE_TRIGGER,
            }
    finally:
        db.dispose()


def _empty_database(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    if backend == "sqlite":
        return create_db_engine(Settings(data_dir=tmp_path))
    admin = create_engine(request.getfixturevalue("postgres_url"), isolation_level="AUTOCOMMIT")
    name = "cf_audit_" + tmp_path.name[-8:].replace("-", "_").lower()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
                {"n": name},
            )
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()

    request.addfinalizer(drop)
    return create_engine(admin.url.set(database=name))
