"""The registration label: a QR code with the exam's link and a few lines of text, as a
PNG for thermal label printers (60 × 40 mm at 203 dpi) and as a PDF of that page size."""

from __future__ import annotations

import io
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import segno
from PIL import Image, ImageDraw, ImageFont

from cloudfilm.reports import pdf

LABEL_MM = (60, 40)
DPI = 203
_FONT_CANDIDATES = (
    ("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc", 2),  # Debian fonts-noto-cjk: SC
    ("/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc", 2),
)


@dataclass(frozen=True, slots=True)
class LabelText:
    hospital: str
    name: str
    exam: str
    accession: str
    date: str


@lru_cache(maxsize=1)
def _font_file() -> tuple[str, int] | None:
    for path, index in _FONT_CANDIDATES:
        if Path(path).exists():
            return path, index
    fc_match = shutil.which("fc-match")
    if fc_match:
        out = subprocess.run(
            [fc_match, "-f", "%{file}\n%{index}", "Noto Sans CJK SC"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.split("\n")
        if len(out) == 2 and out[0]:
            return out[0], int(out[1] or 0)
    return None


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    found = _font_file()
    if found is None:
        return ImageFont.load_default()
    return ImageFont.truetype(found[0], size=size, index=found[1])


def _px(mm: float) -> int:
    return round(mm / 25.4 * DPI)


def label_png(text: LabelText, url: str) -> bytes:
    """The label as a 1-bit PNG (what thermal printers print)."""
    width, height = _px(LABEL_MM[0]), _px(LABEL_MM[1])
    image = Image.new("1", (width, height), 1)
    qr = Image.open(io.BytesIO(pdf.qr_png(url, scale=4))).convert("1")
    side = height - 2 * _px(2)
    qr = qr.resize((side, side), Image.Resampling.NEAREST)
    image.paste(qr, (_px(1.5), _px(2)))
    draw = ImageDraw.Draw(image)
    left, top = side + _px(3), _px(3)
    lines = [
        (text.hospital, 20),
        (text.name, 30),
        (text.exam, 20),
        (f"检查号 {text.accession}" if text.accession else "", 18),
        (text.date, 18),
        ("扫码查看报告与影像", 18),
    ]
    for line, size in lines:
        if not line:
            continue
        font = _font(size)
        draw.text((left, top), _fit(draw, line, font, width - left - _px(1)), font=font, fill=0)
        top += size + 8
    out = io.BytesIO()
    image.save(out, "PNG", dpi=(DPI, DPI))
    return out.getvalue()


def _fit(draw: ImageDraw.ImageDraw, text: str, font: object, width: int) -> str:
    """``text``, shortened with … until it fits ``width`` pixels."""
    while text and draw.textlength(text, font=font) > width:  # type: ignore[arg-type]
        text = text[:-2] + "…"
    return text


def label_pdf(text: LabelText, url: str) -> bytes:
    """The label as a one-page PDF of the label's size (vector QR code and text)."""
    from html import escape

    from weasyprint import HTML  # type: ignore[import-untyped]

    qr = segno.make(url, error="m").svg_data_uri(scale=4, border=2)
    rows = "".join(
        f'<div class="{cls}">{escape(value)}</div>'
        for cls, value in (
            ("h", text.hospital),
            ("n", text.name),
            ("e", text.exam),
            ("a", f"检查号 {text.accession}" if text.accession else ""),
            ("a", text.date),
            ("a", "扫码查看报告与影像"),
        )
        if value
    )
    html = f"""<!doctype html><html lang="zh-CN"><head><meta charset="utf-8"><style>
@page {{ size: {LABEL_MM[0]}mm {LABEL_MM[1]}mm; margin: 1.5mm; }}
body {{ font-family: "Noto Sans CJK SC", sans-serif; margin: 0; display: flex; }}
img {{ width: 34mm; height: 34mm; }}
.t {{ padding-left: 1.5mm; overflow: hidden; }}
.h {{ font-size: 6.5pt; }} .n {{ font-size: 11pt; font-weight: bold; margin: 0.5mm 0; }}
.e {{ font-size: 7pt; }} .a {{ font-size: 6.5pt; }}
</style></head><body><img src="{qr}" alt=""><div class="t">{rows}</div></body></html>"""
    data = HTML(string=html).write_pdf()
    assert data is not None
    return bytes(data)
