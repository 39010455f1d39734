"""When a study was last read (``study.last_accessed_at``), for the tier policies'
``not_accessed_days``.

Retrievals (WADO-RS, WADO-URI, C-MOVE, C-GET) call :func:`note_access`. It is cheap on the
request's path: a dictionary look-up per study, and at most once per hour per study and
process the study is handed to a writer thread. The write is one conditional statement,

    UPDATE study SET last_accessed_at = :now
    WHERE study_instance_uid IN (...)
      AND (last_accessed_at IS NULL OR last_accessed_at < :now - 1 h)

so several processes together still write a study's row at most about once an hour, and
a read never waits for the index's write lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import or_, update

from cloudfilm.archive.models import Study

if TYPE_CHECKING:
    from cloudfilm.archive.ingest import Archive
    from cloudfilm.db import Database

logger = logging.getLogger(__name__)

RESOLUTION = timedelta(hours=1)
"""``last_accessed_at`` is at most this old (and written at most this often per study)."""
_BATCH = 500
_KEEP = 50_000


class AccessLog:
    """The studies read lately, written to ``study.last_accessed_at`` by a writer thread."""

    def __init__(self, db: Database, resolution: timedelta = RESOLUTION) -> None:
        self.db = db
        self.resolution = resolution
        self._noted: dict[str, float] = {}
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def note(self, study_uids: Iterable[str]) -> None:
        """``study_uids`` were read just now (returns at once)."""
        now = time.monotonic()
        seconds = self.resolution.total_seconds()
        with self._lock:
            fresh = {u for u in study_uids if u and now - self._noted.get(u, -seconds) >= seconds}
            if not fresh:
                return
            for uid in fresh:
                self._noted[uid] = now
            self._pending |= fresh
            if len(self._noted) > _KEEP:
                self._noted = {u: t for u, t in self._noted.items() if now - t < seconds}
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="study-access", daemon=True)
                self._thread.start()
        self._wake.set()

    def flush(self) -> int:
        """Write what was noted (and wait for a write under way); rows updated."""
        updated = 0
        with self._write_lock:
            with self._lock:
                uids, self._pending = sorted(self._pending), set()
            now = datetime.now(UTC)
            try:
                for start in range(0, len(uids), _BATCH):
                    batch = uids[start : start + _BATCH]
                    with self.db.session() as session:
                        result = session.execute(
                            update(Study)
                            .where(
                                Study.study_instance_uid.in_(batch),
                                or_(
                                    Study.last_accessed_at.is_(None),
                                    Study.last_accessed_at < now - self.resolution,
                                ),
                            )
                            .values(last_accessed_at=now)
                            .execution_options(synchronize_session=False)
                        )
                        updated += int(result.rowcount)  # type: ignore[attr-defined]
            except Exception:
                logger.exception("could not record the last access of %d studies", len(uids))
                with self._lock:  # noted again at the next read
                    for uid in uids:
                        self._noted.pop(uid, None)
        return updated

    def _loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            self.flush()


def note_access(archive: Archive, study_uids: Iterable[str]) -> None:
    """Record that ``study_uids`` were read (retrieval, not query); cheap, never raises."""
    try:
        archive.tiering.access.note(study_uids)
    except Exception:
        logger.exception("could not note a study access")


__all__ = ["RESOLUTION", "AccessLog", "note_access"]
