"""WADO-RS metadata and retrieve, access control on every route."""

from __future__ import annotations

import gzip
import io
import time
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.fileset import FileSet
from sqlalchemy import func, select, update

from cloudfilm.archive.models import Instance
from cloudfilm.audit.models import AuditEvent
from cloudfilm.audit.service import Actor
from cloudfilm.config import Settings

from conftest import DATA, LiveServer


@pytest.fixture(autouse=True)
def _stored_as_sent(settings: Settings) -> None:
    """These tests check that objects come back byte for byte as sent: compression off
    (compression at ingest is tested in tests/archive/test_compression.py)."""
    settings.compression.at_ingest = False


ACTOR = Actor.cli("pytest")


@pytest.fixture
def ct(live_server: LiveServer) -> tuple[LiveServer, str, str, str]:
    ds = dcmread(DATA / "ct_small.dcm")
    assert live_server.archive.ingest((DATA / "ct_small.dcm").read_bytes(), actor=ACTOR).ok
    return live_server, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID


def _client(server: LiveServer) -> DICOMwebClient:
    return DICOMwebClient(f"{server.url}/dicom-web", headers=server.headers)


def _audit_count(server: LiveServer) -> int:
    with server.archive.db.read_session() as session:
        return int(session.scalar(select(func.count()).select_from(AuditEvent)) or 0)


def test_retrieve_instance__pixels_identical(ct: tuple[LiveServer, str, str, str]) -> None:
    server, study, series, sop = ct
    client = _client(server)
    retrieved = client.retrieve_instance(study, series, sop)
    original = dcmread(DATA / "ct_small.dcm")
    assert retrieved.SOPInstanceUID == sop
    assert retrieved.PixelData == original.PixelData
    [from_series] = client.retrieve_series(study, series)
    [from_study] = client.retrieve_study(study)
    assert from_series.PixelData == from_study.PixelData == original.PixelData


def test_metadata__from_stored_json_with_absolute_bulk_uris(
    ct: tuple[LiveServer, str, str, str],
) -> None:
    server, study, series, sop = ct
    [metadata] = _client(server).retrieve_study_metadata(study)
    assert metadata["00080018"]["Value"] == [sop]
    # dicomweb-client sends "Host: 127.0.0.1" without the port; compare the path
    uri = urlparse(metadata["7FE00010"]["BulkDataURI"])
    assert uri.scheme == "http"
    assert (
        uri.path == f"/dicom-web/studies/{study}/series/{series}/instances/{sop}/bulkdata/7FE00010"
    )
    server.archive.settings.http.public_url = "https://film.example.cn"
    [public] = _client(server).retrieve_study_metadata(study)
    assert public["7FE00010"]["BulkDataURI"].startswith("https://film.example.cn/dicom-web/")
    server.archive.settings.http.public_url = None
    assert _client(server).retrieve_series_metadata(study, series) == [metadata]
    assert _client(server).retrieve_instance_metadata(study, series, sop) == metadata
    assert metadata["00100010"] == dcmread(DATA / "ct_small.dcm").to_json_dict()["00100010"]


def test_metadata__gzip_and_etag(ct: tuple[LiveServer, str, str, str]) -> None:
    server, study, _, _ = ct
    url = f"{server.url}/dicom-web/studies/{study}/metadata"
    raw = httpx.get(url, headers={**server.headers, "Accept-Encoding": "gzip"})
    assert raw.headers["content-encoding"] == "gzip"
    assert raw.headers["content-type"] == "application/dicom+json"
    etag = raw.headers["etag"]
    again = httpx.get(url, headers={**server.headers, "If-None-Match": etag})
    assert again.status_code == 304
    assert len(gzip.compress(raw.content)) > 0


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/studies/1.2.3", 404),
        ("/studies/1.2.3/metadata", 404),
        ("/studies/not-a-uid", 400),
        ("/studies/{study}/series/1.2.3/metadata", 404),
    ],
)
def test_retrieve__unknown_or_invalid(
    ct: tuple[LiveServer, str, str, str], path: str, status: int
) -> None:
    server, study, _, _ = ct
    response = httpx.get(
        f"{server.url}/dicom-web{path.format(study=study)}", headers=server.headers
    )
    assert response.status_code == status
    assert response.json()["error"]


def test_disabled_client_is_refused(ct: tuple[LiveServer, str, str, str]) -> None:
    server, study, _, _ = ct
    url = f"{server.url}/dicom-web/studies/{study}/metadata"
    assert httpx.get(url, headers=server.headers).status_code == 200
    from cloudfilm.auth.service import set_enabled

    with server.archive.db.session() as session:
        set_enabled(session=session, name="pytest", enabled=False)
    assert httpx.get(url, headers=server.headers).status_code == 401


def test_frames__native_and_compressed(live_server: LiveServer) -> None:
    archive = live_server.archive
    for name in ("ct_small.dcm", "emri_small_jpeg_ls_lossless.dcm"):
        assert archive.ingest((DATA / name).read_bytes(), actor=ACTOR).ok
    client = _client(live_server)
    ct = dcmread(DATA / "ct_small.dcm")
    [frame] = client.retrieve_instance_frames(
        ct.StudyInstanceUID,
        ct.SeriesInstanceUID,
        ct.SOPInstanceUID,
        frame_numbers=[1],
        media_types=("application/octet-stream",),
    )
    assert frame == ct.PixelData
    mr = dcmread(DATA / "emri_small_jpeg_ls_lossless.dcm")
    from pydicom.encaps import generate_frames

    originals = list(generate_frames(mr.PixelData, number_of_frames=10))
    got = client.retrieve_instance_frames(
        mr.StudyInstanceUID,
        mr.SeriesInstanceUID,
        mr.SOPInstanceUID,
        frame_numbers=[1, 3, 10],
        media_types=(("application/octet-stream", "*"),),
    )
    assert got == [originals[0], originals[2], originals[9]]
    jls = client.retrieve_instance_frames(
        mr.StudyInstanceUID,
        mr.SeriesInstanceUID,
        mr.SOPInstanceUID,
        frame_numbers=[2],
        media_types=(("image/jls", "1.2.840.10008.1.2.4.80"),),
    )
    assert jls == [originals[1]]
    base = (
        f"{live_server.url}/dicom-web/studies/{mr.StudyInstanceUID}/series/"
        f"{mr.SeriesInstanceUID}/instances/{mr.SOPInstanceUID}"
    )
    decoded = client.retrieve_instance_frames(
        mr.StudyInstanceUID,
        mr.SeriesInstanceUID,
        mr.SOPInstanceUID,
        frame_numbers=[4],
        media_types=("application/octet-stream",),
    )
    assert decoded == [mr.pixel_array[3].astype("<u2").tobytes()]
    gif = {**live_server.headers, "Accept": 'multipart/related; type="image/gif"'}
    assert httpx.get(f"{base}/frames/1", headers=gif).status_code == 406
    assert httpx.get(f"{base}/frames/11", headers=live_server.headers).status_code == 404
    assert httpx.get(f"{base}/frames/0,x", headers=live_server.headers).status_code == 400


def test_frames__same_without_frame_index(live_server: LiveServer) -> None:
    """Objects stored before the frame index existed (column empty) are served by parsing
    them, with the same bytes."""
    archive = live_server.archive
    name = "emri_small_jpeg_ls_lossless.dcm"
    assert archive.ingest((DATA / name).read_bytes(), actor=ACTOR).ok
    mr = dcmread(DATA / name)
    client = _client(live_server)

    def fetch() -> list[bytes]:
        return list(
            client.retrieve_instance_frames(
                mr.StudyInstanceUID,
                mr.SeriesInstanceUID,
                mr.SOPInstanceUID,
                frame_numbers=[2, 9],
                media_types=(("application/octet-stream", "*"),),
            )
        )

    def fetch_decoded() -> list[bytes]:
        return list(
            client.retrieve_instance_frames(
                mr.StudyInstanceUID,
                mr.SeriesInstanceUID,
                mr.SOPInstanceUID,
                frame_numbers=[3, 10],
                media_types=("application/octet-stream",),
            )
        )

    with archive.db.read_session() as session:
        assert session.scalar(select(Instance.frame_index)) is not None
    indexed, decoded = fetch(), fetch_decoded()  # decoded one frame at a time
    with archive.db.session() as session:
        session.execute(update(Instance).values(frame_index=None))
    assert fetch() == indexed
    assert fetch_decoded() == decoded  # decoded from the whole object
    assert decoded == [mr.pixel_array[i].astype("<u2").tobytes() for i in (2, 9)]
    from pydicom.encaps import generate_frames

    originals = list(generate_frames(mr.PixelData, number_of_frames=10))
    assert indexed == [originals[1], originals[8]]


def test_bulkdata__pixel_data(ct: tuple[LiveServer, str, str, str]) -> None:
    server, study, series, sop = ct
    [metadata] = _client(server).retrieve_study_metadata(study)
    path = urlparse(metadata["7FE00010"]["BulkDataURI"]).path
    data = _client(server).retrieve_bulkdata(f"{server.url}{path}")
    assert data == [dcmread(DATA / "ct_small.dcm").PixelData]
    missing = httpx.get(f"{server.url}{path[:-8]}00091234", headers=server.headers)
    assert missing.status_code == 404


@pytest.mark.parametrize(
    "syntax",
    [
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.5",
    ],
)
def test_retrieve__transcoded_pixels_identical(live_server: LiveServer, syntax: str) -> None:
    """Lossless transfer syntaxes on request; the decoded pixels equal the stored ones."""
    archive = live_server.archive
    for name in ("ct_small.dcm", "emri_small_jpeg_ls_lossless.dcm"):
        assert archive.ingest((DATA / name).read_bytes(), actor=ACTOR).ok
    client = _client(live_server)
    for name in ("ct_small.dcm", "emri_small_jpeg_ls_lossless.dcm"):
        original = dcmread(DATA / name)
        got = client.retrieve_instance(
            original.StudyInstanceUID,
            original.SeriesInstanceUID,
            original.SOPInstanceUID,
            media_types=(("application/dicom", syntax),),
        )
        assert got.file_meta.TransferSyntaxUID == syntax
        assert (got.pixel_array == original.pixel_array).all()


def test_retrieve__htj2k_pixels_identical(live_server: LiveServer) -> None:
    """HTJ2K lossless on request (dicomweb-client does not ask for it: plain HTTP)."""
    archive = live_server.archive
    name = "emri_small_jpeg_ls_lossless.dcm"
    assert archive.ingest((DATA / name).read_bytes(), actor=ACTOR).ok
    original = dcmread(DATA / name)
    response = httpx.get(
        f"{live_server.url}/dicom-web/studies/{original.StudyInstanceUID}/series/"
        f"{original.SeriesInstanceUID}/instances/{original.SOPInstanceUID}",
        headers={
            **live_server.headers,
            "Accept": 'multipart/related; type="application/dicom"; '
            "transfer-syntax=1.2.840.10008.1.2.4.201",
        },
    )
    assert response.status_code == 200, response.text
    boundary = response.headers["content-type"].split("boundary=")[1].strip('"').encode()
    [part] = [p for p in response.content.split(b"--" + boundary) if b"\r\n\r\n" in p]
    got = dcmread(io.BytesIO(part.split(b"\r\n\r\n", 1)[1].rstrip(b"\r\n")))
    assert got.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.201"
    assert (got.pixel_array == original.pixel_array).all()  # decoded by OpenJPEG


def test_retrieve__unknown_transfer_syntax_is_406(ct: tuple[LiveServer, str, str, str]) -> None:
    server, study, _, _ = ct
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'
    response = httpx.get(
        f"{server.url}/dicom-web/studies/{study}", headers={**server.headers, "Accept": accept}
    )
    assert response.status_code == 406
    assert "1.2.840.10008.1.2.4.201" in response.json()["error"]  # what can be had instead


def test_study_archive__zip_with_dicomdir(live_server: LiveServer, tmp_path: Path) -> None:
    """Two series (one object lacks Study ID and Study Time): the stored files, byte for
    byte, in a DICOMDIR file-set that pydicom reads back."""
    ct = dcmread(DATA / "ct_small.dcm")
    mr = dcmread(DATA / "mr_small.dcm")
    mr.StudyInstanceUID = ct.StudyInstanceUID
    mr.PatientID = ct.PatientID
    buffer = io.BytesIO()
    mr.save_as(buffer, enforce_file_format=True)
    archive = live_server.archive
    assert archive.ingest((DATA / "ct_small.dcm").read_bytes(), actor=ACTOR).ok
    assert archive.ingest(buffer.getvalue(), actor=ACTOR).ok
    response = httpx.get(
        f"{live_server.url}/dicom-web/studies/{ct.StudyInstanceUID}/archive",
        headers=live_server.headers,
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(response.content)) as zf:
        zf.extractall(tmp_path)
        names = zf.namelist()
    assert names[0] == "DICOMDIR" and len(names) == 3
    fileset = FileSet(dcmread(tmp_path / "DICOMDIR"))
    assert sorted(i.SOPInstanceUID for i in fileset) == sorted(
        [ct.SOPInstanceUID, mr.SOPInstanceUID]
    )
    with archive.db.read_session() as session:
        stored = {
            i.sop_instance_uid: archive.storage.read(i.storage_key)
            for i in session.scalars(select(Instance))
        }
    for instance in fileset:
        assert Path(instance.path).read_bytes() == stored[instance.SOPInstanceUID]


def test_capabilities__wadl_lists_the_services(live_server: LiveServer) -> None:
    from xml.etree import ElementTree

    for method, path in (("GET", "/dicom-web/capabilities"), ("OPTIONS", "/dicom-web")):
        response = httpx.request(method, f"{live_server.url}{path}", headers=live_server.headers)
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/vnd.sun.wadl+xml"
        ns = {"w": "http://wadl.dev.java.net/2009/02"}
        root = ElementTree.fromstring(response.content)
        paths = {r.get("path") for r in root.iterfind(".//w:resource", ns)}
        assert {
            "/studies",
            "/studies/{study}/metadata",
            "/studies/{study}/series/{series}/instances/{instance}/frames/{frames}",
        } <= paths
        methods = {
            m.get("name") for m in root.iterfind(".//w:resource[@path='/studies']/w:method", ns)
        }
        assert methods == {"GET", "POST"}


def test_retrieval_notes_the_access_of_the_study(ct: tuple[LiveServer, str, str, str]) -> None:
    """For the tier policies' "not accessed for N days" (archive/access.py)."""
    from cloudfilm.archive.models import Study

    server, study, series, sop = ct
    url = f"{server.url}/dicom-web/studies/{study}/series/{series}/instances/{sop}/frames/1"
    assert httpx.get(url, headers=server.headers).status_code == 200
    deadline = time.monotonic() + 10
    accessed = None
    while accessed is None and time.monotonic() < deadline:
        with server.archive.db.read_session() as session:
            accessed = session.scalar(select(Study.last_accessed_at))
        time.sleep(0.1)
    assert accessed is not None
