"""Query/Retrieve SCP: C-FIND, C-MOVE and C-GET on the Patient and Study Root models.

Every request passes three steps:

1. :meth:`QueryRetrieveSCP.screen` runs before pynetdicom's service class sees the
   request. It refuses what the node table does not allow (``0x0124`` Refused: Not
   Authorised) and identifiers that cannot be used (``0xA900``), answering itself: a
   C-MOVE handler's first answer must be a destination, so it could not refuse with
   ``0x0124`` before pynetdicom connects to that destination.
2. The ``EVT_C_FIND`` / ``EVT_C_MOVE`` / ``EVT_C_GET`` handlers run the query on the index
   and yield matches or instances, read from storage one at a time.
3. :meth:`QueryRetrieveSCP.on_sent` watches the responses as they leave. The final one
   writes the operation's single audit record with exactly what the requester was told:
   status, matches returned, sub-operations completed, failed and warned. An association
   that ends before the final response is audited when the connection closes.

Handlers never let an exception escape: pynetdicom would answer with a status of its own
and the log would hold a traceback with patient data in it.
"""

from __future__ import annotations

import io
import logging
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_FIND, C_GET, C_MOVE
from pynetdicom.dsutils import decode
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import func, select

from cloudfilm.archive.access import note_access
from cloudfilm.archive.ingest import Archive
from cloudfilm.archive.matching import Level, QueryError
from cloudfilm.archive.models import Study
from cloudfilm.audit import service as audit
from cloudfilm.audit.enums import AuditAction, AuditEventType, AuditOutcome
from cloudfilm.audit.service import Actor
from cloudfilm.config import DimseSettings
from cloudfilm.dimse import identifiers
from cloudfilm.dimse.identifiers import (
    MODELS,
    FindRequest,
    InformationModel,
    MatchedInstance,
    RetrieveRequest,
)
from cloudfilm.dimse.nodes import NodeTable, Service
from cloudfilm.dimse.status import DimseStatus, error_comment, status
from cloudfilm.storage import codecs

logger = logging.getLogger(__name__)

_SERVICES = {"C-FIND": Service.FIND, "C-MOVE": Service.MOVE, "C-GET": Service.GET}
#: Command Field (0000,0100) of the responses we watch (PS3.7 E.1).
_RESPONSES = {0x8020: "C-FIND", 0x8021: "C-MOVE", 0x8010: "C-GET"}
_PENDING = (0xFF00, 0xFF01)
#: pynetdicom refuses more requested presentation contexts than PS3.8 allows.
MAX_CONTEXTS = 128
#: Transfer syntaxes pynetdicom converts between when the destination accepts another one.
_NATIVE_LITTLE_ENDIAN = frozenset(
    {ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian}
)
#: Stored syntaxes decoded exactly: offered natively too (lossless compression at ingest).
_LOSSLESS = frozenset({JPEGLSLossless, JPEG2000Lossless, RLELossless})
_RECALLING = "recall started, retry later"
"""Error Comment of a C-MOVE / C-GET whose objects are being recalled from offline."""
_INTERNAL_ERROR = "internal error; see the server log"


@dataclass(slots=True)
class Operation:
    """One C-FIND, C-MOVE or C-GET, from screening to its audit record."""

    model: InformationModel
    actor: Actor
    level: Level | None = None
    matches: dict[str, str] = field(default_factory=dict)
    find: FindRequest | None = None
    retrieve: RetrieveRequest | None = None
    destination: str | None = None
    note: str | None = None
    """Why it was refused or failed, for the audit trail (the requester sees the first 64
    ASCII characters as Error Comment)."""
    truncated: bool = False
    study_uids: set[str] = field(default_factory=set)
    patient_ids: set[str] = field(default_factory=set)
    instances: int = 0
    responses: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    accepted: dict[str, set[str]] | None = None
    """Transfer syntaxes the receiving side accepted, per SOP class (C-MOVE, C-GET)."""


class QueryRetrieveSCP:
    """The Q/R service of one DICOM listener."""

    def __init__(self, archive: Archive, settings: DimseSettings, nodes: NodeTable) -> None:
        self.archive = archive
        self.settings = settings
        self.nodes = nodes
        self._operations: dict[tuple[Association, int], Operation] = {}
        self._lock = threading.Lock()

    # -- 1. screening, before pynetdicom's service class

    def screen(self, assoc: Association, msg: Any, context_id: int) -> bool:
        """Refuse a Q/R request that will not be served, answering it here.

        Returns ``True`` when the request was answered (refused), ``False`` when it goes
        on to the handlers. Not a Q/R request of ours: ``False`` and nothing happens.
        """
        if not isinstance(msg, C_FIND | C_MOVE | C_GET) or msg.MessageID is None:
            return False
        context = next((c for c in assoc.accepted_contexts if c.context_id == context_id), None)
        model = MODELS.get(str(context.abstract_syntax)) if context is not None else None
        if context is None or model is None:
            return False  # pynetdicom deals with unknown contexts
        requestor = assoc.requestor
        calling = requestor.ae_title.strip()
        operation = Operation(model, Actor.ae(calling, f"{requestor.address}:{requestor.port}"))
        if isinstance(msg, C_MOVE):
            operation.destination = (msg.MoveDestination or "").strip()
        self._watch(assoc)
        with self._lock:
            self._operations[(assoc, msg.MessageID)] = operation
        service = _SERVICES[model.service]
        try:
            if not self.nodes.may(calling, requestor.address, service):
                operation.note = (
                    f"not authorised: dimse.nodes.{calling}.allow_{service.value} is off"
                )
                return self._refuse(assoc, msg, context_id, DimseStatus.NOT_AUTHORISED, operation)
            syntax = context.transfer_syntax[0]
            if msg.Identifier is None:
                raise QueryError("the request has no identifier")
            identifier = decode(
                msg.Identifier, syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated
            )
            if isinstance(msg, C_FIND):
                operation.find = identifiers.parse_find(identifier, model)
                operation.level, operation.matches = operation.find.level, operation.find.matches
            else:
                operation.retrieve = identifiers.parse_retrieve(identifier, model)
                operation.level = operation.retrieve.level
                operation.matches = operation.retrieve.matches
        except QueryError as exc:
            operation.note = str(exc)
            return self._refuse(
                assoc, msg, context_id, DimseStatus.IDENTIFIER_DOES_NOT_MATCH, operation
            )
        except Exception:
            logger.exception("%s from %s: screening failed", model.service, calling)
            operation.note = _INTERNAL_ERROR
            return self._refuse(assoc, msg, context_id, DimseStatus.CANNOT_UNDERSTAND, operation)
        return False

    def _refuse(
        self,
        assoc: Association,
        msg: C_FIND | C_MOVE | C_GET,
        context_id: int,
        code: DimseStatus,
        operation: Operation,
    ) -> bool:
        # An identifier's values may be patient data: they go to the audit trail only.
        reason = operation.note if code is DimseStatus.NOT_AUTHORISED else "see the audit trail"
        logger.warning(
            "%s from %s refused (0x%04X): %s",
            operation.model.service,
            operation.actor.id,
            code,
            reason,
        )
        rsp = type(msg)()
        rsp.MessageID = msg.MessageID
        rsp.MessageIDBeingRespondedTo = msg.MessageID
        rsp.AffectedSOPClassUID = msg.AffectedSOPClassUID
        rsp.Status = int(code)
        # pynetdicom declares the attribute as None-only; any str is valid (PS3.7 C.4)
        rsp.ErrorComment = error_comment(operation.note or "")  # type: ignore[assignment]
        assoc.dimse.send_msg(rsp, context_id)
        return True

    def _operation(self, event: evt.Event) -> Operation | None:
        with self._lock:
            return self._operations.get((event.assoc, event.message_id))

    # -- 2. the handlers

    def on_find(self, event: evt.Event) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        """``EVT_C_FIND``: matches at the requested level, at most ``max_find_results``
        (PS3.4 C.4.1.3)."""
        operation = self._operation(event)
        if operation is None or operation.find is None:
            yield status(DimseStatus.CANNOT_UNDERSTAND, "request was not screened"), None
            return
        request = operation.find
        cap = self.settings.max_find_results
        try:
            with self.archive.db.read_session() as session:
                rows = session.execute(request.statement.limit(cap + 1)).all()
                operation.truncated = len(rows) > cap
                rows = rows[:cap]
                counts = (
                    _patient_counts(session, [row.Patient.id for row in rows])
                    if request.wants_patient_counts
                    else {}
                )
                results = []
                for row in rows:
                    found = identifiers.values(request.level, row, ae_title=self.settings.ae_title)
                    found.update(counts.get(row.Patient.id, {}))
                    results.append(identifiers.response(request, found))
                    if request.level is not Level.PATIENT:
                        operation.study_uids.add(row.Study.study_instance_uid)
                    operation.patient_ids.add(row.Patient.patient_id)
        except Exception:
            logger.exception("C-FIND from %s failed", operation.actor.id)
            operation.note = _INTERNAL_ERROR
            yield status(DimseStatus.CANNOT_UNDERSTAND, _INTERNAL_ERROR), None
            return
        if operation.truncated:
            operation.note = f"more than {cap} matches; returned the first {cap}"
            logger.warning(
                "C-FIND from %s: more than %d matches, returned the first %d "
                "(dimse.max_find_results)",
                operation.actor.id,
                cap,
                cap,
            )
        for ds in results:
            if event.is_cancelled:
                yield DimseStatus.CANCEL, None
                return
            yield DimseStatus.PENDING, ds

    def on_move(self, event: evt.Event) -> Iterator[Any]:
        """``EVT_C_MOVE``: send the matched instances to a node of the table (PS3.4 C.4.2.3).

        pynetdicom's protocol: yield the destination's (address, port, association
        arguments), then the number of sub-operations, then (status, data set) pairs;
        pynetdicom opens the association and does the C-STOREs.
        """
        operation = self._operation(event)
        destination = self.nodes.destination(operation.destination or "") if operation else None
        if operation is None or operation.retrieve is None or destination is None:
            if operation is not None:
                operation.note = (
                    f"{operation.destination!r} is not a C-MOVE destination; list it in the "
                    "node table with host and port"
                )
            yield None, None  # 0xA801 Move Destination Unknown
            return
        instances = self._matched(operation, operation.retrieve)
        contexts = _contexts(instances or [])

        def accepted(event: evt.Event) -> None:
            operation.accepted = _accepted(event.assoc)

        options = {
            "contexts": contexts,
            "evt_handlers": [(evt.EVT_CONN_OPEN, _no_delay), (evt.EVT_ACCEPTED, accepted)],
        }
        recalling = self._recalling(operation, instances)
        yield destination.address, destination.port, options
        if instances is None:
            yield 1
            yield status(DimseStatus.CANNOT_UNDERSTAND, _INTERNAL_ERROR), None
            return
        if recalling:
            yield len(instances)
            yield status(DimseStatus.OUT_OF_SUBOPERATIONS, _RECALLING), None
            return
        yield len(instances)
        yield from self._send(event, operation, instances)

    def on_get(self, event: evt.Event) -> Iterator[Any]:
        """``EVT_C_GET``: send the matched instances back on the requester's association
        (PS3.4 C.4.3.3); the requester must have proposed the storage SOP classes with
        the SCP role (SCP/SCU Role Selection, PS3.7 D.3.3.4)."""
        operation = self._operation(event)
        instances = (
            self._matched(operation, operation.retrieve)
            if operation is not None and operation.retrieve is not None
            else None
        )
        if operation is None or instances is None:
            yield 1
            yield status(DimseStatus.CANNOT_UNDERSTAND, _INTERNAL_ERROR), None
            return
        operation.accepted = _accepted(event.assoc)
        if self._recalling(operation, instances):
            yield len(instances)
            yield status(DimseStatus.OUT_OF_SUBOPERATIONS, _RECALLING), None
            return
        yield len(instances)
        yield from self._send(event, operation, instances)

    def _recalling(self, operation: Operation, instances: list[MatchedInstance] | None) -> bool:
        """Some of ``instances`` are on an offline tier and their recall (started here) did
        not finish within ``tiers.retrieve_wait_seconds``: answer 0xA702, retry later."""
        if not instances:
            return False
        try:
            jobs = self.archive.tiering.recall_for_retrieve(
                [i.storage_key for i in instances],
                wait=self.archive.settings.tiers.retrieve_wait_seconds,
                actor=operation.actor,
            )
        except Exception:
            logger.exception("could not start the recall of offline objects")
            return False  # the reads then fail one by one (failed sub-operations)
        if jobs:
            operation.note = (
                f"on an offline tier: recall started (job {', '.join(map(str, jobs))}), retry later"
            )
        return bool(jobs)

    def _matched(
        self, operation: Operation, request: RetrieveRequest
    ) -> list[MatchedInstance] | None:
        """The instances to send, or ``None`` when the index cannot be read (logged)."""
        try:
            with self.archive.db.read_session() as session:
                rows = session.execute(request.statement).all()
        except Exception:
            logger.exception("%s from %s failed", operation.model.service, operation.actor.id)
            operation.note = _INTERNAL_ERROR
            return None
        instances = [MatchedInstance(*row) for row in rows]
        operation.instances = len(instances)
        operation.study_uids.update(i.study_instance_uid for i in instances)
        operation.patient_ids.update(i.patient_id for i in instances)
        note_access(self.archive, operation.study_uids)
        return instances

    def _send(
        self, event: evt.Event, operation: Operation, instances: list[MatchedInstance]
    ) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        for instance in instances:
            if event.is_cancelled:
                yield DimseStatus.CANCEL, None
                return
            yield DimseStatus.PENDING, self._load(operation, instance)

    def _load(self, operation: Operation, instance: MatchedInstance) -> Dataset:
        """The stored object's data set, as stored (same transfer syntax, same bytes), or
        decoded to Explicit VR Little Endian when it was compressed losslessly at ingest and
        the receiver accepted only native syntaxes for its SOP class."""
        try:
            blob = self.archive.storage.read(instance.storage_key)
            accepted = (operation.accepted or {}).get(instance.sop_class_uid, set())
            syntax = instance.transfer_syntax_uid
            if syntax in _LOSSLESS and syntax not in accepted and accepted & _NATIVE_LITTLE_ENDIAN:
                blob = codecs.transcode(blob, ExplicitVRLittleEndian)
            return dcmread(io.BytesIO(blob))
        except Exception:
            logger.exception(
                "%s: cannot read stored object %s", operation.model.service, instance.storage_key
            )
            # Without a SOP Class UID pynetdicom cannot send it and counts a failed
            # sub-operation, listing the SOP Instance UID as failed (PS3.4 C.4.2.1.4.2).
            stub = Dataset()
            stub.SOPInstanceUID = instance.sop_instance_uid
            return stub

    # -- 3. responses as they leave, and the audit record

    def _watch(self, assoc: Association) -> None:
        # bind() ignores a handler that is already bound
        assoc.bind(evt.EVT_DIMSE_SENT, self.on_sent)
        assoc.bind(evt.EVT_CONN_CLOSE, self.on_closed)

    def on_sent(self, event: evt.Event) -> None:
        """``EVT_DIMSE_SENT``: count pending responses; audit at the final one."""
        try:
            command = event.message.command_set
            service = _RESPONSES.get(int(command.CommandField))
            if service is None:
                return
            key = (event.assoc, int(command.MessageIDBeingRespondedTo))
            code = int(command.Status)
            with self._lock:
                operation = self._operations.get(key)
                if operation is None:
                    return
                if code not in _PENDING:
                    del self._operations[key]
            operation.responses += 1
            for name in ("Completed", "Failed", "Warning"):
                value = command.get(f"NumberOf{name}Suboperations")
                if value is not None:
                    operation.counts[name.lower()] = int(value)
            if code not in _PENDING:
                self._audit(operation, code, command.get("ErrorComment"))
        except Exception:
            logger.exception("could not follow a Q/R response")

    def on_closed(self, event: evt.Event) -> None:
        """``EVT_CONN_CLOSE``: operations without a final response are audited as failed."""
        with self._lock:
            left = [k for k in self._operations if k[0] is event.assoc]
            operations = [self._operations.pop(k) for k in left]
        for operation in operations:
            operation.note = "the association ended before the final response"
            self._audit(operation, None, None)

    def _audit(self, operation: Operation, code: int | None, comment: str | None) -> None:
        service = operation.model.service
        finds = service == "C-FIND"
        results = operation.responses - 1 if finds and code is not None else None
        detail: dict[str, Any] = {
            "service": service,
            "model": operation.model.root.value,
            "level": operation.level.value if operation.level else None,
            "keys": operation.matches,
            "status": f"0x{code:04X}" if code is not None else None,
        }
        if finds:
            detail.update(results=results, truncated=operation.truncated)
        else:
            detail.update(instances=operation.instances, **operation.counts)
            if operation.destination is not None:
                detail["destination"] = operation.destination
        if len(operation.study_uids) > 1:
            detail["studies"] = sorted(operation.study_uids)[:100]
        outcome = _outcome(code, operation.counts)
        summary = f"{service} {detail['level'] or ''}".strip()
        if operation.destination is not None:
            summary += f" to {operation.destination}"
        summary += f": {detail['status'] or 'no final response'}"
        if finds and results is not None:
            summary += f", {results} match(es)"
        elif operation.counts:
            summary += ", " + ", ".join(f"{v} {k}" for k, v in operation.counts.items())
        if operation.note or comment:
            summary += f" ({operation.note or comment})"
        try:
            with self.archive.db.session() as session:
                audit.record(
                    session=session,
                    actor=operation.actor,
                    event_type=AuditEventType.QUERY if finds else AuditEventType.RETRIEVE,
                    action=AuditAction.EXECUTE if finds else AuditAction.READ,
                    outcome=outcome,
                    object_type="dimse",
                    object_id=operation.model.uid,
                    patient_id=_single(operation.patient_ids),
                    study_instance_uid=_single(operation.study_uids),
                    message=summary,
                    detail=detail,
                )
        except Exception:
            logger.exception("could not audit a %s", service)


def _no_delay(event: evt.Event) -> None:
    """TCP_NODELAY on the C-MOVE association, as on the listener's: without it every
    C-STORE waits for the destination's delayed ACK (~40 ms an object)."""
    try:
        sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        logger.warning("could not set TCP_NODELAY on the C-MOVE association", exc_info=True)


def _accepted(assoc: Association) -> dict[str, set[str]]:
    """Accepted transfer syntaxes per SOP class of an association."""
    accepted: dict[str, set[str]] = {}
    for context in assoc.accepted_contexts:
        for syntax in context.transfer_syntax:
            accepted.setdefault(str(context.abstract_syntax), set()).add(str(syntax))
    return accepted


def _single(values: set[str]) -> str | None:
    known = values - {""}
    return next(iter(known)) if len(known) == 1 else None


def _outcome(code: int | None, counts: dict[str, int]) -> AuditOutcome:
    """ATNA outcome of a final status, graded as the HTTP edge grades 4xx and 5xx."""
    if code in (DimseStatus.SUCCESS, DimseStatus.CANCEL):
        return AuditOutcome.SUCCESS
    if code is None:  # cut off: the association ended first
        return AuditOutcome.SERIOUS_FAILURE
    if code == DimseStatus.NOT_AUTHORISED:
        return AuditOutcome.SERIOUS_FAILURE
    if code is not None and (
        code in (DimseStatus.IDENTIFIER_DOES_NOT_MATCH, DimseStatus.MOVE_DESTINATION_UNKNOWN)
        or (0xB000 <= code <= 0xBFFF and counts.get("completed", 0) > 0)
    ):
        return AuditOutcome.MINOR_FAILURE
    if code is not None and (0xB000 <= code <= 0xBFFF or code == 0xA702):
        return AuditOutcome.SERIOUS_FAILURE  # nothing (or not everything) was delivered
    return AuditOutcome.MAJOR_FAILURE


def _contexts(instances: list[MatchedInstance]) -> list[PresentationContext]:
    """Presentation contexts for a C-MOVE association: one per SOP class and stored
    transfer syntax, so that the destination can take each object as stored. Native
    little-endian objects also get a context offering Explicit and Implicit VR, which
    pynetdicom converts between when the destination refused the stored one; so do
    losslessly compressed ones, decoded for a destination that takes only native syntaxes
    (:meth:`_load`). Lossy objects are offered only as stored — never decoded on the way
    out. At most 128
    (PS3.8 9.3.2.2), fallbacks dropped first; instances without a context fail as
    sub-operations."""
    wanted: dict[tuple[str, str], list[str]] = {}
    fallbacks: dict[tuple[str, str], list[str]] = {}
    for instance in instances:
        syntax = instance.transfer_syntax_uid
        wanted.setdefault((instance.sop_class_uid, syntax), [syntax])
        if syntax in _NATIVE_LITTLE_ENDIAN or syntax in _LOSSLESS:
            fallbacks.setdefault(
                (instance.sop_class_uid, "native"), [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
            )
    wanted.update(fallbacks)
    if len(wanted) > MAX_CONTEXTS:
        logger.warning(
            "C-MOVE needs %d presentation contexts; proposing the first %d",
            len(wanted),
            MAX_CONTEXTS,
        )
    contexts = [build_context(abstract, syntaxes) for (abstract, _), syntaxes in wanted.items()]
    return contexts[:MAX_CONTEXTS] or [build_context(Verification)]


def _patient_counts(session: Any, patient_pks: list[int]) -> dict[int, dict[str, int]]:
    """Number of Patient Related Studies/Series/Instances (PS3.4 C.6.1.1.2) per patient."""
    if not patient_pks:
        return {}
    stmt = (
        select(
            Study.patient_pk,
            func.count(Study.id),
            func.coalesce(func.sum(Study.number_of_series), 0),
            func.coalesce(func.sum(Study.number_of_instances), 0),
        )
        .where(Study.patient_pk.in_(set(patient_pks)))
        .group_by(Study.patient_pk)
    )
    return {
        pk: {
            "NumberOfPatientRelatedStudies": int(studies),
            "NumberOfPatientRelatedSeries": int(series),
            "NumberOfPatientRelatedInstances": int(instances),
        }
        for pk, studies, series, instances in session.execute(stmt)
    }


__all__ = ["MAX_CONTEXTS", "Operation", "QueryRetrieveSCP"]
