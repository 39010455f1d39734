"""FHIR search parameter values: date precision and prefixes, tokens, references, paging."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from cloudfilm.fhir.params import FHIRError, paging, parse_date, parse_token, reference_id


@pytest.mark.parametrize(
    ("raw", "prefix", "start", "end"),
    [
        ("2026", "eq", datetime(2026, 1, 1), datetime(2027, 1, 1)),
        ("ge2024-02", "ge", datetime(2024, 2, 1), datetime(2024, 3, 1)),
        ("lt2026-03-15", "lt", datetime(2026, 3, 15), datetime(2026, 3, 16)),
        ("2026-03-15T10:30", "eq", datetime(2026, 3, 15, 10, 30), datetime(2026, 3, 15, 10, 31)),
        (
            "le2026-03-15T10:30:05+08:00",
            "le",
            datetime(2026, 3, 15, 2, 30, 5),
            datetime(2026, 3, 15, 2, 30, 6),
        ),
    ],
)
def test_parse_date__precision_is_a_range(
    raw: str, prefix: str, start: datetime, end: datetime
) -> None:
    found = parse_date("date", raw)
    assert (found.prefix, found.start, found.end) == (
        prefix,
        start.replace(tzinfo=UTC),
        end.replace(tzinfo=UTC),
    )


@pytest.mark.parametrize("raw", ["yesterday", "2026-13", "2026-02-30", "sa2026", "20260101"])
def test_parse_date__refuses_what_is_not_a_date(raw: str) -> None:
    with pytest.raises(FHIRError) as caught:
        parse_date("date", raw)
    assert caught.value.status == 400


def test_token_and_reference() -> None:
    assert parse_token("urn:dicom:uid|urn:oid:1.2").system == "urn:dicom:uid"
    assert parse_token("|P1").system == "" and parse_token("P1").system is None
    assert reference_id("patient", "Patient/12", "Patient") == "12"
    assert reference_id("patient", "http://x/fhir/R4/Patient/12", "Patient") == "12"
    with pytest.raises(FHIRError):
        reference_id("patient", "Group/12", "Patient")


def test_paging__caps_count() -> None:
    assert paging({"_count": ["5000"]}, default=20, maximum=200).count == 200
    assert paging({}, default=20, maximum=200).count == 20
    with pytest.raises(FHIRError):
        paging({"_count": ["-1"]}, default=20, maximum=200)
