"""DICOM with the hospital PACS: C-FIND (discovery), C-MOVE (retrieval) and the gateway's own
Storage SCP that receives what a C-MOVE sends (pynetdicom).

PS3.4 C.4.1 (C-FIND) and C.4.2 (C-MOVE), Study Root Query/Retrieve Information Model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)
from pynetdicom.transport import ThreadedAssociationServer

from cloudfilm.config import GatewaySettings, GatewaySource
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

    def _associate(self, context: str) -> Any:
        ae = AE(ae_title=self.settings.ae_title)
        ae.network_timeout = self.settings.network_timeout
        ae.acse_timeout = min(30.0, self.settings.network_timeout)
        ae.dimse_timeout = self.settings.network_timeout
        ae.add_requested_context(context)
        assoc = ae.associate(self.source.host, self.source.port, ae_title=self.source.aet)
        if not assoc.is_established:
            what = "rejected" if assoc.is_rejected else "aborted or unreachable"
            raise PacsError(
                f"association with {self.source.aet} at {self.source.host}:{self.source.port} "
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
        try:
            for status, answer in assoc.send_c_find(
                query, StudyRootQueryRetrieveInformationModelFind
            ):
                code = int(getattr(status, "Status", -1))
                if code in _PENDING and answer is not None:
                    found.append(_found(answer))
                elif code != _SUCCESS:
                    raise PacsError(f"C-FIND failed with status 0x{code & 0xFFFF:04X}")
        finally:
            assoc.release()
        return found

    def move_study(self, study_instance_uid: str) -> MoveResult:
        """C-MOVE one study to our own Storage SCP (``gateway.ae_title``)."""
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study_instance_uid
        assoc = self._associate(StudyRootQueryRetrieveInformationModelMove)
        final: Any = None
        try:
            for status, _ in assoc.send_c_move(
                query, self.settings.ae_title, StudyRootQueryRetrieveInformationModelMove
            ):
                if status is not None and "Status" in status:
                    final = status
        finally:
            if assoc.is_established:
                assoc.release()
        if final is None:
            raise PacsError("the PACS ended the C-MOVE without a final status")
        code = int(final.Status)
        result = MoveResult(
            int(final.get("NumberOfCompletedSuboperations", 0) or 0),
            int(final.get("NumberOfFailedSuboperations", 0) or 0),
            int(final.get("NumberOfWarningSuboperations", 0) or 0),
            code,
        )
        if code in _PENDING:
            raise PacsError("the C-MOVE ended while still pending")
        if code not in (_SUCCESS, 0xB000):
            raise PacsError(
                f"C-MOVE failed with status 0x{code:04X} ({result.failed} failed, "
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
        """PS3.4 B.2.3 statuses: 0x0000 stored, 0xA700 could not be kept, 0x0124 unwanted."""
        try:
            ds = event.dataset
            data = event.encoded_dataset()
            self.queue.accept(
                data,
                study_instance_uid=str(ds.StudyInstanceUID),
                sop_instance_uid=str(ds.SOPInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
            )
        except Rejected as exc:
            logger.warning("gateway SCP: refused an instance: %s", exc)
            return _REFUSED_NOT_AUTHORISED
        except Exception:
            logger.exception("gateway SCP: could not keep a received instance")
            return _OUT_OF_RESOURCES
        return _SUCCESS
