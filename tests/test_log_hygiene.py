"""No secret or personal data in the logs (SECURITY-CHECKS G6): canary values planted
through DICOM and HTTP never reach a log line, at DEBUG level."""

from __future__ import annotations

import io
import logging

import httpx
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelFind,
)

from cloudfilm.config import DimseSettings
from cloudfilm.dimse.server import DIMSEServer

from auth_helpers import login, make_user
from conftest import DATA, LiveServer, free_port

NAME = "Canary^Zhang7391"
PATIENT_ID = "CANARY-110101199003078515"
PASSWORD = "Canary-Pass-7391!"


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_canaries_stay_out_of_the_logs(
    live_server: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    archive = live_server.archive
    settings = DimseSettings(
        port=free_port(), nodes={"WS01": {"host": "127.0.0.1", "allow_find": True}}
    )
    scp = DIMSEServer(archive, settings)
    scp.start()
    try:
        ds = dcmread(DATA / "ct_small.dcm")
        ds.PatientName, ds.PatientID = NAME, PATIENT_ID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        ae = AE(ae_title="WS01")
        ae.add_requested_context(CTImageStorage, ds.file_meta.TransferSyntaxUID)
        ae.add_requested_context(PatientRootQueryRetrieveInformationModelFind)
        assoc = ae.associate("127.0.0.1", settings.port, ae_title="CLOUDFILM")
        assert assoc.is_established
        assert assoc.send_c_store(dcmread(io.BytesIO(buffer.getvalue()))).Status == 0
        query = Dataset()
        query.QueryRetrieveLevel, query.PatientName, query.PatientID = "PATIENT", NAME, ""
        found = [
            i
            for _, i in assoc.send_c_find(query, PatientRootQueryRetrieveInformationModelFind)
            if i
        ]
        assoc.release()
        assert found and found[0].PatientID == PATIENT_ID
    finally:
        scp.stop()

    make_user(live_server, "canary", ["radiologist"], password=PASSWORD)
    response = login(live_server, "canary", PASSWORD)
    token = response.cookies.jar
    session_token = next(c.value for c in token if c.name == "__Host-cf_session")
    login(live_server, "canary", "Wrong-" + PASSWORD)
    search = httpx.get(
        f"{live_server.url}/dicom-web/studies",
        params={"PatientName": NAME},
        headers=live_server.headers,
    )
    assert search.status_code == 200

    server_lines = "\n".join(
        f"{r.name} {r.getMessage()} {r.exc_text or ''}"
        for r in caplog.records
        if not r.name.startswith(("httpx", "httpcore"))  # the test's own HTTP client
    )
    assert server_lines  # the logs were captured at all
    for canary in (NAME, "Zhang7391", PATIENT_ID, PASSWORD, session_token, live_server.token):
        assert canary not in server_lines, canary
