"""audit hash chain, append-only triggers

Adds ``seq``, ``prev_hash``, ``hash`` and ``hash_algorithm`` to ``audit_event`` and chains
the records already stored, in ``id`` order, with SM3 from the genesis hash (64 zeros), so
the whole trail verifies from its first record. On SQLite, triggers then refuse UPDATE
and DELETE of audit records; on PostgreSQL the same guarantee comes from grants (the
application's role may only insert and select).

The serialisation below is a frozen copy of ``cloudfilm.audit.chain`` as of this revision,
so that this migration keeps its meaning whatever the application code becomes.

Revision ID: 1132a829ba0a
Revises: 6a0007d8723b
Create Date: 2026-11-28 10:19:44.016151
"""

import hashlib
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "1132a829ba0a"
down_revision: str | None = "6a0007d8723b"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

GENESIS = "0" * 64
ALGORITHM = "sm3"
HASHED_FIELDS = (
    "seq",
    "occurred_at",
    "event_type",
    "action",
    "outcome",
    "actor_type",
    "actor_id",
    "actor_role",
    "source",
    "object_type",
    "object_id",
    "patient_id",
    "study_instance_uid",
    "request_id",
    "message",
    "detail",
    "hash_algorithm",
)
BATCH = 1000

NO_UPDATE_TRIGGER = (
    "CREATE TRIGGER audit_event_no_update BEFORE UPDATE ON audit_event\n"
    "BEGIN SELECT RAISE(ABORT, 'audit_event is append-only: UPDATE refused'); END"
)
NO_DELETE_TRIGGER = (
    "CREATE TRIGGER audit_event_no_delete BEFORE DELETE ON audit_event\n"
    "BEGIN SELECT RAISE(ABORT, 'audit_event is append-only: DELETE refused'); END"
)

_TEXT_COLUMNS = (
    "event_type",
    "action",
    "actor_type",
    "actor_id",
    "actor_role",
    "source",
    "object_type",
    "object_id",
    "patient_id",
    "study_instance_uid",
    "request_id",
    "message",
)
_CHAIN_COLUMNS = (
    ("seq", sa.BigInteger()),
    ("prev_hash", sa.String(length=64)),
    ("hash", sa.String(length=64)),
    ("hash_algorithm", sa.String(length=16)),
)


def upgrade() -> None:
    with op.batch_alter_table("audit_event", schema=None) as batch_op:
        for name, type_ in _CHAIN_COLUMNS:
            batch_op.add_column(sa.Column(name, type_, nullable=True))
    _chain_existing_records()
    with op.batch_alter_table("audit_event", schema=None) as batch_op:
        for name, type_ in _CHAIN_COLUMNS:
            batch_op.alter_column(name, existing_type=type_, nullable=False)
        batch_op.create_unique_constraint(batch_op.f("uq_audit_event_seq"), ["seq"])
    if op.get_bind().dialect.name == "sqlite":
        op.execute(NO_UPDATE_TRIGGER)
        op.execute(NO_DELETE_TRIGGER)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TRIGGER IF EXISTS audit_event_no_delete")
        op.execute("DROP TRIGGER IF EXISTS audit_event_no_update")
    with op.batch_alter_table("audit_event", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("uq_audit_event_seq"), type_="unique")
        for name, _ in reversed(_CHAIN_COLUMNS):
            batch_op.drop_column(name)


def _chain_existing_records() -> None:
    """Give every stored record its place in the chain, in batches of ``id`` order."""
    conn = op.get_bind()
    table = sa.table(
        "audit_event",
        sa.column("id", sa.BigInteger()),
        sa.column("occurred_at", sa.DateTime(timezone=True)),
        sa.column("outcome", sa.Integer()),
        sa.column("detail", sa.JSON()),
        *(sa.column(name, sa.String()) for name in _TEXT_COLUMNS),
        *(sa.column(name, type_) for name, type_ in _CHAIN_COLUMNS),
    )
    link = sa.update(table).where(table.c.id == sa.bindparam("row_id"))
    prev_hash, seq, after = GENESIS, 0, None
    while True:
        query = sa.select(table).order_by(table.c.id).limit(BATCH)
        if after is not None:
            query = query.where(table.c.id > after)
        rows = conn.execute(query).all()
        links = []
        for row in rows:
            seq += 1
            fields = {**row._asdict(), "seq": seq, "hash_algorithm": ALGORITHM}
            digest = _link_hash(prev_hash, fields)
            links.append(
                {
                    "row_id": row.id,
                    "seq": seq,
                    "prev_hash": prev_hash,
                    "hash": digest,
                    "hash_algorithm": ALGORITHM,
                }
            )
            prev_hash = digest
        if links:
            conn.execute(link, links)
        if len(rows) < BATCH:
            return
        after = rows[-1].id


def _link_hash(prev_hash: str, record: Mapping[str, Any]) -> str:
    document = {name: record[name] for name in HASHED_FIELDS}
    occurred: datetime = record["occurred_at"]
    utc = occurred.replace(tzinfo=UTC) if occurred.tzinfo is None else occurred.astimezone(UTC)
    document["occurred_at"] = utc.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"
    canonical = json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")
    digest = hashlib.new(ALGORITHM)
    digest.update(prev_hash.encode("utf-8"))
    digest.update(canonical)
    return digest.hexdigest()
