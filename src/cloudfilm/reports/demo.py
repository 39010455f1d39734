"""Demo reports: each demo patient (:mod:`cloudfilm.archive.demo`) gets a person in the
master index (with a made-up ID-card number, valid under GB 11643) and a final report on
their study, so that a demo shows the report PDF, its QR code and the patient entry.

The ID-card numbers start 110105 1900...: birth year 1900 marks them as invented."""

from __future__ import annotations

from sqlalchemy import select

from cloudfilm.archive.demo import DEMO_PATIENTS, DemoPatient
from cloudfilm.archive.ingest import Archive
from cloudfilm.archive.models import Study
from cloudfilm.audit.service import Actor
from cloudfilm.mpi import idcard
from cloudfilm.mpi import service as mpi
from cloudfilm.reports import service as reports
from cloudfilm.reports.models import ReportStatus

TEXTS = {
    "CF0001": ("肝脏大小形态正常，实质密度均匀，未见异常密度灶。胆囊不大，壁不厚。"
               "胰腺形态、密度未见异常，胰管无扩张。脾脏不大。双肾未见异常。腹膜后未见肿大淋巴结。",
               "上腹部CT平扫未见明显异常。"),
    "CF0002": ("颅骨结构完整。脑实质密度均匀，灰白质分界清楚。脑室系统大小形态正常，中线结构居中。",
               "头部CT（体模）未见异常。"),
    "CF0003": ("任务态功能成像示双侧运动皮层激活，激活区位置、范围符合任务设计。"
               "常规序列未见异常信号。",
               "功能成像运动区定位如上所述。"),
    "CF0004": ("双肺纹理清晰，未见实变影。双肺门不大。心影大小形态正常。双侧膈面光整，肋膈角锐利。",
               "胸部正位片未见明显异常。"),
    "CF0005": ("窦性心律，心率 72 次/分。PR 间期、QRS 时限、QT 间期在正常范围。未见 ST-T 异常。",
               "正常心电图。"),
    "CF0006": ("肝脏形态大小正常，实质回声均匀。胆囊壁光滑，腔内未见异常回声。胰腺、脾脏显示清晰，"
               "未见异常。",
               "腹部超声未见明显异常。"),
}  # fmt: skip


def demo_id_card(patient: DemoPatient) -> str:
    """An invented ID-card number with a valid check character: 110105 1900MMDD 0NN."""
    first17 = f"1101051900{patient.birth_date[4:]}0{patient.patient_id[-2:]}"
    return first17 + idcard.check_character(first17)


def load_demo_reports(archive: Archive) -> int:
    """Persons and final reports of the demo studies; idempotent. How many were added."""
    actor = Actor.cli("cloudfilm demo")
    added = 0
    with archive.db.session() as session:
        for patient in DEMO_PATIENTS:
            uid = session.scalars(
                select(Study.study_instance_uid).where(Study.accession_number == patient.accession)
            ).first()
            if uid is None or reports.find_report(session, accession_number=patient.accession):
                continue
            family_given = patient.name.split("=")[-1].replace("^", "")
            person = mpi.register(
                session=session,
                identifiers=[
                    mpi.identifier("PI", "", patient.patient_id),
                    mpi.identifier(mpi.ID_CARD, "", demo_id_card(patient)),
                ],
                demographics=mpi.Demographics(
                    name=family_given, sex=patient.sex, birth_date=patient.birth_date
                ),
                source="demo",
            )
            findings, impression = TEXTS.get(patient.patient_id, ("", ""))
            reports.submit(
                session,
                data=reports.ReportData(
                    status=ReportStatus.FINAL,
                    accession_number=patient.accession,
                    study_instance_uid=uid,
                    patient_id=patient.patient_id,
                    exam_name=patient.study_description,
                    department=patient.department,
                    findings=findings,
                    impression=impression,
                    reporting_doctor="林医生",
                    reviewing_doctor="周主任",
                ),
                source="demo",
                actor=actor,
                storage=archive.storage,
                person_id=person.id,
            )
            added += 1
    return added
