"""The gateway's HL7 trigger: an MLLP listener that queues a study when the RIS says its
order or result is final, exactly like ``POST /trigger``.

Messages: ORU^R01, ORM^O01 and OMI^O23 (HL7 v2.5.1 7.3.1, 4.4.1, 4.4.6). An order group is
final when ORC-5 (order status, table 0038) is ``CM`` or OBR-25 (result status, table
0123) is ``F``. Its study is named by the accession number (IPC-1, else OBR-18) and/or the
Study Instance UID (ZDS-1, the RIS convention of IHE SWF, else IPC-3).

The MLLP framing, the size and peer limits and the idle timeout are the archive's
:class:`~cloudfilm.hl7.listener.HL7Listener`; only what is done with a message differs:
nothing is stored in the archive's database (the gateway has none), the message is read,
the trigger is queued in the gateway's own durable queue, and only then is the sender
answered AA. A message with a final group but no usable key is answered AE with an ERR
segment; a message with nothing final is answered AA and queues nothing.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from cloudfilm.config import GatewaySettings, HL7Settings
from cloudfilm.db import Database
from cloudfilm.gateway.api import TriggerError, TriggerRequest
from cloudfilm.gateway.messages import message
from cloudfilm.hl7.listener import HL7Listener
from cloudfilm.hl7.messages import AckCode, ErrorCode, MessageError, build_ack
from cloudfilm.hl7.service import Verdict, examine

logger = logging.getLogger(__name__)

#: The message types that can say "exam X is final".
TRIGGER_TYPES = frozenset({"ORU^R01", "ORM^O01", "OMI^O23"})
FINAL_ORDER_STATUS = frozenset({"CM"})
"""ORC-5 (table 0038): order is completed."""
FINAL_RESULT_STATUS = frozenset({"F"})
"""OBR-25 (table 0123): final results."""

HL7Trigger = Callable[[TriggerRequest], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class FinalExam:
    """One final order group: where it is in the message and the study keys it carries."""

    number: int
    accession_number: str | None
    study_instance_uid: str | None


def _first(segment: Any, number: int, seps: str, component: int = 1) -> str:
    """Component ``component`` of the first repetition of field ``number``, or ''
    (``seps``: the repetition, component and subcomponent separators)."""
    if segment is None or len(segment) <= number:
        return ""
    text = str(segment[number])
    repetition = text.split(seps[0])[0]
    parts = repetition.split(seps[1])
    value = parts[component - 1] if len(parts) >= component else ""
    return value.split(seps[2])[0].strip()


def final_exams(parsed: Any, message_type: str) -> list[FinalExam]:
    """The final order groups of a parsed ORU/ORM/OMI: one per OBR, with the ORC before it
    (if any) and the IPC and ZDS segments that follow it up to the next OBR or ORC."""
    seps = str(parsed.separators)[2:5]  # python-hl7: segment, field, then these three
    groups: list[dict[str, Any]] = []
    orc: Any = None
    for segment in parsed:
        name = str(segment[0])
        if name == "ORC":
            orc = segment
            groups.append({"orc": segment, "obr": None, "ipc": None, "zds": None})
        elif name == "OBR":
            if groups and groups[-1]["obr"] is None and groups[-1]["orc"] is orc:
                groups[-1]["obr"] = segment
            else:
                groups.append({"orc": orc, "obr": segment, "ipc": None, "zds": None})
        elif name in ("IPC", "ZDS") and groups and groups[-1][name.lower()] is None:
            groups[-1][name.lower()] = segment
    out: list[FinalExam] = []
    for number, group in enumerate(groups, start=1):
        order_status = _first(group["orc"], 5, seps).upper()
        result_status = _first(group["obr"], 25, seps).upper()
        final = result_status in FINAL_RESULT_STATUS
        if not message_type.startswith("ORU"):
            final = final or order_status in FINAL_ORDER_STATUS
        if not final:
            continue
        accession = _first(group["ipc"], 1, seps) or _first(group["obr"], 18, seps)
        study_uid = _first(group["zds"], 1, seps) or _first(group["ipc"], 3, seps)
        out.append(FinalExam(number, accession or None, study_uid or None))
    return out


def hl7_settings(settings: GatewaySettings) -> HL7Settings:
    """The listener limits of the archive's ``hl7`` section, from the gateway's settings."""
    return HL7Settings(
        port=settings.hl7_port,
        host=settings.hl7_host,
        allowed_sources=settings.hl7_allowed_sources,
        application=settings.ae_title,
    )


class GatewayHL7Listener(HL7Listener):
    """MLLP in, :meth:`Gateway.trigger` per final exam, ACK out (AA once queued)."""

    def __init__(self, settings: GatewaySettings, trigger: HL7Trigger) -> None:
        # The archive's database is never touched: the methods of HL7Listener that use it
        # (_take, _audit_refusal) are replaced below.
        super().__init__(cast(Database, None), hl7_settings(settings), port=settings.hl7_port)
        self.trigger = trigger
        self.source = settings.hl7_source

    def _audit_refusal(self, source: str, reason: str) -> None:
        message("HL7-REFUSED", direction="in", peer=source, reason=reason)

    async def _take(self, raw: bytes, writer: asyncio.StreamWriter, source: str) -> None:
        verdict = await asyncio.to_thread(examine, raw)
        failure = verdict.error
        queued: list[str] = []
        if failure is None:
            try:
                queued = await asyncio.to_thread(self._queue, verdict)
            except MessageError as exc:
                failure = exc
            except Exception as exc:  # the gateway's queue could not be written
                logger.exception("gateway: HL7 trigger from %s failed", source)
                failure = MessageError(
                    AckCode.ERROR,
                    ErrorCode.APPLICATION_ERROR,
                    f"the trigger could not be queued ({type(exc).__name__}); send it again",
                )
        header = verdict.header
        code = AckCode.ACCEPT if failure is None else failure.ack
        ack = build_ack(header, code, control_id="GW" + secrets.token_hex(8), error=failure,
                        application=self.settings.application)  # fmt: skip
        await self._send(writer, ack, verdict.encoding or "utf-8")
        message(
            "HL7",
            direction="in",
            peer=source,
            type=header.message_type if header else None,
            control_id=header.control_id if header else None,
            ack=code.value,
            study_uids=queued,
            error=failure.text if failure is not None else None,
        )

    def _queue(self, verdict: Verdict) -> list[str]:
        """Trigger every final exam of the message; the queued study UIDs.

        Raises
        ------
        MessageError
            AE: not a trigger message type, a final exam without any key, a study the PACS
            does not know (accession only), or the PACS or source unusable.
        """
        header = verdict.header
        assert header is not None
        kind = header.message_type.replace(header.encoding_characters[:1] or "^", "^")
        if kind not in TRIGGER_TYPES:
            raise MessageError(
                AckCode.ERROR,
                ErrorCode.UNSUPPORTED_MESSAGE_TYPE,
                f"the gateway takes {', '.join(sorted(TRIGGER_TYPES))}, not {kind}",
                "MSH^1^9",
            )
        queued: list[str] = []
        for exam in final_exams(verdict.message, kind):
            if not (exam.accession_number or exam.study_instance_uid):
                raise MessageError(
                    AckCode.ERROR,
                    ErrorCode.REQUIRED_FIELD_MISSING,
                    "检查已完成但无检查号或 Study Instance UID · the exam is final but names "
                    "neither an accession number (OBR-18, IPC-1) nor a Study Instance UID "
                    "(ZDS-1, IPC-3)",
                    f"OBR^{exam.number}^18",
                )
            request = TriggerRequest(
                study_instance_uid=exam.study_instance_uid,
                accession_number=exam.accession_number,
                source=self.source,
            )
            try:
                result = self.trigger(request)
            except TriggerError as exc:
                raise MessageError(
                    AckCode.ERROR,
                    ErrorCode.UNKNOWN_KEY if exc.status == 404 else ErrorCode.APPLICATION_ERROR,
                    str(exc),
                    f"OBR^{exam.number}^18",
                ) from exc
            queued.extend(str(q["study_instance_uid"]) for q in result["queued"])
        return queued
