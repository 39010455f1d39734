"""Validation of incoming objects: every refusal has a reason a person can act on."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from cloudfilm.archive.parsing import IngestLimits, is_valid_uid, parse_instance
from cloudfilm.errors import InvalidDicom

from conftest import DATA, shared_data

LIMITS = IngestLimits(max_object_bytes=64 * 1024**2, max_frame_pixels=20_000 * 20_000)


def _bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _ct() -> Dataset:
    return dcmread(DATA / "ct_small.dcm")


def test_parse_instance__keeps_data_set_bytes_and_rebuilds_meta() -> None:
    original = (DATA / "ct_small.dcm").read_bytes()
    parsed = parse_instance(original, LIMITS)
    source_offset = len(original) - (len(parsed.blob) - parsed.dataset_offset)
    assert parsed.blob[parsed.dataset_offset :] == original[source_offset:]
    stored = dcmread(io.BytesIO(parsed.blob))
    assert stored.file_meta.MediaStorageSOPInstanceUID == stored.SOPInstanceUID
    assert stored.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"


@pytest.mark.parametrize(
    ("uid", "valid"),
    [
        ("1.2.840.10008.1.2", True),
        ("1.2.3.04", True),  # leading zero: invalid per PS3.5 but common; tolerated
        ("../../etc/passwd", False),
        ("1.2.3/4", False),
        ("1.2.3\\4", False),
        ("1.2.3\x004", False),
        ("1.2.3;rm -rf", False),
        ("1.2.$(id)", False),
        ("1." + "2" * 70, False),
        ("1.2.abc", False),
        ("1..2", False),
        ("", False),
    ],
)
def test_is_valid_uid(uid: str, valid: bool) -> None:
    assert is_valid_uid(uid) is valid


@pytest.mark.parametrize("bad", ["../../etc/passwd", "1.2.3\x00.4", "1." + "9" * 70, "1.2.abc"])
def test_parse_instance__refuses_bad_uid(bad: str) -> None:
    ds = _ct()
    ds.SOPInstanceUID = bad
    with pytest.raises(InvalidDicom, match="SOPInstanceUID .* is not a valid UID"):
        parse_instance(_bytes(ds), LIMITS)


@pytest.mark.parametrize(
    "keyword", ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"]
)
def test_parse_instance__refuses_missing_uid(keyword: str) -> None:
    ds = _ct()
    delattr(ds, keyword)
    if keyword in ("SOPClassUID", "SOPInstanceUID"):
        ds.file_meta.MediaStorageSOPClassUID = "1.2.3"
        ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    with pytest.raises(InvalidDicom, match=f"{keyword} is missing"):
        parse_instance(_bytes(ds), LIMITS)


def test_parse_instance__refuses_pixel_length_mismatch() -> None:
    ds = _ct()
    ds.PixelData = ds.PixelData[:-1000]
    with pytest.raises(InvalidDicom, match="Pixel Data has 523288 bytes .* needs 524288"):
        parse_instance(_bytes(ds), LIMITS)


def test_parse_instance__refuses_absurd_dimensions() -> None:
    ds = _ct()
    ds.Rows = 65535
    ds.Columns = 65535
    with pytest.raises(InvalidDicom, match="absurd image size 65535 × 65535"):
        parse_instance(_bytes(ds), LIMITS)


def test_parse_instance__refuses_unknown_character_set() -> None:
    ds = _ct()
    ds.SpecificCharacterSet = "KLINGON 1"
    with pytest.raises(InvalidDicom, match="unknown Specific Character Set 'KLINGON 1'"):
        parse_instance(_bytes(ds), LIMITS)


@pytest.mark.parametrize("cut", [64, 132, 200, 1210, 2424, 263358, 526715])
def test_parse_instance__refuses_truncated_file(cut: int) -> None:
    data = (DATA / "ct_small.dcm").read_bytes()[:cut]
    with pytest.raises(InvalidDicom):
        parse_instance(data, LIMITS)


def test_parse_instance__refuses_oversized_object() -> None:
    with pytest.raises(InvalidDicom, match="exceeds the limit"):
        parse_instance((DATA / "ct_small.dcm").read_bytes(), IngestLimits(1000, 10**8))


def test_parse_instance__refuses_not_dicom() -> None:
    with pytest.raises(InvalidDicom, match="not DICOM"):
        parse_instance(b"%PDF-1.4 hello" * 10, LIMITS)
    with pytest.raises(InvalidDicom, match="empty file"):
        parse_instance(b"", LIMITS)


def test_parse_instance__accepts_bare_data_set() -> None:
    ds = _ct()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=False, implicit_vr=True, little_endian=True)
    raw = buffer.getvalue()
    bare = raw[raw.index(b"\x08\x00") :] if raw[128:132] == b"DICM" else raw
    parsed = parse_instance(bare, LIMITS)
    assert parsed.transfer_syntax_uid == "1.2.840.10008.1.2"
    assert any("bare data set" in note for note in parsed.notes)


def test_parse_instance__encapsulated_multiframe() -> None:
    parsed = parse_instance((DATA / "emri_small_jpeg_ls_lossless.dcm").read_bytes(), LIMITS)
    assert parsed.transfer_syntax_uid == "1.2.840.10008.1.2.4.80"


def test_parse_instance__decodes_iso_2022_ir_58() -> None:
    """GB 2312 through ISO 2022 IR 58 (PS3.5 K.2): clean Unicode, no escape sequences."""
    # 张 D5C5, 小 D0A1, 东 B6AB, each group introduced by ESC $ ) A (G1 = GB 2312)
    raw = b"Zhang^XiaoDong=\x1b$)A\xd5\xc5^\x1b$)A\xd0\xa1\xb6\xab"
    ds = _ct()
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 58"]
    ds.PatientName = "Zhang^XiaoDong=" + "X" * (len(raw) - 15)
    data = _bytes(ds).replace(b"Zhang^XiaoDong=" + b"X" * (len(raw) - 15), raw)
    parsed = parse_instance(data, LIMITS)
    assert raw in parsed.blob  # the stored bytes are kept as sent
    assert str(parsed.ds.PatientName) == "Zhang^XiaoDong=张^小东"


MALFORMED_EXPECTED = {
    "ct_bad_magic_DICX.dcm": "preamble without the 'DICM' prefix",
    "ct_pixeldata_length_0x7FFFFFF0.dcm": "declares 2147483632 bytes",
    "ct_trailing_garbage_1000B.dcm": "truncated or damaged",
    "ct_trunc_0064_in_preamble.dcm": "not DICOM",
    "ct_trunc_0132_after_DICM.dcm": "File Meta",
    "ct_trunc_0200_in_file_meta.dcm": "File Meta",
    "ct_trunc_at_pixeldata_tag.dcm": "CT Image Storage object has no Pixel Data",
    "ct_trunc_in_dataset_header.dcm": "cannot be read",
    "ct_trunc_last_byte_missing.dcm": "declares 524288 bytes but only 524287",
    "ct_trunc_mid_pixeldata.dcm": "truncated",
    "declared_3gb_element_truncated.dcm": "not a valid UID",
    "empty_0_bytes.dcm": "empty file",
    "emri_small_jpeg_2k_lossless_too_short.dcm": "truncated",
    "mr_jpeg_lossless_trunc_mid_fragment.dcm": "truncated",
    "not_dicom_raw_pdf_named_dcm.dcm": "not DICOM",
    "preamble_only_128_zero_bytes.dcm": "not DICOM",
    "rtplan_truncated.dcm": "truncated",
    "ts_mismatch_clunie_ct1_bigendian_undef_len.dcm": "cannot be read",
    "us_jpeg_baseline_trunc_60pct.dcm": "truncated",
    "MR_truncated.dcm": "declares 8192 bytes but only 8130 follow",
}


@pytest.mark.parametrize("name", sorted(MALFORMED_EXPECTED))
def test_parse_instance__shared_malformed_corpus(name: str) -> None:
    path = shared_data(f"malformed/{name}")
    with pytest.raises(InvalidDicom, match=MALFORMED_EXPECTED[name]):
        parse_instance(Path(path).read_bytes(), LIMITS)


@pytest.mark.parametrize(
    "name", ["JPEG2000-embedded-sequence-delimiter.dcm", "mr_j2k_codestream_zeroed_4KiB.dcm"]
)
def test_parse_instance__damaged_codestream_needs_decoding_to_detect(name: str) -> None:
    """Structurally sound objects whose compressed codestream is damaged pass ingest
    validation: only decoding finds them, and ingest does not decode."""
    parsed = parse_instance(shared_data(f"malformed/{name}").read_bytes(), LIMITS)
    assert parsed.ds.file_meta.TransferSyntaxUID.is_encapsulated


def test_parse_instance__odd_files_refused_with_reason() -> None:
    folder = shared_data("odd")
    expected = {
        "badVR.dcm": "Pixel Data has 6000 bytes",
        "bad_sequence.dcm": "not a valid UID",
        "huge_dims_65535_no_pixels.dcm": "absurd image size",
        "meta_missing_tsyntax.dcm": "no Transfer Syntax UID",
        "no_meta.dcm": "not DICOM",
        "rows_missing_dummyct.dcm": "no Pixel Data",
        "UN_sequence.dcm": "SOPClassUID is missing",
    }
    for name, reason in expected.items():
        with pytest.raises(InvalidDicom, match=reason):
            parse_instance((folder / name).read_bytes(), LIMITS)


def test_parse_instance__odd_but_valid_files_accepted() -> None:
    """Real-world oddities that carry a complete, readable object are kept as sent."""
    folder = shared_data("odd")
    accepted = {
        "693_J2KR.dcm",
        "GDCMJ2K_TextGBR.dcm",
        "J2K_pixelrep_mismatch.dcm",
        "MR-SIEMENS-DICOM-WithOverlays.dcm",
        "explicit_VR-UN.dcm",
        "gdcm-US-ALOKA-16_big.dcm",
        "reportsi_with_empty_number_tags.dcm",
        "ExplVR_BigEndNoMeta.dcm",
        "ExplVR_LitEndNoMeta.dcm",
    }
    for name in sorted(accepted):
        parsed = parse_instance((folder / name).read_bytes(), LIMITS)
        assert parsed.sop_instance_uid
