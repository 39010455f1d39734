"""The hash chain over audit records: what is hashed, and how.

``hash = H(prev_hash || canonical(record))`` where ``prev_hash`` is the hex digest of the
record before (64 zeros for the first record ever), ``canonical`` is the record's fields
as compact JSON with sorted keys and ASCII escapes, and ``H`` is SM3 (GB/T 32905) or
SHA-256, named per record in ``hash_algorithm``. Because the sequence number and the
previous hash are inside the digest, changing, removing or inserting a row breaks the
chain at that row; because the algorithm name is inside too, a record cannot be
re-labelled to a weaker digest.

This serialisation is a stored contract: every record ever written is verified with it.
Changing it (a new field, another timestamp format) needs a new ``hash_algorithm`` value
that names the new form, never an edit of this one. The migration that introduced the
chain (revision ``1132a829ba0a``) holds a frozen copy of it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

#: ``prev_hash`` of the first record of a chain that was never purged.
GENESIS = "0" * 64

#: Digests a record may be chained with (both 256-bit: 64 hex characters).
ALGORITHMS = frozenset({"sm3", "sha256"})

#: The fields under the hash, in the record's own column names. ``id`` is left out: the
#: database assigns it after the hash is computed, and ``seq`` identifies the record.
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


def timestamp(value: datetime) -> str:
    """``occurred_at`` as hashed: UTC, microseconds, ``Z``.

    SQLite hands back naive datetimes (the value written was UTC), PostgreSQL aware ones
    in the session's zone; both must hash alike.
    """
    utc = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return utc.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def canonical(record: Mapping[str, Any]) -> bytes:
    """The bytes of ``record`` that its hash covers."""
    document = {name: record[name] for name in HASHED_FIELDS}
    document["occurred_at"] = timestamp(record["occurred_at"])
    return json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def link_hash(algorithm: str, prev_hash: str, record: Mapping[str, Any]) -> str:
    """The hash of ``record`` chained to ``prev_hash``.

    Raises
    ------
    ValueError
        For an algorithm that is not in :data:`ALGORITHMS`.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown audit hash algorithm {algorithm!r}")
    digest = hashlib.new(algorithm)
    digest.update(prev_hash.encode("utf-8"))
    digest.update(canonical(record))
    return digest.hexdigest()
