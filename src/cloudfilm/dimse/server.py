"""The DICOM listener: Verification, Storage SCP and Query/Retrieve SCP (pynetdicom).

Every storage SOP class is accepted with every transfer syntax pynetdicom knows: we store
data sets as received and never need to decode them on the way in. The storage contexts
also accept SCP/SCU role selection, so a C-GET requester can take the SCP role and
receive its instances on the same association. Callers are checked against the node
table (``dimse.nodes``) before association negotiation; what each node may then ask for
(store, find, move, get) is checked per request.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import (
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEG2000MCLossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    DEFAULT_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    _config,
    evt,
)
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from cloudfilm.archive.ingest import Archive, IngestStatus
from cloudfilm.audit import service as audit
from cloudfilm.audit.enums import AuditAction, AuditEventType, AuditOutcome
from cloudfilm.audit.service import Actor
from cloudfilm.config import DimseSettings
from cloudfilm.dimse.handlers import QueryRetrieveSCP
from cloudfilm.dimse.identifiers import MODELS
from cloudfilm.dimse.nodes import NodeTable, Service
from cloudfilm.dimse.status import DimseStatus, status
from cloudfilm.errors import StorageUnavailable

logger = logging.getLogger(__name__)

# Patient data never goes to the application log (audit only): PS3.15, SECURITY-CHECKS G6.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False
_config.LOG_HANDLER_LEVEL = "none"

#: Storage transfer syntaxes in our order of preference. pynetdicom accepts, per presentation
#: context, the first of *our* list that the requester proposes. Native encodings first (what
#: pynetdicom does by default), then lossless compression, lossy last: a sender that offers
#: both lossless and lossy compression must never be made to compress lossily.
_LOSSLESS = (
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEG2000Lossless,
    JPEG2000MCLossless,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    RLELossless,
)
STORAGE_TRANSFER_SYNTAXES = [
    *DEFAULT_TRANSFER_SYNTAXES,
    *_LOSSLESS,
    *(ts for ts in ALL_TRANSFER_SYNTAXES if ts not in (*DEFAULT_TRANSFER_SYNTAXES, *_LOSSLESS)),
]

# A-ASSOCIATE-RJ (PS3.8 9.3.4): result permanent (1), source service user (1)
_RJ_CALLING_AE = (0x01, 0x01, 0x03)
_RJ_CALLED_AE = (0x01, 0x01, 0x07)


class _NoDelayServer(ThreadedAssociationServer):
    """Associations with TCP_NODELAY: without it a DIMSE response waits ~40 ms for the
    peer's delayed ACK (Nagle), which caps a C-STORE stream at ~25 objects/s."""

    qr: QueryRetrieveSCP

    def get_request(self) -> tuple[socket.socket, Any]:
        client, address = super().get_request()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client, address


class _ScreenedAssociation(Association):
    """pynetdicom's acceptor association with one addition: Q/R requests go through
    :meth:`QueryRetrieveSCP.screen` before pynetdicom's service class, so that a refusal
    is answered with its own status (a C-MOVE handler cannot refuse with 0x0124)."""

    qr: QueryRetrieveSCP

    def _serve_request(self, msg: Any, context_id: int) -> None:
        try:
            answered = self.qr.screen(self, msg, context_id)
        except Exception:
            # Fail closed: a request that could not be screened is never served.
            logger.exception("screening a request failed; aborting the association")
            self.abort(block=False)  # we are the reactor thread: do not wait for ourselves
            return
        if not answered:
            super()._serve_request(msg, context_id)


class _RequestHandler(RequestHandler):
    server: _NoDelayServer

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        # pynetdicom constructs the Association itself; only the class changes.
        assoc.__class__ = _ScreenedAssociation
        assert isinstance(assoc, _ScreenedAssociation)
        assoc.qr = self.server.qr
        return assoc


class DIMSEServer:
    """Verification, Storage SCP (into the archive's ingest pipeline) and Q/R SCP."""

    def __init__(self, archive: Archive, settings: DimseSettings) -> None:
        self.archive = archive
        self.settings = settings
        self.nodes = NodeTable(settings)
        self.qr = QueryRetrieveSCP(archive, settings, self.nodes)
        self.ae = AE(ae_title=settings.ae_title)
        self.ae.maximum_pdu_size = settings.max_pdu
        self.ae.maximum_associations = settings.max_associations
        self.ae.network_timeout = settings.network_timeout
        self.ae.acse_timeout = 30
        # also bounds the TCP connect of a C-MOVE association to an unreachable destination
        self.ae.connection_timeout = 30
        self.ae.dimse_timeout = settings.network_timeout
        self.ae.require_called_aet = settings.require_called_ae_title
        for context in AllStoragePresentationContexts:
            assert context.abstract_syntax is not None
            # Role selection accepted as proposed: a C-GET requester takes the SCP role.
            self.ae.add_supported_context(
                context.abstract_syntax, STORAGE_TRANSFER_SYNTAXES, scu_role=True, scp_role=True
            )
        self.ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        for uid in MODELS:
            self.ae.add_supported_context(uid, DEFAULT_TRANSFER_SYNTAXES)
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
            (evt.EVT_C_FIND, self.qr.on_find),
            (evt.EVT_C_MOVE, self.qr.on_move),
            (evt.EVT_C_GET, self.qr.on_get),
        ]
        server = self.ae.make_server(
            address,
            evt_handlers=handlers,
            server_class=_NoDelayServer,
            request_handler=_RequestHandler,
        )
        assert isinstance(server, _NoDelayServer)
        server.qr = self.qr
        self.ae._servers.append(server)  # as AE.start_server does; shutdown() expects it
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, name=f"dimse-{address[1]}", daemon=True
        )
        self._thread.start()
        logger.info("DICOM listener %s on %s:%d", self.settings.ae_title, address[0], self.port)

    def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, give running associations ``grace`` seconds to finish, then
        abort the rest (never blocks longer than about ``grace`` + 2 seconds).

        pynetdicom's ``AE.shutdown()`` aborts with a blocking wait that can last until an
        association's ARTIM timer runs out (an idle connection waiting for its
        A-ASSOCIATE-RQ), so it is not used here.
        """
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.ae._servers = []
        deadline = time.monotonic() + grace
        for assoc in list(self.ae.active_associations):
            assoc.join(max(0.0, deadline - time.monotonic()))
        for assoc in list(self.ae.active_associations):
            if assoc.is_established:
                assoc.abort(block=False)
            elif assoc.dul.socket is not None:
                # Not yet associated (no A-ASSOCIATE-RQ): an A-ABORT is not a valid event
                # there (PS3.8 state Sta2); closing the transport is (Evt17).
                assoc.dul.socket.close()
        for assoc in list(self.ae.active_associations):
            assoc.join(2.0)

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
                "dimse.nodes or set CLOUDFILM_DIMSE__ACCEPT_UNKNOWN_CALLERS",
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
        """May ``calling`` open an association from ``address`` (node table, PS3.8 7.1.1)?"""
        return self.nodes.caller_allowed(calling, address)

    def _on_echo(self, _event: evt.Event) -> int:
        return DimseStatus.SUCCESS

    def _on_store(self, event: evt.Event) -> Dataset | int:
        requestor = event.assoc.requestor
        calling = requestor.ae_title.strip()
        actor = Actor.ae(calling, f"{requestor.address}:{requestor.port}")
        if not self.nodes.may(calling, requestor.address, Service.STORE):
            return self._refuse_store(event, actor)
        try:
            data = event.encoded_dataset(include_meta=False)
            result = self.archive.ingest(
                data, actor=actor, transfer_syntax_uid=str(event.context.transfer_syntax)
            )
        except StorageUnavailable as exc:
            logger.error("C-STORE from %s failed: %s", actor.id, exc)
            return status(DimseStatus.OUT_OF_RESOURCES, str(exc))
        except Exception:
            logger.exception("C-STORE from %s failed unexpectedly", actor.id)
            return status(DimseStatus.PROCESSING_FAILURE, "internal error; see the server log")
        if result.status is IngestStatus.REJECTED:
            return status(DimseStatus.CANNOT_UNDERSTAND, result.reason or "rejected")
        return DimseStatus.SUCCESS

    def _refuse_store(self, event: evt.Event, actor: Actor) -> Dataset:
        """C-STORE from a node without ``allow_store``: 0x0124, audited."""
        reason = f"not authorised: dimse.nodes.{actor.id}.allow_store is off"
        logger.warning("C-STORE refused: %s", reason)
        try:
            with self.archive.db.session() as session:
                audit.record(
                    session=session,
                    actor=actor,
                    event_type=AuditEventType.INSTANCE_REJECTED,
                    action=AuditAction.CREATE,
                    outcome=AuditOutcome.SERIOUS_FAILURE,
                    object_type="instance",
                    object_id=str(getattr(event.request, "AffectedSOPInstanceUID", "") or "")
                    or None,
                    message=reason,
                )
        except Exception:
            logger.exception("could not audit a refused C-STORE")
        return status(DimseStatus.NOT_AUTHORISED, reason)
