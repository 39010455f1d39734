"""Report messages as a RIS sends them, and the steps every report test repeats."""

from __future__ import annotations

import base64
import io
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hl7.client import MLLPClient
from pydicom import dcmread
from pydicom.uid import generate_uid

import hl7
from cloudfilm.archive.ingest import Archive
from cloudfilm.audit.service import Actor
from cloudfilm.config import HL7Settings
from cloudfilm.hl7.listener import HL7Listener

from conftest import DATA, require_tool

FINDINGS = "双肺纹理清晰，右肺上叶见一直径约8mm磨玻璃结节，边界清楚。纵隔淋巴结未见肿大。"
IMPRESSION = "右肺上叶磨玻璃结节，建议三个月后复查。"


def oru(
    control_id: str,
    *,
    accession: str = "ACC100",
    status: str = "F",
    findings: str = FINDINGS,
    impression: str = IMPRESSION,
    pdf: bytes | None = None,
    critical: bool = False,
    study_uid: str = "",
    key_images: list[str] | None = None,
    patient: str = "P100",
    name: str = "王小明",
    phone: str = "13800138000",
    placer: str = "HIS100",
    reported: str = "20261128143000",
    id_card: str = "",
    id_card_first: bool = False,
) -> bytes:
    """An ORU^R01 (UTF-8) with PID, ORC, OBR (chest CT, doctors in OBR-32..34, status in
    OBR-25), ZDS (Study Instance UID) and OBX findings, impression, key images, PDF."""
    segments = [
        "MSH|^~\\&|RIS|人民医院|CLOUDFILM|影像科|20261128150000||ORU^R01^ORU_R01|"
        f"{control_id}|P|2.5|||AL|NE|CHN|UNICODE UTF-8",
        f"PID|1||{_pid3(patient, id_card, id_card_first)}||{name}^^^^^^L||19800315|M|||||{phone}",
        "PV1|1|O|放射科门诊",
        f"ORC|RE|{placer}|RIS{accession}||CM",
        _obr(placer, accession, status, reported),
    ]
    if study_uid:
        segments.append(f"ZDS|{study_uid}^^Application^DICOM")
    flag = "AA" if critical else ""
    segments.append(f"OBX|1|TX|GDT^检查所见^LOCAL||{_escape(findings)}|||{flag}|||{status}")
    segments.append(f"OBX|2|TX|IMP^诊断意见^LOCAL||{_escape(impression)}||||||{status}")
    if key_images:
        segments.append(f"OBX|3|ST|KEY^关键图像^LOCAL||{' '.join(key_images)}||||||{status}")
    if pdf is not None:
        data = base64.b64encode(pdf).decode("ascii")
        segments.append(
            f"OBX|4|ED|PDF^报告原件^LOCAL||^application^pdf^Base64^{data}||||||{status}"
        )
    return ("\r".join(segments) + "\r").encode("utf-8")


def _pid3(patient: str, id_card: str, id_card_first: bool) -> str:
    reps = [f"{patient}^^^HIS^PI"] + ([f"{id_card}^^^^NNCHN"] if id_card else [])
    return "~".join(reversed(reps) if id_card_first else reps)


def _obr(placer: str, accession: str, status: str, reported: str) -> str:
    fields = [""] * 35
    fields[1] = "1"
    fields[2] = placer
    fields[3] = f"RIS{accession}" if accession else ""
    fields[4] = "CT001^胸部CT平扫^LOCAL"
    fields[7] = "20261128090000"
    fields[15] = "^^^胸部"
    fields[18] = accession
    fields[22] = reported
    fields[24] = "CT"
    fields[25] = status
    fields[32] = "D01&张&主任"
    fields[33] = "D02&李&医生"
    fields[34] = "D03&赵&技师"
    return "OBR|" + "|".join(fields[1:])


def _escape(text: str) -> str:
    return text.replace("\\", "\\E\\").replace("|", "\\F\\").replace("\n", "\\.br\\")


def ingest_ct(archive: Archive, accession: str, patient: str = "P100") -> tuple[str, str]:
    """A CT image of a new study with ``accession``: (Study, SOP Instance UID)."""
    ds = dcmread(DATA / "ct_small.dcm")
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.AccessionNumber = accession
    ds.PatientID = patient
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    assert archive.ingest(buffer.getvalue(), actor=Actor.cli("pytest")).ok
    return str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)


def pdf_text(pdf: bytes, tmp: Path) -> str:
    path = tmp / "report.pdf"
    path.write_bytes(pdf)
    out = subprocess.run(
        [require_tool("pdftotext"), "-enc", "UTF-8", str(path), "-"],
        check=True,
        capture_output=True,
    )
    return out.stdout.decode("utf-8")


def pdf_page_png(pdf: bytes, tmp: Path, name: str = "page", dpi: int = 150) -> Path:
    path = tmp / f"{name}.pdf"
    path.write_bytes(pdf)
    subprocess.run(
        [
            require_tool("pdftoppm"),
            "-png",
            "-r",
            str(dpi),
            "-f",
            "1",
            "-l",
            "1",
            "-singlefile",
            str(path),
            str(tmp / name),
        ],
        check=True,
    )
    return tmp / f"{name}.png"


def qr_codes(png: Path) -> list[str]:
    """The QR codes zbar finds in the image."""
    out = subprocess.run(
        [require_tool("zbarimg"), "--quiet", "--raw", "-Sdisable", "-Sqrcode.enable", str(png)],
        capture_output=True,
        check=False,
    )
    return [line for line in out.stdout.decode("utf-8").splitlines() if line]


@contextmanager
def listening(archive: Archive) -> Iterator[HL7Listener]:
    """The archive's MLLP listener on a free port."""
    server = HL7Listener(archive.db, HL7Settings(port=0, idle_timeout_seconds=5))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def send(listener: HL7Listener, *messages: bytes) -> list[Any]:
    """Each message on one connection, as a RIS sends them; the parsed ACKs."""
    acks = []
    with MLLPClient("127.0.0.1", listener.port, encoding="utf-8") as client:
        for raw in messages:
            answer = client.send_message(raw)
            acks.append(hl7.parse(answer[1:-2].decode("utf-8")))
    return acks


def ack_code(ack: Any) -> str:
    return str(ack.segment("MSA")[1])
