"""Gateway benchmark: one study from Orthanc (the PACS) to the archive, per retrieval method.

Run from the repository root::

    .venv/bin/python bench/gateway.py                  # 3 runs, medians (~5 min)
    .venv/bin/python bench/gateway.py --runs 5 --json bench/results/gateway.json

Orthanc from Debian (``/usr/sbin/Orthanc``, with the DICOMweb plugin from
``/usr/share/orthanc/plugins`` when it is installed) is started once from a temporary
config on loopback ports and loaded with the real 134-slice CT over REST. Its
``DicomModalities`` list the gateway's AE (C-MOVE destination, C-GET caller) and the AE of
the direct path below.

For every run and every retrieval method that exists (``move``, ``get``, and ``wado`` when
the plugin is there), with a fresh archive (``cloudfilm serve --role api`` on an empty data
directory, integration client made with ``cloudfilm client create`` before it starts) and
fresh gateway state (its own ``data_dir``: SQLite queue, spool, message log), the gateway's
Python API does what ``cloudfilm gateway fetch --study UID`` and the ``cloudfilm gateway``
loop do: ``Gateway.fetch`` (C-FIND, queue the study), then ``retrieve_next`` and
``deliver_next`` until the study is ``delivered``. Timed from the fetch request until the
last STOW-RS answer is recorded; every instance must then be delivered and in the archive.

Queue overhead: the same study by a direct path without the durable queue — a C-MOVE into a
plain pynetdicom Storage SCP that writes each instance to a file (no fsync, no database),
then one STOW-RS POST of all those files to a fresh archive (token fetched inside the timed
span, as the gateway does). Same machine, same runs, interleaved with the gateway cases.

Rates: studies/hour = 3600 / seconds; MB/s = bytes of the study as stored in Orthanc
(``DiskSize`` of ``/studies/{id}/statistics``, storage compression off) / seconds / 10^6.

The sample data is looked up like ``cloudfilm demo`` does (``CLOUDFILM_SAMPLE_DATA``, then
``../shared/data``); without it, or without Orthanc, the benchmark prints why and exits with
status 0 (skip). It binds only to 127.0.0.1, works in a temporary folder under /tmp, and
stops every process and server it starts, also on error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pydicom
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

from ingest import (
    CT_134,
    LOOPBACK,
    ORTHANC,
    BenchError,
    child_env,
    first_line,
    free_port,
    sample_data_dir,
    stop,
    tail,
    timed,
    wait_until,
)

REPO = Path(__file__).resolve().parent.parent
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
ORTHANC_AET = "ORTHANC"
GATEWAY_AET = "CF_GATEWAY"
DIRECT_AET = "CF_DIRECT"
CLIENT = "gateway"
DIRECT = "direct"
FETCH_TIMEOUT = 300.0
#: File-drop sources: the files are put where the gateway looks, no PACS query.
DROPS = ("folder", "ftp", "sftp")
FTP_USER = "pacs"
FTP_PASSWORD_ENV = "CLOUDFILM_BENCH_FTP_PASSWORD"
HTTP_TIMEOUT = 300.0


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def load_note() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


# -- the PACS -------------------------------------------------------------------------------


class OrthancPACS:
    """Orthanc on loopback with the gateway's and the direct path's AEs as modalities."""

    def __init__(self, base: Path, gateway_port: int, direct_port: int) -> None:
        self.base = base
        (base / "storage").mkdir(parents=True)
        self.http_port, self.dicom_port = free_port(), free_port()
        self.url = f"http://{LOOPBACK}:{self.http_port}"
        self.wado = DICOMWEB_PLUGIN.exists()
        config = {
            "Name": "cloudfilm-gateway-bench",
            "StorageDirectory": str(base / "storage"),
            "IndexDirectory": str(base / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAet": ORTHANC_AET,
            "DicomCheckCalledAet": False,
            "Plugins": [str(DICOMWEB_PLUGIN)] if self.wado else [],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "LuaScripts": [],
            "DicomModalities": {
                "gateway": [GATEWAY_AET, LOOPBACK, gateway_port],
                "direct": [DIRECT_AET, LOOPBACK, direct_port],
            },
            "OrthancPeers": {},
            "StorageCompression": False,
        }
        (base / "orthanc.json").write_text(json.dumps(config, indent=2))
        self.log = base / "orthanc.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [str(ORTHANC), str(self.base / "orthanc.json")],
                cwd=self.base,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        wait_until(self._ready, self.proc, "Orthanc", self.log)

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/system", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None

    def load(self, files: Sequence[Path]) -> tuple[str, int]:
        """POST every file; (Study Instance UID, bytes of the study as Orthanc stores it)."""
        study_id = ""
        with httpx.Client(base_url=self.url, timeout=60.0) as client:
            for path in files:
                response = client.post("/instances", content=path.read_bytes())
                response.raise_for_status()
                study_id = str(response.json()["ParentStudy"])
            stats = client.get(f"/studies/{study_id}/statistics").json()
            tags = client.get(f"/studies/{study_id}").json()["MainDicomTags"]
        if int(stats["CountInstances"]) != len(files):
            raise BenchError(f"Orthanc holds {stats['CountInstances']} of {len(files)} files")
        return str(tags["StudyInstanceUID"]), int(stats["DiskSize"])


# -- the archive ----------------------------------------------------------------------------


class Archive:
    """``cloudfilm serve --role api`` on an empty data directory, with an integration client."""

    def __init__(self, base: Path, pycache: Path) -> None:
        self.base = base
        self.data = base / "data"
        self.env = child_env(pycache)
        cloudfilm = [sys.executable, "-m", "cloudfilm"]
        _, out = timed(
            [*cloudfilm, "client", "create", CLIENT, "--data-dir", str(self.data)],
            env=self.env,
            cwd=base,
            what="cloudfilm client create",
        )
        self.secret = out.strip().splitlines()[-1].strip()
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.log = base / "serve.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    *cloudfilm,
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
                cwd=base,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        wait_until(self._ready, self.proc, "cloudfilm serve", self.log)

    def _ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/readyz", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def token(self, client: httpx.Client) -> str:
        response = client.post(
            f"{self.url}/api/oauth/token",
            data={
                "grant_type": "client_credentials",
                "client_id": CLIENT,
                "client_secret": self.secret,
            },
        )
        if response.status_code != 200:
            raise BenchError(f"token: {response.status_code} {response.text[:300]}")
        return str(response.json()["access_token"])

    def instances(self) -> int:
        """Instances in the archive's index (read from its SQLite file)."""
        with contextlib.closing(sqlite3.connect(self.data / "cloudfilm.db")) as db:
            return int(db.execute("SELECT count(*) FROM instance").fetchone()[0])

    def stop(self) -> None:
        stop(self.proc)


# -- the cases ------------------------------------------------------------------------------


@dataclass
class Sample:
    seconds: float
    first: float  # retrieval (gateway) or C-MOVE into the plain SCP (direct)
    second: float  # delivery (gateway) or the STOW-RS POST (direct)
    load: str


@dataclass
class Results:
    cases: dict[str, list[Sample]] = field(default_factory=dict)

    def add(self, case: str, sample: Sample) -> None:
        self.cases.setdefault(case, []).append(sample)


@contextlib.contextmanager
def ftp_server(root: Path) -> Any:
    """pyftpdlib serving ``root`` on loopback (the FTP drop a modality writes to); its port."""
    import warnings

    with warnings.catch_warnings():  # pyftpdlib still imports asyncore on Python 3.11
        warnings.simplefilter("ignore", DeprecationWarning)
        from pyftpdlib.authorizers import DummyAuthorizer
        from pyftpdlib.handlers import FTPHandler
        from pyftpdlib.servers import FTPServer

    password = secrets.token_urlsafe(12)
    os.environ[FTP_PASSWORD_ENV] = password
    authorizer = DummyAuthorizer()
    authorizer.add_user(FTP_USER, password, str(root), perm="elradfmwMT")
    handler = type("Handler", (FTPHandler,), {"authorizer": authorizer, "use_sendfile": False})
    logging.getLogger("pyftpdlib").setLevel(logging.WARNING)
    server = FTPServer((LOOPBACK, 0), handler)
    port = server.socket.getsockname()[1]
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"timeout": 0.05, "handle_exit": False}, daemon=True
    )
    thread.start()
    try:
        yield port, None
    finally:
        server.close_all()
        thread.join(5)


@contextlib.contextmanager
def sftp_server(root: Path) -> Any:
    """asyncssh's SFTP server on loopback, chrooted to ``root``, in a thread of its own;
    its port and a known_hosts file with its host key."""
    import asyncio

    import asyncssh

    password = secrets.token_urlsafe(12)
    os.environ[FTP_PASSWORD_ENV] = password

    class Server(asyncssh.SSHServer):
        def begin_auth(self, username: str) -> bool:  # noqa: ARG002 - a password for all
            return True

        def password_auth_supported(self) -> bool:
            return True

        def validate_password(self, username: str, given: str) -> bool:
            return username == FTP_USER and given == password

    key = asyncssh.generate_private_key("ssh-ed25519")
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, Any] = {}

    async def listen() -> None:
        holder["server"] = await asyncssh.listen(
            LOOPBACK,
            0,
            server_host_keys=[key],
            server_factory=Server,
            sftp_factory=lambda chan: asyncssh.SFTPServer(chan, chroot=str(root).encode()),
        )
        ready.set()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(listen())
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    if not ready.wait(10):
        raise BenchError("the SFTP server did not start")
    port = holder["server"].sockets[0].getsockname()[1]
    known_hosts = root.parent / "known_hosts"
    known_hosts.write_text(f"[{LOOPBACK}]:{port} {key.export_public_key().decode()}")

    async def close() -> None:
        holder["server"].close()
        await holder["server"].wait_closed()

    try:
        yield port, known_hosts
    finally:
        asyncio.run_coroutine_threadsafe(close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


class Bench:
    def __init__(self, work: Path, files: list[Path], gateway_port: int, direct_port: int):
        self.work = work
        self.files = files
        self.gateway_port = gateway_port
        self.direct_port = direct_port
        self.pycache = work / "pycache"
        self.counter = 0
        self.pacs: OrthancPACS | None = None
        self.study_uid = ""
        self.study_bytes = 0

    def fresh(self, name: str) -> Path:
        self.counter += 1
        path = self.work / f"{self.counter:03d}-{name}"
        path.mkdir()
        return path

    def run_gateway(self, method: str) -> Sample:
        from cloudfilm.config import Settings
        from cloudfilm.gateway.models import InstanceState, StudyState
        from cloudfilm.gateway.service import Gateway

        assert self.pacs is not None
        base = self.fresh(f"gateway-{method}")
        archive = Archive(base, self.pycache)
        stack = contextlib.ExitStack()
        try:
            source: dict[str, Any] = {
                "aet": ORTHANC_AET,
                "host": LOOPBACK,
                "port": self.pacs.dicom_port,
                "retrieve": method,
                "poll_interval": 3600,
            }
            if method in DROPS:  # the study's files dropped where the gateway looks
                drop = base / "drop"
                drop.mkdir()
                for path in self.files:
                    shutil.copyfile(path, drop / path.name)
                source = {"retrieve": method, "poll_interval": 3600}
                if method == "folder":
                    source["folder"] = drop
                else:
                    serve = ftp_server if method == "ftp" else sftp_server
                    port, known_hosts = stack.enter_context(serve(drop))
                    source.update(
                        host=LOOPBACK,
                        port=port,
                        ftp_user=FTP_USER,
                        ftp_password_env=FTP_PASSWORD_ENV,
                        ftp_path="/",
                    )
                    if known_hosts is not None:
                        source["sftp_known_hosts"] = known_hosts
            if method == "wado":
                source["wado_url"] = f"{self.pacs.url}/dicom-web"
            if method == "wado-uri":  # instances listed by C-FIND, one WADO-URI GET each
                source["wado_uri_url"] = f"{self.pacs.url}/wado"
            settings = Settings(
                data_dir=base / "unused",
                gateway={
                    "data_dir": base / "gateway",
                    "ae_title": GATEWAY_AET,
                    "scp_host": LOOPBACK,
                    "scp_port": self.gateway_port,
                    "sources": {"pacs": source},
                    "archive_url": archive.url,
                    "client_id": CLIENT,
                    "client_secret": archive.secret,
                    "http_port": 0,
                    "backoff_initial_seconds": 0.2,
                    "backoff_max_seconds": 1.0,
                },
            )
            gw = Gateway(settings)
            gw.start()
            try:
                start = time.perf_counter()
                retrieved_at = None
                if method in DROPS:
                    # A file is taken once its size is the same in two listings.
                    gw.poll_drop("pacs")
                    gw.poll_drop("pacs")
                    if gw.queue.study(self.study_uid) is None:
                        raise BenchError(f"{method}: the dropped study was not queued")
                    retrieved_at = time.perf_counter()
                else:
                    found = gw.fetch("pacs", study_instance_uid=self.study_uid)
                    if len(found) != 1:
                        raise BenchError(f"C-FIND found {len(found)} studies, expected 1")
                deadline = time.monotonic() + FETCH_TIMEOUT
                while True:
                    job = gw.retrieve_next()
                    did = job is not None
                    study = gw.queue.study(self.study_uid)
                    if retrieved_at is None and job is not None and study is not None:
                        if study.state == StudyState.RETRIEVED:
                            retrieved_at = time.perf_counter()
                    did |= gw.deliver_next() is not None
                    study = gw.queue.study(self.study_uid)
                    if study is not None and study.state == StudyState.DELIVERED:
                        break
                    if study is not None and study.state == StudyState.DEAD:
                        raise BenchError(f"{method}: study dead: {gw.queue.studies()}")
                    if time.monotonic() > deadline:
                        raise BenchError(f"{method}: not delivered in {FETCH_TIMEOUT:.0f} s")
                    if not did:
                        time.sleep(0.02)
                seconds = time.perf_counter() - start
                counts = gw.queue.summary()["instances"]
            finally:
                gw.close()
            delivered = counts.get(InstanceState.DELIVERED, 0)
            stored = archive.instances()
            if delivered != len(self.files) or stored != len(self.files):
                raise BenchError(
                    f"{method}: {delivered} delivered, {stored} archived of {len(self.files)}"
                )
            first = (retrieved_at or start) - start
            return Sample(seconds, first, seconds - first, load_note())
        finally:
            stack.close()
            archive.stop()

    def run_direct(self) -> Sample:
        assert self.pacs is not None
        base = self.fresh("direct")
        archive = Archive(base, self.pycache)
        scp = None
        try:
            folder = base / "received"
            folder.mkdir()
            written: list[Path] = []
            lock = threading.Lock()

            def on_store(event: Any) -> int:
                path = folder / f"{event.request.AffectedSOPInstanceUID}.dcm"
                path.write_bytes(event.encoded_dataset())
                with lock:
                    written.append(path)
                return 0x0000

            ae = AE(ae_title=DIRECT_AET)
            for context in AllStoragePresentationContexts:
                ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
            ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
            scp = ae.start_server(
                (LOOPBACK, self.direct_port),
                block=False,
                evt_handlers=[(evt.EVT_C_STORE, on_store)],
            )
            query = pydicom.Dataset()
            query.QueryRetrieveLevel = "STUDY"
            query.StudyInstanceUID = self.study_uid
            start = time.perf_counter()
            assoc = ae.associate(LOOPBACK, self.pacs.dicom_port, ae_title=ORTHANC_AET)
            if not assoc.is_established:
                raise BenchError("direct: Orthanc refused the association")
            try:
                answers = list(
                    assoc.send_c_move(query, DIRECT_AET, StudyRootQueryRetrieveInformationModelMove)
                )
            finally:
                assoc.release()
            status = answers[-1][0] if answers else None
            if status is None or status.Status != 0x0000:
                raise BenchError(f"direct: C-MOVE ended with {status}")
            moved = time.perf_counter()
            boundary = secrets.token_hex(16)
            body = bytearray()
            for path in written:
                body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                body += path.read_bytes()
                body += b"\r\n"
            body += f"--{boundary}--\r\n".encode()
            with httpx.Client(timeout=HTTP_TIMEOUT) as client:
                token = archive.token(client)
                response = client.post(
                    f"{archive.url}/dicom-web/studies",
                    content=bytes(body),
                    headers={
                        "Content-Type": "multipart/related; "
                        f'type="application/dicom"; boundary={boundary}',
                        "Accept": "application/dicom+json",
                        "Authorization": f"Bearer {token}",
                    },
                )
            seconds = time.perf_counter() - start
            if response.status_code != 200:
                raise BenchError(f"direct: STOW-RS {response.status_code} {response.text[:300]}")
            referenced = response.json().get("00081199", {}).get("Value", [])
            stored = archive.instances()
            if len(written) != len(self.files) or len(referenced) != len(self.files):
                raise BenchError(
                    f"direct: {len(written)} received, {len(referenced)} referenced "
                    f"of {len(self.files)}"
                )
            if stored != len(self.files):
                raise BenchError(f"direct: {stored} archived of {len(self.files)}")
            return Sample(seconds, moved - start, seconds - (moved - start), load_note())
        finally:
            if scp is not None:
                scp.shutdown()
            archive.stop()


# -- report ---------------------------------------------------------------------------------


LABELS = {
    "move": "gateway, C-MOVE → queue → STOW-RS",
    "get": "gateway, C-GET → queue → STOW-RS",
    "wado": "gateway, WADO-RS → queue → STOW-RS",
    "wado-uri": "gateway, WADO-URI (one GET per instance) → queue → STOW-RS",
    "folder": "gateway, watch folder (files dropped) → queue → STOW-RS",
    "ftp": "gateway, FTP drop folder (pyftpdlib) → queue → STOW-RS",
    "sftp": "gateway, SFTP drop folder (asyncssh) → queue → STOW-RS",
    DIRECT: "direct, C-MOVE → files → 1 STOW-RS (no queue)",
}


def report(results: Results, study_bytes: int, instances: int) -> str:
    mb = study_bytes / 1e6
    lines = [
        f"Study: {instances} instances, {mb:.1f} MB as stored in Orthanc",
        "",
        "| path | median s | studies/h | MB/s | retrieve s | deliver s | runs (s) |",
        "|---|--:|--:|--:|--:|--:|---|",
    ]
    direct = results.cases.get(DIRECT)
    for case, samples in results.cases.items():
        seconds = statistics.median(s.seconds for s in samples)
        first = statistics.median(s.first for s in samples)
        second = statistics.median(s.second for s in samples)
        runs = ", ".join(f"{s.seconds:.1f}" for s in samples)
        lines.append(
            f"| {LABELS[case]} | {seconds:.1f} | {3600 / seconds:.0f} | {mb / seconds:.1f} "
            f"| {first:.1f} | {second:.1f} | {runs} |"
        )
    if direct:
        base = statistics.median(s.seconds for s in direct)
        lines.append("")
        for case, samples in results.cases.items():
            if case == DIRECT:
                continue
            seconds = statistics.median(s.seconds for s in samples)
            lines.append(
                f"{case}: {seconds / base:.2f}× the direct path's time "
                f"({seconds - base:+.1f} s, {(seconds - base) / instances * 1000:+.0f} ms/instance)"
            )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="repetitions per path")
    parser.add_argument(
        "--methods",
        default="move,get,wado,wado-uri,folder,ftp,sftp",
        help="gateway retrieval methods to time (comma-separated; wado and wado-uri need "
        "the DICOMweb plugin)",
    )
    parser.add_argument("--no-direct", action="store_true", help="skip the direct path")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    shared = sample_data_dir()
    if shared is None:
        print(f"skip: the shared sample data ({CT_134}) was not found")
        return 0
    if not os.access(ORTHANC, os.X_OK):
        print(f"skip: Orthanc is not installed ({ORTHANC}; apt-get install orthanc)")
        return 0
    files = sorted((shared / CT_134).glob("*.dcm"))
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("pynetdicom").setLevel(logging.ERROR)
    methods = [m for m in args.methods.split(",") if m]
    for web in ("wado", "wado-uri"):
        if web in methods and not DICOMWEB_PLUGIN.exists():
            say(f"note: no {DICOMWEB_PLUGIN} (apt-get install orthanc-dicomweb): {web} skipped")
            methods.remove(web)
    cases = [*methods] + ([] if args.no_direct else [DIRECT])
    uptime_before = first_line(["uptime"])
    say(f"uptime before: {uptime_before}")
    work = Path(tempfile.mkdtemp(prefix="cloudfilm-bench-gateway-"))
    results = Results()
    bench = Bench(work, files, free_port(), free_port())
    try:
        bench.pacs = OrthancPACS(work / "orthanc", bench.gateway_port, bench.direct_port)
        bench.pacs.start()
        bench.study_uid, bench.study_bytes = bench.pacs.load(files)
        say(f"Orthanc loaded: {len(files)} instances, {bench.study_bytes / 1e6:.1f} MB")
        for run in range(args.runs):
            order = cases[run % len(cases) :] + cases[: run % len(cases)]
            for case in order:
                sample = bench.run_direct() if case == DIRECT else bench.run_gateway(case)
                results.add(case, sample)
                say(
                    f"run {run + 1}/{args.runs} {case}: {sample.seconds:.1f} s "
                    f"({sample.first:.1f} + {sample.second:.1f}), load {sample.load}"
                )
    except BenchError as exc:
        say(f"error: {exc}")
        if bench.pacs is not None:
            say(tail(bench.pacs.log))
        return 1
    finally:
        if bench.pacs is not None:
            bench.pacs.stop()
        shutil.rmtree(work, ignore_errors=True)
    uptime_after = first_line(["uptime"])
    say(f"uptime after: {uptime_after}")
    text = report(results, bench.study_bytes, len(files))
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "study_bytes": bench.study_bytes,
                    "instances": len(files),
                    "uptime_before": uptime_before,
                    "uptime_after": uptime_after,
                    "orthanc": first_line([str(ORTHANC), "--version"]),
                    "cases": {
                        case: [s.__dict__ for s in samples]
                        for case, samples in results.cases.items()
                    },
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
