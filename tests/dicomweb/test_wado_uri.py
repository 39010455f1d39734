"""WADO-URI for legacy clients."""

from __future__ import annotations

import io

import httpx
import pytest
from PIL import Image
from pydicom import dcmread

from cloudfilm.audit.service import Actor
from cloudfilm.config import Settings

from conftest import DATA, LiveServer


@pytest.fixture(autouse=True)
def _stored_as_sent(settings: Settings) -> None:
    """These tests check that objects come back byte for byte as sent: compression off
    (compression at ingest is tested in tests/archive/test_compression.py)."""
    settings.compression.at_ingest = False


@pytest.fixture
def server(live_server: LiveServer) -> LiveServer:
    assert live_server.archive.ingest(
        (DATA / "ct_small.dcm").read_bytes(), actor=Actor.cli("pytest")
    ).ok
    return live_server


def _params(**extra: str) -> dict[str, str]:
    ds = dcmread(DATA / "ct_small.dcm", stop_before_pixels=True)
    return {
        "requestType": "WADO",
        "studyUID": ds.StudyInstanceUID,
        "seriesUID": ds.SeriesInstanceUID,
        "objectUID": ds.SOPInstanceUID,
        **extra,
    }


def test_wado_uri__jpeg_with_window_and_size(server: LiveServer) -> None:
    response = httpx.get(
        f"{server.url}/wado",
        headers=server.headers,
        params=_params(windowCenter="40", windowWidth="400", rows="128"),
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(response.content)).size == (128, 128)


def test_wado_uri__dicom_original_and_transcoded(server: LiveServer) -> None:
    original = dcmread(DATA / "ct_small.dcm")
    raw = httpx.get(
        f"{server.url}/wado",
        headers=server.headers,
        params=_params(contentType="application/dicom"),
    )
    assert raw.headers["content-type"] == "application/dicom"
    assert dcmread(io.BytesIO(raw.content)).PixelData == original.PixelData
    jls = httpx.get(
        f"{server.url}/wado",
        headers=server.headers,
        params=_params(contentType="application/dicom", transferSyntax="1.2.840.10008.1.2.4.80"),
    )
    back = dcmread(io.BytesIO(jls.content))
    assert back.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.80"
    assert (back.pixel_array == original.pixel_array).all()


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({"requestType": "WADO-RS"}, 400),
        ({"objectUID": ""}, 400),
        ({"objectUID": "1.2.3"}, 404),
        ({"objectUID": "../../etc/passwd"}, 400),
        ({"windowCenter": "40"}, 400),
        ({"windowCenter": "a", "windowWidth": "b"}, 400),
        ({"contentType": "image/gif"}, 406),
        ({"contentType": "application/dicom", "transferSyntax": "1.2.840.10008.1.2.4.50"}, 406),
        ({"anonymize": "yes"}, 400),
    ],
)
def test_wado_uri__bad_requests(server: LiveServer, params: dict[str, str], status: int) -> None:
    response = httpx.get(f"{server.url}/wado", headers=server.headers, params=_params(**params))
    assert response.status_code == status
    assert response.json()["error"]


def test_wado_uri__needs_credentials(server: LiveServer) -> None:
    assert httpx.get(f"{server.url}/wado", params=_params()).status_code == 401
