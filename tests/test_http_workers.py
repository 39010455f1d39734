"""``http.workers``: several HTTP processes on one port, one audit chain, a dead worker
replaced, a clean stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil

from test_cli import _cli, _wait_http

from conftest import DATA, free_port


def _workers(parent: psutil.Process) -> set[int]:
    pids = set()
    for child in parent.children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(child.cmdline()):
                pids.add(child.pid)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue  # a worker that just died (not yet reaped)
    return pids


def _replaced(parent: psutil.Process, gone: int, seconds: float = 60) -> set[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pids = _workers(parent)
        if len(pids) == 2 and gone not in pids:
            return pids
        time.sleep(0.3)
    raise AssertionError(f"worker {gone} was not replaced: {_workers(parent)}")


def test_two_workers__serve_audit_and_stop(tmp_path: Path) -> None:
    data = tmp_path / "var"
    port = free_port()
    env = {**os.environ, "CLOUDFILM_HTTP__WORKERS": "2"}
    created = _cli("client", "create", "workers", "--data-dir", str(data))
    assert created.returncode == 0, created.stderr
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cloudfilm",
            "serve",
            "--role",
            "api",
            "--data-dir",
            str(data),
            "--http-port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    parent = psutil.Process(process.pid)
    try:
        _wait_http(f"{base}/healthz", process)
        first = _workers(parent)
        assert len(first) == 2, first
        granted = httpx.post(
            f"{base}/api/oauth/token",
            data={"grant_type": "client_credentials"},
            auth=("workers", created.stdout.strip()),
        )
        assert granted.status_code == 200, granted.text
        auth = {"Authorization": f"Bearer {granted.json()['access_token']}"}
        body = (DATA / "ct_small.dcm").read_bytes()
        boundary = "b0undary"
        stow = (
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            + body
            + f"\r\n--{boundary}--\r\n".encode()
        )
        stored = httpx.post(
            f"{base}/dicom-web/studies",
            content=stow,
            headers={
                **auth,
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            },
        )
        assert stored.status_code == 200, stored.text

        def search(_: int) -> int:
            # A fresh connection each time: the kernel spreads them over both workers.
            return httpx.get(f"{base}/dicom-web/studies", headers=auth).status_code

        with ThreadPoolExecutor(8) as pool:
            assert set(pool.map(search, range(80))) == {200}

        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        _replaced(parent, victim)
        _wait_http(f"{base}/healthz", process)
        with ThreadPoolExecutor(4) as pool:
            assert set(pool.map(search, range(20))) == {200}
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr[-3000:]
    assert not [p for p in psutil.process_iter() if p.pid in first]
    # Both processes appended to one hash chain (each append under the write lock).
    verified = _cli("audit", "verify", "--data-dir", str(data))
    assert verified.returncode == 0, verified.stdout + verified.stderr
