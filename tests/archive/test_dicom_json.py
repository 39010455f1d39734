"""Our DICOM JSON encoder gives what pydicom's ``to_json_dict`` gives, only faster."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from pydicom import dcmread

from cloudfilm.archive.dicom_json import dataset_json
from cloudfilm.archive.parsing import IngestLimits, parse_instance
from cloudfilm.errors import InvalidDicom

from conftest import DATA, SHARED

LIMITS = IngestLimits(max_object_bytes=64 * 1024**2, max_frame_pixels=20_000 * 20_000)


def _pair(data: bytes) -> tuple[dict[str, object], dict[str, object]]:
    ours = dataset_json(
        dcmread(io.BytesIO(data)), threshold=1024, bulk_uri=lambda tag: f"bulkdata/{tag:08X}"
    )
    reference = dcmread(io.BytesIO(data)).to_json_dict(
        bulk_data_threshold=1024,
        bulk_data_element_handler=lambda elem: f"bulkdata/{elem.tag:08X}",
        suppress_invalid_tags=True,
    )
    return ours, reference


@pytest.mark.parametrize("name", sorted(p.name for p in DATA.glob("*.dcm")))
def test_dataset_json__matches_pydicom_on_bundled_files(name: str) -> None:
    ours, reference = _pair((DATA / name).read_bytes())
    assert ours == reference


def test_dataset_json__matches_pydicom_on_every_accepted_sample() -> None:
    if not SHARED.is_dir():
        pytest.skip(f"shared sample data not found at {SHARED}")
    compared = 0
    for folder, _, names in os.walk(SHARED):
        for name in names:
            path = Path(folder) / name
            try:
                parsed = parse_instance(path.read_bytes(), LIMITS)
            except InvalidDicom:
                continue  # refused at ingest: never encoded
            ours, reference = _pair(parsed.blob)
            # pydicom drops values it finds invalid (e.g. an SH longer than 16 characters);
            # we keep them. Everything pydicom keeps must be identical.
            assert {k: v for k, v in ours.items() if k in reference} == reference, path
            assert set(reference) <= set(ours)
            compared += 1
    assert compared > 400
