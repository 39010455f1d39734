"""A watched local folder (``retrieve = "folder"``) → gateway → STOW-RS → archive: stable files
are taken and moved to done/, unreadable or cut-short ones to failed/ with the reason."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from test_end_to_end import archived, drain, same_pixels

from cloudfilm.config import Settings
from cloudfilm.gateway.models import StudyState
from cloudfilm.gateway.service import Gateway

from conftest import DATA, LiveServer, free_port

pytest_plugins = ["pacs_fixtures"]


@pytest.fixture
def backend() -> str:
    return "sqlite"


@pytest.fixture
def watch(tmp_path: Path) -> Path:
    folder = tmp_path / "share"
    folder.mkdir()
    return folder


@pytest.fixture
def folder_gateway(tmp_path: Path, watch: Path, live_server: LiveServer) -> Iterator[Gateway]:
    from pacs_fixtures import client_secret

    settings = Settings(
        data_dir=tmp_path / "gw-archive-unused",
        gateway={
            "data_dir": tmp_path / "gateway",
            "scp_port": free_port(),
            "sources": {"share": {"retrieve": "folder", "folder": watch, "poll_interval": 0.2}},
            "archive_url": live_server.url,
            "client_id": "gateway",
            "client_secret": client_secret(live_server.archive, live_server.clock),
            "backoff_initial_seconds": 0.2,
            "backoff_max_seconds": 1.0,
        },
    )
    gw = Gateway(settings)
    gw.start()
    yield gw
    gw.close()


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_watch_folder__stable_files_delivered__bad_ones_to_failed(
    watch: Path, folder_gateway: Gateway, live_server: LiveServer
) -> None:
    ct = DATA.joinpath("ct_small.dcm").read_bytes()
    mr = DATA.joinpath("mr_small.dcm").read_bytes()
    emri = DATA.joinpath("emri_small_jpeg_ls_lossless.dcm").read_bytes()
    (watch / "CT0001.dcm").write_bytes(ct)
    (watch / "study-2").mkdir()
    (watch / "study-2" / "IM0001").write_bytes(mr)
    (watch / "notes.txt").write_text("not an image")
    (watch / "cut.dcm").write_bytes(emri[: len(emri) // 2])  # the modality's copy broke off
    (watch / "growing.dcm").write_bytes(emri[:1000])  # still being written
    (watch / ".hidden.tmp").write_bytes(b"ignored")

    assert folder_gateway.poll("share") == 0  # first listing: nothing is stable yet
    assert folder_gateway.queue.studies() == []
    (watch / "growing.dcm").write_bytes(emri[:5000])
    assert folder_gateway.poll("share") == 2  # CT and MR; growing.dcm changed size
    assert (watch / "growing.dcm").exists()
    (watch / "growing.dcm").write_bytes(emri)
    assert folder_gateway.poll("share") == 0  # it changed once more
    assert folder_gateway.poll("share") == 1  # now stable and complete

    assert sorted(p.relative_to(watch / "done").as_posix() for p in (watch / "done").rglob("*")
                  if p.is_file()) == ["CT0001.dcm", "growing.dcm", "study-2/IM0001"]  # fmt: skip
    assert not (watch / "study-2").exists()
    assert (watch / ".hidden.tmp").exists()
    failed = watch / "failed"
    assert (failed / "notes.txt").read_text() == "not an image"
    assert "not a DICOM file" in (failed / "notes.txt.reason.txt").read_text()
    assert "cut short" in (failed / "cut.dcm.reason.txt").read_text()

    drain(folder_gateway)
    stored = archived(live_server)
    assert set(stored) == {
        _uid(DATA / "ct_small.dcm"),
        _uid(DATA / "mr_small.dcm"),
        _uid(DATA / "emri_small_jpeg_ls_lossless.dcm"),
    }
    assert same_pixels(mr, stored[_uid(DATA / "mr_small.dcm")])
    summary = folder_gateway.queue.summary()
    assert summary["studies"] == {StudyState.DELIVERED: 3}
    log = [
        json.loads(line)
        for line in (folder_gateway.gw.data_dir / "messages.log").read_text().splitlines()
    ]
    refused = {entry["file"]: entry["reason"] for entry in log if entry["msg"] == "FILE-REFUSED"}
    assert set(refused) == {"notes.txt", "cut.dcm"}
    assert refused["cut.dcm"].startswith("cut short")


def test_watch_folder__late_file_of_a_delivered_study__delivered_too(
    tmp_path: Path, watch: Path, folder_gateway: Gateway, live_server: LiveServer
) -> None:
    ct = pydicom.dcmread(DATA / "ct_small.dcm")
    (watch / "a.dcm").write_bytes(DATA.joinpath("ct_small.dcm").read_bytes())
    folder_gateway.poll("share")
    folder_gateway.poll("share")
    drain(folder_gateway)
    ct.SOPInstanceUID = ct.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ct.save_as(watch / "b.dcm", enforce_file_format=True)
    folder_gateway.poll("share")
    assert folder_gateway.poll("share") == 0  # the study is known; it is reopened
    drain(folder_gateway)
    assert str(ct.SOPInstanceUID) in archived(live_server)
    [study] = folder_gateway.queue.studies()
    assert study["state"] == StudyState.DELIVERED and study["delivered"] == 2
