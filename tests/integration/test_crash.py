"""Kill -9 the server in the middle of a storescu run; nothing acknowledged is lost.

SECURITY-CHECKS R1: after restart every instance the sender saw acknowledged has its
index row and readable bytes with a matching checksum, no index row lacks bytes, and
partial uploads are swept.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from cloudfilm.archive.ingest import Archive
from cloudfilm.archive.models import Instance
from cloudfilm.config import Settings

from conftest import free_port, require_tool

ITERATIONS = int(os.environ.get("CLOUDFILM_CRASH_ITERATIONS", "4"))


def _server(settings: Settings, port: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "CLOUDFILM_DATA_DIR": str(settings.data_dir),
        "CLOUDFILM_DIMSE__ACCEPT_UNKNOWN_CALLERS": "true",
    }
    if settings.database.url:
        env["CLOUDFILM_DATABASE__URL"] = settings.database.url
    process = subprocess.Popen(
        [sys.executable, "-m", "cloudfilm", "serve", "--role", "dimse", "--dicom-port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited: {process.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise AssertionError("server did not start listening within 60 s")


def _acknowledged(storescu_log: str) -> list[str]:
    """Files whose C-STORE response was Success, from `storescu -v` output."""
    acknowledged = []
    current = None
    for line in storescu_log.splitlines():
        if "Sending file:" in line:
            current = line.split("Sending file:", 1)[1].strip()
        elif "Received Store Response (Success)" in line and current:
            acknowledged.append(current)
            current = None
    return acknowledged


@pytest.mark.serial
def test_kill_9_during_storescu__acknowledged_instances_survive(
    settings: Settings, ct_files: list[Path]
) -> None:
    storescu = require_tool("storescu")
    rng = random.Random(int(os.environ.get("CLOUDFILM_CRASH_SEED", str(time.time_ns()))))
    acknowledged: set[str] = set()
    for iteration in range(ITERATIONS):
        port = free_port()
        server = _server(settings, port)
        sender = subprocess.Popen(
            [storescu, "-v", "-aec", "CLOUDFILM", "127.0.0.1", str(port), *map(str, ct_files)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        delay = rng.uniform(0.05, 1.2)
        time.sleep(delay)
        server.send_signal(signal.SIGKILL)
        server.wait()
        log = sender.communicate(timeout=60)[0].decode(errors="replace")
        acked = _acknowledged(log)
        assert len(acked) < len(ct_files), (
            f"iteration {iteration}: the kill after {delay:.2f} s came after the last object"
        )
        acknowledged.update(acked)

    # Restart: the server sweeps what the killed processes left, then answers again.
    port = free_port()
    server = _server(settings, port)
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=30)

    archive = Archive(settings)
    try:
        with archive.db.read_session() as session:
            rows = {i.sop_instance_uid: i for i in session.scalars(select(Instance))}
        for path in acknowledged:
            uid = dcmread(path, stop_before_pixels=True).SOPInstanceUID
            assert uid in rows, f"{path} was acknowledged but is not indexed"
        for row in rows.values():
            blob = archive.storage.read(row.storage_key)  # raises if the bytes are missing
            assert row.checksum == "sha256:" + hashlib.sha256(blob).hexdigest()
        leftovers = list((Path(settings.storage_url.removeprefix("file://")) / "tmp").iterdir())
        assert leftovers == []
    finally:
        archive.close()
    assert acknowledged, "no object was acknowledged before any kill"
