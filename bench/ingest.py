"""Ingest benchmark: our C-STORE door and import CLI against Orthanc, in one run.

Run from the repository root::

    .venv/bin/python bench/ingest.py            # 3 runs, medians, ratios
    .venv/bin/python bench/ingest.py --runs 5 --json bench/results/ingest.json

What is measured, each time on fresh, empty data directories under /tmp:

* ``cstore/cloudfilm`` — ``cloudfilm serve --role dimse`` receiving the real 134-slice CT
  from dcmtk ``storescu`` (one association, ``TCP_NODELAY=1`` for storescu);
* ``cstore/orthanc`` — the same storescu command against Orthanc from Debian's package,
  once as configured out of the box and once with ``TCP_NODELAY=1`` in Orthanc's own
  environment too (its DCMTK-based SCP honours the variable; ours sets TCP_NODELAY itself);
* ``bulk/cloudfilm import`` — ``cloudfilm import --processes 2`` and ``--processes 1``:
  wall time of the whole command (interpreter start, imports, schema creation, import) and
  the rate the command itself prints (import only);
* ``bulk/orthanc rest`` — every file POSTed to Orthanc's ``/instances``, one by one, over one
  keep-alive HTTP connection.

The sample data is looked up like ``cloudfilm demo`` does (``CLOUDFILM_SAMPLE_DATA``, then
``../shared/data``); without it the benchmark prints why and exits with status 0 (skip).
Every process it starts is stopped at the end, also on error; it binds only to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
CT_134 = Path("ct/pancreas_ct_cb_001_axial_134")
OUR_AET = "CLOUDFILM"
ORTHANC_AET = "ORTHANC"
ORTHANC = Path("/usr/sbin/Orthanc")
LOOPBACK = "127.0.0.1"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
CLI_RATE = re.compile(r"([\d.]+) s \((\d+) objects/s, (\d+) MB/s\)")


class BenchError(RuntimeError):
    """A measurement could not be taken (a server did not start, data went missing...)."""


# -- what we measure ------------------------------------------------------------------------


@dataclass
class Series:
    """The repeated timings of one measurement."""

    key: str
    door: str
    system: str
    seconds: list[float] = field(default_factory=list)

    def median(self) -> float:
        return statistics.median(self.seconds)


@dataclass(frozen=True)
class Corpus:
    folder: Path
    files: tuple[Path, ...]
    total_bytes: int

    @classmethod
    def load(cls, folder: Path) -> Corpus:
        files = tuple(sorted(p for p in folder.iterdir() if p.is_file()))
        return cls(folder, files, sum(p.stat().st_size for p in files))

    @property
    def count(self) -> int:
        return len(self.files)


@dataclass(frozen=True)
class Tools:
    storescu: str | None
    echoscu: str | None
    orthanc: Path | None

    @classmethod
    def find(cls) -> Tools:
        return cls(
            storescu=shutil.which("storescu"),
            echoscu=shutil.which("echoscu"),
            orthanc=ORTHANC if os.access(ORTHANC, os.X_OK) else None,
        )

    @property
    def dcmtk(self) -> bool:
        return self.storescu is not None and self.echoscu is not None


# -- process helpers ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def child_env(pycache: Path, **extra: str) -> dict[str, str]:
    """The environment for a child: no inherited CLOUDFILM_* settings, bytecode cached.

    Bytecode goes to a cache under /tmp (PYTHONPYCACHEPREFIX) so that interpreter start-up
    is what an installed deployment sees, without writing __pycache__ into the source tree.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDFILM_")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    env.update(extra)
    return env


@contextlib.contextmanager
def running(
    cmd: Sequence[str], *, env: dict[str, str], cwd: Path, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``cmd`` (output to ``log``) and always stop it: SIGTERM, then SIGKILL."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        try:
            yield proc
        finally:
            stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def tail(log: Path, lines: int = 15) -> str:
    try:
        text = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


def wait_until(
    ready: Callable[[], bool], proc: subprocess.Popen[bytes], what: str, log: Path
) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with status {proc.returncode}:\n{tail(log)}")
        if ready():
            return
        time.sleep(0.1)
    raise BenchError(f"{what} did not become ready in {START_TIMEOUT:.0f} s:\n{tail(log)}")


def echo_ok(tools: Tools, aet: str, port: int) -> bool:
    assert tools.echoscu is not None
    done = subprocess.run(
        [tools.echoscu, "-aec", aet, LOOPBACK, str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )
    return done.returncode == 0


def timed(cmd: Sequence[str], *, env: dict[str, str], cwd: Path, what: str) -> tuple[float, str]:
    """Run ``cmd`` to completion; (wall seconds, stdout). Any failure is a BenchError."""
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise BenchError(
            f"{what} failed with status {done.returncode}:\n"
            f"{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )
    return elapsed, done.stdout


def storescu_cmd(tools: Tools, aet: str, port: int, corpus: Corpus) -> list[str]:
    assert tools.storescu is not None
    return [tools.storescu, "-aec", aet, LOOPBACK, str(port), *map(str, corpus.files)]


# -- the measurements -----------------------------------------------------------------------


@dataclass
class Bench:
    corpus: Corpus
    tools: Tools
    work: Path
    """Scratch folder under /tmp; every measurement gets a fresh subfolder."""
    _counter: int = 0

    @property
    def cloudfilm(self) -> list[str]:
        return [sys.executable, "-m", "cloudfilm"]

    @property
    def pycache(self) -> Path:
        return self.work / "pycache"

    def fresh(self, name: str) -> Path:
        self._counter += 1
        path = self.work / f"{self._counter:03d}-{name}"
        path.mkdir()
        return path

    def storescu_env(self) -> dict[str, str]:
        return {**os.environ, "TCP_NODELAY": "1"}

    # our doors

    def warm_up(self) -> None:
        """Compile bytecode and read the files once, so that no run pays for it alone."""
        base = self.fresh("warm-up")
        timed(
            [
                *self.cloudfilm,
                "import",
                "--quiet",
                "--data-dir",
                str(base / "data"),
                "--processes",
                "2",
                str(self.corpus.folder),
            ],
            env=child_env(self.pycache),
            cwd=base,
            what="warm-up import",
        )

    def ours_cstore(self) -> float:
        base = self.fresh("cloudfilm-dimse")
        port = free_port()
        data = base / "data"
        env = child_env(self.pycache, CLOUDFILM_DIMSE__ACCEPT_UNKNOWN_CALLERS="true")
        cmd = [
            *self.cloudfilm,
            "serve",
            "--role",
            "dimse",
            "--data-dir",
            str(data),
            "--dicom-port",
            str(port),
        ]
        log = base / "serve.log"
        with running(cmd, env=env, cwd=base, log=log) as proc:
            wait_until(lambda: echo_ok(self.tools, OUR_AET, port), proc, "cloudfilm serve", log)
            seconds, _ = timed(
                storescu_cmd(self.tools, OUR_AET, port, self.corpus),
                env=self.storescu_env(),
                cwd=base,
                what="storescu → cloudfilm",
            )
            stored = count_our_instances(data)
        self.expect(stored, "cloudfilm serve --role dimse")
        return seconds

    def ours_import(self, processes: int) -> tuple[float, float]:
        """(wall seconds of the command, seconds derived from the rate it prints)."""
        base = self.fresh(f"cloudfilm-import-p{processes}")
        data = base / "data"
        cmd = [
            *self.cloudfilm,
            "import",
            "--quiet",
            "--data-dir",
            str(data),
            "--processes",
            str(processes),
            str(self.corpus.folder),
        ]
        seconds, out = timed(cmd, env=child_env(self.pycache), cwd=base, what="cloudfilm import")
        match = CLI_RATE.search(out)
        if match is None:
            raise BenchError(f"cloudfilm import printed no rate:\n{out}")
        self.expect(count_our_instances(data), f"cloudfilm import --processes {processes}")
        return seconds, self.corpus.count / int(match.group(2))

    # Orthanc's doors

    @contextlib.contextmanager
    def orthanc(self, name: str, **extra_env: str) -> Iterator[OrthancServer]:
        assert self.tools.orthanc is not None
        base = self.fresh(name)
        server = OrthancServer(http_port=free_port(), dicom_port=free_port())
        config = base / "orthanc.json"
        config.write_text(json.dumps(server.config(base), indent=2))
        env = {**os.environ, **extra_env}
        log = base / "orthanc.log"
        with running([str(self.tools.orthanc), str(config)], env=env, cwd=base, log=log) as proc:
            wait_until(server.http_ready, proc, "Orthanc", log)
            if self.tools.dcmtk:
                wait_until(
                    lambda: echo_ok(self.tools, ORTHANC_AET, server.dicom_port),
                    proc,
                    "Orthanc's DICOM port",
                    log,
                )
            yield server

    def orthanc_cstore(self, *, nodelay: bool) -> float:
        extra = {"TCP_NODELAY": "1"} if nodelay else {}
        with self.orthanc("orthanc-dimse" + ("-nodelay" if nodelay else ""), **extra) as server:
            seconds, _ = timed(
                storescu_cmd(self.tools, ORTHANC_AET, server.dicom_port, self.corpus),
                env=self.storescu_env(),
                cwd=self.work,
                what="storescu → Orthanc",
            )
            self.expect(server.instances(), "Orthanc C-STORE")
        return seconds

    def orthanc_rest(self) -> float:
        with (
            self.orthanc("orthanc-rest") as server,
            httpx.Client(
                base_url=server.url, timeout=60.0, headers={"Content-Type": "application/dicom"}
            ) as client,
        ):
            client.get("/system").raise_for_status()  # open the connection before the clock
            start = time.perf_counter()
            for path in self.corpus.files:
                response = client.post("/instances", content=path.read_bytes())
                if response.status_code != 200 or response.json().get("Status") != "Success":
                    raise BenchError(
                        f"Orthanc refused {path.name}: {response.status_code} {response.text[:300]}"
                    )
            seconds = time.perf_counter() - start
            self.expect(server.instances(), "Orthanc REST")
        return seconds

    def expect(self, stored: int, what: str) -> None:
        if stored != self.corpus.count:
            raise BenchError(f"{what}: {stored} instances stored, expected {self.corpus.count}")


@dataclass(frozen=True)
class OrthancServer:
    http_port: int
    dicom_port: int

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    def config(self, base: Path) -> dict[str, object]:
        (base / "storage").mkdir()
        (base / "index").mkdir()
        return {
            "Name": "cloudfilm-bench",
            "StorageDirectory": str(base / "storage"),
            "IndexDirectory": str(base / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAet": ORTHANC_AET,
            "DicomCheckCalledAet": False,
            "Plugins": [],
            "LuaScripts": [],
            "DicomModalities": {},
            "OrthancPeers": {},
        }

    def http_ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/system", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def instances(self) -> int:
        response = httpx.get(f"{self.url}/statistics", timeout=10.0)
        response.raise_for_status()
        return int(response.json()["CountInstances"])


def count_our_instances(data_dir: Path) -> int:
    """Rows in the archive index of an embedded (SQLite) data directory."""
    uri = f"file:{data_dir / 'cloudfilm.db'}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        return int(db.execute("SELECT count(*) FROM instance").fetchone()[0])


# -- the machine ----------------------------------------------------------------------------


def first_line(cmd: Sequence[str]) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not available"
    return ((done.stdout or done.stderr).strip().splitlines() or ["?"])[0]


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def filesystem_of(path: Path) -> str:
    best, kind = "", "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
                best, kind = parts[1], parts[2]
    return kind


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine(tools: Tools, work: Path) -> dict[str, str]:
    commit = first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = first_line(["git", "-C", str(REPO), "status", "--porcelain", "--", "src"])
    return {
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "cloudfilm": f"{package_version('cloudfilm')} (git {commit}"
        f"{', src/ modified' if dirty not in ('', '?') else ''})",
        "pydicom / pynetdicom": f"{package_version('pydicom')} / {package_version('pynetdicom')}",
        "orthanc": first_line([str(tools.orthanc), "--version"])
        if tools.orthanc
        else "not installed",
        "dcmtk": first_line([tools.storescu, "--version"]) if tools.storescu else "not installed",
        "scratch filesystem": f"{work.parent} ({filesystem_of(work)})",
    }


# -- report ---------------------------------------------------------------------------------


def report(series: list[Series], corpus: Corpus, runs: int) -> str:
    mb = corpus.total_bytes / 1e6
    by_key = {s.key: s for s in series if s.seconds}
    lines = [
        f"{corpus.count} files, {mb:.1f} MB; median of {runs} runs",
        "",
        "| door | system | median s | instances/s | MB/s | runs (s) |",
        "|---|---|--:|--:|--:|---|",
    ]
    for s in by_key.values():
        median = s.median()
        runs_text = ", ".join(f"{x:.2f}" for x in s.seconds)
        lines.append(
            f"| {s.door} | {s.system} | {median:.2f} | {corpus.count / median:.0f} | "
            f"{mb / median:.1f} | {runs_text} |"
        )
    pairs = [
        ("C-STORE", "ours_cstore", "orthanc_cstore"),
        ("C-STORE", "ours_cstore", "orthanc_cstore_nodelay"),
        ("bulk file", "ours_import_p2_wall", "orthanc_rest"),
        ("bulk file", "ours_import_p2_cli", "orthanc_rest"),
        ("bulk file", "ours_import_p1_wall", "orthanc_rest"),
        ("bulk file", "ours_import_p1_cli", "orthanc_rest"),
    ]
    ratio_lines = [
        "",
        "| door | ours | Orthanc | ours/Orthanc (instances/s) |",
        "|---|---|---|--:|",
    ]
    for door, ours, theirs in pairs:
        if ours in by_key and theirs in by_key:
            ratio = by_key[theirs].median() / by_key[ours].median()
            ratio_lines.append(
                f"| {door} | {by_key[ours].system} | {by_key[theirs].system} | {ratio:.2f} |"
            )
    if len(ratio_lines) > 3:
        lines += ratio_lines
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------


def sample_data_dir() -> Path | None:
    """The shared sample-data folder, found the way ``cloudfilm demo`` finds it."""
    for candidate in (
        os.environ.get("CLOUDFILM_SAMPLE_DATA"),
        "../shared/data",
        str(REPO.parent / "shared" / "data"),
    ):
        if candidate and (Path(candidate) / CT_134).is_dir():
            return Path(candidate).resolve()
    return None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="repetitions per measurement")
    parser.add_argument(
        "--ct",
        type=Path,
        default=None,
        help="folder of DICOM files (default: the shared 134-slice CT)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    folder: Path | None = args.ct
    if folder is None:
        shared = sample_data_dir()
        folder = shared / CT_134 if shared else None
    if folder is None:
        print(
            f"skip: the sample CT ({CT_134}) is not on this machine; set "
            "CLOUDFILM_SAMPLE_DATA to the shared data folder (e.g. /work/shared/data) "
            "or pass --ct FOLDER"
        )
        return 0
    if not folder.is_dir():
        print(f"skip: {folder} is not a folder")
        return 0
    corpus = Corpus.load(folder)
    tools = Tools.find()
    if not tools.dcmtk:
        print(
            "note: dcmtk (storescu, echoscu) not found, C-STORE doors skipped; "
            "install it with: apt-get install dcmtk"
        )
    if tools.orthanc is None:
        print(
            f"note: {ORTHANC} not found, Orthanc skipped; install it with: apt-get install orthanc"
        )

    series = {
        "ours_cstore": Series("ours_cstore", "C-STORE", "cloudfilm serve --role dimse"),
        "orthanc_cstore": Series("orthanc_cstore", "C-STORE", "Orthanc, default"),
        "orthanc_cstore_nodelay": Series(
            "orthanc_cstore_nodelay", "C-STORE", "Orthanc, TCP_NODELAY=1 in its env"
        ),
        "ours_import_p2_wall": Series(
            "ours_import_p2_wall", "bulk file", "cloudfilm import --processes 2, whole command"
        ),
        "ours_import_p2_cli": Series(
            "ours_import_p2_cli", "bulk file", "cloudfilm import --processes 2, rate it prints"
        ),
        "ours_import_p1_wall": Series(
            "ours_import_p1_wall", "bulk file", "cloudfilm import --processes 1, whole command"
        ),
        "ours_import_p1_cli": Series(
            "ours_import_p1_cli", "bulk file", "cloudfilm import --processes 1, rate it prints"
        ),
        "orthanc_rest": Series(
            "orthanc_rest", "bulk file", "Orthanc REST POST /instances, 1 keep-alive connection"
        ),
    }
    with tempfile.TemporaryDirectory(prefix="cloudfilm-bench-ingest-") as scratch:
        work = Path(scratch)
        bench = Bench(corpus, tools, work)
        info = machine(tools, work)
        for key, value in info.items():
            print(f"{key:>20}: {value}")
        print(
            f"{'data':>20}: {corpus.folder} ({corpus.count} files, "
            f"{corpus.total_bytes / 1e6:.1f} MB)",
            flush=True,
        )
        try:
            bench.warm_up()
            for run in range(1, args.runs + 1):
                measure(bench, series, run, args.runs)
        except BenchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    results = [s for s in series.values() if s.seconds]
    print()
    print(report(results, corpus, args.runs))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "machine": info,
                    "files": corpus.count,
                    "bytes": corpus.total_bytes,
                    "series": [asdict(s) for s in results],
                },
                indent=2,
            )
        )
    return 0


def measure(bench: Bench, series: dict[str, Series], run: int, runs: int) -> None:
    """One run of every measurement the tools allow, interleaved so drift hits all alike."""
    tools = bench.tools

    def note(what: str, seconds: float) -> None:
        print(
            f"  run {run}/{runs} {what:<44} {seconds:6.2f} s "
            f"{bench.corpus.count / seconds:6.0f} inst/s",
            file=sys.stderr,
            flush=True,
        )

    if tools.dcmtk:
        seconds = bench.ours_cstore()
        series["ours_cstore"].seconds.append(seconds)
        note("C-STORE → cloudfilm", seconds)
    for processes in (2, 1):
        wall, printed = bench.ours_import(processes)
        series[f"ours_import_p{processes}_wall"].seconds.append(wall)
        series[f"ours_import_p{processes}_cli"].seconds.append(printed)
        note(f"cloudfilm import --processes {processes} (whole)", wall)
        note(f"cloudfilm import --processes {processes} (printed)", printed)
    if tools.orthanc is None:
        return
    if tools.dcmtk:
        for nodelay in (False, True):
            seconds = bench.orthanc_cstore(nodelay=nodelay)
            key = "orthanc_cstore_nodelay" if nodelay else "orthanc_cstore"
            series[key].seconds.append(seconds)
            note(f"C-STORE → Orthanc{' (TCP_NODELAY=1)' if nodelay else ''}", seconds)
    seconds = bench.orthanc_rest()
    series["orthanc_rest"].seconds.append(seconds)
    note("REST → Orthanc", seconds)


if __name__ == "__main__":
    sys.exit(main())
