"""Orthanc (the PACS) → gateway (C-FIND poll, C-MOVE, spool, STOW-RS) → archive."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pydicom
import pytest
from sqlalchemy import func, select

from cloudfilm.archive.models import Instance
from cloudfilm.config import Settings
from cloudfilm.gateway.models import InstanceState, StudyState
from cloudfilm.gateway.service import Gateway

from conftest import CT_134, DATA, LiveServer

if TYPE_CHECKING:
    from pacs_fixtures import OrthancPACS

pytest_plugins = ["pacs_fixtures"]

SMALL = ["ct_small.dcm", "mr_small.dcm", "emri_small_jpeg_ls_lossless.dcm"]


@pytest.fixture
def backend() -> str:
    """The archive on SQLite here (the gateway's own state is SQLite in every test)."""
    return "sqlite"


@pytest.fixture
def gateway(gw_settings: Settings) -> Iterator[Gateway]:
    gw = Gateway(gw_settings)
    gw.start()
    yield gw
    gw.close()


def drain(gw: Gateway, *, timeout: float = 60.0) -> None:
    """Run the loop until nothing is left to do (delivered or dead)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        gw.run_once()
        summary = gw.queue.summary()
        if summary["studies"] and summary["backlog"] == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"the queue did not drain: {gw.queue.studies()}")


def archived(server: LiveServer) -> dict[str, bytes]:
    """SOP Instance UID → stored object, for every instance in the archive."""
    archive = server.archive
    with archive.db.read_session() as session:
        rows = session.execute(select(Instance.sop_instance_uid, Instance.storage_key)).all()
    return {uid: archive.storage.read(key) for uid, key in rows}


def same_pixels(original: bytes, stored: bytes) -> bool:
    import io

    a = pydicom.dcmread(io.BytesIO(original))
    b = pydicom.dcmread(io.BytesIO(stored))
    if "PixelData" not in a:
        return "PixelData" not in b
    return bool(np.array_equal(a.pixel_array, b.pixel_array))


def assert_archived(server: LiveServer, originals: dict[str, bytes]) -> None:
    """The archive holds exactly ``originals`` (SOP Instance UID → bytes sent), each with
    the same pixels."""
    stored = archived(server)
    assert set(stored) == set(originals)
    for uid, data in originals.items():
        assert same_pixels(data, stored[uid]), uid


def load(orthanc: OrthancPACS, files: list[Path]) -> dict[str, bytes]:
    originals = {}
    for path in files:
        data = path.read_bytes()
        orthanc.upload(data)
        originals[str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)] = data
    return originals


def test_gateway__poll_move_stow__archive_holds_every_instance(
    orthanc: OrthancPACS, gateway: Gateway, live_server: LiveServer
) -> None:
    originals = load(orthanc, [DATA / name for name in SMALL])
    assert gateway.poll("pacs") == len(SMALL)
    assert gateway.poll("pacs") == 0  # overlap: already queued, nothing new
    drain(gateway)
    assert_archived(live_server, originals)
    summary = gateway.queue.summary()
    assert summary["studies"] == {StudyState.DELIVERED: len(SMALL)}
    assert summary["instances"] == {InstanceState.DELIVERED: len(SMALL)}
    assert list(gateway.queue.spooled()) == []
    source = gateway.queue.source_state("pacs")
    assert source is not None and source.polled_through is not None


def test_gateway__134_slice_ct__fetch_by_study_uid(
    orthanc: OrthancPACS, gateway: Gateway, live_server: LiveServer
) -> None:
    if not CT_134.is_dir():
        pytest.skip(f"shared sample data not found at {CT_134}")
    files = sorted(CT_134.glob("*.dcm"))
    originals = load(orthanc, files)
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    [found] = gateway.fetch("pacs", study_instance_uid=study_uid)
    assert found.expected_instances == len(files)
    start = time.monotonic()
    drain(gateway, timeout=120)
    seconds = time.monotonic() - start
    stored = archived(live_server)
    assert set(stored) == set(originals)
    with live_server.archive.db.read_session() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == len(files)
    for uid in list(originals)[:: max(1, len(originals) // 10)]:
        assert same_pixels(originals[uid], stored[uid])
    print(f"134-slice CT Orthanc → archive: {seconds:.1f} s")  # noqa: T201
