"""SECURITY-CHECKS R3, disk full: the live archive (STOW-RS and C-STORE) on a 16 MiB tmpfs.

The storage folder sits on a size-limited tmpfs mounted by the test (we run as root in the
test container); the index database stays outside it. A filler file brings the device
near its limit, the archive then fills the rest. Checked: the refusal reserve answers
507 / FailedSOP 0xA700 / C-STORE 0xA700 before the device is full, a real ENOSPC (reserve
off, device filled to the last byte) gives the same answers and leaves nothing
half-written, the warning (85 %) and critical alarms, file count == index count, earlier
instances intact, probes answering, and recovery once the filler is deleted.

Without permission to mount, the reserve variant still runs against the machine's disk
with the reserve set above its free space ("a quota setting"); the real-ENOSPC part is
skipped then.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from sqlalchemy import func, select

from cloudfilm.archive.ingest import Archive
from cloudfilm.archive.models import Instance
from cloudfilm.config import DimseSettings, Settings
from cloudfilm.dimse.server import DIMSEServer
from cloudfilm.storage.models import Alarm

from conftest import DATA, LiveServer, free_port

MIB = 1024**2
BOUNDARY = "cloudfilm-disk-full"
OUT_OF_RESOURCES = 0xA700


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path | None]:
    """A 16 MiB tmpfs, or ``None`` when this machine does not let us mount one."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        yield None
        return
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def backend() -> str:
    return "sqlite"


@pytest.fixture
def settings(tmp_path: Path, small_fs: Path | None) -> Settings:
    storage = (small_fs or tmp_path) / "storage"
    return Settings(
        data_dir=tmp_path / "var",
        storage={"url": storage.as_uri()},
        monitoring={
            "warning_percent": 85,
            "critical_percent": 90,
            "refuse_below_bytes": 0,
            "refuse_below_percent": 5,  # refused from 95 % used on
            "forecast_warning_days": 0,
        },
    )


@pytest.fixture
def scp(archive: Archive) -> Iterator[DIMSEServer]:
    server = DIMSEServer(
        archive, DimseSettings(port=free_port(), nodes={"FILLER": {"host": "127.0.0.1"}})
    )
    server.start()
    yield server
    server.stop()


def _new_ct() -> Dataset:
    ds = dcmread(DATA / "ct_small.dcm")
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _encoded(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _stow(server: LiveServer, ds: Dataset) -> httpx.Response:
    body = (
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        + _encoded(ds)
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    return httpx.post(
        f"{server.url}/dicom-web/studies",
        content=body,
        headers={
            **server.headers,
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
        },
        timeout=60,
    )


def _c_store(scp: DIMSEServer, ds: Dataset) -> int:
    ae = AE(ae_title="FILLER")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="CLOUDFILM")
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def _failed_reasons(response: httpx.Response) -> list[int]:
    return [item["00081197"]["Value"][0] for item in response.json()["00081198"]["Value"]]


def _fill(path: Path, leave: int) -> None:
    """Grow the filler file until ``leave`` bytes are free (0: until ENOSPC)."""
    with open(path, "ab") as fh:
        while True:
            st = os.statvfs(path)
            free = st.f_bavail * st.f_frsize
            chunk = min(MIB, free - leave) if leave else MIB
            if chunk <= 0:
                return
            try:
                fh.write(b"\0" * chunk)
                fh.flush()
                os.fsync(fh.fileno())
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                return


def _consistent(archive: Archive) -> dict[str, str]:
    """File count == index count, no partial upload left; uid → checksum of the bytes."""
    files = {o.key for o in archive.storage.iter_objects()}
    with archive.db.read_session() as session:
        rows = session.execute(
            select(Instance.sop_instance_uid, Instance.storage_key, Instance.checksum)
        ).all()
    assert files == {key for _, key, _ in rows}
    assert list((Path(archive.storage.root) / "tmp").iterdir()) == []  # type: ignore[attr-defined]
    stored = {}
    for uid, key, checksum in rows:
        blob = archive.storage.read(key)
        assert checksum == "sha256:" + hashlib.sha256(blob).hexdigest()
        stored[uid] = checksum
    return stored


def _active(archive: Archive) -> list[tuple[str, str]]:
    with archive.db.read_session() as session:
        return [
            (a.kind, a.severity)
            for a in session.scalars(select(Alarm).where(Alarm.cleared_at.is_(None)))
        ]


def _probes_answer(server: LiveServer) -> None:
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    assert httpx.get(f"{server.url}/readyz").status_code == 200


def test_disk_full__refused_alarmed_intact_and_recovers(
    live_server: LiveServer, scp: DIMSEServer, small_fs: Path | None
) -> None:
    archive = live_server.archive
    monitor = archive.monitor
    root = Path(archive.storage.root)  # type: ignore[attr-defined]

    # Some studies before the disk fills, through both doors.
    assert _stow(live_server, _new_ct()).status_code == 200
    assert _c_store(scp, _new_ct()) == 0x0000
    before = _consistent(archive)
    assert len(before) == 2

    if small_fs is None:
        # No mount possible: the "quota setting" variant. The reserve is set above the
        # free space of the machine's disk, so every write is refused.
        st = os.statvfs(root)
        archive.monitor.settings = monitor.settings.model_copy(
            update={"refuse_below_bytes": st.f_bavail * st.f_frsize + 100 * MIB}
        )
        monitor.invalidate()
        filler = None
    else:
        filler = small_fs / "filler.bin"  # ours, not an archive object
        capacity = os.statvfs(small_fs).f_blocks * os.statvfs(small_fs).f_frsize
        _fill(filler, leave=int(capacity * 0.13))  # 87 % used: warning
        monitor.invalidate()
        monitor.run_once()
        assert _active(archive) == [("disk_usage", "warning")]
        # The archive fills the rest until the reserve refuses.
        for _ in range(100):
            response = _stow(live_server, _new_ct())
            if response.status_code != 200:
                break
        else:
            raise AssertionError("the 16 MiB device never filled")
        free = os.statvfs(small_fs).f_bavail * os.statvfs(small_fs).f_frsize
        assert free > 0, "refused before the device was completely full"

    # Refused: STOW-RS 507 with FailedSOP 0xA700, C-STORE 0xA700.
    refused = _stow(live_server, _new_ct())
    assert refused.status_code == 507, refused.text
    assert _failed_reasons(refused) == [OUT_OF_RESOURCES]
    assert _c_store(scp, _new_ct()) == OUT_OF_RESOURCES
    # Alarm raised at the next monitor pass: critical (the warning is replaced).
    monitor.run_once()
    assert _active(archive) == [("disk_usage", "critical")]
    stored = _consistent(archive)
    assert {uid: stored[uid] for uid in before} == before
    _probes_answer(live_server)
    metrics = httpx.get(f"{live_server.url}/metrics", headers=live_server.headers).text
    assert 'cloudfilm_storage_accepting{backend="primary",tier="online"} 0.0' in metrics
    refusals = 3 if small_fs is not None else 2  # with the filling loop's last STOW
    assert f'cloudfilm_ingest_total{{outcome="refused_out_of_space"}} {refusals}.0' in metrics

    if filler is not None and small_fs is not None:
        # A real ENOSPC: reserve off, the device filled to the last byte.
        settings = monitor.settings
        monitor.settings = settings.model_copy(
            update={"refuse_below_bytes": 0, "refuse_below_percent": 0}
        )
        _fill(filler, leave=0)
        monitor.invalidate()
        enospc = _stow(live_server, _new_ct())
        assert enospc.status_code == 507, enospc.text
        assert _failed_reasons(enospc) == [OUT_OF_RESOURCES]
        assert _c_store(scp, _new_ct()) == OUT_OF_RESOURCES
        assert _consistent(archive) == stored
        _probes_answer(live_server)
        monitor.settings = settings
        # Space freed: delete our filler (never archive objects).
        filler.unlink()
    else:
        monitor.settings = archive.settings.monitoring
    monitor.invalidate()

    assert _stow(live_server, _new_ct()).status_code == 200
    assert _c_store(scp, _new_ct()) == 0x0000
    result = monitor.run_once()
    assert [a.severity for a in result.cleared] == ["critical"]
    assert _active(archive) == []
    after = _consistent(archive)
    assert len(after) == len(stored) + 2
    with archive.db.read_session() as session:
        alarms = session.scalar(select(func.count()).select_from(Alarm))
    assert alarms == (2 if small_fs is not None else 1)  # warning, critical
