"""DICOM with the hospital PACS: C-FIND (discovery), C-MOVE and C-GET (retrieval) and the
gateway's own Storage SCP that receives what a C-MOVE sends (pynetdicom).

PS3.4 C.4.1 (C-FIND), C.4.2 (C-MOVE) and C.4.3 (C-GET), Study Root Query/Retrieve
Information Model. A C-GET carries the C-STORE sub-operations on the same association, so
the storage contexts are proposed with the SCP role (PS3.7 D.3.3.4 SCP/SCU role selection).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts, build_role, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from pynetdicom.transport import ThreadedAssociationServer

from cloudfilm.config import GatewaySettings, GatewaySource
from cloudfilm.gateway.messages import message, since
from cloudfilm.gateway.queue import FoundStudy, GatewayQueue, Rejected

logger = logging.getLogger(__name__)

_SUCCESS = 0x0000
_PENDING = (0xFF00, 0xFF01)
_OUT_OF_RESOURCES = 0xA700
_REFUSED_NOT_AUTHORISED = 0x0124
_TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired)
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.5",  # RLE Lossless
]


class PacsError(Exception):
    """The PACS could not be reached or answered with a failure."""


@dataclass(frozen=True, slots=True)
class MoveResult:
    completed: int
    failed: int
    warning: int
    status: int


class PacsClient:
    """Query/Retrieve SCU for one source."""

    def __init__(self, settings: GatewaySettings, source: GatewaySource) -> None:
        self.settings = settings
        self.source = source
        self.aet = source.aet or ""
        self.host = source.host or ""

    def _associate(self, context: str, *, store: Any = None) -> Any:
        """Associate for ``context``; with a ``store`` handler also propose every storage
        SOP class with the SCP role, for the C-STORE sub-operations of a C-GET."""
        ae = AE(ae_title=self.settings.ae_title)
        ae.network_timeout = self.settings.network_timeout
        ae.acse_timeout = min(30.0, self.settings.network_timeout)
        ae.dimse_timeout = self.settings.network_timeout
        ae.add_requested_context(context)
        roles: list[Any] = []
        handlers: list[Any] = []
        if store is not None:
            # 1 + 120 contexts: within the 128 a requestor may propose (PS3.8 9.3.2.2).
            for item in StoragePresentationContexts:
                if item.abstract_syntax is not None:
                    ae.add_requested_context(item.abstract_syntax, _TRANSFER_SYNTAXES)
                    roles.append(build_role(item.abstract_syntax, scp_role=True))
            handlers.append((evt.EVT_C_STORE, store))
        start = time.monotonic()
        assoc = ae.associate(
            self.host,
            self.source.port,
            ae_title=self.aet,
            ext_neg=roles or None,
            evt_handlers=handlers or None,
        )
        message(
            "A-ASSOCIATE",
            direction="out",
            peer=f"{self.aet}@{self.host}:{self.source.port}",
            calling=self.settings.ae_title,
            context=str(context),
            result="accepted"
            if assoc.is_established
            else ("rejected" if assoc.is_rejected else "aborted"),
            ms=since(start),
        )
        if not assoc.is_established:
            what = "rejected" if assoc.is_rejected else "aborted or unreachable"
            raise PacsError(
                f"association with {self.aet} at {self.host}:{self.source.port} "
                f"{what}; check the source's AE title and port and that the PACS lists "
                f"{self.settings.ae_title}"
            )
        return assoc

    def find_studies(
        self,
        *,
        study_date: str | None = None,
        study_instance_uid: str | None = None,
        accession_number: str | None = None,
        patient_id: str | None = None,
        modality: str | None = None,
    ) -> list[FoundStudy]:
        """C-FIND at STUDY level; ``study_date`` may be a range ``YYYYMMDD-YYYYMMDD``."""
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study_instance_uid or ""
        query.AccessionNumber = accession_number or ""
        query.PatientID = patient_id or ""
        query.StudyDate = study_date or ""
        query.ModalitiesInStudy = modality or ""
        query.NumberOfStudyRelatedInstances = ""
        found: list[FoundStudy] = []
        assoc = self._associate(StudyRootQueryRetrieveInformationModelFind)
        start = time.monotonic()
        # Keys by name only: a patient ID is demographics and stays out of the message log.
        message(
            "C-FIND-RQ",
            direction="out",
            peer=self.aet,
            level="STUDY",
            study_uid=study_instance_uid,
            study_date=study_date,
            modality=modality,
            keys=[
                k
                for k, v in (("AccessionNumber", accession_number), ("PatientID", patient_id))
                if v
            ],
        )
        unchecked: list[int] = []
        try:
            for status, answer in assoc.send_c_find(
                query, StudyRootQueryRetrieveInformationModelFind
            ):
                code = int(getattr(status, "Status", -1))
                if code in _PENDING and answer is not None:
                    if modality and "ModalitiesInStudy" not in answer:
                        unchecked.append(len(found))
                    found.append(_found(answer))
                elif code != _SUCCESS:
                    message(
                        "C-FIND-RSP",
                        direction="in",
                        peer=self.aet,
                        status=f"0x{code & 0xFFFF:04X}",
                        matches=len(found),
                        ms=since(start),
                    )
                    raise PacsError(f"C-FIND failed with status 0x{code & 0xFFFF:04X}")
            if modality and unchecked:
                found = self._check_modality(assoc, found, unchecked, modality)
        finally:
            if assoc.is_established:
                assoc.release()
        message(
            "C-FIND-RSP",
            direction="in",
            peer=self.aet,
            status="0x0000",
            matches=len(found),
            ms=since(start),
        )
        return found

    def _check_modality(
        self, assoc: Any, found: list[FoundStudy], unchecked: list[int], modality: str
    ) -> list[FoundStudy]:
        """Keep of the ``unchecked`` studies only those with a series of ``modality``.

        Modalities in Study (0008,0061) is an optional STUDY-level key that not every PACS
        supports: dcmqrscp drops it from the query and the answer, so every study matches.
        For a study answered without it, a SERIES-level C-FIND by Modality (a key every
        PACS supports) on the same association decides.
        """
        keep: list[FoundStudy] = []
        for index, study in enumerate(found):
            if index not in unchecked:
                keep.append(study)
                continue
            query = Dataset()
            query.QueryRetrieveLevel = "SERIES"
            query.StudyInstanceUID = study.study_instance_uid
            query.SeriesInstanceUID = ""
            query.Modality = modality
            if self._matches(assoc, query):
                keep.append(replace(study, modalities=study.modalities or modality))
        message(
            "C-FIND-RSP",
            direction="in",
            peer=self.aet,
            level="SERIES",
            note="ModalitiesInStudy not supported by the PACS: checked by series",
            modality=modality,
            studies=len(unchecked),
            kept=len(keep) - (len(found) - len(unchecked)),
        )
        return keep

    def find_instances(self, study_instance_uid: str) -> list[tuple[str, str]]:
        """(Series Instance UID, SOP Instance UID) of every instance of one study: C-FIND at
        SERIES level, then at IMAGE level per series, on one association (PS3.4 C.4.1.2.1:
        the hierarchical model needs the series UID to ask for its instances)."""
        assoc = self._associate(StudyRootQueryRetrieveInformationModelFind)
        start = time.monotonic()
        message(
            "C-FIND-RQ",
            direction="out",
            peer=self.aet,
            level="SERIES+IMAGE",
            study_uid=study_instance_uid,
        )
        out: list[tuple[str, str]] = []
        try:
            query = Dataset()
            query.QueryRetrieveLevel = "SERIES"
            query.StudyInstanceUID = study_instance_uid
            query.SeriesInstanceUID = ""
            series = [str(a.SeriesInstanceUID) for a in self._matches(assoc, query)]
            for series_uid in series:
                query = Dataset()
                query.QueryRetrieveLevel = "IMAGE"
                query.StudyInstanceUID = study_instance_uid
                query.SeriesInstanceUID = series_uid
                query.SOPInstanceUID = ""
                out.extend((series_uid, str(a.SOPInstanceUID)) for a in self._matches(assoc, query))
        finally:
            if assoc.is_established:
                assoc.release()
        message(
            "C-FIND-RSP",
            direction="in",
            peer=self.aet,
            level="SERIES+IMAGE",
            study_uid=study_instance_uid,
            matches=len(out),
            ms=since(start),
        )
        return out

    @staticmethod
    def _matches(assoc: Any, query: Dataset) -> list[Dataset]:
        found: list[Dataset] = []
        for status, answer in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            code = int(getattr(status, "Status", -1))
            if code in _PENDING and answer is not None:
                found.append(answer)
            elif code != _SUCCESS:
                raise PacsError(
                    f"C-FIND at {query.QueryRetrieveLevel} level failed with status "
                    f"0x{code & 0xFFFF:04X}"
                )
        return found

    def move_study(self, study_instance_uid: str) -> MoveResult:
        """C-MOVE one study to our own Storage SCP (``gateway.ae_title``)."""
        assoc = self._associate(StudyRootQueryRetrieveInformationModelMove)
        try:
            message(
                "C-MOVE-RQ",
                direction="out",
                peer=self.aet,
                study_uid=study_instance_uid,
                destination=self.settings.ae_title,
            )
            responses = assoc.send_c_move(
                _study_query(study_instance_uid),
                self.settings.ae_title,
                StudyRootQueryRetrieveInformationModelMove,
            )
            return _final(responses, "C-MOVE", self.aet, study_instance_uid)
        finally:
            if assoc.is_established:
                assoc.release()

    def get_study(self, study_instance_uid: str, store: Any) -> MoveResult:
        """C-GET one study; ``store`` handles each C-STORE sub-operation (EVT_C_STORE)."""
        assoc = self._associate(StudyRootQueryRetrieveInformationModelGet, store=store)
        try:
            message("C-GET-RQ", direction="out", peer=self.aet, study_uid=study_instance_uid)
            responses = assoc.send_c_get(
                _study_query(study_instance_uid), StudyRootQueryRetrieveInformationModelGet
            )
            return _final(responses, "C-GET", self.aet, study_instance_uid)
        finally:
            if assoc.is_established:
                assoc.release()


def _study_query(study_instance_uid: str) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_instance_uid
    return query


def _final(responses: Any, what: str, peer: str, study_uid: str) -> MoveResult:
    """The sub-operation counts of a C-MOVE or C-GET's final response (PS3.4 C.4.2.1.4)."""
    final: Any = None
    start = time.monotonic()
    for status, _ in responses:
        if status is not None and "Status" in status:
            final = status
    if final is None:
        message(
            f"{what}-RSP",
            direction="in",
            peer=peer,
            study_uid=study_uid,
            status=None,
            ms=since(start),
        )
        raise PacsError(f"the PACS ended the {what} without a final status")
    code = int(final.Status)
    result = MoveResult(
        int(final.get("NumberOfCompletedSuboperations", 0) or 0),
        int(final.get("NumberOfFailedSuboperations", 0) or 0),
        int(final.get("NumberOfWarningSuboperations", 0) or 0),
        code,
    )
    message(
        f"{what}-RSP",
        direction="in",
        peer=peer,
        study_uid=study_uid,
        status=f"0x{code:04X}",
        completed=result.completed,
        failed=result.failed,
        warning=result.warning,
        ms=since(start),
    )
    if code in _PENDING:
        raise PacsError(f"the {what} ended while still pending")
    if code not in (_SUCCESS, 0xB000):
        raise PacsError(
            f"{what} failed with status 0x{code:04X} ({result.failed} failed, "
            f"{result.completed} completed sub-operations)"
        )
    return result


def _found(answer: Dataset) -> FoundStudy:
    count = answer.get("NumberOfStudyRelatedInstances")
    modalities = answer.get("ModalitiesInStudy")
    if isinstance(modalities, str):
        text = modalities
    else:
        text = "\\".join(str(m) for m in modalities or [])
    return FoundStudy(
        study_instance_uid=str(answer.StudyInstanceUID),
        accession_number=str(answer.get("AccessionNumber") or "") or None,
        study_date=str(answer.get("StudyDate") or "") or None,
        modalities=text or None,
        expected_instances=int(count) if count not in (None, "") else None,
    )


class StorageSCP:
    """The gateway's C-STORE listener: every instance is spooled durably before it is
    acknowledged; instances of studies nobody asked for are refused."""

    def __init__(self, settings: GatewaySettings, queue: GatewayQueue) -> None:
        self.settings = settings
        self.queue = queue
        self.server: ThreadedAssociationServer | None = None

    def start(self) -> None:
        ae = AE(ae_title=self.settings.ae_title)
        ae.network_timeout = self.settings.network_timeout
        ae.maximum_pdu_size = 262_144
        for context in StoragePresentationContexts:
            if context.abstract_syntax is not None:
                ae.add_supported_context(context.abstract_syntax, _TRANSFER_SYNTAXES)
        # The PACS calls us back as a C-MOVE destination: its calling AE title is its own
        # (Orthanc: DicomAet), and only studies in the queue are accepted.
        self.server = ae.start_server(
            (self.settings.scp_host, self.settings.scp_port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store)],
        )

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def _on_store(self, event: Any) -> int:
        return spool_received(self.queue, event)


def spool_received(queue: GatewayQueue, event: Any) -> int:
    """Keep one C-STORE (of a C-MOVE or a C-GET) in the spool before acknowledging it.

    PS3.4 B.2.3 statuses: 0x0000 stored, 0xA700 could not be kept, 0x0124 unwanted.
    """
    start = time.monotonic()
    request = event.request
    fields: dict[str, Any] = {
        "direction": "in",
        "peer": str(event.assoc.requestor.ae_title).strip(),
        "sop_uid": str(request.AffectedSOPInstanceUID),
        "sop_class": str(request.AffectedSOPClassUID),
    }
    try:
        ds = event.dataset
        data = event.encoded_dataset()
        fields["study_uid"], fields["bytes"] = str(ds.StudyInstanceUID), len(data)
        queue.accept(
            data,
            study_instance_uid=str(ds.StudyInstanceUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
        )
    except Rejected as exc:
        logger.warning("gateway SCP: refused an instance: %s", exc)
        message("C-STORE", **fields, status="0x0124", ms=since(start))
        return _REFUSED_NOT_AUTHORISED
    except Exception:
        logger.exception("gateway SCP: could not keep a received instance")
        message("C-STORE", **fields, status="0xA700", ms=since(start))
        return _OUT_OF_RESOURCES
    message("C-STORE", **fields, status="0x0000", ms=since(start))
    return _SUCCESS
