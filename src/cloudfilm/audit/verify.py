"""Walk the audit chain and report the first broken link (G3).

The walk reads the records in ``seq`` order in batches, so memory stays flat however long
the trail is. A record whose stored hash differs from the recomputed one was modified; a
jump in ``seq`` means records were deleted; a ``prev_hash`` that is not the hash of the
record before means a record was rewritten together with its hash, or one was slipped in.
A chain that does not start at ``seq`` 1 must start where an ``audit-purged`` record says
a purge ended (:mod:`cloudfilm.audit.purge`).

What a chain alone cannot show is the loss of its newest records: nothing comes after
them. Note the head that ``cloudfilm audit verify`` prints somewhere else and pass it back
as a checkpoint (``--expect SEQ:HASH``) to cover them too.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, cast

from sqlalchemy import Connection, Row, Table, select

from cloudfilm.audit.chain import ALGORITHMS, GENESIS, link_hash
from cloudfilm.audit.enums import AuditEventType
from cloudfilm.audit.models import AuditEvent
from cloudfilm.db import Database

_TABLE = cast(Table, AuditEvent.__table__)
_BATCH = 1000

#: ``detail`` keys of an ``audit-purged`` record: the last record the purge removed.
PURGED_THROUGH_SEQ = "purged_through_seq"
PURGED_THROUGH_HASH = "purged_through_hash"


class BreakKind(StrEnum):
    MODIFIED = "modified"
    """The stored hash is not the hash of the record's fields."""
    MISSING = "missing"
    """``seq`` jumps: the records in between were deleted."""
    RELINKED = "relinked"
    """``prev_hash`` is not the previous record's hash: it was rewritten or this one forged."""
    UNANCHORED = "unanchored"
    """The chain starts after ``seq`` 1 and no purge record explains the records before."""
    TRUNCATED = "truncated"
    """A checkpoint noted earlier is no longer in the chain, or has another hash."""


@dataclass(frozen=True, slots=True)
class ChainBreak:
    kind: BreakKind
    seq: int
    """The record at which the chain breaks (for ``missing``: the first after the gap)."""
    id: int | None
    message: str


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A head noted earlier: record ``seq`` had ``hash``."""

    seq: int
    hash: str

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        """``SEQ:HASH`` as ``cloudfilm audit verify`` prints it."""
        seq, sep, digest = text.strip().partition(":")
        if not sep or not seq.isdigit() or len(digest) != 64:
            raise ValueError(f"{text!r}: expected SEQ:HASH, e.g. 1234:9f86d08188...")
        return cls(int(seq), digest.lower())


@dataclass(frozen=True, slots=True)
class ChainReport:
    records: int
    first_seq: int | None
    head_seq: int | None
    head_hash: str | None
    broken: ChainBreak | None

    @property
    def ok(self) -> bool:
        return self.broken is None


def verify(conn: Connection, *, checkpoint: Checkpoint | None = None) -> ChainReport:
    """Check the whole chain as ``conn`` sees it; ``conn`` should come from
    :func:`snapshot`."""
    anchors = _purge_anchors(conn)
    records, first, previous = 0, None, None
    for row in iter_chain(conn):
        broken = _check(row, previous, anchors)
        if broken is not None:
            return ChainReport(records, first, _seq(previous), _hash(previous), broken)
        records += 1
        first = row.seq if first is None else first
        previous = row
    report = ChainReport(records, first, _seq(previous), _hash(previous), None)
    if checkpoint is not None:
        return _check_checkpoint(conn, report, checkpoint)
    return report


@contextmanager
def snapshot(db: Database) -> Iterator[Connection]:
    """A read connection that sees one state of the table across all its statements, so
    that a purge committing during a walk cannot look like a gap: REPEATABLE READ on
    PostgreSQL; on SQLite a read transaction is one snapshot already."""
    with db.read_connection() as conn:
        if conn.dialect.name == "postgresql":
            conn.execution_options(isolation_level="REPEATABLE READ")
        yield conn


def iter_chain(conn: Connection, *, through_seq: int | None = None) -> Iterator[Row[Any]]:
    """Every record in ``seq`` order (up to ``through_seq``), read in batches."""
    after = None
    while True:
        query = select(_TABLE).order_by(_TABLE.c.seq).limit(_BATCH)
        if after is not None:
            query = query.where(_TABLE.c.seq > after)
        if through_seq is not None:
            query = query.where(_TABLE.c.seq <= through_seq)
        rows = conn.execute(query).all()
        yield from rows
        if len(rows) < _BATCH:
            return
        after = rows[-1].seq


def _purge_anchors(conn: Connection) -> dict[int, tuple[int, str]]:
    """``purged_through_seq`` → (seq of the purge record, ``purged_through_hash``)."""
    rows = conn.execute(
        select(_TABLE.c.seq, _TABLE.c.detail).where(
            _TABLE.c.event_type == AuditEventType.AUDIT_PURGED.value
        )
    )
    anchors: dict[int, tuple[int, str]] = {}
    for seq, detail in rows:
        if isinstance(detail, Mapping) and isinstance(detail.get(PURGED_THROUGH_SEQ), int):
            anchors[detail[PURGED_THROUGH_SEQ]] = (seq, str(detail.get(PURGED_THROUGH_HASH)))
    return anchors


def _check(
    row: Row[Any], previous: Row[Any] | None, anchors: Mapping[int, tuple[int, str]]
) -> ChainBreak | None:
    if previous is None:
        broken = _check_start(row, anchors)
    elif row.seq != previous.seq + 1:
        broken = ChainBreak(
            BreakKind.MISSING,
            row.seq,
            row.id,
            f"records {previous.seq + 1}..{row.seq - 1} are missing: deleted after "
            f"seq {previous.seq}",
        )
    elif row.prev_hash != previous.hash:
        broken = ChainBreak(
            BreakKind.RELINKED,
            row.seq,
            row.id,
            f"seq {row.seq} does not link to seq {previous.seq}: seq {previous.seq} was "
            f"rewritten together with its hash, or seq {row.seq} was inserted",
        )
    else:
        broken = None
    return broken or _check_hash(row)


def _check_start(row: Row[Any], anchors: Mapping[int, tuple[int, str]]) -> ChainBreak | None:
    if row.seq == 1:
        if row.prev_hash == GENESIS:
            return None
        return ChainBreak(
            BreakKind.RELINKED, 1, row.id, "seq 1 does not start from the genesis hash"
        )
    anchor = anchors.get(row.seq - 1)
    if anchor is not None and anchor[0] > row.seq - 1 and anchor[1] == row.prev_hash:
        return None
    return ChainBreak(
        BreakKind.UNANCHORED,
        row.seq,
        row.id,
        f"the chain starts at seq {row.seq} but no audit purge removed records "
        f"1..{row.seq - 1}: they were deleted",
    )


def _check_hash(row: Row[Any]) -> ChainBreak | None:
    if row.hash_algorithm not in ALGORITHMS:
        return ChainBreak(
            BreakKind.MODIFIED,
            row.seq,
            row.id,
            f"seq {row.seq} names an unknown hash algorithm {row.hash_algorithm!r}",
        )
    if link_hash(row.hash_algorithm, row.prev_hash, row._asdict()) != row.hash:
        return ChainBreak(
            BreakKind.MODIFIED,
            row.seq,
            row.id,
            f"seq {row.seq} (id {row.id}) was modified: its fields do not match its hash",
        )
    return None


def _check_checkpoint(conn: Connection, report: ChainReport, checkpoint: Checkpoint) -> ChainReport:
    """The noted record must still be there with its hash, unless a purge took it (an intact
    chain that starts after it starts at a purge anchor)."""
    if report.first_seq is not None and checkpoint.seq < report.first_seq:
        return report
    row = conn.execute(
        select(_TABLE.c.id, _TABLE.c.hash).where(_TABLE.c.seq == checkpoint.seq)
    ).one_or_none()
    if row is not None and row.hash == checkpoint.hash:
        return report
    message = (
        f"checkpoint seq {checkpoint.seq} is gone: the newest records "
        f"{(report.head_seq or 0) + 1}..{checkpoint.seq} were deleted"
        if row is None
        else f"seq {checkpoint.seq} no longer has the hash noted in the checkpoint: the "
        "chain was rewritten from there on"
    )
    broken = ChainBreak(BreakKind.TRUNCATED, checkpoint.seq, row.id if row else None, message)
    return ChainReport(report.records, report.first_seq, report.head_seq, report.head_hash, broken)


def _seq(row: Row[Any] | None) -> int | None:
    return None if row is None else int(row.seq)


def _hash(row: Row[Any] | None) -> str | None:
    return None if row is None else str(row.hash)
