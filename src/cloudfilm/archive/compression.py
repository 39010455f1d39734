"""Lossless compression of incoming images, and the compression report.

At ingest (:meth:`cloudfilm.archive.ingest.Archive.ingest`), an uncompressed image is
re-encoded in the codec configured for its modality (``settings.compression``) by
:func:`cloudfilm.storage.codecs.compress_verified`, which hands the result back only
when its decoded pixels are bit-identical to the received ones. Anything else (no pixels,
already compressed, too small, an unsupported pixel format, an encoder error, a verified
difference, no gain) stores the object as received; a failure is noted in the audit
record of the store, never reported to the sender as an error. Clients that do not accept
the stored codec get the original transfer syntax back, transcoded on the fly (WADO-RS,
WADO-URI, C-GET/C-MOVE presentation contexts).

The index keeps, per instance, the transfer syntax, size and checksum as received next to
the stored ones; series and studies keep both totals. :func:`report` turns them into
ratios overall, per modality and per study.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cloudfilm.archive.models import Series, Study
from cloudfilm.archive.parsing import ParsedInstance, part10_header
from cloudfilm.config import Codec, CompressionSettings
from cloudfilm.storage import codecs

logger = logging.getLogger(__name__)


def compress_for_storage(parsed: ParsedInstance, settings: CompressionSettings) -> ParsedInstance:
    """``parsed`` as we store it: losslessly re-encoded and verified, or unchanged.

    CPU-bound: about 32 ms of CPU more per 512 × 512 CT slice with JPEG-LS (encode,
    verifying decode, the extra parse and write; docs/benchmarks.md). pyjpegls holds the GIL
    while it encodes (~10 ms a slice), so other threads of the process (HTTP, DIMSE) wait
    up to that long; moving the work after the acknowledgement into a durable job or a
    process pool is the next step if ingest rate matters more than disk.
    """
    modality = str(parsed.ds.get("Modality", "") or "")
    codec = settings.codec_for(modality)
    if codec is Codec.NONE:
        return parsed
    target = codecs.CODEC_SYNTAX[codec]
    try:
        out = codecs.compress_verified(
            parsed.blob, target, min_pixel_bytes=settings.min_pixel_bytes
        )
    except codecs.NotCompressible:
        return parsed
    except (codecs.CodecFailed, codecs.CodecUnavailable) as exc:
        # No UID or name here: application logs carry no PHI; the audit record has the rest.
        logger.warning("stored as received, lossless compression not verified: %s", exc)
        parsed.notes.append(f"stored as received: {codec.value} not used: {exc}")
        return parsed
    head = part10_header(
        out.transfer_syntax_uid, str(parsed.ds.SOPClassUID), str(parsed.ds.SOPInstanceUID)
    )
    if len(head) + len(out.dataset) >= len(parsed.blob):
        return parsed  # e.g. a Deflated object: already smaller than the image codec makes it
    return ParsedInstance(
        blob=head + out.dataset,
        dataset_offset=len(head),
        ds=out.ds,
        transfer_syntax_uid=out.transfer_syntax_uid,
        notes=parsed.notes,
    )


@dataclass(frozen=True, slots=True)
class RatioRow:
    """Sizes of one group of instances: as received and as stored."""

    key: str
    instances: int
    original_bytes: int
    stored_bytes: int

    @property
    def ratio(self) -> float:
        return self.original_bytes / self.stored_bytes if self.stored_bytes else 1.0

    @property
    def saved_bytes(self) -> int:
        return self.original_bytes - self.stored_bytes

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": round(self.ratio, 3), "saved_bytes": self.saved_bytes}


@dataclass(frozen=True, slots=True)
class CompressionReport:
    overall: RatioRow
    by_modality: list[RatioRow]
    by_study: list[RatioRow]
    """Filled only when asked for (one study, or every study with ``by_study``)."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "overall": self.overall.as_dict(),
            "by_modality": [r.as_dict() for r in self.by_modality],
            "by_study": [r.as_dict() for r in self.by_study],
        }


def _row(key: str, count: Any, original: Any, stored: Any) -> RatioRow:
    return RatioRow(key, int(count or 0), int(original or 0), int(stored or 0))


def report(
    *, session: Session, study_instance_uid: str | None = None, by_study: bool = False
) -> CompressionReport:
    """Compression ratios (size as received / size stored) overall, per modality
    (0008,0060 of the series) and per study: one study when ``study_instance_uid`` is
    given, every study with ``by_study``.

    Read from the series and study counters that ingest keeps, not from every instance.
    """
    sums = (
        func.coalesce(func.sum(Series.number_of_instances), 0),
        func.coalesce(func.sum(Series.original_total_bytes), 0),
        func.coalesce(func.sum(Series.total_bytes), 0),
    )
    series = select(*sums).select_from(Series)
    if study_instance_uid is not None:
        series = series.join(Study).where(Study.study_instance_uid == study_instance_uid)
    overall = _row("all", *session.execute(series).one())
    modalities = [
        _row(modality or "", *values)
        for *values, modality in session.execute(
            series.add_columns(Series.modality).group_by(Series.modality).order_by(Series.modality)
        ).all()
    ]
    studies: list[RatioRow] = []
    if by_study or study_instance_uid is not None:
        query = select(
            Study.study_instance_uid,
            Study.number_of_instances,
            Study.original_total_bytes,
            Study.total_bytes,
        ).order_by(Study.study_instance_uid)
        if study_instance_uid is not None:
            query = query.where(Study.study_instance_uid == study_instance_uid)
        studies = [_row(*row) for row in session.execute(query).all()]
    return CompressionReport(overall, modalities, studies)
