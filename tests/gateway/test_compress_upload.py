"""Lossless compression before upload: JPEG-LS on the wire, pixels bit-identical, fewer bytes."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEGLSLossless
from sqlalchemy import select
from test_end_to_end import archived, drain, load

from cloudfilm.archive.models import Instance
from cloudfilm.config import Codec
from cloudfilm.gateway.compress import compress_for_upload
from cloudfilm.gateway.service import Gateway

from conftest import DATA, LiveServer

if TYPE_CHECKING:
    from pacs_fixtures import OrthancPACS

pytest_plugins = ["pacs_fixtures"]

UNCOMPRESSED = ["ct_small.dcm", "mr_small.dcm"]
ALREADY = "emri_small_jpeg_ls_lossless.dcm"


@pytest.fixture
def backend() -> str:
    return "sqlite"


def test_compress_for_upload__keeps_what_it_cannot_improve() -> None:
    jpeg_ls = (DATA / ALREADY).read_bytes()
    assert compress_for_upload(jpeg_ls, Codec.JPEG_LS_LOSSLESS) is jpeg_ls
    raw = (DATA / "mr_small.dcm").read_bytes()
    assert compress_for_upload(raw, Codec.NONE) is raw
    out = compress_for_upload(raw, Codec.JPEG_LS_LOSSLESS)
    ds = pydicom.dcmread(io.BytesIO(out))
    assert ds.file_meta.TransferSyntaxUID == JPEGLSLossless
    assert ds.SOPInstanceUID == pydicom.dcmread(io.BytesIO(raw)).SOPInstanceUID


def test_compress_before_upload__jpeg_ls_on_the_wire_pixels_identical(
    tmp_path: Path, orthanc: OrthancPACS, gateway_port: int, live_server: LiveServer
) -> None:
    from pacs_fixtures import client_secret, gateway_settings

    originals = load(orthanc, [DATA / name for name in [*UNCOMPRESSED, ALREADY]])
    settings = gateway_settings(
        tmp_path,
        orthanc=orthanc,
        gateway_port=gateway_port,
        archive_url=live_server.url,
        secret=client_secret(live_server.archive, live_server.clock),
        compress_before_upload="jpeg-ls-lossless",
    )
    gw = Gateway(settings)
    gw.start()
    try:
        assert gw.poll("pacs") == 3
        drain(gw)
    finally:
        gw.close()
    stored = archived(live_server)
    assert set(stored) == set(originals)
    for uid, data in originals.items():
        sent = pydicom.dcmread(io.BytesIO(data))
        got = pydicom.dcmread(io.BytesIO(stored[uid]))
        assert got.file_meta.TransferSyntaxUID == JPEGLSLossless, uid
        assert np.array_equal(sent.pixel_array, got.pixel_array), uid
        assert got.pixel_array.dtype == sent.pixel_array.dtype
    # What the archive received (and so records as "original") is the JPEG-LS form.
    with live_server.archive.db.read_session() as session:
        received_as = dict(
            session.execute(
                select(Instance.sop_instance_uid, Instance.original_transfer_syntax_uid)
            ).all()
        )
    assert set(received_as.values()) == {JPEGLSLossless}
    # Fewer bytes on the wire than the PACS's objects.
    lines = [
        json.loads(line)
        for line in (tmp_path / "gateway" / "messages.log").read_text().splitlines()
    ]
    on_wire = sum(line["bytes"] for line in lines if line["msg"] == "STOW-RS-RQ")
    raw = sum(len(data) for data in originals.values())
    assert on_wire < raw * 0.8, (on_wire, raw)
    squeezed = [line for line in lines if line["msg"] == "COMPRESS"]
    assert len(squeezed) == len(UNCOMPRESSED)
    assert all(line["bytes_out"] < line["bytes_in"] for line in squeezed)
