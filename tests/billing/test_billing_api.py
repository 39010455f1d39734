"""``/api/billing`` over a live server: a finance user imports the HIS list (raw body and
multipart; a refused file is audited), lists charges, reconciles and exports; a user
without ``billing:reconcile`` gets 403; the command line does the same."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
import uvicorn
from billing_helpers import MakeArchive, deliver, make_archive_fixture  # noqa: F401
from openpyxl import load_workbook
from sqlalchemy import select
from typer.testing import CliRunner

from cloudfilm.app import create_app
from cloudfilm.archive.ingest import Archive
from cloudfilm.audit.models import AuditEvent
from cloudfilm.billing.cli import billing_app
from cloudfilm.clock import MovableClock

from auth_helpers import make_user, signed_in
from conftest import LiveServer, client_token, free_port

CSV = (
    "检查号,患者ID,收费项目编码,金额,科室,收费时间\r\n"
    "ACC1,P1,CF001,20.00,放射科,2026-11-20 10:00:00\r\n"
    "ACC2,P2,CF001,30.00,放射科,2026-11-20 11:00:00\r\n"
    "ACC3,P3,CF001,abc,放射科,2026-11-20 11:00:00\r\n"
    "ACC9,P9,CF001,20.00,超声科,2026-11-21 11:00:00\r\n"
)


@pytest.fixture
def server(make_archive: MakeArchive) -> Iterator[LiveServer]:
    archive = make_archive(enabled=True, price="20.00", item_code="CF001")
    clock = MovableClock()
    app = create_app(archive, clock=clock)
    port = free_port()
    uv = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    token = client_token(archive, clock)
    yield LiveServer(f"http://127.0.0.1:{port}", archive, token, app.state.accounts, clock)
    uv.should_exit = True
    thread.join(timeout=10)


def _events(archive: Archive, event_type: str) -> list[AuditEvent]:
    with archive.db.read_session() as session:
        rows = list(session.scalars(select(AuditEvent).where(AuditEvent.event_type == event_type)))
        session.expunge_all()
    return rows


def _exams(archive: Archive) -> None:
    at = datetime(2026, 11, 20, 1, 0, tzinfo=UTC)  # 09:00 China time
    deliver(archive, "1.1", accession="ACC1", patient="P1", at=at)
    deliver(archive, "1.2", accession="ACC2", patient="P2", at=at)
    deliver(archive, "1.4", accession="ACC4", patient="P4", at=at)


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)  # HTTP, not SQL
def test_api__finance_imports_reconciles_exports(server: LiveServer) -> None:
    _exams(server.archive)
    make_user(server, "cashier", ["finance"])
    headers = signed_in(server, "cashier")
    url = f"{server.url}/api/billing"

    refused = httpx.post(f"{url}/imports?file_name=scan.pdf", content=b"%PDF-1.7\n",
                         headers=headers)  # fmt: skip
    assert refused.status_code == 400
    assert "不是 CSV 或 XLSX 文件 · the file is not CSV or XLSX" in refused.json()["message"]
    [audited] = _events(server.archive, "billing-import-refused")
    assert audited.outcome != 0 and audited.detail["file_name"] == "scan.pdf"

    imported = httpx.post(
        f"{url}/imports", headers=headers,
        files={"file": ("his.csv", CSV.encode("gb18030"), "text/csv")},
    )  # fmt: skip
    assert imported.status_code == 201, imported.text
    body = imported.json()
    assert (body["kept"], body["rejected"], body["file_name"]) == (3, 1, "his.csv")
    assert body["errors"][0]["line"] == 4 and "amount 'abc'" in body["errors"][0]["message"]
    again = httpx.post(f"{url}/imports?file_name=again.csv", content=CSV.encode("gb18030"),
                       headers=headers)  # fmt: skip
    assert again.status_code == 409

    charges = httpx.get(f"{url}/charges?from=2026-11-20&to=2026-11-20", headers=headers)
    assert charges.status_code == 200
    assert sorted(c["accession_number"] for c in charges.json()["charges"]) == [
        "ACC1", "ACC2", "ACC4"
    ]  # fmt: skip

    reconciled = httpx.get(f"{url}/reconciliation?from=2026-11-20&to=2026-11-21",
                           headers=headers)  # fmt: skip
    assert reconciled.status_code == 200
    rows = reconciled.json()["rows"]
    assert [r["accession_number"] for r in rows["matched"]] == ["ACC1"]
    assert [r["accession_number"] for r in rows["amount-mismatch"]] == ["ACC2"]
    assert [r["accession_number"] for r in rows["delivered-not-charged"]] == ["ACC4"]
    assert [r["accession_number"] for r in rows["charged-not-delivered"]] == ["ACC9"]
    assert reconciled.json()["by_department"]["超声科"]["his_amount"] == "20.00"
    assert httpx.get(f"{url}/reconciliation?from=2026-11-21&to=2026-11-20",
                     headers=headers).status_code == 400  # fmt: skip

    exported = httpx.get(f"{url}/reconciliation.xlsx?from=2026-11-20&to=2026-11-21",
                         headers=headers)  # fmt: skip
    assert exported.status_code == 200
    assert exported.headers["content-type"].startswith("application/vnd.openxmlformats")
    book = load_workbook(io.BytesIO(exported.content))
    assert book["金额不符 Amount mismatch"]["C2"].value == "ACC2"
    assert book["金额不符 Amount mismatch"]["H2"].value == 10.0

    for event_type in ("billing-imported", "billing-reconciled", "billing-exported"):
        [event] = _events(server.archive, event_type)  # one record per request (G1)
        assert event.actor_id == "cashier" and event.outcome == 0
    [imported_event] = _events(server.archive, "billing-imported")
    assert imported_event.detail["kept"] == 3 and imported_event.object_id == str(body["batch_id"])


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_api__upload_over_the_limit_refused(make_archive: MakeArchive) -> None:
    archive = make_archive(import_max_bytes=1024)
    clock = MovableClock()
    app = create_app(archive, clock=clock)
    port = free_port()
    uv = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    try:
        while not uv.started:
            time.sleep(0.02)
        server = LiveServer(f"http://127.0.0.1:{port}", archive, "", app.state.accounts, clock)
        make_user(server, "cashier", ["finance"])
        big = CSV.encode() + b"ACC,P,CF001,1,X,2026-11-20\r\n" * 4000
        response = httpx.post(f"{server.url}/api/billing/imports", content=big,
                              headers=signed_in(server, "cashier"))  # fmt: skip
        assert response.status_code == 400 and "import_max_bytes" in response.json()["message"]
        [refused] = _events(archive, "billing-import-refused")
        assert refused.detail["reason"] == "too large"
    finally:
        uv.should_exit = True
        thread.join(timeout=10)


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_api__without_permission_403(server: LiveServer) -> None:
    make_user(server, "doctor", ["radiologist"])
    headers = signed_in(server, "doctor")
    url = f"{server.url}/api/billing"
    days = "from=2026-11-20&to=2026-11-20"
    for method, path in [("GET", "/charges"), ("POST", "/imports"),
                         ("GET", f"/reconciliation?{days}"),
                         ("GET", f"/reconciliation.xlsx?{days}")]:  # fmt: skip
        response = httpx.request(method, url + path, headers=headers, content=CSV.encode())
        assert response.status_code == 403, (path, response.text)
        assert httpx.request(method, url + path).status_code == 401
        # An integration client's token never carries billing:reconcile.
        assert httpx.request(method, url + path, headers=server.headers).status_code == 403
    assert _events(server.archive, "billing-imported") == []


def test_cli__import_and_reconcile(make_archive: MakeArchive, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    archive = make_archive(enabled=True, price="20.00", item_code="CF001")
    _exams(archive)
    settings = archive.settings
    monkeypatch.setenv("CLOUDFILM_DATA_DIR", str(settings.data_dir))
    if settings.database.url:
        monkeypatch.setenv("CLOUDFILM_DATABASE__URL", settings.database.url)
    monkeypatch.setenv("CLOUDFILM_BILLING__ITEM_CODE", "CF001")
    source = tmp_path / "his.csv"
    source.write_bytes(CSV.encode("gb18030"))
    runner = CliRunner()
    result = runner.invoke(billing_app, ["import", str(source)])
    assert result.exit_code == 1, result.output  # one bad line
    assert "第 4 行" in result.output and "kept 3" in result.output
    bad = tmp_path / "photo.csv"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    refused = runner.invoke(billing_app, ["import", str(bad)])
    assert refused.exit_code == 2 and "not CSV or XLSX" in refused.output
    out = tmp_path / "reconciliation.xlsx"
    done = runner.invoke(billing_app, ["reconcile", "--from", "2026-11-20", "--to", "2026-11-21",
                                       "--xlsx", str(out)])  # fmt: skip
    assert done.exit_code == 0, done.output
    assert "金额不符" in done.output and "已匹配" in done.output
    book = load_workbook(out, read_only=True)
    matched = list(book["已匹配 Matched"].iter_rows(values_only=True))
    assert [row[2] for row in matched[1:]] == ["ACC1"]
    for event_type in ("billing-imported", "billing-import-refused", "billing-reconciled",
                       "billing-exported"):  # fmt: skip
        [event] = _events(archive, event_type)
        assert event.actor_type == "cli"
