"""The DICOM listener: Verification and Storage SCP (pynetdicom).

Every storage SOP class is accepted with every transfer syntax pynetdicom knows: we store
data sets as received and never need to decode them on the way in. Callers are checked
against the node table (``dimse.allowed_callers``) before association negotiation.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from cloudfilm.archive.ingest import Archive, IngestStatus
from cloudfilm.audit import service as audit
from cloudfilm.audit.enums import AuditAction, AuditEventType, AuditOutcome
from cloudfilm.audit.service import Actor
from cloudfilm.config import DimseSettings
from cloudfilm.errors import StorageUnavailable

logger = logging.getLogger(__name__)

# Patient data never goes to the application log (audit only): PS3.15, SECURITY-CHECKS G6.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False
_config.LOG_HANDLER_LEVEL = "none"

# C-STORE statuses (PS3.4 B.2.3)
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000
STATUS_PROCESSING_FAILURE = 0x0110

# A-ASSOCIATE-RJ (PS3.8 9.3.4): result permanent (1), source service user (1)
_RJ_CALLING_AE = (0x01, 0x01, 0x03)
_RJ_CALLED_AE = (0x01, 0x01, 0x07)


class _NoDelayServer(ThreadedAssociationServer):
    """Associations with TCP_NODELAY: without it a DIMSE response waits ~40 ms for the
    peer's delayed ACK (Nagle), which caps a C-STORE stream at ~25 objects/s."""

    def get_request(self) -> tuple[socket.socket, Any]:
        client, address = super().get_request()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client, address


class DIMSEServer:
    """Verification + Storage SCP feeding the archive's ingest pipeline."""

    def __init__(self, archive: Archive, settings: DimseSettings) -> None:
        self.archive = archive
        self.settings = settings
        self.ae = AE(ae_title=settings.ae_title)
        self.ae.maximum_pdu_size = settings.max_pdu
        self.ae.maximum_associations = settings.max_associations
        self.ae.network_timeout = settings.network_timeout
        self.ae.acse_timeout = 30
        self.ae.dimse_timeout = settings.network_timeout
        self.ae.require_called_aet = settings.require_called_ae_title
        for context in AllStoragePresentationContexts:
            assert context.abstract_syntax is not None
            self.ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        self.ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        self._server: ThreadedAssociationServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def start(self, host: str | None = None, port: int | None = None) -> None:
        """Listen in a background thread."""
        address = (host or self.settings.host, self.settings.port if port is None else port)
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        server = self.ae.make_server(address, evt_handlers=handlers, server_class=_NoDelayServer)
        assert server is not None
        self.ae._servers.append(server)  # as AE.start_server does; shutdown() expects it
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name=f"dimse-{address[1]}", daemon=True
        )
        self._thread.start()
        logger.info("DICOM listener %s on %s:%d", self.settings.ae_title, address[0], self.port)

    def stop(self) -> None:
        """Stop accepting, then let running associations finish."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.ae.shutdown()

    # -- handlers (never let an exception escape: pynetdicom would abort the association)

    def _on_requested(self, event: evt.Event) -> None:
        """Reject callers not in the node table (A-ASSOCIATE-RJ), and audit it."""
        primitive = event.assoc.requestor.primitive
        assert primitive is not None  # EVT_REQUESTED fires after the A-ASSOCIATE-RQ arrived
        calling = primitive.calling_ae_title.strip()
        called = primitive.called_ae_title.strip()
        address = event.assoc.requestor.address
        reason = None
        if self.settings.require_called_ae_title and called != self.settings.ae_title:
            reason, rsd = f"called AE title {called!r} is not ours", _RJ_CALLED_AE
        elif not self.caller_allowed(calling, address):
            reason, rsd = (
                f"{calling!r} from {address} is not in the node table; add it under "
                "dimse.allowed_callers or set CLOUDFILM_DIMSE__ACCEPT_UNKNOWN_CALLERS",
                _RJ_CALLING_AE,
            )
        if reason is None:
            return
        logger.warning("association rejected: %s", reason)
        try:
            with self.archive.db.session() as session:
                audit.record(
                    session=session,
                    actor=Actor.ae(calling, f"{address}:{event.assoc.requestor.port}"),
                    event_type=AuditEventType.ASSOCIATION_REJECTED,
                    action=AuditAction.EXECUTE,
                    outcome=AuditOutcome.MINOR_FAILURE,
                    message=reason,
                )
        except Exception:
            logger.exception("could not audit a rejected association")
        event.assoc.acse.send_reject(*rsd)
        event.assoc.kill()

    def caller_allowed(self, calling: str, address: str) -> bool:
        allowed = self.settings.allowed_callers
        if calling in allowed:
            return allowed[calling] in ("*", address)
        return self.settings.accept_unknown_callers

    def _on_echo(self, _event: evt.Event) -> int:
        return STATUS_SUCCESS

    def _on_store(self, event: evt.Event) -> Dataset | int:
        requestor = event.assoc.requestor
        actor = Actor.ae(requestor.ae_title.strip(), f"{requestor.address}:{requestor.port}")
        try:
            data = event.encoded_dataset(include_meta=False)
            result = self.archive.ingest(
                data, actor=actor, transfer_syntax_uid=str(event.context.transfer_syntax)
            )
        except StorageUnavailable as exc:
            logger.error("C-STORE from %s failed: %s", actor.id, exc)
            return _status(STATUS_OUT_OF_RESOURCES, str(exc))
        except Exception:
            logger.exception("C-STORE from %s failed unexpectedly", actor.id)
            return _status(STATUS_PROCESSING_FAILURE, "internal error; see the server log")
        if result.status is IngestStatus.REJECTED:
            return _status(STATUS_CANNOT_UNDERSTAND, result.reason or "rejected")
        return STATUS_SUCCESS


def _status(code: int, comment: str) -> Dataset:
    """A status data set with an Error Comment (0000,0902; LO, at most 64 characters)."""
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment.encode("ascii", "replace").decode()[:64]
    return ds
