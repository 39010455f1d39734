"""Object-level access: a user sees only the studies in the data scope of the roles
(SECURITY-CHECKS D2), through every door that names a study, and cannot widen the own
account (D3)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from cloudfilm.audit.service import Actor
from cloudfilm.auth.models import User

from auth_helpers import make_user, signed_in
from conftest import DATA, LiveServer


@dataclass(frozen=True)
class Exam:
    study: str
    series: str
    sop: str


def _exam(server: LiveServer, name: str, **attributes: str) -> Exam:
    ds = dcmread(DATA / name)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    assert server.archive.ingest(buffer.getvalue(), actor=Actor.cli("pytest")).ok
    return Exam(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)


def _doors(exam: Exam) -> list[str]:
    """Every read that names the study, from metadata to pixels."""
    study = f"/dicom-web/studies/{exam.study}"
    instance = f"{study}/series/{exam.series}/instances/{exam.sop}"
    return [
        f"{study}/metadata",
        f"{study}/series/{exam.series}/metadata",
        f"{instance}/metadata",
        study,
        f"{instance}",
        f"{instance}/frames/1",
        f"{instance}/rendered",
        f"{study}/thumbnail",
        f"{study}/series/{exam.series}/thumbnail",
        f"{instance}/thumbnail",
        f"/wado?requestType=WADO&studyUID={exam.study}&seriesUID={exam.series}"
        f"&objectUID={exam.sop}&contentType=application/dicom",
    ]


def _studies(server: LiveServer, headers: dict[str, str], **params: str) -> set[str]:
    response = httpx.get(f"{server.url}/dicom-web/studies", params=params, headers=headers)
    if response.status_code == 204:
        return set()
    assert response.status_code == 200, response.text
    return {item["0020000D"]["Value"][0] for item in response.json()}


@pytest.fixture
def hospital(live_server: LiveServer) -> tuple[LiveServer, Exam, Exam, Exam]:
    server = live_server
    cardio = _exam(server, "ct_small.dcm", RequestingService="cardiology")
    neuro = _exam(server, "ct_small.dcm", RequestingService="neurology")
    referred = _exam(
        server, "mr_small.dcm", RequestingService="neurology", ReferringPhysicianName="Zhang^San"
    )
    make_user(server, "heart", ["clinician"], department="cardiology", display_name="Li^Si")
    make_user(server, "zhang", ["clinician"], department="cardiology", display_name="Zhang^San")
    return server, cardio, neuro, referred


def test_clinician_sees_only_own_department(hospital: tuple[LiveServer, Exam, Exam, Exam]) -> None:
    server, cardio, neuro, referred = hospital
    headers = signed_in(server, "heart")
    assert _studies(server, headers) == {cardio.study}
    assert _studies(server, headers, StudyInstanceUID=neuro.study) == set()
    for level in ("series", "instances"):
        response = httpx.get(
            f"{server.url}/dicom-web/{level}",
            params={"StudyInstanceUID": neuro.study},
            headers=headers,
        )
        assert response.status_code == 204, (level, response.text)
    for path in _doors(neuro) + _doors(referred):
        response = httpx.get(f"{server.url}{path}", headers=headers)
        assert response.status_code == 404, (path, response.status_code)
    for path in _doors(cardio):
        response = httpx.get(f"{server.url}{path}", headers=headers)
        assert response.status_code == 200, (path, response.status_code, response.text[:200])
    # Downloading is not a clinician's permission at all.
    zip_url = f"{server.url}/dicom-web/studies/{cardio.study}/archive"
    assert httpx.get(zip_url, headers=headers).status_code == 403


def test_own_patients_are_visible_outside_the_department(
    hospital: tuple[LiveServer, Exam, Exam, Exam],
) -> None:
    server, cardio, neuro, referred = hospital
    headers = signed_in(server, "zhang")
    assert _studies(server, headers) == {cardio.study, referred.study}
    response = httpx.get(
        f"{server.url}/dicom-web/studies/{referred.study}/metadata", headers=headers
    )
    assert response.status_code == 200
    assert (
        httpx.get(
            f"{server.url}/dicom-web/studies/{neuro.study}/metadata", headers=headers
        ).status_code
        == 404
    )


def test_custom_role_scopes_by_modality_and_download(
    hospital: tuple[LiveServer, Exam, Exam, Exam],
) -> None:
    """A role made at run time by the security administrator: MR studies only, with
    download; the ZIP of a CT study is 404, of an MR study 200."""
    server, cardio, _, referred = hospital
    make_user(server, "sec", ["secadmin"])
    make_user(server, "mr", [])
    sec = signed_in(server, "sec")
    role = {
        "code": "mr-reader",
        "name": "MR 阅片",
        "permissions": ["study:search", "study:read", "study:download"],
        "data_scope": {"modalities": ["MR"]},
    }
    assert httpx.post(f"{server.url}/api/admin/roles", json=role, headers=sec).status_code == 200
    assigned = httpx.put(
        f"{server.url}/api/admin/users/mr/roles", json={"roles": ["mr-reader"]}, headers=sec
    )
    assert assigned.status_code == 200
    headers = signed_in(server, "mr")
    assert _studies(server, headers) == {referred.study}
    archive = f"{server.url}/dicom-web/studies/{{}}/archive"
    assert httpx.get(archive.format(cardio.study), headers=headers).status_code == 404
    assert httpx.get(archive.format(referred.study), headers=headers).status_code == 200


def test_access_rule_limits_where_a_role_applies(
    hospital: tuple[LiveServer, Exam, Exam, Exam],
) -> None:
    """The access dimension: a role bound to another network grants nothing here."""
    server, *_ = hospital
    make_user(server, "sec", ["secadmin"])
    make_user(server, "remote", [])
    sec = signed_in(server, "sec")
    role: dict[str, Any] = {
        "code": "ward-only",
        "name": "病区终端",
        "permissions": ["study:search"],
        "data_scope": {"all": True},
        "access": {"networks": ["10.20.0.0/16"]},
    }
    assert httpx.post(f"{server.url}/api/admin/roles", json=role, headers=sec).status_code == 200
    httpx.put(
        f"{server.url}/api/admin/users/remote/roles", json={"roles": ["ward-only"]}, headers=sec
    )
    headers = signed_in(server, "remote")
    assert httpx.get(f"{server.url}/dicom-web/studies", headers=headers).status_code == 403
    role["access"] = {"networks": ["127.0.0.0/8"], "hours": "00:00-24:00"}
    assert (
        httpx.put(f"{server.url}/api/admin/roles/ward-only", json=role, headers=sec).status_code
        == 200
    )
    headers = signed_in(server, "remote")  # the role change ended the old session
    assert httpx.get(f"{server.url}/dicom-web/studies", headers=headers).status_code == 200


def test_no_mass_assignment_and_no_secrets_in_answers(live_server: LiveServer) -> None:
    """D3: fields users may not set are refused with 400, and no answer carries a password
    hash, token hash or TOTP seed."""
    server = live_server
    make_user(server, "self", ["clinician"])
    make_user(server, "sys", ["sysadmin"])
    make_user(server, "sec", ["secadmin"])
    me = signed_in(server, "self")
    for extra in (
        {"role": "sysadmin"},
        {"is_admin": True},
        {"department": "x"},
        {"roles": ["secadmin"]},
    ):
        response = httpx.patch(
            f"{server.url}/api/auth/me", json={"display_name": "x", **extra}, headers=me
        )
        assert response.status_code == 400, extra
        assert response.json()["error"] == "invalid_request"
    sys = signed_in(server, "sys")
    for body in (
        {"username": "new1", "roles": ["secadmin"]},
        {"username": "new1", "password_hash": "x"},
        {"username": "new1", "enabled": False, "is_admin": True},
    ):
        assert (
            httpx.post(f"{server.url}/api/admin/users", json=body, headers=sys).status_code == 400
        )
    assert (
        httpx.patch(
            f"{server.url}/api/admin/users/self", json={"roles": ["sysadmin"]}, headers=sys
        ).status_code
        == 400
    )
    answers: list[Any] = [
        httpx.get(f"{server.url}/api/auth/me", headers=signed_in(server, "self")).json(),
        httpx.get(f"{server.url}/api/admin/users", headers=sys).json(),
        httpx.get(f"{server.url}/api/admin/clients", headers=sys).json(),
        httpx.get(
            f"{server.url}/api/admin/role-assignments", headers=signed_in(server, "sec")
        ).json(),
    ]

    def keys(value: Any) -> set[str]:
        if isinstance(value, dict):
            return set(value) | {k for v in value.values() for k in keys(v)}
        if isinstance(value, list):
            return {k for v in value for k in keys(v)}
        return set()

    found = keys(answers)
    assert not {
        k for k in found if "hash" in k or "secret" in k or "token" in k and k != "csrf_token"
    }


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_demo_clinician_sees_the_own_department(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The demo's clinician (神经内科) sees that department's patients; the radiologist all."""
    from cloudfilm.archive import demo
    from cloudfilm.auth.bootstrap import demo_users, first_start

    monkeypatch.setattr(demo, "sample_data_dir", lambda: None)  # the bundled files: fast
    demo.load_demo(live_server.archive)
    with live_server.archive.db.session() as session:
        first_start(session, live_server.accounts)
        assert {c.username for c in demo_users(session, live_server.accounts)} == {
            "doctor",
            "clinician",
        }
        for user in session.scalars(select(User)):
            user.must_change_password = False
    everything = _studies(live_server, signed_in(live_server, "doctor"))
    neurology = _studies(live_server, signed_in(live_server, "clinician"))
    assert len(everything) == 2  # the bundled fallback has two demo studies
    assert neurology == {demo.demo_uid("CF0003", "study")}
