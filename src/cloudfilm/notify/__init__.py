"""Notifications: one durable outbox for SMS and WeChat Official Account messages.

Callers queue a message in their own transaction (:func:`cloudfilm.notify.service.enqueue`);
a dispatcher (:class:`cloudfilm.notify.service.Dispatcher`) sends due messages through the
configured driver (:mod:`cloudfilm.notify.drivers`), retries with back-off and records
delivery receipts (``/api/notify/receipts/{driver}``).
"""
