"""The registry of message handlers: what runs after a message is stored, before it is
acknowledged (a handler's :class:`~cloudfilm.hl7.messages.MessageError` becomes the AE).

Handlers register by message type, ``ADT^A01`` for one trigger or ``ADT`` for every
trigger of a code (the exact type wins). They take the session (flush, never commit;
the caller owns the transaction), the parsed message and the stored row. A message whose
type has no handler keeps status ``received`` until one exists; ``cloudfilm hl7 replay``
runs it then. ADT A01/A04/A08/A28/A31/A40 feed the patient master index
(:mod:`cloudfilm.hl7.adt`), ORM^O01 and OMI^O23 the orders (:mod:`cloudfilm.hl7.orm`),
ORU^R01 the reports (:mod:`cloudfilm.hl7.oru`), DFT^P03 the HIS's charge lists for the
billing reconciliation (:mod:`cloudfilm.hl7.dft`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session

from cloudfilm.hl7.models import HL7Message

Handler = Callable[..., None]
"""``handler(*, session: Session, message: hl7.Message, record: HL7Message) -> None``."""

_HANDLERS: dict[str, Handler] = {}


def register(message_type: str) -> Callable[[Handler], Handler]:
    """Decorator: run the function for ``message_type`` (``ADT^A01`` or ``ADT``)."""

    def add(handler: Handler) -> Handler:
        _HANDLERS[message_type.upper()] = handler
        return handler

    return add


def unregister(message_type: str) -> None:
    _HANDLERS.pop(message_type.upper(), None)


def handler_for(message_type: str | None) -> Handler | None:
    """The handler of ``ADT^A01``: the one for ``ADT^A01``, else the one for ``ADT``."""
    if not message_type:
        return None
    key = message_type.upper()
    return _HANDLERS.get(key) or _HANDLERS.get(key.split("^")[0])


def run(*, session: Session, message: Any, record: HL7Message) -> bool:
    """Run the handler of ``record``'s type; False when there is none."""
    handler = handler_for(record.message_type)
    if handler is None:
        return False
    handler(session=session, message=message, record=record)
    return True
