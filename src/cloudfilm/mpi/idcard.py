"""Resident identity card numbers (居民身份证号码), GB 11643-1999.

18 characters: a 6-digit administrative division code, the birth date ``YYYYMMDD``, a
3-digit sequence number (odd for men, even for women) and a check character computed
with ISO 7064:1983 MOD 11-2 over the first 17 digits (``X`` stands for 10).
"""

from __future__ import annotations

import re
from datetime import date

_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_CHECK = "10X98765432"
_SHAPE = re.compile(r"^[1-9]\d{16}[\dX]$")


class InvalidIdCard(ValueError):
    """The text is not a valid 18-character ID-card number; the message says why."""


def check_character(first17: str) -> str:
    """The GB 11643 check character of the first 17 digits (ISO 7064 MOD 11-2)."""
    total = sum(int(digit) * weight for digit, weight in zip(first17, _WEIGHTS, strict=True))
    return _CHECK[total % 11]


def normalize(value: str) -> str:
    """Spaces and hyphens out, lower-case ``x`` up, full-width digits to ASCII."""
    text = value.strip().translate(_FULL_WIDTH)
    return re.sub(r"[\s-]", "", text).upper()


_FULL_WIDTH = str.maketrans("０１２３４５６７８９ｘＸ", "0123456789XX")


def validate(value: str) -> str:
    """The normalised number when ``value`` is a valid ID-card number.

    Raises
    ------
    InvalidIdCard
        Wrong length or characters, an impossible birth date, or a wrong check character.
    """
    number = normalize(value)
    if not _SHAPE.match(number):
        raise InvalidIdCard(
            "身份证号码应为18位，前17位为数字，最后一位为数字或X · "
            "an ID-card number has 18 characters: 17 digits, then a digit or X"
        )
    try:
        born = date(int(number[6:10]), int(number[10:12]), int(number[12:14]))
    except ValueError as exc:
        raise InvalidIdCard("身份证号码中的出生日期无效 · the birth date in it is invalid") from exc
    if born.year < 1800 or born > date.today():
        raise InvalidIdCard("身份证号码中的出生日期无效 · the birth date in it is invalid")
    if check_character(number[:17]) != number[17]:
        raise InvalidIdCard("身份证号码校验位错误 · the check character (GB 11643) is wrong")
    return number


def is_valid(value: str) -> bool:
    try:
        validate(value)
    except InvalidIdCard:
        return False
    return True


def birth_date(number: str) -> str:
    """``YYYYMMDD`` of a valid number."""
    return number[6:14]


def sex(number: str) -> str:
    """``M`` or ``F`` from the sequence number's parity (odd: male)."""
    return "M" if int(number[16]) % 2 else "F"
