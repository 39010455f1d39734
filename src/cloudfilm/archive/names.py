"""Person names: DICOM PN groups and the pinyin kept for searching Chinese names."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from pypinyin import lazy_pinyin

_HAN = re.compile(r"[\u3400-\u9fff\U00020000-\U0002ffff]")


@dataclass(frozen=True, slots=True)
class NameForms:
    full: str
    alphabetic: str
    ideographic: str
    phonetic: str
    pinyin: str
    initials: str


def without_accents(text: str) -> str:
    """``Müller`` → ``Muller``: for accent-insensitive name search."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def has_han(text: str) -> bool:
    return bool(_HAN.search(text))


def to_pinyin(text: str) -> tuple[str, str]:
    """Toneless pinyin with ``^`` between name components, and the initials.

    >>> to_pinyin("王^小东")
    ('wang^xiaodong', 'wxd')
    """
    components: list[str] = []
    initials: list[str] = []
    for component in text.split("^"):
        syllables = [s.lower() for s in lazy_pinyin(component.strip(), errors="ignore") if s]
        syllables = [s for s in syllables if s.isalpha()]
        components.append("".join(syllables))
        initials.extend(s[0] for s in syllables)
    return "^".join(components).strip("^"), "".join(initials)


def name_forms(value: object) -> NameForms:
    """Split a decoded PN value (pydicom ``PersonName`` or text) into its groups."""
    full = str(value or "")
    groups = (full.split("=") + ["", ""])[:3]
    alphabetic, ideographic, phonetic = (g.strip() for g in groups)
    chinese = ideographic if has_han(ideographic) else alphabetic if has_han(alphabetic) else ""
    pinyin, initials = to_pinyin(chinese) if chinese else ("", "")
    if not pinyin and alphabetic:
        pinyin = without_accents(alphabetic).lower()
    return NameForms(full, alphabetic, ideographic, phonetic, pinyin, initials)


__all__ = ["NameForms", "has_han", "name_forms", "to_pinyin", "without_accents"]
