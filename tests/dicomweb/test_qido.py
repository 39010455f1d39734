"""QIDO-RS with a real client (dicomweb-client) against the running HTTP server."""

from __future__ import annotations

import io
from typing import Any

import httpx
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.dataset import Dataset

from cloudfilm.archive.ingest import Archive
from cloudfilm.audit.service import Actor

from conftest import DATA, LiveServer

ACTOR = Actor.cli("pytest")


def _store(archive: Archive, ds: Dataset) -> None:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    assert archive.ingest(buffer.getvalue(), actor=ACTOR).ok


@pytest.fixture
def populated(live_server: LiveServer) -> LiveServer:
    """Three patients: a GB18030 Chinese name, a UTF-8 Chinese name, an accented name."""
    archive = live_server.archive
    specs = [
        ("chr_gb18030.dcm", "P1", "20260101", "CT", "1.2.826.0.1.3680043.8.498.101"),
        ("chr_iso_ir_192.dcm", "P2", "20260315", "MR", "1.2.826.0.1.3680043.8.498.102"),
        ("mr_small.dcm", "P3", "20250620", "MR", "1.2.826.0.1.3680043.8.498.103"),
    ]
    for name, pid, date, modality, study in specs:
        ds = dcmread(DATA / name)
        ds.PatientID = pid
        ds.StudyDate = date
        ds.Modality = modality
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = study + ".1"
        ds.SOPInstanceUID = study + ".1.1"
        ds.AccessionNumber = f"ACC{pid}"
        if name == "mr_small.dcm":
            ds.SpecificCharacterSet = "ISO_IR 192"
            ds.PatientName = "Müller^Jürgen"
        _store(archive, ds)
    return live_server


def _client(server: LiveServer) -> DICOMwebClient:
    return DICOMwebClient(f"{server.url}/dicom-web", headers=server.headers)


def _ids(results: list[dict[str, Any]]) -> list[str]:
    return sorted(r["00100020"]["Value"][0] for r in results)


@pytest.mark.parametrize(
    ("filters", "fuzzy", "expected"),
    [
        ({}, False, ["P1", "P2", "P3"]),
        ({"PatientID": "P2"}, False, ["P2"]),
        ({"PatientID": "P?"}, False, ["P1", "P2", "P3"]),
        ({"PatientName": "wang*"}, False, ["P1", "P2"]),
        ({"PatientName": "WANG^XIAODONG=王^小东"}, False, ["P1"]),
        ({"PatientName": "wangxiaodong"}, True, ["P1", "P2"]),
        ({"PatientName": "wang xiao"}, True, ["P1", "P2"]),
        ({"PatientName": "xiaodong"}, True, ["P1", "P2"]),
        ({"PatientName": "wxd"}, True, ["P1", "P2"]),
        ({"PatientName": "王"}, True, ["P1", "P2"]),
        ({"PatientName": "王小东"}, True, ["P1"]),
        ({"PatientName": "muller"}, True, ["P3"]),
        ({"StudyDate": "20260101-20261231"}, False, ["P1", "P2"]),
        ({"StudyDate": "-20251231"}, False, ["P3"]),
        ({"StudyDate": "20260315"}, False, ["P2"]),
        (
            {"StudyInstanceUID": "1.2.826.0.1.3680043.8.498.101\\1.2.826.0.1.3680043.8.498.103"},
            False,
            ["P1", "P3"],
        ),
        ({"ModalitiesInStudy": "MR"}, False, ["P2", "P3"]),
        ({"AccessionNumber": "ACCP1"}, False, ["P1"]),
        ({"00100020": "P3"}, False, ["P3"]),
    ],
)
def test_search_for_studies__matching(
    populated: LiveServer, filters: dict[str, str], fuzzy: bool, expected: list[str]
) -> None:
    results = _client(populated).search_for_studies(search_filters=filters, fuzzymatching=fuzzy)
    assert _ids(results) == expected


def test_search_for_studies__attributes_and_computed(populated: LiveServer) -> None:
    [study] = _client(populated).search_for_studies(search_filters={"PatientID": "P1"})
    assert study["00100010"]["Value"] == [{"Alphabetic": "Wang^XiaoDong", "Ideographic": "王^小东"}]
    assert study["00080061"] == {"vr": "CS", "Value": ["CT"]}
    assert study["00201206"]["Value"] == [1] and study["00201208"]["Value"] == [1]
    assert study["00081190"]["Value"][0].endswith(
        "/dicom-web/studies/1.2.826.0.1.3680043.8.498.101"
    )


def test_search__includefield(populated: LiveServer) -> None:
    client = _client(populated)
    [study] = client.search_for_studies(
        search_filters={"PatientID": "P3"}, fields=["PatientAge", "00180015"]
    )
    assert "00101010" in study  # PatientAge: from the stored instance JSON (or empty)
    assert "00180015" in study
    [everything] = client.search_for_studies(
        search_filters={"PatientID": "P3"}, get_remaining=False, fields=["all"]
    )
    assert "00080070" in everything  # Manufacturer, from the instance JSON
    assert "00080018" not in everything  # an instance-level attribute is not a study's


def test_search__series_and_instances(populated: LiveServer) -> None:
    client = _client(populated)
    series = client.search_for_series("1.2.826.0.1.3680043.8.498.101")
    assert [s["0020000E"]["Value"][0] for s in series] == ["1.2.826.0.1.3680043.8.498.101.1"]
    assert series[0]["00201209"]["Value"] == [1]
    # ModalitiesInStudy below the study level (its subquery must stay tied to the study).
    in_mr_studies = client.search_for_series(search_filters={"ModalitiesInStudy": "MR"})
    assert len(in_mr_studies) == 2
    instances = client.search_for_instances(search_filters={"Modality": "MR"})
    assert sorted(i["00080018"]["Value"][0] for i in instances) == [
        "1.2.826.0.1.3680043.8.498.102.1.1",
        "1.2.826.0.1.3680043.8.498.103.1.1",
    ]


def test_search__limit_offset_and_cap_warning(populated: LiveServer) -> None:
    base = f"{populated.url}/dicom-web/studies"
    page = httpx.get(base, params={"limit": 2}, headers=populated.headers)
    assert len(page.json()) == 2 and "Warning" in page.headers
    rest = httpx.get(base, params={"limit": 2, "offset": 2}, headers=populated.headers)
    assert len(rest.json()) == 1 and "Warning" not in rest.headers
    populated.archive.settings.dicomweb.max_results = 1
    capped = httpx.get(base, headers=populated.headers)
    assert len(capped.json()) == 1 and capped.headers["Warning"].startswith("299")
    none = httpx.get(base, params={"PatientID": "nobody"}, headers=populated.headers)
    assert none.status_code == 204


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"NoSuchAttribute": "x"}, "unknown attribute"),
        ({"Rows": "512"}, "not a search key"),
        ({"StudyDate": "2026-01-01"}, "not a date range"),
        ({"StudyDate": "yesterday"}, "not a valid date"),
        ({"limit": "-1"}, "non-negative integer"),
        ({"fuzzymatching": "maybe"}, "true or false"),
        ({"StudyInstanceUID": "1.2.*"}, "wild cards are not allowed"),
        ({"PatientName.FamilyName": "x"}, "sequence matching"),
    ],
)
def test_search__bad_parameters_are_400(
    populated: LiveServer, params: dict[str, str], message: str
) -> None:
    response = httpx.get(
        f"{populated.url}/dicom-web/studies", params=params, headers=populated.headers
    )
    assert response.status_code == 400
    assert message in response.json()["error"]
