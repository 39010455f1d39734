"""The frame index (archive/frames.py): every frame read through it equals pydicom's."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.encaps import generate_frames
from pydicom.uid import UID

from cloudfilm.archive import frames
from cloudfilm.archive.parsing import IngestLimits, parse_instance

from conftest import DATA, shared_data

LIMITS = IngestLimits(max_object_bytes=1 << 30, max_frame_pixels=1 << 26)


def _stored(path: Path) -> bytes:
    """The object as the archive stores it (our File Meta Information in front)."""
    return parse_instance(path.read_bytes(), LIMITS).blob


def _expected(blob: bytes) -> list[bytes]:
    ds = dcmread(io.BytesIO(blob))
    count = int(ds.get("NumberOfFrames", 1) or 1)
    if UID(ds.file_meta.TransferSyntaxUID).is_encapsulated:
        return list(generate_frames(ds.PixelData, number_of_frames=count))
    size = len(ds.PixelData) // count
    return [ds.PixelData[i * size : (i + 1) * size] for i in range(count)]


def _through_index(blob: bytes, text: str, count: int) -> list[bytes]:
    index = frames.parse(text)
    return [b"".join(blob[s:e] for s, e in frames.ranges(index, n)) for n in range(1, count + 1)]


def _check(path: Path) -> dict[str, object]:
    blob = _stored(path)
    text = frames.locate(blob)
    assert text is not None, path.name
    expected = _expected(blob)
    assert _through_index(blob, text, len(expected)) == expected
    return frames.parse(text)


@pytest.mark.parametrize(
    "name", ["ct_small.dcm", "mr_small.dcm", "emri_small_jpeg_ls_lossless.dcm"]
)
def test_locate__small_files(name: str) -> None:
    index = _check(DATA / name)
    assert ("frames" in index) == (name == "emri_small_jpeg_ls_lossless.dcm")


@pytest.mark.parametrize(
    "relative",
    [
        "multiframe/us_cine_color_sonosite_jpeg_120f.dcm",
        "multiframe/xa_cine_jpeg_baseline_96f.dcm",
        "multiframe/us_palette_rle_10f.dcm",
        "multiframe/enhanced_ct_nema_2f.dcm",
        "color/us_rgb_nema_us1_uncompressed.dcm",
        "color/vl2_color_nema_j2k_lossless.dcm",
    ],
)
def test_locate__real_multiframe_and_colour(relative: str) -> None:
    _check(shared_data(relative))


def test_locate__no_pixels_or_damaged() -> None:
    ds = dcmread(DATA / "mr_small.dcm")
    del ds.PixelData
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    assert frames.locate(out.getvalue()) is None
    assert frames.locate(b"not dicom at all") is None
    cut = _stored(DATA / "emri_small_jpeg_ls_lossless.dcm")
    assert frames.locate(cut[: len(cut) - 5000]) is None  # fragments run past the end


@pytest.mark.parametrize(
    "name", ["ct_small.dcm", "mr_small.dcm", "emri_small_jpeg_ls_lossless.dcm"]
)
def test_locate__from_the_ingest_parse_without_parsing_again(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed = parse_instance((DATA / name).read_bytes(), LIMITS)
    parsed_again = frames.locate(parsed.blob)
    assert parsed_again is not None
    # A wrong shift does not land on the Pixel Data header: the blob is parsed instead.
    assert frames.locate(parsed.blob, parsed.ds, (parsed.read_shift or 0) + 2) == parsed_again

    def parse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the blob was parsed again")

    monkeypatch.setattr(frames, "dcmread", parse)
    assert frames.locate(parsed.blob, parsed.ds, parsed.read_shift) == parsed_again
