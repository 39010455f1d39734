"""The message log: one JSON line per DICOM/HTTP message, UIDs only, never demographics."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pydicom
import pytest
from pydicom.uid import generate_uid
from test_end_to_end import drain

from cloudfilm.config import Settings
from cloudfilm.gateway.service import Gateway

from conftest import DATA, LiveServer

if TYPE_CHECKING:
    from pacs_fixtures import OrthancPACS

pytest_plugins = ["pacs_fixtures"]

CANARY_NAME = "CANARY^ZHANGSAN"
CANARY_ID = "CANARY-PID-4711"


@pytest.fixture
def backend() -> str:
    return "sqlite"


@pytest.fixture
def gateway(gw_settings: Settings) -> Iterator[Gateway]:
    gw = Gateway(gw_settings)
    gw.start()
    yield gw
    gw.close()


def test_message_log__uids_present__patient_name_and_id_absent(
    orthanc: OrthancPACS, gateway: Gateway, live_server: LiveServer
) -> None:
    ds = pydicom.dcmread(DATA / "ct_small.dcm")
    ds.PatientName, ds.PatientID = CANARY_NAME, CANARY_ID
    ds.StudyInstanceUID = study_uid = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    orthanc.upload(buffer.getvalue())

    gateway.fetch("pacs", patient_id=CANARY_ID)  # the query key itself must not be logged
    drain(gateway)

    text = gateway.message_log.read_text(encoding="utf-8")
    assert CANARY_NAME.split("^")[0] not in text and "ZHANGSAN" not in text
    assert CANARY_ID not in text
    assert study_uid in text and str(ds.SOPInstanceUID) in text
    lines = [json.loads(line) for line in text.splitlines()]
    kinds = {line["msg"] for line in lines}
    assert {"A-ASSOCIATE", "C-FIND-RQ", "C-FIND-RSP", "C-MOVE-RQ", "C-MOVE-RSP", "C-STORE",
            "STOW-RS-RQ", "STOW-RS-RSP"} <= kinds  # fmt: skip
    finds = [line for line in lines if line["msg"] == "C-FIND-RQ"]
    assert ["PatientID"] in [find["keys"] for find in finds]  # the fetch; then the polls
    [move] = [line for line in lines if line["msg"] == "C-MOVE-RSP"]
    assert move["status"] == "0x0000" and move["completed"] == 1 and move["ms"] >= 0
    [stored] = [line for line in lines if line["msg"] == "C-STORE"]
    assert stored["direction"] == "in" and stored["bytes"] > 0 and stored["study_uid"] == study_uid
    stow = [line for line in lines if line["msg"] == "STOW-RS-RSP"]
    assert stow and stow[-1]["status"] == 200
    assert all("ts" in line for line in lines)
