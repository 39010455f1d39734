"""FHIR search parameter values (R4 3.1.1.5 "Search parameter types"): dates with prefixes,
tokens ``system|code``, references, and the result parameters ``_count`` / paging.

Every value becomes a bound SQL parameter; nothing is built from text."""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, not_, or_


class FHIRError(Exception):
    """A request FHIR answers with an OperationOutcome: HTTP status, issue code, text."""

    def __init__(self, status: int, code: str, diagnostics: str) -> None:
        super().__init__(diagnostics)
        self.status = status
        self.code = code
        self.diagnostics = diagnostics


def invalid(diagnostics: str) -> FHIRError:
    return FHIRError(400, "invalid", diagnostics)


_PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
_DATE = re.compile(
    r"^(?P<y>\d{4})(-(?P<m>\d{2})(-(?P<d>\d{2})"
    r"(T(?P<H>\d{2}):(?P<M>\d{2})(:(?P<S>\d{2})(\.\d+)?)?(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)


@dataclass(frozen=True, slots=True)
class DateRange:
    """A date parameter: its prefix and the interval its value stands for,
    ``[start, end)`` (R4 3.1.1.5.4: a value is an implicit range at its precision)."""

    prefix: str
    start: datetime
    end: datetime


def parse_date(name: str, raw: str) -> DateRange:
    prefix, value = (raw[:2], raw[2:]) if raw[:2] in _PREFIXES else ("eq", raw)
    if prefix in ("sa", "eb", "ap"):
        raise invalid(f"{name}: prefix {prefix!r} is not supported; use eq, ne, gt, lt, ge, le")
    match = _DATE.fullmatch(value)
    if match is None:
        raise invalid(f"{name}: {raw!r} is not a FHIR date (YYYY, YYYY-MM, YYYY-MM-DD[Thh:mm])")
    parts = match.groupdict()
    try:
        year = int(parts["y"])
        if parts["m"] is None:
            start = datetime(year, 1, 1)
            end = datetime(year + 1, 1, 1)
        elif parts["d"] is None:
            month = int(parts["m"])
            start = datetime(year, month, 1)
            end = start + timedelta(days=calendar.monthrange(year, month)[1])
        elif parts["H"] is None:
            start = datetime(year, int(parts["m"]), int(parts["d"]))
            end = start + timedelta(days=1)
        else:
            start = datetime(
                year,
                int(parts["m"]),
                int(parts["d"]),
                int(parts["H"]),
                int(parts["M"]),
                int(parts["S"] or 0),
            )
            end = start + timedelta(seconds=1 if parts["S"] else 60)
    except ValueError as exc:
        raise invalid(f"{name}: {raw!r} is not a valid date") from exc
    tz = parts["tz"]
    if tz:
        offset = (
            timedelta(0)
            if tz == "Z"
            else (1 if tz[0] == "+" else -1) * timedelta(hours=int(tz[1:3]), minutes=int(tz[4:]))
        )
        start, end = start - offset, end - offset
    return DateRange(prefix, start.replace(tzinfo=UTC), end.replace(tzinfo=UTC))


def _compare(column: Any, found: DateRange, low: Any, high: Any) -> ColumnElement[bool]:
    """``low``/``high`` are the range's bounds in the column's own form, ``high``
    exclusive."""
    within = and_(column >= low, column < high)
    conditions: dict[str, ColumnElement[bool]] = {
        "eq": within,
        "ne": not_(within),
        "gt": column >= high,
        "ge": column >= low,
        "lt": column < low,
        "le": column < high,
    }
    return conditions[found.prefix]


def da_condition(column: Any, found: DateRange) -> ColumnElement[bool]:
    """A DICOM DA column (``YYYYMMDD`` text, "" when unknown) against a date parameter.
    The text compares like the date; times of day are ignored (a DA has none)."""
    low = found.start.strftime("%Y%m%d")
    last = found.end - timedelta(microseconds=1)
    high = (last.date() + timedelta(days=1)).strftime("%Y%m%d")
    return and_(column != "", _compare(column, found, low, high))


def instant_condition(column: Any, found: DateRange) -> ColumnElement[bool]:
    """A timezone-aware timestamp column against a date parameter (UTC when no zone)."""
    return _compare(column, found, found.start, found.end)


@dataclass(frozen=True, slots=True)
class Token:
    system: str | None
    """``None``: any system; ``""``: no system (``|code``)."""
    code: str


def parse_token(raw: str) -> Token:
    if "|" in raw:
        system, _, code = raw.partition("|")
        return Token(system, code)
    return Token(None, raw)


def reference_id(name: str, raw: str, resource_type: str) -> str:
    """``Patient/123``, a full URL ending so, or ``123`` → ``123``."""
    value = raw.rstrip("/")
    kind, _, ident = value.rpartition("/")
    if kind and kind.rsplit("/", 1)[-1] != resource_type:
        raise invalid(f"{name}: {raw!r} is not a reference to a {resource_type}")
    if not ident:
        raise invalid(f"{name}: empty reference")
    return ident


@dataclass(frozen=True, slots=True)
class Paging:
    count: int
    offset: int


def paging(values: dict[str, list[str]], *, default: int, maximum: int) -> Paging:
    """``_count`` (R4 3.1.1.5.7, capped at ``maximum``) and our ``_offset`` (what the
    ``next`` link carries)."""
    count = _integer("_count", values.get("_count"), default)
    offset = _integer("_offset", values.get("_offset"), 0)
    return Paging(min(count, maximum), offset)


def _integer(name: str, raw: list[str] | None, default: int) -> int:
    if not raw:
        return default
    try:
        value = int(raw[-1])
    except ValueError as exc:
        raise invalid(f"{name}: {raw[-1]!r} is not a number") from exc
    if value < 0:
        raise invalid(f"{name} must not be negative")
    return value


def any_of(conditions: list[ColumnElement[bool]]) -> ColumnElement[bool]:
    return conditions[0] if len(conditions) == 1 else or_(*conditions)
