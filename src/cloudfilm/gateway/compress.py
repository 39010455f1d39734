"""Lossless compression before upload (``gateway.compress_before_upload``), to save WAN
bandwidth between the hospital and the archive.

An uncompressed image is re-encoded by :func:`cloudfilm.storage.codecs.compress_verified`,
the archive's own codec path, which hands the result back only when the re-encoded pixels,
decoded again, are bit-identical to the received ones. Everything else (no pixel data,
already compressed, an unsupported pixel format, an encoder error, a verified difference,
no gain) is sent as the PACS gave it. The spool keeps the object as received (its SHA-256 in
the queue is of those bytes); the re-encoding happens at each send.

The archive takes the compressed object as it comes: its index records the transfer
syntax, size and checksum *it* received (JPEG-LS here) as the "original", because it cannot
know what the PACS held; only objects it compressed itself keep the uncompressed original
transfer syntax. The gateway's message log has both sizes (``COMPRESS`` lines).
"""

from __future__ import annotations

import io
import logging
import time

from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID

from cloudfilm.config import Codec
from cloudfilm.gateway.messages import message, since
from cloudfilm.storage import codecs

logger = logging.getLogger(__name__)


def compress_for_upload(data: bytes, codec: Codec, *, sop_instance_uid: str = "") -> bytes:
    """``data`` (a Part-10 object) losslessly re-encoded in ``codec`` and verified, or
    ``data`` itself when that is not possible or not smaller."""
    if codec is Codec.NONE:
        return data
    start = time.monotonic()
    try:
        out = codecs.compress_verified(data, codecs.CODEC_SYNTAX[codec])
    except codecs.NotCompressible:
        return data
    except (codecs.CodecFailed, codecs.CodecUnavailable) as exc:
        # No UID here: application logs carry no PHI; the message log has the UID.
        logger.warning("gateway: sent as received, %s not used: %s", codec.value, exc)
        message("COMPRESS", sop_uid=sop_instance_uid, codec=codec.value, error=str(exc)[:300])
        return data
    meta = FileMetaDataset(dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta)
    meta.TransferSyntaxUID = UID(out.transfer_syntax_uid)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(fp, meta, enforce_standard=True)
    compressed = b"\x00" * 128 + b"DICM" + fp.getvalue() + out.dataset
    if len(compressed) >= len(data):
        return data
    message(
        "COMPRESS",
        sop_uid=sop_instance_uid,
        codec=codec.value,
        bytes_in=len(data),
        bytes_out=len(compressed),
        ms=since(start),
    )
    return compressed
