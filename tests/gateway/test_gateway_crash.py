"""kill -9 of a ``cloudfilm gateway`` process at random points while it moves a study (R6)."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import numpy as np
import pydicom
import pytest
from sqlalchemy import func, select

from cloudfilm.archive.models import Instance
from cloudfilm.config import Settings
from cloudfilm.gateway.models import InstanceState, StudyState
from cloudfilm.gateway.queue import GatewayQueue

from conftest import CT_134, DATA, LiveServer, free_port

if TYPE_CHECKING:
    from pacs_fixtures import OrthancPACS

pytest_plugins = ["pacs_fixtures", "gw_postgres"]

ITERATIONS = int(os.environ.get("CLOUDFILM_TEST_GATEWAY_KILLS", "10"))
CLOUDFILM = Path(sys.executable).parent / "cloudfilm"


@pytest.fixture
def backend() -> str:
    return "sqlite"


def environment(settings: Settings, work: Path) -> dict[str, str]:
    gw = settings.gateway
    assert gw.client_secret is not None
    sources = {
        name: source.model_dump(mode="json", exclude_none=True)
        for name, source in gw.sources.items()
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDFILM_")}
    env.update(
        {
            "CLOUDFILM_DATA_DIR": str(work / "var"),
            "CLOUDFILM_GATEWAY__DATA_DIR": str(gw.data_dir),
            "CLOUDFILM_GATEWAY__AE_TITLE": gw.ae_title,
            "CLOUDFILM_GATEWAY__SCP_PORT": str(gw.scp_port),
            "CLOUDFILM_GATEWAY__SOURCES": json.dumps(sources),
            "CLOUDFILM_GATEWAY__ARCHIVE_URL": gw.archive_url,
            "CLOUDFILM_GATEWAY__CLIENT_ID": str(gw.client_id),
            "CLOUDFILM_GATEWAY__CLIENT_SECRET": gw.client_secret.get_secret_value(),
            "CLOUDFILM_GATEWAY__BACKOFF_INITIAL_SECONDS": "0.2",
            "CLOUDFILM_GATEWAY__BACKOFF_MAX_SECONDS": "1",
            "CLOUDFILM_GATEWAY__BATCH_SIZE": "10",
            # the status API runs in the process too; a free port, not the default 11180
            "CLOUDFILM_GATEWAY__HTTP_PORT": str(free_port()),
        }
    )
    if gw.database_url:
        env["CLOUDFILM_GATEWAY__DATABASE_URL"] = gw.database_url
    return env


def start(env: dict[str, str], work: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [str(CLOUDFILM), "gateway"], env=env, cwd=work, stdout=out, stderr=subprocess.STDOUT
        )


def test_gateway_killed_repeatedly__every_instance_arrives_exactly_once(
    orthanc: OrthancPACS, gw_settings: Settings, live_server: LiveServer, tmp_path: Path
) -> None:
    files = sorted(CT_134.glob("*.dcm")) if CT_134.is_dir() else []
    if not files:  # without the shared CT: the small samples (fewer bytes per kill window)
        files = [DATA / "ct_small.dcm", DATA / "mr_small.dcm"]
    killed_repeatedly(orthanc, gw_settings, live_server, tmp_path, files, ITERATIONS)


def test_gateway_killed_repeatedly__state_on_postgresql(
    orthanc: OrthancPACS,
    gw_settings: Settings,
    live_server: LiveServer,
    tmp_path: Path,
    gateway_postgres_url: str,
) -> None:
    """The same on the gateway's state in PostgreSQL (``gateway.database_url``): three kills
    while it moves the small samples (the 134-slice run above covers the long work)."""
    state_on_pg = gw_settings.model_copy(
        update={
            "gateway": gw_settings.gateway.model_copy(update={"database_url": gateway_postgres_url})
        }
    )
    files = [DATA / "ct_small.dcm", DATA / "mr_small.dcm"]
    killed_repeatedly(orthanc, state_on_pg, live_server, tmp_path, files, 3)


def killed_repeatedly(
    orthanc: OrthancPACS,
    gw_settings: Settings,
    live_server: LiveServer,
    tmp_path: Path,
    files: list[Path],
    iterations: int,
) -> None:
    originals = {}
    for path in files:
        data = path.read_bytes()
        orthanc.upload(data)
        originals[str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)] = data
    work = tmp_path / "work"
    work.mkdir()
    env = environment(gw_settings, work)
    log = tmp_path / "gateway.log"
    rng = random.Random(int(os.environ.get("CLOUDFILM_TEST_SEED", time.time_ns())))
    seen: list[dict[str, int]] = []
    began = time.monotonic()
    for _ in range(iterations):
        proc = start(env, work, log)
        time.sleep(rng.uniform(1.0, 4.0))  # start-up takes ~1 s; then anywhere in the work
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        queue = GatewayQueue(gw_settings)
        seen.append(queue.summary()["instances"])
        queue.close()
    proc = start(env, work, log)
    try:
        queue = GatewayQueue(gw_settings)
        deadline = time.monotonic() + 120
        # The killed runs may have drained the queue already: wait until this process is
        # up (its status API answers, so its SIGTERM handler is in place) before stopping it.
        status = f"http://127.0.0.1:{env['CLOUDFILM_GATEWAY__HTTP_PORT']}/status"
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                if httpx.get(status, timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        while True:
            summary = queue.summary()
            if summary["studies"] and summary["backlog"] == 0:
                break
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, (summary, log.read_text()[-3000:])
            time.sleep(0.2)
        queue.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    seconds = time.monotonic() - began
    assert proc.returncode == 0  # SIGTERM: the current step finishes, then a clean exit

    with live_server.archive.db.read_session() as session:
        count = session.scalar(select(func.count()).select_from(Instance))
        rows = session.execute(select(Instance.sop_instance_uid, Instance.storage_key)).all()
    assert count == len(originals)  # SOP Instance UID is unique: once each, none missing
    assert {uid for uid, _ in rows} == set(originals)
    for uid, key in rows:
        a = pydicom.dcmread(io.BytesIO(originals[uid]))
        b = pydicom.dcmread(io.BytesIO(live_server.archive.storage.read(key)))
        assert np.array_equal(a.pixel_array, b.pixel_array), uid

    queue = GatewayQueue(gw_settings)
    try:
        assert queue.summary()["studies"] == {StudyState.DELIVERED: 1 if len(files) > 2 else 2}
        assert queue.summary()["instances"] == {InstanceState.DELIVERED: len(originals)}
        assert list(queue.spooled()) == []
    finally:
        queue.close()
    print(  # noqa: T201
        f"{iterations} kills, {len(originals)} instances, {seconds:.1f} s; "
        f"instance states at each kill: {seen}"
    )
