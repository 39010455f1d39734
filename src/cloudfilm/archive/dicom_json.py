"""DICOM JSON (PS3.18 F.2) straight from the raw elements pydicom read.

pydicom's ``Dataset.to_json_dict`` first converts every raw element into a ``DataElement``
and was a third of our ingest time. This encoder handles the common cases — ASCII text,
binary numbers, bulk data — from the raw bytes and hands everything else (sequences,
non-ASCII text, private or ambiguous VRs, odd values) to pydicom, so the output is
identical to pydicom's (``tests/archive/test_dicom_json.py`` checks that on every sample
file).
"""

from __future__ import annotations

import base64
import logging
import struct
from collections.abc import Callable
from typing import Any

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

logger = logging.getLogger(__name__)

BulkHandler = Callable[[int], str]
"""Makes the ``BulkDataURI`` of the element with this tag."""

_STRUCT = {"US": "H", "SS": "h", "UL": "L", "SL": "l", "FL": "f", "FD": "d", "UV": "Q", "SV": "q"}
_BYTES_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
_SINGLE_TEXT = frozenset({"LT", "ST", "UT", "UR"})
_MULTI_TEXT = frozenset({"AE", "AS", "CS", "DA", "DT", "TM", "UI", "LO", "SH", "UC"})


def dataset_json(ds: Dataset, *, threshold: int, bulk_uri: BulkHandler) -> dict[str, Any]:
    """The JSON model of ``ds`` (without file meta), bulk data above ``threshold``
    (length of the base64 text, as pydicom counts) replaced by ``bulk_uri(element)``."""
    implicit, little = ds.original_encoding
    endian = "<" if little is not False else ">"
    result: dict[str, Any] = {}
    for tag in ds.keys():
        if tag.group == 0x0002:  # file meta: not part of the data set
            continue
        raw = ds.get_item(tag)
        encoded = None
        if isinstance(raw, RawDataElement):
            encoded = _fast(raw, endian, threshold, bulk_uri)
        if encoded is None:
            try:
                encoded = ds[tag].to_json_dict(lambda elem: bulk_uri(int(elem.tag)), threshold)
            except Exception:  # noqa: BLE001 - as pydicom's suppress_invalid_tags: drop it
                logger.warning("element %s cannot be represented in DICOM JSON; left out", tag)
                continue
        result[f"{int(tag):08X}"] = encoded
    return result


def _fast(
    raw: RawDataElement, endian: str, threshold: int, bulk_uri: BulkHandler
) -> dict[str, Any] | None:
    """The element's JSON, or ``None`` to let pydicom do it."""
    tag = raw.tag
    if tag.is_private:
        return None
    vr = raw.VR
    if vr == "UN":
        return None  # pydicom swaps UN for the dictionary VR where it knows one
    if vr is None:  # implicit VR: the data dictionary says
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            return None
    if (
        vr not in _STRUCT
        and vr not in _BYTES_VRS
        and vr not in _SINGLE_TEXT
        and vr not in _MULTI_TEXT
        and vr not in ("IS", "DS", "PN", "AT")
    ):
        return None  # SQ, ambiguous ("US or SS", "OB or OW"), anything unusual
    value = raw.value
    if value is None or len(value) == 0:
        return {"vr": vr}
    if vr in _BYTES_VRS:
        if len(value) > (threshold // 4) * 3:
            return {"vr": vr, "BulkDataURI": bulk_uri(int(tag))}
        return {"vr": vr, "InlineBinary": base64.b64encode(value).decode("ascii")}
    if vr in _STRUCT:
        code = _STRUCT[vr]
        size = struct.calcsize(code)
        if len(value) % size:
            return None
        return {
            "vr": vr,
            "Value": list(struct.unpack(f"{endian}{len(value) // size}{code}", value)),
        }
    if vr == "AT":
        if len(value) % 4:
            return None
        pairs = struct.unpack(f"{endian}{len(value) // 2}H", value)
        return {
            "vr": vr,
            "Value": [f"{pairs[i]:04X}{pairs[i + 1]:04X}" for i in range(0, len(pairs), 2)],
        }
    if not value.isascii() or b"\x1b" in value:
        return None  # character-set decoding: pydicom's job
    text = value.decode("ascii")
    if vr in _SINGLE_TEXT:
        stripped = text.rstrip("\x00 ") if vr != "UR" else text.strip()
        return {"vr": vr, "Value": [stripped]} if stripped else {"vr": vr}
    text = text.rstrip("\x00 ")
    if not text:
        return {"vr": vr}
    parts = text.split("\\")
    if vr in ("IS", "DS"):
        numbers: list[Any] = []
        for part in parts:
            part = part.strip()
            if not part:
                return None
            try:
                numbers.append(int(part) if vr == "IS" else float(part))
            except ValueError:
                return None
        return {"vr": vr, "Value": numbers}
    if vr == "PN":
        values = []
        for part in parts:
            groups = part.split("=")
            comps = {"Alphabetic": groups[0]}
            if len(groups) > 1:
                comps["Ideographic"] = groups[1]
            if len(groups) > 2:
                comps["Phonetic"] = groups[2]
            values.append(comps)
        return {"vr": vr, "Value": values}
    if vr == "AE":
        return {"vr": vr, "Value": [p.strip() for p in parts]}
    if vr in ("LO", "SH", "UC"):  # pydicom strips each value of these, not of the others
        return {"vr": vr, "Value": [p.rstrip("\x00 ") for p in parts]}
    return {"vr": vr, "Value": parts}


__all__ = ["dataset_json"]
