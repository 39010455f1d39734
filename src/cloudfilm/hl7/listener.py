"""The MLLP listener: HL7 v2 messages in, ACKs out, many messages per connection.

MLLP (HL7 v2.5.1 Transport Specification: MLLP Release 2, "minimal lower layer
protocol") frames each message as ``<SB> message <EB><CR>`` with SB = 0x0B, EB = 0x1C,
CR = 0x0D. The framing is read here rather than with python-hl7's ``HL7StreamReader``
because the store keeps the bytes exactly as received and decodes them itself (MSH-18),
and because an oversize frame must be refused before it is buffered whole.

For every message: examine (decode, MSH, parse) → commit it to the store with its audit
record → run its handler in a transaction of its own → answer (AA only after the commit:
SECURITY-CHECKS H7; AE with ERR when the handler could not apply it, the message staying
stored for replay). Changed in issue 7 item 1: handlers ran after the answer before. A
sender that repeats a message whose ACK it lost gets AA again and the repeat is kept as
``duplicate``, never processed twice.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import threading
from typing import Any

from sqlalchemy.exc import IntegrityError

from cloudfilm.audit import service as audit
from cloudfilm.audit.enums import AuditAction, AuditEventType, AuditOutcome
from cloudfilm.config import HL7Settings
from cloudfilm.db import Database
from cloudfilm.hl7 import service
from cloudfilm.hl7.messages import AckCode, ErrorCode, MessageError, build_ack
from cloudfilm.hl7.models import MessageStatus

logger = logging.getLogger(__name__)

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"


class HL7Listener:
    """An asyncio MLLP server running in its own thread.

    Parameters
    ----------
    db
        The archive's database (messages and audit records are written there).
    settings
        ``hl7`` settings; ``port`` 0 binds a free port (see :attr:`port` after start).
    """

    def __init__(self, db: Database, settings: HL7Settings, *, port: int | None = None) -> None:
        self.db = db
        self.settings = settings
        self._port = port if port is not None else (settings.port or 0)
        self._networks = [ipaddress.ip_network(n, strict=False) for n in settings.allowed_sources]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._connections: set[asyncio.Task[Any]] = set()

    @property
    def port(self) -> int:
        return self._port

    def start(self) -> None:
        """Bind and serve in a daemon thread; returns when the port is open."""
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, name="hl7-mllp", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        logger.info("HL7 MLLP listener on %s:%d", self.settings.host, self._port)

    def stop(self) -> None:
        """Close the port and every connection; messages already committed stay committed,
        a message whose ACK was not sent yet is simply sent again by the peer."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        self._loop = self._thread = None

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._server = loop.run_until_complete(
                asyncio.start_server(
                    self._handle,
                    self.settings.host,
                    self._port,
                    limit=self.settings.max_message_bytes + len(END_BLOCK) + 1,
                )
            )
            self._port = int(self._server.sockets[0].getsockname()[1])
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def _allowed(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._networks)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        peer = writer.get_extra_info("peername") or ("?", 0)
        source = f"{peer[0]}:{peer[1]}"
        try:
            if not self._allowed(str(peer[0])):
                logger.warning(
                    "HL7 connection from %s refused (not in hl7.allowed_sources)", source
                )
                await asyncio.to_thread(self._audit_refusal, source, "not in hl7.allowed_sources")
                return
            if len(self._connections) > self.settings.max_connections:
                logger.warning("HL7 connection from %s refused (hl7.max_connections)", source)
                await asyncio.to_thread(self._audit_refusal, source, "hl7.max_connections")
                return
            await self._serve_connection(reader, writer, source)
        except asyncio.CancelledError:
            pass
        except Exception:
            logger.exception("HL7 connection from %s failed", source)
        finally:
            self._connections.discard(task)
            writer.close()
            try:
                await writer.wait_closed()
            except Exception:  # the peer may have gone already
                pass

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, source: str
    ) -> None:
        timeout = self.settings.idle_timeout_seconds
        while True:
            try:
                frame = await asyncio.wait_for(reader.readuntil(END_BLOCK), timeout)
            except TimeoutError:
                logger.info("HL7 connection from %s idle for %.0f s: closed", source, timeout)
                return
            except asyncio.IncompleteReadError as exc:
                if exc.partial.strip():
                    # A frame cut off by the peer: never acknowledged, so never owed.
                    logger.warning(
                        "HL7 connection from %s closed inside a frame (%d bytes dropped)",
                        source,
                        len(exc.partial),
                    )
                return
            except asyncio.LimitOverrunError:
                await self._refuse_oversize(writer, source)
                return
            start = frame.rfind(START_BLOCK)
            raw = frame[start + 1 : -len(END_BLOCK)] if start >= 0 else b""
            if start < 0:
                error = MessageError(
                    AckCode.REJECT,
                    ErrorCode.SEGMENT_SEQUENCE,
                    "MLLP frame without a start block (0x0B)",
                )
                await self._send(
                    writer, build_ack(None, AckCode.REJECT, control_id=_id(), error=error), "utf-8"
                )
                continue
            await self._take(raw, writer, source)

    async def _take(self, raw: bytes, writer: asyncio.StreamWriter, source: str) -> None:
        # Decoding and parsing a multi-megabyte ORU is CPU work: off the event loop.
        verdict = await asyncio.to_thread(service.examine, raw)
        try:
            message_id, status = await asyncio.to_thread(self._store, raw, verdict, source)
        except Exception:
            logger.exception("HL7 message from %s could not be stored", source)
            error = MessageError(
                AckCode.REJECT,
                ErrorCode.APPLICATION_ERROR,
                "the message could not be stored; send it again later",
            )
            ack = build_ack(verdict.header, AckCode.REJECT, control_id=_id(), error=error,
                            application=self.settings.application)  # fmt: skip
            await self._send(writer, ack, verdict.encoding or "utf-8")
            return
        failure: MessageError | None = None
        if status == MessageStatus.RECEIVED.value:
            # Stored and committed: now apply it, then answer. A message that cannot be
            # applied (an unknown patient in a merge) is answered AE with the reason and
            # stays stored as failed for `cloudfilm hl7 replay`.
            status, failure = await asyncio.to_thread(self._process, message_id)
        control_id = f"CF{message_id}"
        if failure is not None:
            ack = build_ack(verdict.header, AckCode.ERROR, control_id=control_id, error=failure,
                            application=self.settings.application)  # fmt: skip
        else:
            ack = service.ack_for(verdict, control_id, application=self.settings.application)
        await self._send(writer, ack, verdict.encoding or "utf-8")
        logger.info(
            "HL7 %s %s from %s: %s, stored as #%d (%s)",
            verdict.header.message_type if verdict.header else "?",
            verdict.header.control_id if verdict.header else "?",
            source,
            AckCode.ERROR.value if failure is not None else verdict.ack.value,
            message_id,
            status,
        )

    def _store(self, raw: bytes, verdict: service.Verdict, source: str) -> tuple[int, str]:
        for attempt in (1, 2):
            try:
                with self.db.session() as session:
                    row = service.store(session=session, raw=raw, verdict=verdict, source=source)
                    return row.id, row.status
            except IntegrityError:
                # Another connection stored the same sender + MSH-10 at the same moment:
                # the second attempt finds it and stores this one as a duplicate.
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _process(self, message_id: int) -> tuple[str, MessageError | None]:
        return apply(self.db, message_id, answering=True)

    def _audit_refusal(self, source: str, reason: str) -> None:
        with self.db.session() as session:
            audit.record(
                session=session,
                actor=audit.Actor.system("hl7"),
                event_type=AuditEventType.HL7_MESSAGE_RECEIVED,
                action=AuditAction.CREATE,
                outcome=AuditOutcome.SERIOUS_FAILURE,
                object_type="hl7-message",
                source=source,
                message=f"refused: {reason}",
            )

    async def _refuse_oversize(self, writer: asyncio.StreamWriter, source: str) -> None:
        limit = self.settings.max_message_bytes
        logger.warning("HL7 message from %s larger than %d bytes: refused", source, limit)
        error = MessageError(
            AckCode.REJECT,
            ErrorCode.APPLICATION_ERROR,
            f"message larger than {limit} bytes (hl7.max_message_bytes)",
        )
        await self._send(
            writer, build_ack(None, AckCode.REJECT, control_id=_id(), error=error), "utf-8"
        )
        await asyncio.to_thread(self._audit_refusal, source, f"larger than {limit} bytes")

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, ack: str, encoding: str) -> None:
        writer.write(START_BLOCK + ack.encode(encoding, "replace") + END_BLOCK)
        await writer.drain()


def _id() -> str:
    return "CF" + secrets.token_hex(8)


def process(db: Database, message_id: int) -> str:
    """Run the handler of stored message ``message_id`` in its own transaction; returns the
    status afterwards (``received`` when no handler is registered for its type)."""
    return apply(db, message_id)[0]


def apply(
    db: Database, message_id: int, *, answering: bool = False
) -> tuple[str, MessageError | None]:
    """:func:`process`, with the reason when the handler failed: the handler's own
    :class:`MessageError` (what ERR should say), else an application error (207).

    With ``answering`` the sender is about to be answered AE: the stored ACK code says
    so. Two messages about the same new patient on two connections at once may collide
    on the identifier's unique index: the loser is applied once more.
    """
    from cloudfilm.hl7.models import HL7Message

    for attempt in (1, 2):
        try:
            with db.session() as session:
                row = session.get(HL7Message, message_id)
                if row is None:
                    raise LookupError(f"no HL7 message {message_id}")
                service.process(session=session, row=row)
                return row.status, None
        except LookupError:
            raise
        except IntegrityError as exc:
            if attempt == 1:
                continue
            failure: Exception = exc
        except Exception as exc:
            failure = exc
        break
    # The error text may quote the message (names): it goes to the store, not the log.
    if isinstance(failure, MessageError):  # the message's content: answered AE, kept
        logger.warning("HL7 message #%d could not be applied (%s)", message_id, failure.code)
    else:
        logger.error("HL7 message #%d: its handler failed (%s)", message_id, type(failure).__name__)
    error = (
        failure
        if isinstance(failure, MessageError)
        else MessageError(
            AckCode.ERROR,
            ErrorCode.APPLICATION_ERROR,
            f"消息无法处理，已保存待重放 · the message could not be applied "
            f"({type(failure).__name__}); it is stored as #{message_id} for replay",
        )
    )
    with db.session() as session:
        service.mark_failed(
            session=session,
            message_id=message_id,
            error=f"{type(failure).__name__}: {failure}",
            ack=AckCode.ERROR if answering else None,
            code=error.code.value.split("^")[0],
        )
    return MessageStatus.FAILED.value, error
