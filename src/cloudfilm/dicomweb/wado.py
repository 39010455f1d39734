"""WADO-RS frames and bulk data (PS3.18 10.4, 8.7.3): pieces cut from the stored object.

Frames are sent in the stored transfer syntax: uncompressed frames as
``application/octet-stream``, compressed ones as their image media type (PS3.18 Table
8.7.3-2) or as octet-stream with a ``transfer-syntax`` parameter when the client accepts
any (``transfer-syntax=*``, what OHIF and Cornerstone send). A client that accepts only
uncompressed data gets the frame decoded (Explicit VR Little Endian).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.utils import pixel_array
from pydicom.tag import Tag
from pydicom.uid import UID

from cloudfilm.archive import frames as frame_index
from cloudfilm.dicomweb.media import media_type_parameters

#: PS3.18 Table 8.7.3-2: media types of compressed pixel data.
IMAGE_MEDIA_TYPES = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}


class FrameError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class Frame:
    data: bytes
    media_type: str
    transfer_syntax_uid: str


def parse_frame_list(text: str, count: int) -> list[int]:
    """``1,3,5`` → [1, 3, 5] (1-based, PS3.18 10.4.1.1.6); 400/404 when malformed or absent."""
    numbers = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit() or len(item) > 7 or int(item) < 1:
            raise FrameError(400, f"{item[:20]!r} is not a frame number (1, 2, ...)")
        numbers.append(int(item))
    missing = [n for n in numbers if n > count]
    if missing:
        raise FrameError(404, f"frame {missing[0]} does not exist: the instance has {count}")
    return numbers


def _dataset(blob: bytes) -> Dataset:
    return dcmread(io.BytesIO(blob))


def accepted(accept: str) -> tuple[bool, set[str]]:
    """(whether any transfer syntax is acceptable, the media types asked for)."""
    any_syntax = False
    media: set[str] = set()
    for item in (accept or "*/*").split(","):
        kind, params = media_type_parameters(item)
        if kind == "multipart/related":
            kind = params.get("type", "application/octet-stream").lower()
        media.add(kind)
        if params.get("transfer-syntax") == "*" or kind in ("*/*", "*"):
            any_syntax = True
    return any_syntax, media


def delivery(ts: UID, accept: str) -> tuple[str, str] | None:
    """(media type, transfer syntax) that frames stored in ``ts`` go out in for a client
    that sends ``accept``; ``None`` when they must be decoded first. 406 when no form fits."""
    any_syntax, media = accepted(accept)
    if not ts.is_encapsulated:
        if not media & {"application/octet-stream", "*/*", "*", "multipart/related"}:
            raise FrameError(406, "uncompressed frames come as application/octet-stream")
        return "application/octet-stream", (
            "1.2.840.10008.1.2.1" if ts.is_little_endian else str(ts)
        )
    image_type = IMAGE_MEDIA_TYPES.get(str(ts), "application/octet-stream")
    if image_type in media or "image/*" in media:
        return image_type, str(ts)
    if any_syntax:
        return "application/octet-stream", str(ts)
    if media & {"application/octet-stream", "multipart/related"}:
        return None
    raise FrameError(
        406,
        f"the frames are stored compressed ({ts.name}); accept {image_type}, "
        "application/octet-stream or transfer-syntax=*",
    )


def indexed_frames(
    read: Callable[[int, int], bytes],
    index_text: str,
    ts: str,
    count: int,
    numbers_text: str,
    accept: str,
) -> list[Frame] | None:
    """The requested frames read through the frame index (:mod:`cloudfilm.archive.frames`)
    with ``read(start, end)`` on the stored object, decoded one by one when the client
    accepts only uncompressed data; ``None`` when they must be decoded and the index has
    no pixel description (older indexes): then the whole object is (:func:`frames`)."""
    numbers = parse_frame_list(numbers_text, count)
    how = delivery(UID(ts), accept)
    index = frame_index.parse(index_text)
    if how is None:
        if "pixel" not in index:
            return None
        return [_decode_frame(read, index, n, UID(ts)) for n in numbers]
    kind, syntax = how
    return [
        Frame(b"".join(read(s, e) for s, e in frame_index.ranges(index, n)), kind, syntax)
        for n in numbers
    ]


def frames(blob: bytes, numbers_text: str, accept: str) -> list[Frame]:
    """The requested frames of the stored object ``blob``, in a form ``accept`` allows."""
    ds = _dataset(blob)
    if "PixelData" not in ds:
        raise FrameError(404, "this instance has no pixel data, hence no frames")
    ts = UID(str(ds.file_meta.TransferSyntaxUID))
    count = int(ds.get("NumberOfFrames", 1) or 1)
    numbers = parse_frame_list(numbers_text, count)
    how = delivery(ts, accept)
    if how is None:
        return [_decoded(blob, n, count) for n in numbers]
    kind, syntax = how
    if not ts.is_encapsulated:
        size = (
            int(ds.Rows)
            * int(ds.Columns)
            * int(ds.get("SamplesPerPixel", 1))
            * int(ds.BitsAllocated)
            // 8
        )
        pixels = ds.PixelData
        return [Frame(pixels[(n - 1) * size : n * size], kind, syntax) for n in numbers]
    all_frames = list(generate_frames(ds.PixelData, number_of_frames=count))
    return [Frame(all_frames[n - 1], kind, syntax) for n in numbers]


#: Decoder plug-in per stored syntax where pydicom's first choice is slower (JPEG-LS:
#: GDCM 7.4 ms, pyjpegls 4.3 ms for a 512 × 512 CT frame).
_DECODER = {"1.2.840.10008.1.2.4.80": "pyjpegls", "1.2.840.10008.1.2.4.81": "pyjpegls"}


def _decode_frame(
    read: Callable[[int, int], bytes], index: dict[str, Any], number: int, ts: UID
) -> Frame:
    """Frame ``number`` read through the index and decoded on its own (the frame's
    fragments and the pixel description kept with the index), as :func:`_decoded`."""
    data = b"".join(read(s, e) for s, e in frame_index.ranges(index, number))
    try:
        decoder = get_decoder(ts)
        plugin = _DECODER.get(str(ts), "")
        options: dict[str, Any] = {"number_of_frames": 1, **index["pixel"]}
        pixels, _ = decoder.as_array(
            encapsulate([data]),
            decoding_plugin=plugin if plugin in decoder.available_plugins else "",
            **options,
        )
    except Exception as exc:  # noqa: BLE001 - any decoder failure: the data is damaged
        raise FrameError(422, f"frame {number} cannot be decoded: {exc}") from exc
    data = pixels.astype(pixels.dtype.newbyteorder("<"), copy=False).tobytes()
    return Frame(data, "application/octet-stream", "1.2.840.10008.1.2.1")


def _decoded(blob: bytes, number: int, count: int) -> Frame:
    """Frame ``number`` decoded to uncompressed little-endian pixels (Explicit VR LE).

    Colour frames stored as YBR come out as RGB, as pydicom decodes them.
    """
    try:
        pixels = pixel_array(io.BytesIO(blob), index=number - 1 if count > 1 else None)
    except Exception as exc:  # noqa: BLE001 - any decoder failure: the data is damaged
        raise FrameError(422, f"frame {number} cannot be decoded: {exc}") from exc
    data = pixels.astype(pixels.dtype.newbyteorder("<"), copy=False).tobytes()
    return Frame(data, "application/octet-stream", "1.2.840.10008.1.2.1")


def bulkdata(blob: bytes, tag_text: str) -> bytes:
    """The value of the top-level element ``tag_text`` (``7FE00010``) of the stored object."""
    try:
        tag = Tag(int(tag_text, 16))
    except ValueError as exc:
        raise FrameError(400, f"{tag_text[:20]!r} is not a tag (8 hex digits)") from exc
    ds = _dataset(blob)
    if tag not in ds:
        raise FrameError(404, f"the instance has no element {tag}")
    value = ds[tag].value
    if not isinstance(value, bytes | bytearray):
        raise FrameError(404, f"element {tag} holds no bulk data")
    return bytes(value)
