"""Lossless transcoding of stored objects (pydicom with its pixel-data plug-ins).

Used when a client asks for another transfer syntax than the stored one (WADO-RS
``transfer-syntax``, WADO-URI ``transferSyntax``). Only lossless targets are offered:
the archive never hands out a lossy copy of an original unless it was stored lossy.
HTJ2K is offered once an encoder is installed (pydicom 3.0 has none).
"""

from __future__ import annotations

import io

from pydicom import dcmread
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from cloudfilm.errors import CloudFilmError

#: Target transfer syntax → pydicom encoding plug-in ("" = pydicom's own / no encoding).
TARGETS: dict[str, str] = {
    ExplicitVRLittleEndian: "",
    ImplicitVRLittleEndian: "",
    JPEGLSLossless: "pyjpegls",
    JPEG2000Lossless: "pylibjpeg",
    RLELossless: "",
}


class CodecUnavailable(CloudFilmError):
    """The requested transfer syntax cannot be produced here."""


class CodecFailed(CloudFilmError):
    """The stored pixel data could not be decoded or re-encoded."""


def can_produce(target: str) -> bool:
    return target in TARGETS


def transcode(blob: bytes, target: str) -> bytes:
    """``blob`` (a Part-10 object) re-encoded in ``target``; the same bytes if already so."""
    ds = dcmread(io.BytesIO(blob))
    source = UID(str(ds.file_meta.TransferSyntaxUID))
    if source == target:
        return blob
    if target not in TARGETS:
        raise CodecUnavailable(
            f"cannot produce transfer syntax {target}; available: {', '.join(TARGETS)}"
        )
    try:
        if "PixelData" in ds and source.is_compressed:
            ds.decompress()
        uid = UID(target)
        if uid.is_compressed:
            if "PixelData" not in ds:
                raise CodecUnavailable(f"{target} needs pixel data; this object has none")
            ds.compress(uid, encoding_plugin=TARGETS[target])
        else:
            ds.file_meta.TransferSyntaxUID = uid
        out = io.BytesIO()
        ds.save_as(
            out, enforce_file_format=True, implicit_vr=uid.is_implicit_VR, little_endian=True
        )
    except CodecUnavailable:
        raise
    except Exception as exc:  # noqa: BLE001 - decoder/encoder errors of any kind
        raise CodecFailed(f"transcoding {source.name} to {UID(target).name} failed: {exc}") from exc
    return out.getvalue()
