"""Write audit events in the caller's transaction (Dispatch's ``log_case_event``), each
chained to the one before it (:mod:`cloudfilm.audit.chain`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Connection, Table, insert, select, text
from sqlalchemy.orm import Session

from cloudfilm.audit.chain import GENESIS, link_hash
from cloudfilm.audit.enums import ActorType, AuditAction, AuditEventType, AuditOutcome
from cloudfilm.audit.models import AuditEvent
from cloudfilm.config import AuditSettings


@dataclass(frozen=True, slots=True)
class Actor:
    """Who acts: a user, a calling AE, the command line or the system itself."""

    type: ActorType
    id: str
    source: str | None = None
    role: str | None = None
    request_id: str | None = None

    @classmethod
    def ae(cls, aet: str, address: str | None) -> Actor:
        return cls(ActorType.AE, aet or "(empty AE title)", source=address)

    @classmethod
    def cli(cls, command: str, source: str | None = None) -> Actor:
        return cls(ActorType.CLI, command, source=source)

    @classmethod
    def system(cls, component: str) -> Actor:
        return cls(ActorType.SYSTEM, component)


_TABLE = cast(Table, AuditEvent.__table__)
_INSERT = insert(_TABLE)
_HEAD = select(_TABLE.c.seq, _TABLE.c.hash).order_by(_TABLE.c.seq.desc()).limit(1)

#: PostgreSQL advisory lock that puts appends to the chain in line (the bytes "cfaudit1").
CHAIN_LOCK_KEY = 0x6366617564697431
_LOCK = text("SELECT pg_advisory_xact_lock(:key)")


class _Chain:
    """The digest this process chains new records with (``audit.hash_algorithm``)."""

    algorithm = AuditSettings().hash_algorithm.value


def configure(settings: AuditSettings) -> None:
    """Chain this process's new records with ``settings.hash_algorithm``.

    Called where the process opens its archive. A process-wide value rather than an
    argument of :func:`record`, so that the many callers of ``record`` need no settings;
    each record stores its algorithm, so verification never depends on this value.
    """
    _Chain.algorithm = settings.hash_algorithm.value


def record(
    *,
    session: Session | Connection,
    actor: Actor,
    event_type: AuditEventType,
    action: AuditAction,
    outcome: AuditOutcome = AuditOutcome.SUCCESS,
    object_type: str | None = None,
    object_id: str | None = None,
    patient_id: str | None = None,
    study_instance_uid: str | None = None,
    source: str | None = None,
    message: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Insert one audit event in ``session``'s transaction (an ORM session or a Core
    connection in a transaction): it commits with the change it describes, or not at all.

    The event is appended to the hash chain: it reads the newest record (one indexed
    read) and links to it. On PostgreSQL appends wait in line on an advisory lock that
    is held until the caller's transaction ends, so that ``seq`` follows commit order;
    on SQLite writers are serialised already. Call it last in a transaction, so that
    nothing else waits behind the lock. Two appends that raced anyway (a caller in a
    read-only SQLite transaction) fail on the unique ``seq`` rather than fork the chain.
    """
    conn = session if isinstance(session, Connection) else session.connection()
    if conn.dialect.name == "postgresql":
        conn.execute(_LOCK, {"key": CHAIN_LOCK_KEY})
    head = conn.execute(_HEAD).one_or_none()
    origin = source or actor.source
    now = datetime.now(UTC)
    algorithm = _Chain.algorithm
    row: dict[str, Any] = {
        "seq": head.seq + 1 if head is not None else 1,
        "prev_hash": head.hash if head is not None else GENESIS,
        "hash_algorithm": algorithm,
        # Milliseconds: what the record promises (G2), and exact in both databases.
        "occurred_at": now.replace(microsecond=now.microsecond // 1000 * 1000),
        "event_type": event_type.value,
        "action": action.value,
        "outcome": int(outcome),
        "actor_type": actor.type.value,
        "actor_id": actor.id[:128],
        "actor_role": actor.role,
        "source": origin[-255:] if origin else None,
        "object_type": object_type,
        "object_id": object_id,
        "patient_id": patient_id,
        "study_instance_uid": study_instance_uid,
        "request_id": actor.request_id,
        "message": message[:1024] if message else None,
        "detail": detail,
    }
    row["hash"] = link_hash(algorithm, row["prev_hash"], row)
    conn.execute(_INSERT, row)
