"""Kiosk benchmark: how long a self-service printer waits for its lookup.

Run from the repository root::

    .venv/bin/python bench/kiosk.py
    .venv/bin/python bench/kiosk.py --postgres postgresql+psycopg://postgres@127.0.0.1:5432

A throw-away archive (SQLite in a temporary folder, or with ``--postgres`` a throw-away
database on that server, dropped at the end) is filled with ``--persons`` patients
(default 1000, each with a hospital ID, a medical card and a GB 11643 ID-card number,
registered through the patient index, so ID cards are sealed and found by blind index)
and ``--reports`` released reports (default 3000, spread over them, each with its
registered PDF entry; each patient's first report also with the entry token of its QR
code). The PDFs are not rendered: a lookup never reads them.

Measured over HTTP against the real app (uvicorn on 127.0.0.1, one kiosk client with
``kiosk:print`` and its bearer token, every request audited like in production):
``--lookups`` (default 200) ``POST /api/kiosk/lookup`` of each kind — a scanned report
QR code (the full URL), an ID card, a medical card — for random patients; median, p95
and the slowest. The same lookups are also timed in process (the service function with
its read transaction, without HTTP, authentication and audit) to show where time goes.
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from auth import _database, _serve  # the same throw-away database and server
from cloudfilm import migrations
from cloudfilm.app import create_app
from cloudfilm.archive.ingest import Archive
from cloudfilm.auth.service import create_client, issue_token
from cloudfilm.config import Settings
from cloudfilm.db import Database
from cloudfilm.kiosk import service as kiosk
from cloudfilm.mpi import idcard
from cloudfilm.mpi import service as mpi
from cloudfilm.reports.models import Document, Report, ReportVersion
from cloudfilm.sharing import tokens
from cloudfilm.storage.base import new_key

SURNAMES = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗"
GIVEN = "伟芳娜敏静丽强磊军洋勇艳杰娟涛明超秀霞平刚桂英"
EXAMS = [("CT", "胸部CT平扫"), ("MR", "头颅MR平扫"), ("DX", "胸部正位片"), ("US", "腹部彩超")]


def _ms(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_ms": round(statistics.median(ordered) * 1000, 2),
        "p95_ms": round(ordered[max(0, int(len(ordered) * 0.95) - 1)] * 1000, 2),
        "max_ms": round(ordered[-1] * 1000, 2),
    }


def _time(actions: list[Callable[[], Any]]) -> list[float]:
    samples = []
    for action in actions:
        started = time.perf_counter()
        action()
        samples.append(time.perf_counter() - started)
    return samples


def _id_card(n: int) -> str:
    year = 1950 + (n // 1000) % 50
    first17 = f"440106{year}{1 + n % 12:02d}{1 + n % 28:02d}{n % 1000:03d}"
    return first17 + idcard.check_character(first17)


def populate(archive: Archive, persons: int, reports: int) -> list[dict[str, str]]:
    """Patients and released reports; what a kiosk would scan or read for each patient."""
    rng = random.Random(8)
    now = datetime.now(UTC)
    pdf = b"%PDF-1.7\n% kiosk bench placeholder\n%%EOF\n"
    people: list[dict[str, Any]] = []
    with archive.db.session() as session:
        for n in range(persons):
            name = rng.choice(SURNAMES) + "".join(rng.choices(GIVEN, k=rng.choice((1, 2))))
            card = _id_card(n)
            person = mpi.register(
                session=session,
                identifiers=[
                    mpi.identifier("PI", "HIS", f"B{n:06d}"),
                    mpi.identifier("MC", "HIS", f"MC{n:08d}"),
                    mpi.identifier("NNCHN", "", card),
                ],
                demographics=mpi.Demographics(name=name, sex="MF"[n % 2], birth_date="19800101"),
                source="bench",
                now=now,
            )
            people.append({"person": person, "pid": f"B{n:06d}", "card": card, "mc": f"MC{n:08d}"})
        session.flush()
        storage_key = new_key("pdf")
        archive.storage.put(storage_key, pdf)
        qr: dict[int, str] = {}
        for r in range(reports):
            who = people[r % persons] if r < persons else rng.choice(people)
            modality, exam = rng.choice(EXAMS)
            released = now - timedelta(days=rng.randint(0, 365), minutes=1)
            report = Report(
                accession_number=f"KB{r:07d}",
                study_instance_uid=f"1.2.826.0.1.3680043.10.{r}",
                person_id=who["person"].id,
                patient_id=who["pid"],
                patient_authority="HIS",
                status="final",
                version_count=1,
                approved_at=released,
                release_at=released,
                released_at=released,
                render_pending=False,
                created_at=released,
                updated_at=released,
            )
            session.add(report)
            session.flush()
            version = ReportVersion(
                report_id=report.id,
                version=1,
                status="final",
                exam_name=exam,
                modality=modality,
                examined_at=released,
                approved_at=released,
                created_at=released,
            )
            session.add(version)
            session.flush()
            report.current_version_id = version.id
            session.add(
                Document(
                    uid=f"2.25.{r + 1}{secrets.randbelow(10**12)}",
                    kind="report-pdf",
                    mime_type="application/pdf",
                    title=exam,
                    size=len(pdf),
                    sha256="0" * 64,
                    storage_key=storage_key,
                    person_id=who["person"].id,
                    report_id=report.id,
                    report_version_id=version.id,
                    created_at=released,
                )
            )
            if who["person"].id not in qr:  # the QR code of each patient's first report
                token = tokens.issue(
                    session, purpose="report", person_id=who["person"].id, report_id=report.id
                )
                qr[who["person"].id] = tokens.entry_url(archive.settings, token)
    return [{"qr": qr[p["person"].id], "card": p["card"], "mc": p["mc"]} for p in people]


def run(postgres: str | None, persons: int, reports: int, lookups: int) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix="cloudfilm-bench-kiosk-") as tmp,
        _database(postgres) as url,
    ):
        settings = Settings(data_dir=Path(tmp), **({"database": {"url": url}} if url else {}))
        db = Database(settings)
        migrations.upgrade(db.engine)
        archive = Archive(settings, db=db)
        started = time.perf_counter()
        patients = populate(archive, persons, reports)
        filled = time.perf_counter() - started
        with db.session() as session:
            client, _ = create_client(
                session=session, name="kiosk-bench", now=datetime.now(UTC), scopes=["kiosk:print"]
            )
            bearer, _ = issue_token(
                session=session, client=client, now=datetime.now(UTC), minutes=60
            )
        rng = random.Random(5)
        picks = [rng.choice(patients) for _ in range(lookups)]
        bodies = {
            "qr": [{"qr": p["qr"]} for p in picks],
            "id_card": [{"card_type": "id-card", "card_number": p["card"]} for p in picks],
            "medical_card": [{"card_type": "medical-card", "card_number": p["mc"]} for p in picks],
        }
        results: dict[str, Any] = {
            "database": "postgresql" if url else "sqlite",
            "persons": persons,
            "reports": reports,
            "lookups_per_kind": lookups,
            "fill_seconds": round(filled, 1),
        }
        app = create_app(archive)
        server, base = _serve(app)
        headers = {"Authorization": f"Bearer {bearer}"}
        try:
            with httpx.Client(headers=headers) as http:

                def post(body: dict[str, str]) -> None:
                    answer = http.post(f"{base}/api/kiosk/lookup", json=body)
                    assert answer.status_code == 200 and answer.json()["reports"], answer.text

                for body in bodies["qr"][:20] + bodies["id_card"][:20]:  # warm up
                    post(body)
                for kind, items in bodies.items():
                    samples = _time([lambda b=b: post(b) for b in items])  # type: ignore[misc]
                    results[f"http_{kind}"] = _ms(samples)
        finally:
            server.should_exit = True

        def direct(body: dict[str, str]) -> None:
            with db.read_session() as session:
                if "qr" in body:
                    found = kiosk.lookup_qr(session, scanned=body["qr"], kiosk="kiosk-bench")
                else:
                    found = kiosk.lookup_card(
                        session,
                        card_type=body["card_type"],
                        number=body["card_number"],
                        kiosk="kiosk-bench",
                    )
                assert found.reports

        for kind, items in bodies.items():
            samples = _time([lambda b=b: direct(b) for b in items])  # type: ignore[misc]
            results[f"service_{kind}"] = _ms(samples)
        archive.close()
        return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres", help="PostgreSQL server URL (a throw-away database)")
    parser.add_argument("--persons", type=int, default=1000)
    parser.add_argument("--reports", type=int, default=3000)
    parser.add_argument("--lookups", type=int, default=200)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = run(args.postgres, args.persons, args.reports, args.lookups)
    text_out = json.dumps(results, indent=2, ensure_ascii=False)
    print(text_out)  # noqa: T201 - the benchmark's report
    if args.json:
        args.json.write_text(text_out + "\n")


if __name__ == "__main__":
    main()
