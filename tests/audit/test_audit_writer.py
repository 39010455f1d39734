"""The audit writer of HTTP requests (httpaudit.AuditWriter): group commit keeps one
record per request and an intact chain; a record that cannot be written means no answer."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
from sqlalchemy import select, text

from cloudfilm.audit.models import AuditEvent
from cloudfilm.audit.verify import verify

from conftest import LiveServer


def test_concurrent_requests__one_record_each_and_the_chain_holds(
    live_server: LiveServer,
) -> None:
    url = f"{live_server.url}/dicom-web/studies"

    def search(number: int) -> str:
        answer = httpx.get(url, headers={**live_server.headers, "X-Request-ID": f"r{number}"})
        assert answer.status_code in (200, 204)
        return answer.headers["x-request-id"]

    with ThreadPoolExecutor(16) as pool:
        ids = set(pool.map(search, range(64)))
    assert len(ids) == 64
    with live_server.archive.db.read_session() as session:
        recorded = session.scalars(
            select(AuditEvent.request_id).where(AuditEvent.request_id.in_(ids))
        ).all()
    assert sorted(recorded) == sorted(ids)
    with live_server.archive.db.read_connection() as conn:
        assert verify(conn).ok


def test_record_not_written__no_answer_then_recovers(live_server: LiveServer) -> None:
    """The audit table is away (renamed, a real database error): no answer goes out; once
    it is back, the writer recovers on a fresh connection."""
    url = f"{live_server.url}/dicom-web/studies"
    engine = live_server.archive.db.engine
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE audit_event RENAME TO audit_event_away"))
    try:
        answer = httpx.get(url, headers=live_server.headers)
    finally:
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE audit_event_away RENAME TO audit_event"))
    assert answer.status_code == 500
    assert "00100010" not in answer.text  # nothing of the search went out
    assert httpx.get(url, headers=live_server.headers).status_code in (200, 204)
