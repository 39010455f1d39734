"""DICOMweb benchmark: our QIDO-RS, WADO-RS and STOW-RS against Orthanc's DICOMweb plugin.

Run from the repository root::

    .venv/bin/python bench/dicomweb.py                 # 3 runs, medians, ratios
    .venv/bin/python bench/dicomweb.py --runs 3 --json bench/results/dicomweb.json
    .venv/bin/python bench/dicomweb.py --postgres postgresql+psycopg://postgres@127.0.0.1:5432

Side by side, in one run: ``cloudfilm serve --role api`` (SQLite in the data directory by
default; with ``--postgres`` a throw-away database created on that server, migrated with
``cloudfilm migrate`` and dropped at the end) and Orthanc from Debian's package with only
its DICOMweb plugin loaded (root ``/dicom-web/``). Both hold the same data, loaded before
anything is timed: ours with ``cloudfilm import``, Orthanc with REST ``POST /instances``.

What is measured (every measurement ``--runs`` times, ours and Orthanc interleaved, the
one that goes first alternating between runs):

1. QIDO-RS study search latency, ``GET /dicom-web/studies?PatientID=<one patient>`` and
   ``GET /dicom-web/studies?limit=25``, with 1, 1000, 10 000 and (ours only) 100 000
   studies in the archive. Extra studies are small filler studies: for ours patient and
   study rows inserted with SQLAlchemy Core into the index while the server is stopped,
   for Orthanc copies of ``tests/data/mr_small.dcm`` with new UIDs and patient IDs,
   POSTed within a time budget (``--orthanc-budget``, 300 s by default).
2. WADO-RS series metadata of the real 134-image CT and of a 1000-image synthetic CT
   (``cloudfilm demo --large-ct 1000 --output DIR``): cold (the first metadata request
   after the server process started) and warm (10 requests), asking for gzip like a
   browser, and warm once more with ``Accept-Encoding: identity``.
3. Frame retrieval: frame 1 of every instance of the 134-image CT, Accept
   ``multipart/related; type="application/octet-stream"; transfer-syntax=*``, with 1 and 8
   concurrent clients (threads, one httpx client each), once with ``Accept-Encoding:
   identity`` and once with ``gzip, deflate`` (what browsers send; Orthanc then gzips).
4. STOW-RS of the 134-image CT into an empty archive: one multipart POST of all 134, and
   134 single-instance POSTs over one keep-alive connection.

The sample data is looked up like ``cloudfilm demo`` does (``CLOUDFILM_SAMPLE_DATA``, then
``../shared/data``); without it the benchmark prints why and exits with status 0 (skip).
It binds only to 127.0.0.1, works in a temporary folder under /tmp, and stops every
process it starts (and drops the PostgreSQL databases it creates), also on error.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import queue
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import httpx
import pydicom
from sqlalchemy import Engine, MetaData, Table, create_engine, func, make_url, select, text
from sqlalchemy.types import DateTime, Integer, String, Text

from ingest import (
    CT_134,
    LOOPBACK,
    ORTHANC,
    BenchError,
    Tools,
    child_env,
    first_line,
    free_port,
    machine,
    sample_data_dir,
    stop,
    timed,
    wait_until,
)

REPO = Path(__file__).resolve().parent.parent
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
MR_TEMPLATE = REPO / "tests" / "data" / "mr_small.dcm"
LARGE_CT = 1000
FRAME_ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=*'
#: What a client that decodes nothing asks for: uncompressed frames (ours decodes the
#: stored JPEG-LS for it; Orthanc sends what it stores).
FRAME_ACCEPT_RAW = 'multipart/related; type="application/octet-stream"'
FRAME_VARIANTS = (
    (FRAME_ACCEPT, "identity", "identity"),
    (FRAME_ACCEPT, "gzip, deflate", "gzip"),
    (FRAME_ACCEPT_RAW, "identity", "raw"),
)
DICOM_JSON = "application/dicom+json"
QIDO_WARMUP = 3
WARM_REQUESTS = 10
FRAME_CLIENTS = (1, 8)
FILL_WORKERS = 4
HTTP_TIMEOUT = 300.0
FILLER_NAMESPACE = uuid.UUID("6f3c1b52-8d1e-4c55-9a51-0c6f1d6c2b11")
OURS = "cloudfilm"
THEIRS = "orthanc"


# -- results --------------------------------------------------------------------------------


@dataclass
class Measure:
    """Repeated samples of one measurement on one system.

    ``kind`` is ``latency`` (``runs`` holds, per run, the seconds of each request) or
    ``rate`` (per run, one pass: seconds for ``items`` items of ``bytes`` bytes in all).
    """

    key: str
    system: str
    kind: str
    label: str
    studies: int = 0
    items: int = 0
    bytes: int = 0
    runs: list[list[float]] = field(default_factory=list)
    note: str = ""

    def p50(self) -> float:
        return statistics.median(statistics.median(r) for r in self.runs)

    def p95(self) -> float:
        return statistics.median(percentile(r, 95) for r in self.runs)

    def rate(self) -> float:
        """Items per second, median over the runs."""
        return statistics.median(self.items / r[0] for r in self.runs)

    def mb_per_s(self) -> float:
        return statistics.median(self.bytes / 1e6 / r[0] for r in self.runs)


def percentile(values: Sequence[float], p: float) -> float:
    if len(values) == 1:
        return values[0]
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


class Results:
    def __init__(self) -> None:
        self.measures: dict[tuple[str, str], Measure] = {}

    def add(self, system: str, key: str, kind: str, label: str, samples: list[float], **kw: Any):
        measure = self.measures.get((key, system))
        if measure is None:
            measure = Measure(key=key, system=system, kind=kind, label=label, **kw)
            self.measures[(key, system)] = measure
        else:
            for name, value in kw.items():
                setattr(measure, name, value)
        measure.runs.append(samples)
        return measure


# -- data -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Corpus:
    """A folder of single-frame DICOM files of one series."""

    folder: Path
    files: tuple[Path, ...]
    study_uid: str
    series_uid: str
    patient_id: str
    sop_uids: tuple[str, ...]
    total_bytes: int

    @classmethod
    def load(cls, folder: Path) -> Corpus:
        files = tuple(sorted(p for p in folder.iterdir() if p.is_file()))
        if not files:
            raise BenchError(f"{folder} holds no files")
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
        studies = {str(h.StudyInstanceUID) for h in headers}
        series = {str(h.SeriesInstanceUID) for h in headers}
        if len(studies) != 1 or len(series) != 1:
            raise BenchError(f"{folder} is not one series of one study")
        return cls(
            folder=folder,
            files=files,
            study_uid=studies.pop(),
            series_uid=series.pop(),
            patient_id=str(headers[0].PatientID),
            sop_uids=tuple(str(h.SOPInstanceUID) for h in headers),
            total_bytes=sum(p.stat().st_size for p in files),
        )

    @property
    def count(self) -> int:
        return len(self.files)


@dataclass(frozen=True)
class Filler:
    """One small filler study: one patient, one MR series, one instance."""

    index: int

    def uid(self, what: str) -> str:
        return "2.25." + str(uuid.uuid5(FILLER_NAMESPACE, f"{self.index}:{what}").int)

    @property
    def patient_id(self) -> str:
        return f"BENCH{self.index:06d}"

    @property
    def patient_name(self) -> str:
        return f"BENCH^PATIENT{self.index:06d}"

    @property
    def study_date(self) -> str:
        day = date(2010, 1, 1) + timedelta(days=(self.index * 7919) % 5475)
        return day.strftime("%Y%m%d")

    @property
    def study_time(self) -> str:
        return f"{(self.index * 37) % 24:02d}{(self.index * 11) % 60:02d}00"


class FillerEncoder:
    """Part-10 bytes of filler studies, made from ``tests/data/mr_small.dcm``."""

    def __init__(self) -> None:
        self.template = pydicom.dcmread(MR_TEMPLATE)

    def encode(self, filler: Filler) -> bytes:
        ds = self.template
        ds.PatientID = filler.patient_id
        ds.PatientName = filler.patient_name
        ds.StudyInstanceUID = filler.uid("study")
        ds.SeriesInstanceUID = filler.uid("series")
        ds.SOPInstanceUID = filler.uid("instance")
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyDate = filler.study_date
        ds.StudyTime = filler.study_time
        ds.AccessionNumber = f"A{filler.index:07d}"
        ds.StudyDescription = "bench filler"
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
        return buffer.getvalue()


def multipart(payloads: Iterable[bytes]) -> tuple[str, bytes]:
    """(Content-Type, body) of a STOW-RS request carrying ``payloads``."""
    boundary = secrets.token_hex(16)
    chunks: list[bytes] = []
    for data in payloads:
        chunks.append(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
        chunks.append(data)
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return f'multipart/related; type="application/dicom"; boundary={boundary}', b"".join(chunks)


# -- the servers ----------------------------------------------------------------------------


class System(Protocol):
    name: str
    base: Path

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def client(self, **headers: str) -> httpx.Client: ...

    def study_count(self) -> int: ...


class Process:
    """A server process that can be started and stopped again (log appended to)."""

    def __init__(self, cmd: Sequence[str], *, env: dict[str, str], cwd: Path, log: Path) -> None:
        self.cmd, self.env, self.cwd, self.log = list(cmd), env, cwd, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, ready: Callable[[], bool], what: str) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.cmd,
                env=self.env,
                cwd=self.cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        wait_until(ready, self.proc, what, self.log)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=5.0).status_code == 200
    except httpx.HTTPError:
        return False


def probe(url: str, headers: dict[str, str]) -> bool:
    """The same first request for both servers: a one-result study search."""
    try:
        response = httpx.get(f"{url}/dicom-web/studies?limit=1", headers=headers, timeout=5.0)
    except httpx.HTTPError:
        return False
    return response.status_code in (200, 204)


class Bench:
    """Scratch folder, shared settings, and everything that must be cleaned up."""

    def __init__(
        self,
        work: Path,
        cleanup: contextlib.ExitStack,
        postgres: str | None,
        workers: int = 1,
    ) -> None:
        self.work = work
        self.cleanup = cleanup
        self.postgres = postgres
        self.workers = workers
        self.pycache = work / "pycache"
        self._counter = 0

    @property
    def cloudfilm(self) -> list[str]:
        return [sys.executable, "-m", "cloudfilm"]

    def fresh(self, name: str) -> Path:
        self._counter += 1
        path = self.work / f"{self._counter:03d}-{name}"
        path.mkdir()
        return path

    def create_database(self) -> str:
        """A throw-away PostgreSQL database (dropped at the end); its SQLAlchemy URL."""
        assert self.postgres is not None
        name = f"cloudfilm_bench_{os.getpid()}_{self._counter}"
        admin = create_engine(
            make_url(self.postgres).set(database="postgres"), isolation_level="AUTOCOMMIT"
        )
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))

        def drop() -> None:
            try:
                with admin.connect() as conn:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            finally:
                admin.dispose()

        self.cleanup.callback(drop)
        return make_url(self.postgres).set(database=name).render_as_string(hide_password=False)


class Ours:
    """``cloudfilm serve --role api`` on its own data directory (and database)."""

    name = OURS

    def __init__(self, bench: Bench, label: str) -> None:
        self.bench = bench
        self.base = bench.fresh(f"cloudfilm-{label}")
        self.data = self.base / "data"
        extra: dict[str, str] = {}
        self.db_url = f"sqlite:///{self.data / 'cloudfilm.db'}"
        if bench.postgres:
            self.db_url = bench.create_database()
            extra["CLOUDFILM_DATABASE__URL"] = self.db_url
        # As many HTTP processes as CPUs (http.workers, docs/install.md): Orthanc's
        # threads use every CPU too.
        extra["CLOUDFILM_HTTP__WORKERS"] = str(bench.workers)
        self.env = child_env(bench.pycache, **extra)
        if bench.postgres:
            self.cli("migrate", what="cloudfilm migrate")
        out = self.cli("client", "create", "bench", what="cloudfilm client create")
        self.secret = out.strip().splitlines()[-1].strip()
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.headers: dict[str, str] = {}
        self.process = Process(
            [
                *bench.cloudfilm,
                "serve",
                "--role",
                "api",
                "--data-dir",
                str(self.data),
                "--host",
                LOOPBACK,
                "--http-port",
                str(self.port),
            ],
            env=self.env,
            cwd=self.base,
            log=self.base / "serve.log",
        )
        self._engine: Engine | None = None
        bench.cleanup.callback(self.close)

    def cli(self, *args: str, what: str, env: dict[str, str] | None = None) -> str:
        _, out = timed(
            [*self.bench.cloudfilm, *args, "--data-dir", str(self.data)],
            env={**self.env, **(env or {})},
            cwd=self.base,
            what=what,
        )
        return out

    def start(self) -> None:
        self.process.start(lambda: healthy(self.url), "cloudfilm serve")
        if not self.headers:  # a bearer token for the client (OAuth2 client credentials)
            granted = httpx.post(
                f"{self.url}/api/oauth/token",
                data={"grant_type": "client_credentials"},
                auth=("bench", self.secret),
                timeout=HTTP_TIMEOUT,
            )
            expect(granted, "cloudfilm token")
            self.headers = {"Authorization": f"Bearer {granted.json()['access_token']}"}
        if not probe(self.url, self.headers):
            raise BenchError("cloudfilm serve does not answer a study search")

    def stop(self) -> None:
        self.process.stop()

    def close(self) -> None:
        self.stop()
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def client(self, **headers: str) -> httpx.Client:
        return httpx.Client(
            base_url=f"{self.url}/dicom-web",
            headers={**self.headers, **headers},
            timeout=HTTP_TIMEOUT,
        )

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = create_engine(self.db_url)
        return self._engine

    def study_count(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM study")).scalar_one())

    def load(self, folders: Sequence[Path]) -> None:
        """``cloudfilm import``, then the lossless compression it queued (the server is
        stopped meanwhile): the objects are measured in the form they are kept in."""
        self.stop()
        now = {"CLOUDFILM_COMPRESSION__DEFERRED_DELAY_SECONDS": "0"}
        self.cli(
            "import",
            "--quiet",
            "--processes",
            "2",
            *map(str, folders),
            what="cloudfilm import",
            env=now,
        )
        self.cli("storage", "compress", what="cloudfilm storage compress", env=now)

    def add_fillers(self, fillers: Sequence[Filler]) -> float:
        """Insert patient and study rows straight into the index (server stopped)."""
        self.stop()
        start = time.perf_counter()
        insert_fillers(self.engine, fillers)
        return time.perf_counter() - start


def insert_fillers(engine: Engine, fillers: Sequence[Filler], batch: int = 5000) -> None:
    """Patient and study rows for ``fillers``, with SQLAlchemy Core on the reflected tables.

    Columns the bench does not set get an empty value of their type (``""``, 0, now), the
    way the index's own defaults fill them; ids are assigned after the current maximum.
    On PostgreSQL the two tables are analysed afterwards (fresh planner statistics).
    """
    meta = MetaData()
    meta.reflect(engine, only=["patient", "study"])
    patient, study = meta.tables["patient"], meta.tables["study"]
    now = datetime.now(UTC)
    with engine.begin() as conn:
        next_patient = int(conn.execute(select(func.coalesce(func.max(patient.c.id), 0))).scalar())
        next_study = int(conn.execute(select(func.coalesce(func.max(study.c.id), 0))).scalar())
        for offset in range(0, len(fillers), batch):
            chunk = fillers[offset : offset + batch]
            patients, studies = [], []
            for k, filler in enumerate(chunk, start=1):
                patients.append(
                    row_for(
                        patient,
                        now,
                        id=next_patient + k,
                        patient_id=filler.patient_id,
                        issuer_of_patient_id="",
                        patient_name=filler.patient_name,
                        patient_name_alphabetic=filler.patient_name,
                        patient_sex="O",
                        patient_birth_date="19700101",
                    )
                )
                studies.append(
                    row_for(
                        study,
                        now,
                        id=next_study + k,
                        patient_pk=next_patient + k,
                        study_instance_uid=filler.uid("study"),
                        study_date=filler.study_date,
                        study_time=filler.study_time,
                        accession_number=f"A{filler.index:07d}",
                        study_id="1",
                        study_description="bench filler",
                        modalities_in_study="MR",
                        number_of_series=1,
                        number_of_instances=1,
                        total_bytes=MR_TEMPLATE.stat().st_size,
                    )
                )
            conn.execute(patient.insert(), patients)
            conn.execute(study.insert(), studies)
            next_patient += len(chunk)
            next_study += len(chunk)
        if engine.dialect.name == "postgresql":
            for table in ("patient", "study"):
                conn.execute(
                    text(
                        f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                        f"(SELECT max(id) FROM {table}))"
                    )
                )
    if engine.dialect.name == "postgresql":
        # Planner statistics as autovacuum would have them in an archive that grew slowly.
        with engine.begin() as conn:
            conn.execute(text("ANALYZE patient, study"))


def row_for(table: Table, now: datetime, **values: Any) -> dict[str, Any]:
    row = dict(values)
    for column in table.columns:
        if column.name in row or column.nullable or column.server_default is not None:
            continue
        if isinstance(column.type, DateTime):
            row[column.name] = now
        elif isinstance(column.type, Integer):
            row[column.name] = 0
        elif isinstance(column.type, String | Text):
            row[column.name] = ""
    return row


class Orthanc:
    """Orthanc from Debian with only its DICOMweb plugin, from a temporary config."""

    name = THEIRS

    def __init__(self, bench: Bench, label: str) -> None:
        self.base = bench.fresh(f"orthanc-{label}")
        (self.base / "storage").mkdir()
        (self.base / "index").mkdir()
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        config = {
            "Name": "cloudfilm-bench",
            "StorageDirectory": str(self.base / "storage"),
            "IndexDirectory": str(self.base / "index"),
            "HttpPort": self.port,
            "DicomPort": free_port(),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAet": "ORTHANC",
            "DicomCheckCalledAet": False,
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "LuaScripts": [],
            "DicomModalities": {},
            "OrthancPeers": {},
        }
        path = self.base / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        self.process = Process(
            [str(ORTHANC), str(path)], env=dict(os.environ), cwd=self.base, log=self.base / "log"
        )
        bench.cleanup.callback(self.stop)

    def start(self) -> None:
        self.process.start(lambda: probe(self.url, {}), "Orthanc")

    def stop(self) -> None:
        self.process.stop()

    def client(self, **headers: str) -> httpx.Client:
        return httpx.Client(base_url=f"{self.url}/dicom-web", headers=headers, timeout=HTTP_TIMEOUT)

    def rest(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            headers={"Content-Type": "application/dicom"},
            timeout=HTTP_TIMEOUT,
        )

    def study_count(self) -> int:
        response = httpx.get(f"{self.url}/statistics", timeout=30.0)
        response.raise_for_status()
        return int(response.json()["CountStudies"])

    def plugin_version(self) -> str:
        response = httpx.get(f"{self.url}/plugins/dicom-web", timeout=10.0)
        response.raise_for_status()
        return str(response.json().get("Version", "?"))

    def post(self, client: httpx.Client, data: bytes, what: str) -> None:
        response = client.post("/instances", content=data)
        if response.status_code != 200 or response.json().get("Status") not in (
            "Success",
            "AlreadyStored",
        ):
            raise BenchError(
                f"Orthanc refused {what}: {response.status_code} {response.text[:300]}"
            )

    def load(self, folders: Sequence[Path]) -> None:
        self.start()
        with self.rest() as client:
            for folder in folders:
                for path in sorted(p for p in folder.iterdir() if p.is_file()):
                    self.post(client, path.read_bytes(), path.name)

    def add_fillers(self, fillers: Sequence[Filler], deadline: float) -> tuple[int, float]:
        """POST filler studies with a few client threads until done or ``deadline``."""
        self.start()
        todo: queue.SimpleQueue[Filler] = queue.SimpleQueue()
        for filler in fillers:
            todo.put(filler)
        done = [0] * FILL_WORKERS
        errors: list[BaseException] = []

        def work(slot: int) -> None:
            encoder = FillerEncoder()
            try:
                with self.rest() as client:
                    while time.monotonic() < deadline and not errors:
                        try:
                            filler = todo.get_nowait()
                        except queue.Empty:
                            return
                        self.post(client, encoder.encode(filler), filler.patient_id)
                        done[slot] += 1
            except BaseException as exc:  # reported by the caller
                errors.append(exc)

        start = time.perf_counter()
        threads = [threading.Thread(target=work, args=(i,)) for i in range(FILL_WORKERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise BenchError(f"filling Orthanc failed: {errors[0]}")
        return sum(done), time.perf_counter() - start


# -- the measurements -----------------------------------------------------------------------


def get(client: httpx.Client, url: str, **kw: Any) -> tuple[float, httpx.Response]:
    start = time.perf_counter()
    response = client.get(url, **kw)
    return time.perf_counter() - start, response


def expect(response: httpx.Response, what: str, statuses: tuple[int, ...] = (200,)) -> None:
    if response.status_code not in statuses:
        raise BenchError(f"{what}: HTTP {response.status_code} {response.text[:300]}")


def qido(system: System, params: dict[str, str], requests: int, expected: int) -> list[float]:
    """Latencies of ``requests`` identical study searches after a few untimed ones."""
    samples = []
    with system.client(Accept=DICOM_JSON) as client:
        for _ in range(QIDO_WARMUP):
            _, response = get(client, "/studies", params=params)
            expect(response, f"{system.name} QIDO {params}")
            found = len(response.json())
            if found != expected:
                raise BenchError(
                    f"{system.name} QIDO {params}: {found} studies, expected {expected}"
                )
        for _ in range(requests):
            seconds, response = get(client, "/studies", params=params)
            expect(response, f"{system.name} QIDO {params}")
            samples.append(seconds)
    return samples


def series_metadata(
    system: System, corpus: Corpus, requests: int, encoding: str
) -> tuple[list[float], int, str]:
    """Latencies of ``requests`` series-metadata requests; (seconds, bytes, encoding)."""
    url = f"/studies/{corpus.study_uid}/series/{corpus.series_uid}/metadata"
    samples = []
    size, used = 0, "identity"
    with system.client(Accept=DICOM_JSON, **{"Accept-Encoding": encoding}) as client:
        for _ in range(requests):
            seconds, response = get(client, url)
            expect(response, f"{system.name} series metadata")
            if len(response.json()) != corpus.count:
                raise BenchError(f"{system.name} series metadata: wrong number of instances")
            samples.append(seconds)
            size = int(response.headers.get("content-length", len(response.content)))
            used = response.headers.get("content-encoding", "identity")
    return samples, size, used


def frames(
    system: System, corpus: Corpus, clients: int, encoding: str, accept: str = FRAME_ACCEPT
) -> tuple[float, int]:
    """Frame 1 of every instance with ``clients`` threads; (seconds, frame bytes received).

    ``encoding`` is the Accept-Encoding sent: ``gzip, deflate`` as browsers (and httpx) send
    it, or ``identity``. The bytes counted are the decoded multipart bodies.
    """
    urls = [
        f"/studies/{corpus.study_uid}/series/{corpus.series_uid}/instances/{sop}/frames/1"
        for sop in corpus.sop_uids
    ]
    todo: queue.SimpleQueue[str] = queue.SimpleQueue()
    for url in urls:
        todo.put(url)
    received = [0] * clients
    errors: list[BaseException] = []
    http = [system.client(Accept=accept, **{"Accept-Encoding": encoding}) for _ in range(clients)]
    try:
        # One untimed frame per client: opens its connection.
        for client in http:
            expect(client.get(urls[0]), f"{system.name} frame")
        go = threading.Barrier(clients + 1)

        def work(slot: int) -> None:
            client = http[slot]
            go.wait()
            try:
                while not errors:
                    try:
                        url = todo.get_nowait()
                    except queue.Empty:
                        return
                    response = client.get(url)
                    expect(response, f"{system.name} frame")
                    # A 512 x 512 CT frame: 512 kB uncompressed, ~140 kB in JPEG-LS.
                    if len(response.content) < 32 * 1024:
                        raise BenchError(f"{system.name} frame: only {len(response.content)} B")
                    received[slot] += len(response.content)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(clients)]
        for thread in threads:
            thread.start()
        go.wait()
        start = time.perf_counter()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - start
    finally:
        for client in http:
            client.close()
    if errors:
        raise BenchError(f"frames: {errors[0]}")
    return seconds, sum(received)


def stow(system: System, corpus: Corpus, single: bool) -> float:
    """Seconds to store the corpus with STOW-RS, in one request or one per instance."""
    payloads = [p.read_bytes() for p in corpus.files]
    bodies = [multipart([p]) for p in payloads] if single else [multipart(payloads)]
    stored = 0
    with system.client(Accept=DICOM_JSON) as client:
        expect(client.get("/studies", params={"limit": "1"}), "probe", (200, 204))
        start = time.perf_counter()
        for content_type, body in bodies:
            response = client.post("/studies", content=body, headers={"Content-Type": content_type})
            expect(response, f"{system.name} STOW-RS")
            answer = response.json()
            failed = answer.get("00081198", {}).get("Value")
            if failed:
                raise BenchError(f"{system.name} STOW-RS: failures {failed}")
            stored += len(answer.get("00081199", {}).get("Value", []))
        seconds = time.perf_counter() - start
    if stored != corpus.count:
        raise BenchError(f"{system.name} STOW-RS: {stored} stored, expected {corpus.count}")
    return seconds


def load_note() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def process_cpu() -> dict[int, tuple[int, float, str]]:
    """CPU seconds used so far by every process: pid → (parent pid, seconds, name)."""
    tick = os.sysconf("SC_CLK_TCK")
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        seconds = (int(fields[11]) + int(fields[12])) / tick
        table[int(entry.name)] = (int(fields[1]), seconds, name)
    return table


def cpu_times() -> list[int]:
    """The machine's CPU time counters (/proc/stat): user ... steal, in ticks."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("cpu "):
                return [int(x) for x in line.split()[1:9]]
    return [0] * 8


def steal_share(before: list[int], after: list[int]) -> float:
    """Share of CPU time the hypervisor gave to other guests in between (``st`` in top)."""
    delta = [b - a for a, b in zip(before, after, strict=True)]
    return delta[7] / max(sum(delta), 1)


def foreign_cpu(
    before: dict[int, tuple[int, float, str]], after: dict[int, tuple[int, float, str]]
) -> dict[str, float]:
    """CPU seconds, by process name, that processes outside this benchmark's process tree
    used in between (processes that ended in between are not seen). With ``--postgres``
    the PostgreSQL server's processes are among them: they work for our server too."""
    ours = {os.getpid()}
    grew = True
    while grew:
        grew = False
        for pid, (parent, _, _) in after.items():
            if parent in ours and pid not in ours:
                ours.add(pid)
                grew = True
    used: dict[str, float] = {}
    for pid, (_, seconds, name) in after.items():
        if pid not in ours:
            delta = seconds - (before[pid][1] if pid in before else 0.0)
            if delta > 0:
                used[name] = used.get(name, 0.0) + delta
    return used


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- the run --------------------------------------------------------------------------------


@dataclass
class Plan:
    runs: int
    requests: int
    scales: list[int]
    orthanc_max: int
    orthanc_budget: float


class Runner:
    def __init__(
        self,
        bench: Bench,
        plan: Plan,
        ct: Corpus,
        large: Corpus,
        with_orthanc: bool,
    ) -> None:
        self.bench, self.plan, self.ct, self.large = bench, plan, ct, large
        self.results = Results()
        self.ours = Ours(bench, "main")
        self.theirs = Orthanc(bench, "main") if with_orthanc else None
        self.counts: dict[str, dict[int, int]] = {OURS: {}, THEIRS: {}}
        self.fill_log: list[dict[str, Any]] = []
        self.loads: list[dict[str, Any]] = []
        self.fillers_used = {OURS: 0, THEIRS: 0}
        self.orthanc_fill_seconds = 0.0

    def systems(self, run: int, *, orthanc: bool = True) -> list[System]:
        order: list[System] = [self.ours]
        if orthanc and self.theirs is not None:
            order.append(self.theirs)
        return order if run % 2 == 1 else order[::-1]

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Note the load average, and how much CPU other processes took meanwhile."""
        say(f"-- {name} (load average {load_note()})")
        entry: dict[str, Any] = {"stage": name, "loadavg_start": load_note()}
        self.loads.append(entry)
        before, ticks, start = process_cpu(), cpu_times(), time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        used = foreign_cpu(before, process_cpu())
        other = sum(used.values())
        busiest = sorted(used.items(), key=lambda item: -item[1])[:3]
        steal = steal_share(ticks, cpu_times())
        entry.update(
            seconds=round(seconds, 1),
            other_cpu_seconds=round(other, 1),
            other_cpus=round(other / seconds, 2),
            other_busiest={name: round(cpu, 1) for name, cpu in busiest},
            steal=round(steal, 3),
            loadavg_end=load_note(),
        )
        names = ", ".join(f"{name} {cpu:.1f}" for name, cpu in busiest)
        say(
            f"   stage took {seconds:.0f} s; other processes used {other:.1f} CPU-s "
            f"({other / seconds:.2f} of {os.cpu_count()} CPUs; {names}); steal {steal:.0%}"
        )

    def run(self) -> None:
        plan = self.plan
        say("loading the 134-image CT into both servers")
        self.ours.load([self.ct.folder])
        if self.theirs is not None:
            self.theirs.load([self.ct.folder])
        with self.stage("1 study: metadata of the 134-image CT, QIDO, frames"):
            self.stage_small()
        say(f"loading the {self.large.count}-image CT into both servers")
        self.ours.load([self.large.folder])
        if self.theirs is not None:
            self.theirs.load([self.large.folder])
        with self.stage(f"2 studies: metadata of the {self.large.count}-image CT"):
            self.stage_large()
        for scale in plan.scales:
            self.stage_scale(scale)
        self.ours.stop()
        if self.theirs is not None:
            self.theirs.stop()
        with self.stage("STOW-RS into empty archives"):
            self.stage_stow()

    def stage_small(self) -> None:
        """One study: series metadata of the real CT, QIDO, frames."""
        for run in range(1, self.plan.runs + 1):
            for system in self.systems(run):
                system.stop()
                system.start()
                self.metadata(system, self.ct, "ct134")
                self.qido(system, 1)
                for accept, encoding, tag in FRAME_VARIANTS:
                    for clients in FRAME_CLIENTS:
                        seconds, size = frames(system, self.ct, clients, encoding, accept)
                        form = "as stored" if accept == FRAME_ACCEPT else "uncompressed"
                        label = (
                            f"frames {form}, {clients} client{'s' if clients > 1 else ''}, "
                            f"Accept-Encoding {encoding}"
                        )
                        self.results.add(
                            system.name,
                            f"frames_c{clients}_{tag}",
                            "rate",
                            label,
                            [seconds],
                            items=self.ct.count,
                            bytes=size,
                        )
                        say(
                            f"  run {run} {system.name:<9} {label}: "
                            f"{self.ct.count / seconds:6.0f} frames/s "
                            f"{size / 1e6 / seconds:6.0f} MB/s"
                        )

    def stage_large(self) -> None:
        for run in range(1, self.plan.runs + 1):
            for system in self.systems(run):
                system.stop()
                system.start()
                self.metadata(system, self.large, f"ct{self.large.count}")

    def metadata(self, system: System, corpus: Corpus, tag: str) -> None:
        cold, size, encoding = series_metadata(system, corpus, 1, "gzip, deflate")
        warm, _, _ = series_metadata(system, corpus, WARM_REQUESTS, "gzip, deflate")
        plain, plain_size, _ = series_metadata(system, corpus, WARM_REQUESTS, "identity")
        what = f"series metadata, {corpus.count} instances"
        self.results.add(
            system.name,
            f"meta_{tag}_cold",
            "latency",
            f"{what}, cold",
            cold,
            bytes=size,
            note=f"Content-Encoding {encoding}",
        )
        self.results.add(
            system.name,
            f"meta_{tag}_warm",
            "latency",
            f"{what}, warm",
            warm,
            bytes=size,
            note=f"Content-Encoding {encoding}",
        )
        self.results.add(
            system.name,
            f"meta_{tag}_warm_identity",
            "latency",
            f"{what}, warm, no compression asked",
            plain,
            bytes=plain_size,
        )
        say(
            f"  {system.name:<9} {what}: cold {cold[0] * 1e3:7.1f} ms, warm p50 "
            f"{statistics.median(warm) * 1e3:7.1f} ms ({encoding}, {size / 1e3:.0f} kB), "
            f"identity p50 {statistics.median(plain) * 1e3:7.1f} ms ({plain_size / 1e3:.0f} kB)"
        )

    def qido(self, system: System, scale: int) -> None:
        studies = system.study_count()
        self.counts[system.name][scale] = studies
        cases = [
            (
                "qido_patient",
                "QIDO studies?PatientID=<one patient>",
                {"PatientID": self.ct.patient_id},
                1,
            ),
            ("qido_list", "QIDO studies?limit=25", {"limit": "25"}, min(25, studies)),
        ]
        for key, label, params, expected in cases:
            samples = qido(system, params, self.plan.requests, expected)
            self.results.add(
                system.name, f"{key}@{scale}", "latency", label, samples, studies=studies
            )
            say(
                f"  {system.name:<9} {label} with {studies} studies: p50 "
                f"{statistics.median(samples) * 1e3:6.1f} ms, p95 "
                f"{percentile(samples, 95) * 1e3:6.1f} ms"
            )

    def stage_scale(self, scale: int) -> None:
        """Grow both archives to ``scale`` studies (Orthanc within its budget), then QIDO."""
        say(f"-- growing the archives to {scale} studies")
        need = max(0, scale - self.ours.study_count())
        fillers = [
            Filler(i) for i in range(self.fillers_used[OURS], self.fillers_used[OURS] + need)
        ]
        seconds = self.ours.add_fillers(fillers)
        self.fillers_used[OURS] += need
        self.fill_log.append({"system": OURS, "target": scale, "added": need, "seconds": seconds})
        say(f"  cloudfilm: +{need} studies in {seconds:.1f} s (rows inserted)")
        self.ours.start()
        orthanc = self.theirs is not None and scale <= self.plan.orthanc_max
        if orthanc:
            assert self.theirs is not None
            budget_left = self.plan.orthanc_budget - self.orthanc_fill_seconds
            need = max(0, scale - self.theirs.study_count())
            start = self.fillers_used[THEIRS]
            fillers = [Filler(i) for i in range(start, start + need)]
            if budget_left <= 0:
                orthanc = False
                say(f"  orthanc: fill budget spent, no QIDO at {scale}")
            else:
                added, seconds = self.theirs.add_fillers(fillers, time.monotonic() + budget_left)
                self.orthanc_fill_seconds += seconds
                self.fillers_used[THEIRS] += added
                self.fill_log.append(
                    {"system": THEIRS, "target": scale, "added": added, "seconds": seconds}
                )
                say(
                    f"  orthanc: +{added} of {need} studies in {seconds:.1f} s "
                    f"({added / max(seconds, 1e-9):.0f}/s)"
                )
        with self.stage(f"{scale} studies: QIDO"):
            for run in range(1, self.plan.runs + 1):
                for system in self.systems(run, orthanc=orthanc):
                    self.qido(system, scale)

    def stage_stow(self) -> None:
        for run in range(1, self.plan.runs + 1):
            for make in self.systems_fresh(run):
                for single in (False, True):
                    system = make(f"stow-{'single' if single else 'multi'}-r{run}")
                    try:
                        system.start()
                        seconds = stow(system, self.ct, single)
                    finally:
                        system.stop()
                        shutil.rmtree(system.base, ignore_errors=True)
                    key = "stow_single" if single else "stow_multi"
                    label = (
                        f"STOW-RS, {self.ct.count} single-instance POSTs"
                        if single
                        else f"STOW-RS, one POST of {self.ct.count}"
                    )
                    self.results.add(
                        system.name,
                        key,
                        "rate",
                        label,
                        [seconds],
                        items=self.ct.count,
                        bytes=self.ct.total_bytes,
                    )
                    say(
                        f"  run {run} {system.name:<9} {label}: "
                        f"{self.ct.count / seconds:6.0f} instances/s"
                    )

    def systems_fresh(self, run: int) -> list[Callable[[str], System]]:
        makers: list[Callable[[str], System]] = [lambda label: Ours(self.bench, label)]
        if self.theirs is not None:
            makers.append(lambda label: Orthanc(self.bench, label))
        return makers if run % 2 == 1 else makers[::-1]


# -- report ---------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def report(results: Results, runs: int) -> str:
    measures = results.measures
    keys = list(dict.fromkeys(key for key, _ in measures))
    latency = [
        "| measurement | studies | ours p50 ms | ours p95 ms | Orthanc p50 ms | Orthanc p95 ms "
        "| speed ours/Orthanc (p50) |",
        "|---|--:|--:|--:|--:|--:|--:|",
    ]
    rates = [
        "| measurement | ours /s | ours MB/s | Orthanc /s | Orthanc MB/s | speed ours/Orthanc |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for key in keys:
        ours, theirs = measures.get((key, OURS)), measures.get((key, THEIRS))
        first = ours or theirs
        assert first is not None
        if first.kind == "latency":
            count = " / ".join(
                str(m.studies) for m in (ours, theirs) if m is not None and m.studies
            )
            single = len(first.runs[0]) == 1
            latency.append(
                f"| {first.label}{' (median of runs)' if single else ''} | {count or '–'} | "
                f"{ms(ours.p50()) if ours else '–'} | "
                f"{'' if single or not ours else ms(ours.p95())} | "
                f"{ms(theirs.p50()) if theirs else '–'} | "
                f"{'' if single or not theirs else ms(theirs.p95())} | "
                f"{f'{theirs.p50() / ours.p50():.2f}' if ours and theirs else '–'} |"
            )
        else:
            unit = "frames" if key.startswith("frames") else "instances"
            rates.append(
                f"| {first.label} ({unit}) | {f'{ours.rate():.0f}' if ours else '–'} | "
                f"{f'{ours.mb_per_s():.0f}' if ours else '–'} | "
                f"{f'{theirs.rate():.0f}' if theirs else '–'} | "
                f"{f'{theirs.mb_per_s():.0f}' if theirs else '–'} | "
                f"{f'{ours.rate() / theirs.rate():.2f}' if ours and theirs else '–'} |"
            )
    return "\n".join(
        [
            f"Latency: p50 and p95 of each run's requests, median over {runs} runs "
            "(cold rows: one request per run). Speed ratio = Orthanc time / our time "
            "(above 1: we are faster).",
            "",
            *latency,
            "",
            f"Throughput: median over {runs} runs. Speed ratio = our rate / Orthanc's rate.",
            "",
            *rates,
        ]
    )


# -- main -----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="repetitions per measurement")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    parser.add_argument(
        "--postgres",
        default=None,
        metavar="URL",
        help="run ours on a throw-away database created on this PostgreSQL server, e.g. "
        "postgresql+psycopg://postgres@127.0.0.1:5432 (default: embedded SQLite)",
    )
    parser.add_argument(
        "--requests", type=int, default=25, help="timed QIDO requests per run (default 25)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="our HTTP worker processes, http.workers (default: the number of CPUs)",
    )
    parser.add_argument(
        "--scales",
        default="1000,10000,100000",
        help="study counts for QIDO beyond 1 (default 1000,10000,100000)",
    )
    parser.add_argument(
        "--orthanc-max-studies",
        type=int,
        default=10000,
        help="largest study count Orthanc is filled to (default 10000)",
    )
    parser.add_argument(
        "--orthanc-budget",
        type=float,
        default=300.0,
        help="seconds allowed for POSTing filler studies to Orthanc, in all (default 300)",
    )
    args = parser.parse_args(argv)
    if args.runs < 1 or args.requests < 1:
        parser.error("--runs and --requests must be at least 1")
    try:
        args.scale_list = sorted({int(s) for s in args.scales.split(",") if s.strip()})
    except ValueError:
        parser.error("--scales takes comma-separated integers")
    if any(s < 2 or s > 1_000_000 for s in args.scale_list):
        parser.error("--scales must be between 2 and 1 000 000")
    return args


def make_large_ct(bench: Bench, shared: Path) -> Path:
    folder = bench.work / f"large-ct-{LARGE_CT}"
    say(f"synthesising the {LARGE_CT}-image CT (cloudfilm demo --large-ct {LARGE_CT})")
    timed(
        [*bench.cloudfilm, "demo", "--large-ct", str(LARGE_CT), "--output", str(folder)],
        env=child_env(bench.pycache, CLOUDFILM_SAMPLE_DATA=str(shared)),
        cwd=bench.work,
        what="cloudfilm demo --large-ct",
    )
    return folder


def facts(bench: Bench, runner: Runner, postgres: str | None) -> dict[str, str]:
    info = machine(Tools.find(), bench.work)
    info.pop("dcmtk", None)
    where = first_line(
        [sys.executable, "-c", "import cloudfilm; print(cloudfilm.__file__)"],
    )
    info["cloudfilm imported from"] = where
    if runner.theirs is not None:
        runner.theirs.start()
        info["orthanc dicomweb plugin"] = f"{runner.theirs.plugin_version()} ({DICOMWEB_PLUGIN})"
    if postgres:
        with runner.ours.engine.connect() as conn:
            version = conn.execute(text("SHOW server_version")).scalar_one()
        info["database (ours)"] = f"PostgreSQL {version} at {make_url(postgres).host}"
    else:
        info["database (ours)"] = "SQLite (embedded default, in the data directory)"
    info["http.workers (ours)"] = str(bench.workers)
    return info


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    shared = sample_data_dir()
    if shared is None:
        print(
            f"skip: the sample CT ({CT_134}) is not on this machine; set "
            "CLOUDFILM_SAMPLE_DATA to the shared data folder (e.g. /work/shared/data)"
        )
        return 0
    with_orthanc = os.access(ORTHANC, os.X_OK) and DICOMWEB_PLUGIN.is_file()
    if not with_orthanc:
        print(
            f"note: {ORTHANC} or {DICOMWEB_PLUGIN} not found, Orthanc skipped; install them "
            "with: apt-get install orthanc orthanc-dicomweb"
        )
    plan = Plan(
        runs=args.runs,
        requests=args.requests,
        scales=args.scale_list,
        orthanc_max=args.orthanc_max_studies,
        orthanc_budget=args.orthanc_budget,
    )
    # SIGTERM ends the run through the finally clauses, so that no server is left behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.time()
    with (
        tempfile.TemporaryDirectory(prefix="cloudfilm-bench-dicomweb-") as scratch,
        contextlib.ExitStack() as cleanup,
    ):
        bench = Bench(Path(scratch), cleanup, args.postgres, args.workers)
        try:
            ct = Corpus.load(shared / CT_134)
            large = Corpus.load(make_large_ct(bench, shared))
            runner = Runner(bench, plan, ct, large, with_orthanc)
            info = facts(bench, runner, args.postgres)
            info["load average at start (1/5/15 min)"] = load_note()
            info["uptime"] = first_line(["uptime"])
            for key, value in info.items():
                print(f"{key:>36}: {value}")
            print(
                f"{'data':>36}: {ct.folder} ({ct.count} files, {ct.total_bytes / 1e6:.1f} MB); "
                f"synthetic CT {large.count} files, {large.total_bytes / 1e6:.1f} MB",
                flush=True,
            )
            runner.run()
        except BenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    info["load average at end (1/5/15 min)"] = load_note()
    info["duration"] = f"{time.time() - started:.0f} s"
    print()
    print(report(runner.results, args.runs))
    print()
    counts = ", ".join(
        f"{scale}: ours {runner.counts[OURS].get(scale, '–')}, Orthanc "
        f"{runner.counts[THEIRS].get(scale, '–')}"
        for scale in [1, *plan.scales]
    )
    print(f"studies actually in each archive at each QIDO stage: {counts}")
    for entry in runner.fill_log:
        print(
            f"filled {entry['system']} towards {entry['target']}: +{entry['added']} studies in "
            f"{entry['seconds']:.1f} s"
        )
    for entry in runner.loads:
        print(
            f"stage {entry['stage']!r}: {entry.get('seconds', '?')} s, load average "
            f"{entry['loadavg_start']} → {entry.get('loadavg_end', '?')}, other processes "
            f"{entry.get('other_cpus', '?')} CPUs on average "
            f"({', '.join(f'{k} {v}' for k, v in entry.get('other_busiest', {}).items())}), "
            f"steal {entry.get('steal', 0):.0%}"
        )
    print(f"load average at end: {info['load average at end (1/5/15 min)']}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "machine": info,
                    "argv": sys.argv,
                    "loads": runner.loads,
                    "counts": runner.counts,
                    "fill": runner.fill_log,
                    "measures": [asdict(m) for m in runner.results.measures.values()],
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
