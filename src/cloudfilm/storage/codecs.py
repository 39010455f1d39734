"""Lossless transcoding of stored objects (pydicom with its pixel-data plug-ins).

Two uses:

* :func:`transcode`, when a client asks for another transfer syntax than the stored one
  (WADO-RS ``transfer-syntax``, WADO-URI ``transferSyntax``). Only lossless targets are
  offered: the archive never hands out a lossy copy of an original unless it was stored
  lossy.
* :func:`compress_verified`, the lossless compression of an uncompressed object (at ingest,
  later at migration): encode, decode the result, and hand it back only when the decoded
  pixels are bit-identical to the received ones. A pure function of bytes, so it can run
  in a worker thread or process.

HTJ2K (High-Throughput JPEG 2000, PS3.5 A.4.7): pydicom 3.0 has no HTJ2K encoder, so
single-sample images are encoded here with imagecodecs (OpenJPH, reversible) frame by
frame and encapsulated with a Basic Offset Table; pydicom decodes them with
pylibjpeg-openjpeg, an independent implementation, for the verification. Colour images
are not offered HTJ2K: OpenJPH applies the reversible colour transform to three
components, which DICOM would have to label YBR_RCT. :func:`htj2k_available` says
whether the encoder imports.

Encoders are named explicitly: GDCM's RLE encoder aborts the whole process (a C++
exception through ``abort()``) on images of odd width, so it is never chosen.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from cloudfilm.config import Codec
from cloudfilm.errors import CloudFilmError

#: Target transfer syntax → pydicom encoding plug-in ("" = pydicom's own / no encoding).
TARGETS: dict[str, str] = {
    ExplicitVRLittleEndian: "",
    ImplicitVRLittleEndian: "",
    JPEGLSLossless: "pyjpegls",
    JPEG2000Lossless: "pylibjpeg",
    RLELossless: "pylibjpeg",
}

#: Codec setting → transfer syntax.
CODEC_SYNTAX: dict[Codec, UID] = {
    Codec.JPEG_LS_LOSSLESS: JPEGLSLossless,
    Codec.JPEG2000_LOSSLESS: JPEG2000Lossless,
    Codec.RLE_LOSSLESS: RLELossless,
    Codec.HTJ2K_LOSSLESS: HTJ2KLossless,
}

#: Encoder options per target: JPEG 2000 without the colour transform, so RGB stays RGB.
_ENCODE_OPTIONS: dict[str, dict[str, Any]] = {JPEG2000Lossless: {"use_mct": False}}

#: Received encodings that :func:`compress_verified` re-encodes. Big Endian (retired) is
#: left as received: re-encoding it would also have to swap every other OW/OF value.
UNCOMPRESSED = frozenset(
    {ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian}
)

#: Photometric interpretations the lossless codecs carry unchanged (PS3.5 8.2).
_PHOTOMETRIC = frozenset({"MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "YBR_FULL"})


class CodecUnavailable(CloudFilmError):
    """The requested transfer syntax cannot be produced here."""


class CodecFailed(CloudFilmError):
    """The stored pixel data could not be decoded or re-encoded."""


class NotCompressible(CloudFilmError):
    """The object is kept as received: no pixel data, already compressed, too small, or a
    pixel format the codec cannot carry losslessly. Not an error for the sender."""


def can_produce(target: str) -> bool:
    return target in TARGETS


def htj2k_available() -> bool:
    """Whether an HTJ2K encoder is installed (imagecodecs with OpenJPH; see above)."""
    try:
        import imagecodecs
    except ImportError:
        return False
    return bool(imagecodecs.HTJ2K.available)


if htj2k_available():
    TARGETS[HTJ2KLossless] = "imagecodecs"


def encode_dataset(ds: Dataset, uid: UID, arr: np.ndarray[Any, Any] | None = None) -> None:
    """Encode the pixel data of ``ds`` (uncompressed) in the lossless ``uid``, in place.
    ``arr``: its decoded pixels, when the caller has them already."""
    if uid == HTJ2KLossless:
        _compress_htj2k(ds, _decode(ds) if arr is None else arr)
        return
    ds.compress(
        uid,
        arr,
        encoding_plugin=TARGETS.get(uid, ""),
        generate_instance_uid=False,  # pydicom's default would re-identify it
        **_ENCODE_OPTIONS.get(uid, {}),
    )


def _compress_htj2k(ds: Dataset, arr: np.ndarray[Any, Any]) -> None:
    import imagecodecs

    samples = int(ds.get("SamplesPerPixel", 1))
    if samples != 1:
        raise CodecUnavailable("HTJ2K is offered for single-sample (grey-scale) images only")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    layout = arr.reshape(frames, int(ds.Rows), int(ds.Columns))
    encoded = [bytes(imagecodecs.htj2k_encode(frame, reversible=True)) for frame in layout]
    ds.PixelData = encapsulate(encoded, has_bot=True)
    element = ds["PixelData"]
    element.VR = "OB"
    element.is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = HTJ2KLossless


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
            ds.decompress(generate_instance_uid=False)  # pydicom's default re-identifies it
        uid = UID(target)
        if uid.is_compressed:
            if "PixelData" not in ds:
                raise CodecUnavailable(f"{target} needs pixel data; this object has none")
            encode_dataset(ds, uid)
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


@dataclass(frozen=True, slots=True)
class CompressedObject:
    """A losslessly re-encoded object whose decoded pixels were verified bit-exact."""

    dataset: bytes
    """The data set (no preamble, no File Meta Information), Explicit VR Little Endian."""
    transfer_syntax_uid: str
    ds: Dataset
    """The re-encoded data set (the same attributes; Pixel Data encapsulated)."""


def compress_verified(blob: bytes, target: str, *, min_pixel_bytes: int = 0) -> CompressedObject:
    """Re-encode the Part-10 object ``blob`` in the lossless ``target`` and verify it.

    Verification: the received pixel data is decoded and must give back its own bytes
    (so no bit outside Bits Stored, e.g. an overlay in the high bits, would be dropped
    silently), and the re-encoded object, decoded again from its serialised bytes, must
    give an array equal to it in shape, dtype and every value (every frame, every sample).
    Every other attribute, the SOP Instance UID included, is kept.

    Raises
    ------
    NotCompressible
        Nothing to do (see the class); the caller stores ``blob`` as received.
    CodecFailed
        Encoding failed or the verification found a difference; the caller stores
        ``blob`` as received and records the reason.
    """
    uid = UID(target)
    if uid not in CODEC_SYNTAX.values() or not uid.is_compressed:
        raise CodecUnavailable(f"{target} is not a lossless codec we encode")
    if uid == HTJ2KLossless and not htj2k_available():
        raise CodecUnavailable("no HTJ2K encoder is installed")
    try:
        ds = dcmread(io.BytesIO(blob))
    except Exception as exc:  # noqa: BLE001 - the blob was validated; be safe anyway
        raise CodecFailed(f"the object cannot be read: {exc}") from exc
    source = UID(str(ds.file_meta.TransferSyntaxUID))
    _check_suitable(ds, source, min_pixel_bytes)
    if uid == HTJ2KLossless and int(ds.get("SamplesPerPixel", 1)) != 1:
        raise NotCompressible("HTJ2K is used for single-sample images only; colour kept")
    try:
        original = _decode(ds)
        _check_faithful(ds, original)
        encode_dataset(ds, uid, original)
        dataset = _dataset_bytes(ds)
        check = dcmread(io.BytesIO(_part10(dataset, uid)))
        decoded = _decode(check)
    except CodecFailed:
        raise
    except Exception as exc:  # noqa: BLE001 - encoder/decoder errors of any kind
        raise CodecFailed(f"{uid.name}: encoding failed: {exc}") from exc
    if decoded.dtype != original.dtype or decoded.shape != original.shape:
        raise CodecFailed(
            f"{uid.name}: decoded {decoded.dtype}{decoded.shape}, "
            f"received {original.dtype}{original.shape}"
        )
    if not np.array_equal(decoded, original):
        differing = int(np.count_nonzero(decoded != original))
        raise CodecFailed(f"{uid.name}: {differing} decoded sample(s) differ from the received")
    return CompressedObject(dataset, str(uid), ds)


def suitable(ds: Dataset, source: str, min_pixel_bytes: int) -> bool:
    """Whether :func:`compress_verified` would try to compress ``ds`` received in ``source``
    (a cheap check: no pixel is decoded)."""
    try:
        _check_suitable(ds, UID(source), min_pixel_bytes)
    except NotCompressible:
        return False
    return True


def _check_suitable(ds: Dataset, source: UID, min_pixel_bytes: int) -> None:
    if "PixelData" not in ds:
        raise NotCompressible("no Pixel Data")
    if source not in UNCOMPRESSED:
        raise NotCompressible(f"received in {source.name}, kept as received")
    bits = ds.get("BitsAllocated")
    if bits not in (8, 16):
        raise NotCompressible(f"Bits Allocated {bits}: only 8 and 16 are compressed")
    samples = ds.get("SamplesPerPixel", 1)
    if samples not in (1, 3):
        raise NotCompressible(f"Samples per Pixel {samples}")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in _PHOTOMETRIC:
        raise NotCompressible(f"Photometric Interpretation {photometric or '(none)'}")
    size = len(ds.PixelData)
    if size < min_pixel_bytes:
        raise NotCompressible(f"Pixel Data of {size} bytes is below {min_pixel_bytes}")


def _decode(ds: Dataset) -> np.ndarray[Any, Any]:
    # raw: no colour-space conversion, so YBR_FULL is compared as YBR_FULL.
    ds.pixel_array_options(raw=True)
    return np.asarray(ds.pixel_array)


def _check_faithful(ds: Dataset, arr: np.ndarray[Any, Any]) -> None:
    """The decoded array must be the received bytes, not a masked copy of them."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1))
    layout = arr.reshape(frames, int(ds.Rows), int(ds.Columns), samples)
    if samples == 3 and int(ds.get("PlanarConfiguration", 0)) == 1:
        layout = np.moveaxis(layout, 3, 1)
    native = layout.astype(layout.dtype.newbyteorder("<"), copy=False).tobytes()
    if bytes(ds.PixelData[: len(native)]) != native:
        raise CodecFailed(
            "the received Pixel Data has bits outside Bits Stored (or unusual sign "
            "extension) that a decoded array does not keep; kept as received"
        )


def _dataset_bytes(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_dataset(fp, ds)
    return fp.getvalue()


def _part10(dataset: bytes, transfer_syntax_uid: str) -> bytes:
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = UID(transfer_syntax_uid)
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_file_meta_info(fp, meta, enforce_standard=False)
    return b"\x00" * 128 + b"DICM" + fp.getvalue() + dataset
