"""Where each frame lies in a stored object: found once at ingest, used by every frame
request (WADO-RS frames, the viewer's main traffic) to read just those bytes.

Without it a frame request reads and parses the whole object with pydicom, about a
sixth of the server's time per frame, and for a multi-frame object of hundreds of MB the
whole object for one frame. With it: one ranged read per fragment, also on object
storage (an HTTP range request).

The index is JSON in ``instance.frame_index``, byte ranges relative to the stored object:

* native pixel data (PS3.5 8.2): ``{"native": [offset, frame_bytes]}``;
* encapsulated (PS3.5 A.4): ``{"frames": [[start, end, start, end, ...], ...], "pixel":
  {...}}``, the fragment values (item headers excluded) of each frame, in order, and the
  image pixel description a decoder needs to decode one frame on its own.

``None`` where the frames cannot be told apart without decoding (several fragments per
frame and no Basic Offset Table, packed 1-bit pixels, big endian): such objects take the
parsing path, as do objects stored before the index existed.
"""

from __future__ import annotations

import io
import struct
from typing import Any

import orjson
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID

_PIXEL_DATA = 0x7FE00010
_ITEM = b"\xfe\xff\x00\xe0"
_SEQUENCE_END = b"\xfe\xff\xdd\xe0"


def locate(blob: bytes, ds: Dataset | None = None, shift: int | None = None) -> str | None:
    """The frame index of the stored object ``blob`` (JSON text), or ``None``.

    ``ds`` is the object already parsed (ingest has it) from bytes that equal the blob
    once ``shift`` is added to the positions pydicom recorded; the blob is then not parsed
    again (about 0.5 ms a CT slice). Without them, or when the recorded position does not
    fall on the Pixel Data element of the blob, the blob is parsed.
    """
    if ds is not None and shift is not None:
        found = _locate(blob, ds, shift)
        if found is not None:
            return found
    try:
        return _locate(blob, dcmread(io.BytesIO(blob), defer_size=1024), 0)
    except Exception:  # noqa: BLE001 - any surprise: no index, the parsing path still works
        return None


def _locate(blob: bytes, ds: Dataset, shift: int) -> str | None:
    try:
        element = ds.get_item(_PIXEL_DATA)
        if element is None:
            return None
        tell = element.value_tell if hasattr(element, "value_tell") else element.file_tell
        if tell is None:
            return None
        offset = int(tell) + shift
        if not _at_pixel_data(blob, offset):
            return None
        ts = UID(str(ds.file_meta.TransferSyntaxUID))
        count = int(ds.get("NumberOfFrames", 1) or 1)
        index = (
            _encapsulated(blob, offset, count)
            if ts.is_encapsulated
            else _native(ds, offset, count, ts, len(blob))
        )
        if index is not None and ts.is_encapsulated:
            index["pixel"] = _pixel_description(ds)
    except Exception:  # noqa: BLE001 - any surprise: no index, the parsing path still works
        return None
    return orjson.dumps(index).decode() if index is not None else None


def _pixel_description(ds: Dataset) -> dict[str, Any]:
    """What a decoder needs to decode one frame on its own (pydicom's decoding options)."""
    samples = int(ds.get("SamplesPerPixel", 1))
    description: dict[str, Any] = {
        "rows": int(ds.Rows),
        "columns": int(ds.Columns),
        "samples_per_pixel": samples,
        "bits_allocated": int(ds.BitsAllocated),
        "bits_stored": int(ds.get("BitsStored", ds.BitsAllocated)),
        "pixel_representation": int(ds.get("PixelRepresentation", 0)),
        "photometric_interpretation": str(ds.PhotometricInterpretation),
    }
    if samples > 1:
        description["planar_configuration"] = int(ds.get("PlanarConfiguration", 0))
    return description


def _at_pixel_data(blob: bytes, offset: int) -> bool:
    """Whether the value at ``offset`` follows a Pixel Data element header: tag and
    length (implicit VR), or tag, VR, two reserved bytes and length (explicit VR)."""
    tag = b"\xe0\x7f\x10\x00"
    return offset >= 12 and (
        blob[offset - 8 : offset - 4] == tag or blob[offset - 12 : offset - 8] == tag
    )


def _native(ds: Dataset, offset: int, count: int, ts: UID, size: int) -> dict[str, Any] | None:
    bits = int(ds.BitsAllocated)
    if bits % 8 or not ts.is_little_endian or ts.is_deflated:
        # 1-bit frames share bytes; big endian frames are swapped on the way out; a
        # deflated data set has no pixel offsets.
        return None
    frame = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * bits // 8
    if frame <= 0 or offset + frame * count > size:
        return None
    return {"native": [offset, frame]}


def _encapsulated(blob: bytes, offset: int, count: int) -> dict[str, Any] | None:
    fragments: list[tuple[int, int]] = []  # (item start, value end) of every item
    position = offset
    while blob[position : position + 4] == _ITEM:
        (length,) = struct.unpack_from("<L", blob, position + 4)
        start = position + 8
        if start + length > len(blob):
            return None
        fragments.append((position, start + length))
        position = start + length
    if blob[position : position + 4] != _SEQUENCE_END or not fragments:
        return None
    table_start, table_end = fragments[0]
    table = blob[table_start + 8 : table_end]
    items = fragments[1:]
    if not items:
        return None
    if count == 1:
        groups = [items]
    elif len(items) == count:
        groups = [[item] for item in items]
    elif len(table) == 4 * count:
        # Basic Offset Table: each frame's first item, relative to the first fragment item.
        first = items[0][0]
        starts = [first + o for o in struct.unpack(f"<{count}L", table)]
        groups = [[] for _ in range(count)]
        frame = -1
        for item in items:
            while frame + 1 < count and item[0] >= starts[frame + 1]:
                frame += 1
            if frame < 0:
                return None
            groups[frame].append(item)
        if any(not g for g in groups):
            return None
    else:
        return None
    return {"frames": [[v for s, e in g for v in (s + 8, e)] for g in groups]}


def parse(index_text: str) -> dict[str, Any]:
    index: dict[str, Any] = orjson.loads(index_text)
    return index


def ranges(index: dict[str, Any], number: int) -> list[tuple[int, int]]:
    """The byte ranges (start, end) of the stored object that hold frame ``number``
    (1-based; the caller checks it against the instance's frame count)."""
    if "native" in index:
        offset, size = index["native"]
        start = offset + (number - 1) * size
        return [(start, start + size)]
    flat = index["frames"][number - 1]
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]
