"""STOW-RS: standard responses, per-instance failures, never a partial write."""

from __future__ import annotations

import io

import httpx
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import select

from cloudfilm.archive.models import Instance
from cloudfilm.archive.parsing import IngestLimits
from cloudfilm.config import Settings

from conftest import DATA, LiveServer


@pytest.fixture(autouse=True)
def _stored_as_sent(settings: Settings) -> None:
    """These tests check that objects come back byte for byte as sent: compression off
    (compression at ingest is tested in tests/archive/test_compression.py)."""
    settings.compression.at_ingest = False


BOUNDARY = "cloudfilm-test-boundary"
MULTIPART = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


def _bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _body(*parts: bytes, close: bool = True) -> bytes:
    body = b"".join(
        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + p + b"\r\n"
        for p in parts
    )
    return body + (f"--{BOUNDARY}--\r\n".encode() if close else b"")


def _stored(server: LiveServer) -> list[str]:
    with server.archive.db.read_session() as session:
        return sorted(session.scalars(select(Instance.sop_instance_uid)))


def _post(
    server: LiveServer, body: bytes, path: str = "/studies", content_type: str = MULTIPART
) -> httpx.Response:
    return httpx.post(
        f"{server.url}/dicom-web{path}",
        content=body,
        headers={**server.headers, "Content-Type": content_type},
    )


def test_store_instances__with_dicomweb_client(live_server: LiveServer) -> None:
    client = DICOMwebClient(f"{live_server.url}/dicom-web", headers=live_server.headers)
    datasets = [dcmread(DATA / "ct_small.dcm"), dcmread(DATA / "mr_small.dcm")]
    response = client.store_instances(datasets)
    referenced = response.ReferencedSOPSequence
    assert sorted(r.ReferencedSOPInstanceUID for r in referenced) == sorted(
        d.SOPInstanceUID for d in datasets
    )
    assert all(r.RetrieveURL.startswith("http") for r in referenced)
    assert "FailedSOPSequence" not in response
    assert _stored(live_server) == sorted(d.SOPInstanceUID for d in datasets)
    [back] = client.retrieve_study(datasets[0].StudyInstanceUID)
    assert back.PixelData == datasets[0].PixelData


def test_store__partial_failure_is_202_with_reasons(live_server: LiveServer) -> None:
    good = (DATA / "ct_small.dcm").read_bytes()
    cut = (DATA / "mr_small.dcm").read_bytes()[:5000]
    response = _post(live_server, _body(good, cut))
    assert response.status_code == 202
    body = response.json()
    assert [f["00081197"]["Value"] for f in body["00081198"]["Value"]] == [[0xC000]]
    assert len(body["00081199"]["Value"]) == 1
    assert _stored(live_server) == [dcmread(DATA / "ct_small.dcm").SOPInstanceUID]


def test_store__all_failed_is_409(live_server: LiveServer) -> None:
    response = _post(live_server, _body(b"not dicom at all" * 10))
    assert response.status_code == 409
    assert response.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
    assert _stored(live_server) == []


def test_store__study_in_path_must_match(live_server: LiveServer) -> None:
    response = _post(
        live_server,
        _body((DATA / "ct_small.dcm").read_bytes()),
        path="/studies/1.2.826.0.1.3680043.8.498.999",
    )
    assert response.status_code == 409
    failure = response.json()["00081198"]["Value"][0]
    assert failure["00081197"]["Value"] == [0xA900]
    assert _stored(live_server) == []


def test_store__cut_off_body_stores_only_complete_parts(live_server: LiveServer) -> None:
    good = (DATA / "ct_small.dcm").read_bytes()
    second = dcmread(DATA / "ct_small.dcm")
    second.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.555"
    body = _body(good, _bytes(second), close=False)
    response = _post(live_server, body[: len(body) - 300_000])
    assert response.status_code == 400
    assert "before the closing boundary" in response.json()["error"]
    assert _stored(live_server) == [dcmread(DATA / "ct_small.dcm").SOPInstanceUID]


def test_store__oversized_part_refused(live_server: LiveServer) -> None:
    live_server.archive.limits = IngestLimits(max_object_bytes=100_000, max_frame_pixels=10**8)
    response = _post(live_server, _body((DATA / "ct_small.dcm").read_bytes()))
    assert response.status_code == 409
    assert response.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xA700]
    assert _stored(live_server) == []


@pytest.mark.parametrize(
    "content_type",
    [
        "application/dicom",
        'multipart/related; type="application/dicom+json"; boundary=x',
        "multipart/related; boundary=",
        "text/plain",
    ],
)
def test_store__unsupported_media_type_is_415(live_server: LiveServer, content_type: str) -> None:
    response = _post(live_server, b"x", content_type=content_type)
    assert response.status_code == 415
    assert "multipart/related" in response.json()["error"]


def test_store__garbage_body_is_400(live_server: LiveServer) -> None:
    response = _post(live_server, b"\x00\x01 this is no multipart body at all")
    assert response.status_code == 400


def test_store__many_parts_in_flight_each_answered_once(live_server: LiveServer) -> None:
    """Parts are ingested two at a time: every part gets exactly one answer, a bad part
    and the same object sent twice in one body included."""
    original = dcmread(DATA / "mr_small.dcm")
    parts, uids = [], []
    for number in range(12):
        ds = dcmread(DATA / "mr_small.dcm")
        ds.SOPInstanceUID = f"{original.SOPInstanceUID}.{number + 1}"
        uids.append(ds.SOPInstanceUID)
        parts.append(_bytes(ds))
    body = _body(*parts[:6], b"not dicom at all" * 10, *parts[6:], parts[0])
    response = _post(live_server, body)
    assert response.status_code == 202
    answer = response.json()
    referenced = [r["00081155"]["Value"][0] for r in answer["00081199"]["Value"]]
    assert sorted(referenced) == sorted([*uids, uids[0]])  # the resend: a success too
    assert [f["00081197"]["Value"] for f in answer["00081198"]["Value"]] == [[0xC000]]
    assert _stored(live_server) == sorted(uids)
