"""Lossless compression at ingest: bit-exact or not at all; sizes and the ratio report."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import jpeg_ls
import numpy as np
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    JPEG2000Lossless,
    JPEGLSLossless,
)

from cloudfilm.archive import compression, service
from cloudfilm.archive.ingest import Archive, IngestStatus
from cloudfilm.archive.models import Instance, Series, Study
from cloudfilm.audit.models import AuditEvent
from cloudfilm.audit.service import Actor
from cloudfilm.config import Codec, CompressionSettings, Settings

from conftest import DATA, LiveServer, shared_data

ACTOR = Actor.cli("pytest")
SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
CT_134 = SHARED / "ct" / "pancreas_ct_cb_001_axial_134"

#: One or more uncompressed objects per modality and pixel format of ../shared/data.
SHARED_SAMPLES = [
    "ct/pancreas_ct_cb_001_axial_134/1-067.dcm",  # CT, implicit VR, 16/12
    "study_multiseries/ct_philips_head_phantom/S1000/I10",  # CT scout, explicit VR
    "multiframe/enhanced_ct_nema_2f.dcm",  # Enhanced CT, 2 frames
    "mr/mr2_nema_1024_uncompressed.dcm",  # MR 1024²
    "mr/ge_epi_fmri_150img/001.dcm",  # MR 16/16
    "study_multiseries/mr_siemens_xa30_enhanced/5_anat-T1w_acq-tfl/0001.dcm",  # 96 frames
    "multiframe/enhanced_mr_small_10f.dcm",  # Enhanced MR, 10 frames
    "color/us_rgb_nema_us1_uncompressed.dcm",  # US, RGB
    "radiograph/dx_fujifilm_small.dcm",  # DX, MONOCHROME1, 8 bits, odd width
    "charset/SCSX2_gb18030_fullsize",  # OT, 8 bits
    "wsi/sm_tiny_10px_25frames.dcm",  # SM, RGB, 25 frames
    "odd/MR-SIEMENS-DICOM-WithOverlays.dcm",  # MR with overlays
    "dicomdir/77654033/CR1/6154",  # CR 16×16
]
LOCAL_SAMPLES = ["ct_small.dcm", "mr_small.dcm", "chr_gb18030.dcm", "chr_iso_ir_192.dcm"]


@pytest.fixture(autouse=True)
def _compress_everything(settings: Settings) -> None:
    settings.compression = CompressionSettings(min_pixel_bytes=0, deferred=False)


def _stored(archive: Archive, sop_instance_uid: str) -> tuple[Instance, Dataset]:
    with archive.db.read_session() as session:
        instance = service.get_instance(session=session, sop_instance_uid=sop_instance_uid)
        assert instance is not None
        session.expunge(instance)
    return instance, dcmread(io.BytesIO(archive.storage.read(instance.storage_key)))


def _pixels(ds: Dataset) -> np.ndarray[Any, Any]:
    ds.pixel_array_options(raw=True)
    return np.asarray(ds.pixel_array)


def _assert_bit_exact(original: Dataset, stored: Dataset) -> None:
    before, after = _pixels(original), _pixels(stored)
    assert after.dtype == before.dtype and after.shape == before.shape
    assert np.array_equal(after, before)
    frames = int(original.get("NumberOfFrames", 1) or 1)
    for frame in range(frames) if frames > 1 else ():
        assert np.array_equal(after[frame], before[frame])


def _check_sample(archive: Archive, path: Path) -> Instance:
    data = path.read_bytes()
    original = dcmread(path)
    result = archive.ingest(data, actor=ACTOR)
    assert result.status is IngestStatus.STORED, result.reason
    instance, stored = _stored(archive, str(original.SOPInstanceUID))
    assert instance.transfer_syntax_uid == JPEGLSLossless
    assert stored.file_meta.TransferSyntaxUID == JPEGLSLossless
    assert instance.original_transfer_syntax_uid == original.file_meta.TransferSyntaxUID
    assert instance.byte_size < instance.original_bytes
    assert stored.SOPInstanceUID == original.SOPInstanceUID
    # Every attribute is kept; group lengths (gggg,0000), retired, are not rewritten.
    changed = {
        e.keyword or str(e.tag)
        for e in original
        if e.keyword != "PixelData" and e.tag.element != 0 and stored.get(e.tag) != e
    }
    assert changed <= {"PlanarConfiguration"}
    assert stored.PhotometricInterpretation == original.PhotometricInterpretation
    _assert_bit_exact(original, stored)
    return instance


@pytest.mark.parametrize("name", LOCAL_SAMPLES)
def test_ingest__compresses_small_samples_bit_exact(archive: Archive, name: str) -> None:
    _check_sample(archive, DATA / name)


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not here")
@pytest.mark.parametrize("name", SHARED_SAMPLES)
def test_ingest__compresses_each_sample_modality_bit_exact(archive: Archive, name: str) -> None:
    _check_sample(archive, SHARED / name)


def test_ingest__already_compressed_and_small_objects_kept_as_sent(
    archive: Archive, settings: Settings
) -> None:
    data = (DATA / "emri_small_jpeg_ls_lossless.dcm").read_bytes()
    sop = dcmread(io.BytesIO(data)).SOPInstanceUID
    assert archive.ingest(data, actor=ACTOR).ok
    instance, _ = _stored(archive, sop)
    assert instance.byte_size == instance.original_bytes
    assert instance.checksum == instance.original_checksum

    settings.compression.min_pixel_bytes = 1 << 20
    small = (DATA / "ct_small.dcm").read_bytes()
    assert archive.ingest(small, actor=ACTOR).ok
    instance, stored = _stored(archive, dcmread(DATA / "ct_small.dcm").SOPInstanceUID)
    assert instance.transfer_syntax_uid == instance.original_transfer_syntax_uid
    assert instance.byte_size == instance.original_bytes


def test_ingest__off_stores_bytes_as_sent(archive: Archive, settings: Settings) -> None:
    settings.compression.at_ingest = False
    data = (DATA / "ct_small.dcm").read_bytes()
    original = dcmread(io.BytesIO(data))
    assert archive.ingest(data, actor=ACTOR).ok
    instance, stored = _stored(archive, original.SOPInstanceUID)
    assert instance.transfer_syntax_uid == original.file_meta.TransferSyntaxUID
    assert instance.byte_size == instance.original_bytes
    assert stored.PixelData == original.PixelData


def test_ingest__codec_per_modality(archive: Archive, settings: Settings) -> None:
    settings.compression = CompressionSettings(
        min_pixel_bytes=0,
        deferred=False,
        by_modality={"ct": Codec.NONE, "MR": Codec.JPEG2000_LOSSLESS},
    )
    assert archive.ingest((DATA / "ct_small.dcm").read_bytes(), actor=ACTOR).ok
    assert archive.ingest((DATA / "mr_small.dcm").read_bytes(), actor=ACTOR).ok
    ct, _ = _stored(archive, dcmread(DATA / "ct_small.dcm").SOPInstanceUID)
    mr, stored = _stored(archive, dcmread(DATA / "mr_small.dcm").SOPInstanceUID)
    assert ct.transfer_syntax_uid == ct.original_transfer_syntax_uid
    assert mr.transfer_syntax_uid == JPEG2000Lossless
    _assert_bit_exact(dcmread(DATA / "mr_small.dcm"), stored)


def test_ingest__encoder_fault_stores_the_original_and_audits_why(
    archive: Archive, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = jpeg_ls.encode_pixel_data

    def wrong(src: bytes, *args: Any, **kwargs: Any) -> bytearray:
        damaged = bytearray(src)
        damaged[0] ^= 0x01  # a valid JPEG-LS stream of other pixels
        return real(bytes(damaged), *args, **kwargs)

    monkeypatch.setattr(jpeg_ls, "encode_pixel_data", wrong)
    data = (DATA / "ct_small.dcm").read_bytes()
    original = dcmread(io.BytesIO(data))
    result = archive.ingest(data, actor=ACTOR)
    assert result.status is IngestStatus.STORED
    instance, stored = _stored(archive, original.SOPInstanceUID)
    assert instance.transfer_syntax_uid == original.file_meta.TransferSyntaxUID
    assert stored.PixelData == original.PixelData
    with archive.db.read_session() as session:
        event = session.query(AuditEvent).filter_by(object_id=original.SOPInstanceUID).one()
    assert "differ" in str(event.detail)


def test_ingest__bits_outside_bits_stored_kept_as_sent(archive: Archive) -> None:
    """pydicom masks values to Bits Stored when decoding, and so would the encoder: an
    object with bits above Bits Stored (old overlays) must not be compressed."""
    ds = dcmread(DATA / "ct_small.dcm")
    ds.BitsStored = 12
    ds.HighBit = 11
    pixels = np.frombuffer(ds.PixelData, dtype="<i2").copy()
    pixels[0] = 0x7123
    ds.PixelData = pixels.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer)
    assert archive.ingest(buffer.getvalue(), actor=ACTOR).ok
    instance, stored = _stored(archive, ds.SOPInstanceUID)
    assert instance.transfer_syntax_uid == instance.original_transfer_syntax_uid
    assert stored.PixelData == ds.PixelData


def test_ingest__resent_object_is_a_duplicate(archive: Archive) -> None:
    data = (DATA / "ct_small.dcm").read_bytes()
    assert archive.ingest(data, actor=ACTOR).status is IngestStatus.STORED
    assert archive.ingest(data, actor=ACTOR).status is IngestStatus.DUPLICATE


def test_wado_rs__original_transfer_syntax_on_request(live_server: LiveServer) -> None:
    live_server.archive.settings.compression = CompressionSettings(
        min_pixel_bytes=0, deferred=False
    )
    data = (DATA / "ct_small.dcm").read_bytes()
    original = dcmread(io.BytesIO(data))
    assert live_server.archive.ingest(data, actor=ACTOR).ok
    client = DICOMwebClient(f"{live_server.url}/dicom-web", headers=live_server.headers)
    uids = (original.StudyInstanceUID, original.SeriesInstanceUID, original.SOPInstanceUID)
    native = client.retrieve_instance(
        *uids, media_types=(("application/dicom", ExplicitVRLittleEndian),)
    )
    assert native.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert native.SOPInstanceUID == original.SOPInstanceUID
    assert native.PixelData == original.PixelData
    stored = client.retrieve_instance(*uids, media_types=(("application/dicom", JPEGLSLossless),))
    assert stored.file_meta.TransferSyntaxUID == JPEGLSLossless
    _assert_bit_exact(original, stored)


def test_report__sizes_per_study_modality_and_overall(archive: Archive) -> None:
    for name in ("ct_small.dcm", "mr_small.dcm"):
        assert archive.ingest((DATA / name).read_bytes(), actor=ACTOR).ok
    ct = dcmread(DATA / "ct_small.dcm")
    with archive.db.read_session() as session:
        instances = session.query(Instance).all()
        result = compression.report(session=session, by_study=True)
        one = compression.report(session=session, study_instance_uid=ct.StudyInstanceUID)
        series_totals = session.query(Series.original_total_bytes, Series.total_bytes).all()
        study_totals = session.query(Study.original_total_bytes, Study.total_bytes).all()
    original = sum(i.original_bytes for i in instances)
    stored = sum(i.byte_size for i in instances)
    assert (result.overall.original_bytes, result.overall.stored_bytes) == (original, stored)
    assert result.overall.ratio == pytest.approx(original / stored)
    assert result.overall.ratio > 1.2
    assert {r.key for r in result.by_modality} == {"CT", "MR"}
    assert sum(o for o, _ in series_totals) == sum(o for o, _ in study_totals) == original
    assert [r.key for r in one.by_study] == [ct.StudyInstanceUID]
    assert one.as_dict()["overall"]["instances"] == 1


@pytest.mark.skipif(not CT_134.is_dir(), reason="../shared/data is not here")
def test_report__ct_134_jpeg_ls_ratio(archive: Archive) -> None:
    files = sorted(CT_134.glob("*.dcm"))
    assert len(files) == 134
    pixel_bytes = 0
    for path in files:
        result = archive.ingest(path.read_bytes(), actor=ACTOR)
        assert result.status is IngestStatus.STORED
        pixel_bytes += len(dcmread(path, stop_before_pixels=False).PixelData)
    with archive.db.read_session() as session:
        result = compression.report(session=session)
        codestreams = sum(
            i.byte_size
            for i in session.query(Instance).filter_by(transfer_syntax_uid=JPEGLSLossless)
        )
    [ct] = result.by_modality
    assert ct.key == "CT" and ct.instances == 134
    # Whole objects (headers included, as received vs as stored).
    assert ct.ratio >= 3.7, ct
    assert codestreams == ct.stored_bytes


@pytest.mark.parametrize("name", ["ct_small.dcm", "mr_small.dcm"])
def test_ingest__htj2k_grey_scale_bit_exact(
    archive: Archive, settings: Settings, name: str
) -> None:
    """HTJ2K (OpenJPH through imagecodecs), checked with pydicom's OpenJPEG decoder."""
    settings.compression = CompressionSettings(
        codec=Codec.HTJ2K_LOSSLESS, min_pixel_bytes=0, deferred=False
    )
    original = dcmread(DATA / name)
    assert archive.ingest((DATA / name).read_bytes(), actor=ACTOR).ok
    instance, stored = _stored(archive, str(original.SOPInstanceUID))
    assert instance.transfer_syntax_uid == HTJ2KLossless
    assert instance.byte_size < instance.original_bytes
    _assert_bit_exact(original, stored)


def test_ingest__htj2k_keeps_colour_as_received(archive: Archive, settings: Settings) -> None:
    settings.compression = CompressionSettings(
        codec=Codec.HTJ2K_LOSSLESS, min_pixel_bytes=0, deferred=False
    )
    path = shared_data("color/us_rgb_nema_us1_uncompressed.dcm")
    assert archive.ingest(path.read_bytes(), actor=ACTOR).ok
    instance, _ = _stored(archive, str(dcmread(path).SOPInstanceUID))
    assert instance.transfer_syntax_uid == instance.original_transfer_syntax_uid


def test_api__compression_report(live_server: LiveServer) -> None:
    live_server.archive.settings.compression = CompressionSettings(
        min_pixel_bytes=0, deferred=False
    )
    ct = dcmread(DATA / "ct_small.dcm")
    assert live_server.archive.ingest((DATA / "ct_small.dcm").read_bytes(), actor=ACTOR).ok
    url = f"{live_server.url}/api/archive/compression"
    assert httpx.get(url, timeout=30).status_code == 401
    body = httpx.get(url, headers=live_server.headers, timeout=30).json()
    assert body["overall"]["instances"] == 1 and body["overall"]["ratio"] > 1.2
    assert [m["key"] for m in body["by_modality"]] == ["CT"]
    assert body["by_study"] == [] and body["settings"]["codec"] == "jpeg-ls-lossless"
    one = httpx.get(
        url, params={"study": ct.StudyInstanceUID}, headers=live_server.headers, timeout=30
    ).json()
    assert [s["key"] for s in one["by_study"]] == [ct.StudyInstanceUID]


def test_cli__storage_report(archive: Archive, settings: Settings) -> None:
    assert archive.ingest((DATA / "ct_small.dcm").read_bytes(), actor=ACTOR).ok
    env = {**os.environ, "CLOUDFILM_DATABASE__URL": settings.database_url}
    result = subprocess.run(
        [sys.executable, "-m", "cloudfilm", "storage", "report", "--by", "study"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "CLOUDFILM_DATA_DIR": str(settings.data_dir), "COLUMNS": "200"},
    )
    assert result.returncode == 0, result.stderr
    assert "CT" in result.stdout and "overall" in result.stdout and ":1" in result.stdout
