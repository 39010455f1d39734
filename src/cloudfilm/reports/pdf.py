"""The report PDF: an HTML template (Jinja2) laid out by WeasyPrint, with the hospital's
header, the patient and exam, findings and impression, key images rendered from the
archive, the doctors, and a QR code (segno) that opens the patient pages for this exam.

Text is set in Noto Sans CJK SC (Debian ``fonts-noto-cjk``, found through fontconfig);
WeasyPrint embeds only the glyphs a report uses, so a PDF is some tens of kilobytes.
"""

from __future__ import annotations

import base64
import mimetypes
import time
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import segno
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup

from cloudfilm.config import ReportSettings
from cloudfilm.orders.service import LOCAL_ZONE

_TEMPLATES = Path(__file__).parent / "templates"

SEX = {"M": "男", "F": "女", "O": "其他", "U": "未知"}
STATUS = {"preliminary": "初步报告", "final": "正式报告", "corrected": "更正报告"}
VISIT = {"outpatient": "门诊", "inpatient": "住院", "emergency": "急诊", "physical-exam": "体检"}


@lru_cache(maxsize=1)
def _environment() -> Environment:
    return Environment(
        loader=FileSystemLoader(_TEMPLATES),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _css_string(text: str) -> Markup:
    """``text`` inside a CSS string literal of the template's <style> (escaped for CSS,
    since HTML escaping means nothing there)."""
    out = []
    for ch in text.replace("\n", " "):
        if ch in '\\"<>&' or ord(ch) < 0x20:
            out.append(f"\\{ord(ch):X} ")
        else:
            out.append(ch)
    return Markup("".join(out))


def qr_png(url: str, scale: int = 8) -> bytes:
    """The QR code of ``url`` (error correction M, 2-module quiet zone) as PNG bytes."""
    import io

    out = io.BytesIO()
    segno.make(url, error="m", micro=False).save(out, kind="png", scale=scale, border=2)
    return out.getvalue()


def data_uri(data: bytes, mime_type: str) -> str:
    return f"data:{mime_type};base64," + base64.b64encode(data).decode("ascii")


def local_time(moment: datetime | None, with_time: bool = True) -> str:
    if moment is None:
        return ""
    if moment.tzinfo is None:
        from datetime import UTC

        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(LOCAL_ZONE).strftime("%Y-%m-%d %H:%M" if with_time else "%Y-%m-%d")


def age(birth_date: str, on: datetime) -> str:
    """Age in whole years (岁), months (月) for babies, as Chinese reports print it."""
    if len(birth_date) != 8 or not birth_date.isdigit():
        return ""
    year, month, day = int(birth_date[:4]), int(birth_date[4:6]), int(birth_date[6:])
    local = on.astimezone(LOCAL_ZONE)
    years = local.year - year - ((local.month, local.day) < (month, day))
    if years >= 1:
        return f"{years}岁"
    months = (local.year - year) * 12 + local.month - month - (local.day < day)
    return f"{max(months, 0)}月"


@dataclass(frozen=True, slots=True)
class KeyImage:
    jpeg: bytes
    caption: str


@dataclass(frozen=True, slots=True)
class ReportPage:
    """Everything printed on a report, already looked up."""

    patient: dict[str, str]
    exam: dict[str, Any]
    doctors: dict[str, str]
    findings: str
    impression: str
    recommendation: str
    critical: bool
    url: str
    images: list[KeyImage]
    printed_at: datetime


def _logo(path: Path | None) -> str | None:
    if path is None:
        return None
    mime = mimetypes.guess_type(path.name)[0] or "image/png"
    return data_uri(path.read_bytes(), mime)


def render_html(page: ReportPage, settings: ReportSettings) -> str:
    template = _environment().get_template("report.html")
    return template.render(
        hospital={
            "name": settings.hospital_name,
            "name_en": settings.hospital_name_en,
            "title": settings.department_title,
        },
        footer_css=_css_string(settings.footer),
        logo=_logo(settings.logo_path),
        qr=data_uri(qr_png(page.url), "image/png"),
        patient=page.patient,
        exam=page.exam,
        doctors=page.doctors,
        findings=page.findings,
        impression=page.impression,
        recommendation=page.recommendation,
        critical=page.critical,
        images=[
            {"src": data_uri(image.jpeg, "image/jpeg"), "caption": image.caption}
            for image in page.images
        ],
        printed_at=local_time(page.printed_at),
    )


def render_pdf(page: ReportPage, settings: ReportSettings) -> tuple[bytes, float]:
    """The PDF bytes and the milliseconds it took."""
    from weasyprint import HTML  # type: ignore[import-untyped]

    started = time.perf_counter()
    html = render_html(page, settings)
    pdf = HTML(string=html, base_url=str(_TEMPLATES)).write_pdf()
    assert pdf is not None
    return pdf, (time.perf_counter() - started) * 1000
