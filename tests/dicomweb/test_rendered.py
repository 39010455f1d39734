"""Rendered images and thumbnails: windowing on real HU values, viewports, codecs."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread

from cloudfilm.audit.service import Actor

from conftest import DATA, LiveServer

ACTOR = Actor.cli("pytest")


@pytest.fixture
def server(live_server: LiveServer) -> LiveServer:
    for name in ("ct_small.dcm", "emri_small_jpeg_ls_lossless.dcm"):
        assert live_server.archive.ingest((DATA / name).read_bytes(), actor=ACTOR).ok
    return live_server


def _url(server: LiveServer, name: str) -> str:
    ds = dcmread(DATA / name, stop_before_pixels=True)
    return (
        f"{server.url}/dicom-web/studies/{ds.StudyInstanceUID}/series/"
        f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
    )


def _image(response: httpx.Response) -> Image.Image:
    assert response.status_code == 200, response.text
    return Image.open(io.BytesIO(response.content))


def test_rendered__ct_window_on_hounsfield_units(server: LiveServer) -> None:
    png = {**server.headers, "Accept": "image/png"}
    image = _image(
        httpx.get(
            f"{_url(server, 'ct_small.dcm')}/rendered", params={"window": "40,400"}, headers=png
        )
    )
    assert image.format == "PNG" and image.mode == "L" and image.size == (512, 512)
    shown = np.asarray(image)
    ds = dcmread(DATA / "ct_small.dcm")
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    # A soft-tissue window: air is black, bone is white, water mid-grey.
    assert (shown[hu < -160] == 0).all()
    assert (shown[hu > 240] == 255).all()
    water = (hu > 30) & (hu < 50)
    assert abs(float(shown[water].mean()) - 127.5) < 10


def test_rendered__jpeg_default_header_window_viewport(server: LiveServer) -> None:
    image = _image(
        httpx.get(
            f"{_url(server, 'ct_small.dcm')}/rendered",
            params={"viewport": "256,256", "quality": "80"},
            headers=server.headers,
        )
    )
    assert image.format == "JPEG" and image.size == (256, 256)


def test_thumbnails(server: LiveServer) -> None:
    url = _url(server, "ct_small.dcm")
    study = url.split("/series/")[0]
    series = url.split("/instances/")[0]
    for target in (f"{url}/thumbnail", f"{series}/thumbnail", f"{study}/thumbnail"):
        image = _image(httpx.get(target, headers=server.headers))
        assert max(image.size) <= 128


def test_rendered__compressed_multiframe(server: LiveServer) -> None:
    url = _url(server, "emri_small_jpeg_ls_lossless.dcm")
    png = {**server.headers, "Accept": "image/png"}
    first = np.asarray(_image(httpx.get(f"{url}/frames/1/rendered", headers=png)))
    third = np.asarray(_image(httpx.get(f"{url}/frames/3/rendered", headers=png)))
    assert first.shape == third.shape == (64, 64)
    assert not np.array_equal(first, third)
    assert httpx.get(f"{url}/frames/11/rendered", headers=png).status_code == 404


@pytest.mark.parametrize(
    ("params", "accept", "status"),
    [
        ({"window": "40"}, "image/png", 400),
        ({"window": "40,0"}, "image/png", 400),
        ({"window": "40,400,sigmoid"}, "image/png", 400),
        ({"viewport": "0,10"}, "image/png", 400),
        ({"viewport": "99999,10"}, "image/png", 400),
        ({"quality": "101"}, "image/jpeg", 400),
        ({}, "image/gif", 406),
    ],
)
def test_rendered__bad_parameters(
    server: LiveServer, params: dict[str, str], accept: str, status: int
) -> None:
    response = httpx.get(
        f"{_url(server, 'ct_small.dcm')}/rendered",
        params=params,
        headers={**server.headers, "Accept": accept},
    )
    assert response.status_code == status
    assert response.json()["error"]


def test_rendered__with_dicomweb_client(server: LiveServer) -> None:
    from dicomweb_client.api import DICOMwebClient

    ds = dcmread(DATA / "ct_small.dcm", stop_before_pixels=True)
    client = DICOMwebClient(f"{server.url}/dicom-web", headers=server.headers)
    png = client.retrieve_instance_rendered(
        ds.StudyInstanceUID,
        ds.SeriesInstanceUID,
        ds.SOPInstanceUID,
        media_types=("image/png",),
        params={"window": "40,400"},
    )
    assert Image.open(io.BytesIO(png)).size == (512, 512)
    jpeg = client.retrieve_instance_frames_rendered(
        ds.StudyInstanceUID,
        ds.SeriesInstanceUID,
        ds.SOPInstanceUID,
        frame_numbers=[1],
        media_types=("image/jpeg",),
    )
    assert Image.open(io.BytesIO(jpeg)).format == "JPEG"
