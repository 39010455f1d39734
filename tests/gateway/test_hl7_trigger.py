"""The gateway's HL7 trigger (MLLP): a final ORU^R01 / ORM^O01 / OMI^O23 queues its study
like ``POST /trigger``; AA only once it is queued, AE with ERR when it names no study."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom
import pytest
from hl7.client import MLLPClient
from test_end_to_end import archived

import hl7
from cloudfilm.gateway.hl7_trigger import final_exams
from cloudfilm.gateway.models import StudyState
from cloudfilm.gateway.service import Gateway

from conftest import DATA, LiveServer, free_port

if TYPE_CHECKING:
    from pacs_fixtures import OrthancPACS

pytest_plugins = ["pacs_fixtures"]


@pytest.fixture
def backend() -> str:
    return "sqlite"


@pytest.fixture
def gateway(
    tmp_path: Path, orthanc: OrthancPACS, gateway_port: int, live_server: LiveServer
) -> Iterator[Gateway]:
    from pacs_fixtures import client_secret, gateway_settings

    settings = gateway_settings(
        tmp_path,
        orthanc=orthanc,
        gateway_port=gateway_port,
        archive_url=live_server.url,
        secret=client_secret(live_server.archive, live_server.clock),
        source={"poll_interval": 3600},
        http_port=0,
        hl7_port=free_port(),
    )
    gw = Gateway(settings)
    gw.start()
    gw.start_hl7()
    yield gw
    gw.close()


def hl7_message(kind: str, control_id: str, *segments: str) -> str:
    structure = {"ORU^R01": "ORU_R01", "ORM^O01": "ORM_O01", "OMI^O23": "OMI_O23",
                 "ADT^A08": "ADT_A01"}[kind]  # fmt: skip
    return "\r".join(
        [
            f"MSH|^~\\&|RIS|人民医院|CF_GATEWAY|影像科|20261128083000||{kind}^{structure}|"
            f"{control_id}|P|2.5.1|||AL|NE|CHN|UNICODE UTF-8",
            "PID|1||P001^^^HIS^PI||张^三丰||19800101|M",
            *segments,
        ]
    )


def obr(accession: str = "", result_status: str = "", number: int = 1) -> str:
    """OBR with OBR-18 (accession, RIS convention) and OBR-25 (result status)."""
    fields = ["OBR", str(number), "PL1", "FL1", "CT001^胸部CT平扫"] + [""] * 21
    fields[18], fields[25] = accession, result_status
    return "|".join(fields)


def orc(control: str, status: str) -> str:
    return f"ORC|{control}|PL1|FL1||{status}"


def send(gw: Gateway, text: str) -> Any:
    assert gw.hl7 is not None
    with MLLPClient("127.0.0.1", gw.hl7.port) as client:
        answer = client.send_message(text.encode("utf-8"))
    return hl7.parse(answer.decode("utf-8").strip("\x0b\x1c\r"))


def ack_code(ack: Any) -> str:
    return str(ack.segment("MSA")[1])


def test_final_exams__keys_and_status_of_each_group() -> None:
    oru = hl7.parse(
        hl7_message("ORU^R01", "1", obr("ACC1", "F"), "ZDS|1.2.3^100^Application^DICOM")
    )
    [exam] = final_exams(oru, "ORU^R01")
    assert (exam.accession_number, exam.study_instance_uid) == ("ACC1", "1.2.3")
    preliminary = hl7.parse(hl7_message("ORU^R01", "2", orc("SC", "CM"), obr("ACC1", "P")))
    assert final_exams(preliminary, "ORU^R01") == []  # a result is final by OBR-25 only
    omi = hl7.parse(
        hl7_message("OMI^O23", "3", orc("SC", "CM"), obr(), "IPC|ACC9|REQ1|1.2.9|SPS1|CT")
    )
    [exam] = final_exams(omi, "OMI^O23")
    assert (exam.accession_number, exam.study_instance_uid) == ("ACC9", "1.2.9")
    orm = hl7.parse(hl7_message("ORM^O01", "4", orc("NW", "IP"), obr("ACC2")))
    assert final_exams(orm, "ORM^O01") == []


def test_hl7_trigger__final_result_and_order__queued_then_delivered(
    orthanc: OrthancPACS, gateway: Gateway, live_server: LiveServer
) -> None:
    header = pydicom.dcmread(DATA / "ct_small.dcm")
    header.AccessionNumber = "A20261128HL7"
    buffer = io.BytesIO()
    header.save_as(buffer, enforce_file_format=True)
    orthanc.upload(buffer.getvalue())
    study_uid = str(header.StudyInstanceUID)

    # Not final yet (ORC-5 IP): acknowledged, nothing queued.
    ack = send(gateway, hl7_message("ORM^O01", "M1", orc("NW", "IP"), obr("A20261128HL7")))
    assert ack_code(ack) == "AA"
    assert gateway.queue.studies() == []

    # The final report: queued by its accession number before the AA.
    ack = send(gateway, hl7_message("ORU^R01", "M2", obr("A20261128HL7", "F")))
    assert ack_code(ack) == "AA", str(ack)
    assert str(ack.segment("MSA")[2]) == "M2"
    row = gateway.queue.study(study_uid)
    assert row is not None and row.state == StudyState.DISCOVERED

    # An imaging order completed (ORC-5 CM), the study named by IPC-3: queued by its UID
    # although the PACS does not hold it yet.
    ack = send(
        gateway,
        hl7_message(
            "OMI^O23", "M3", orc("SC", "CM"), obr(), "IPC|A9|REQ9|1.2.826.0.1.99.1|SPS9|MR"
        ),
    )
    assert ack_code(ack) == "AA", str(ack)
    assert gateway.queue.study("1.2.826.0.1.99.1") is not None

    # Final, but no accession number and no Study Instance UID: AE with ERR 101.
    ack = send(gateway, hl7_message("ORU^R01", "M4", obr("", "F")))
    assert ack_code(ack) == "AE"
    err = ack.segment("ERR")
    assert str(err[3]).startswith("101^") and str(err[2]) == "OBR^1^18"
    # An accession the PACS does not know: AE 204; not a trigger type: AE 200.
    ack = send(gateway, hl7_message("ORU^R01", "M5", obr("NO-SUCH-ACC", "F")))
    assert (ack_code(ack), str(ack.segment("ERR")[3]).split("^")[0]) == ("AE", "204")
    ack = send(gateway, hl7_message("ADT^A08", "M6", "PV1|1|O"))
    assert (ack_code(ack), str(ack.segment("ERR")[3]).split("^")[0]) == ("AE", "200")

    # The UID-only study keeps failing (its images are not in the PACS): not drained here.
    _drain_one(gateway, study_uid)
    assert str(header.SOPInstanceUID) in archived(live_server)
    log = (gateway.gw.data_dir / "messages.log").read_text()
    assert log.count('"peer": "hl7"') == 2  # two TRIGGER records
    assert '"msg": "HL7"' in log


def _drain_one(gw: Gateway, study_uid: str, timeout: float = 30.0) -> None:
    """Run the loop until ``study_uid`` is delivered (the other study keeps failing: its
    images are not in the PACS)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        gw.run_once()
        row = gw.queue.study(study_uid)
        if row is not None and row.state == StudyState.DELIVERED:
            return
        time.sleep(0.05)
    raise AssertionError(f"{study_uid} was not delivered: {gw.queue.studies()}")
