"""States of a queued notification."""

from enum import StrEnum

from cloudfilm.config import NotifyChannel

__all__ = ["NotifyChannel", "NotifyState"]


class NotifyState(StrEnum):
    """queued → sending → sent → delivered | failed; or given-up, refused."""

    QUEUED = "queued"
    """Waiting for its turn (``not_before``), first send or a retry."""
    SENDING = "sending"
    """Held by a dispatcher (``lease_until``); back to ``queued`` if that one dies."""
    SENT = "sent"
    """Accepted by the platform; the delivery receipt may follow."""
    DELIVERED = "delivered"
    """The receipt says the phone or the WeChat user received it."""
    FAILED = "failed"
    """The platform refused it for good, or the receipt says it was not delivered."""
    GIVEN_UP = "given-up"
    """Every attempt (``notify.max_attempts``) failed."""
    REFUSED = "refused"
    """Not sent at all: over the send limit, invalid recipient or template (``last_error``)."""


FINAL = frozenset({NotifyState.DELIVERED, NotifyState.FAILED, NotifyState.GIVEN_UP,
                   NotifyState.REFUSED})  # fmt: skip
