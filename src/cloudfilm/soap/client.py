"""The envelope of the query WebService, as a hospital system's integrator uses it.

This module needs only the standard library and ``cryptography``: copy it into the
calling system. The server uses the same functions, so both sides agree byte for byte.

A request is ``{client_id, key_id, timestamp, nonce, ciphertext}``:

* ``timestamp``: Unix time in whole seconds (the server refuses one more than
  ``webservice.max_clock_skew_seconds`` away from its clock);
* ``nonce``: 12 random bytes, base64url without padding — the AES-GCM nonce, and the
  replay guard (the server takes each nonce of a client once);
* ``ciphertext``: base64 (standard alphabet) of AES-256-GCM over the UTF-8 JSON of the
  parameters, with ``client_id|timestamp|nonce`` (UTF-8) as associated data.

A response adds ``reply_to`` (the request's nonce) and is sealed the same way with a fresh
nonce; its associated data is ``client_id|timestamp|nonce|reply_to``, so an answer cannot
be passed off as the answer to another request.

Example::

    request = seal_request({"accession_number": "A123"}, client_id="ris", key=key,
                           key_id="ws1.1a2b3c4d")
    answer = httpx.post(url + "/api/webservice/exams", json=request, headers=bearer).json()
    result = open_response(answer, client_id="ris", key=key, request_nonce=request["nonce"])
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import time
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

#: The fields of a request envelope; anything else in the body is refused.
REQUEST_FIELDS = ("client_id", "key_id", "timestamp", "nonce", "ciphertext")
NONCE_BYTES = 12


class EnvelopeOpenError(ValueError):
    """The envelope does not open: ciphertext or associated data altered, or another key."""


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def associated_data(
    client_id: str, timestamp: int, nonce: str, reply_to: str | None = None
) -> bytes:
    parts = [client_id, str(timestamp), nonce] + ([reply_to] if reply_to is not None else [])
    return "|".join(parts).encode("utf-8")


def seal(
    payload: Any, *, client_id: str, key: bytes, key_id: str, reply_to: str | None = None,
    timestamp: int | None = None, nonce: bytes | None = None,
) -> dict[str, Any]:  # fmt: skip
    """An envelope of ``payload`` (JSON-serialisable) under ``key`` (32 bytes)."""
    raw_nonce = nonce if nonce is not None else os.urandom(NONCE_BYTES)
    when = int(time.time()) if timestamp is None else int(timestamp)
    text_nonce = b64url(raw_nonce)
    data = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    aad = associated_data(client_id, when, text_nonce, reply_to)
    sealed = AESGCM(key).encrypt(raw_nonce, data, aad)
    envelope: dict[str, Any] = {
        "client_id": client_id,
        "key_id": key_id,
        "timestamp": when,
        "nonce": text_nonce,
        "ciphertext": base64.b64encode(sealed).decode("ascii"),
    }
    if reply_to is not None:
        envelope["reply_to"] = reply_to
    return envelope


def open_envelope(envelope: dict[str, Any], *, key: bytes, reply_to: str | None = None) -> Any:
    """The JSON payload of ``envelope``; :class:`EnvelopeOpenError` if it does not open."""
    try:
        raw_nonce = unb64url(str(envelope["nonce"]))
        sealed = base64.b64decode(str(envelope["ciphertext"]), validate=True)
        aad = associated_data(
            str(envelope["client_id"]), int(envelope["timestamp"]), str(envelope["nonce"]),
            reply_to,
        )  # fmt: skip
        if len(raw_nonce) != NONCE_BYTES:
            raise EnvelopeOpenError("the nonce is not 12 bytes")
        data = AESGCM(key).decrypt(raw_nonce, sealed, aad)
        return json.loads(data.decode("utf-8"))
    except (InvalidTag, KeyError, ValueError, TypeError, binascii.Error) as exc:
        if isinstance(exc, EnvelopeOpenError):
            raise
        raise EnvelopeOpenError("authentication failed") from exc


def seal_request(
    params: dict[str, Any], *, client_id: str, key: bytes, key_id: str,
    timestamp: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The request envelope of query parameters ``params``."""
    return seal(params, client_id=client_id, key=key, key_id=key_id, timestamp=timestamp)


def open_response(
    envelope: dict[str, Any], *, client_id: str, key: bytes, request_nonce: str
) -> Any:
    """The result in a response envelope, checked to answer the request ``request_nonce``."""
    if envelope.get("client_id") != client_id or envelope.get("reply_to") != request_nonce:
        raise EnvelopeOpenError("the response is not the answer to this request")
    return open_envelope(envelope, key=key, reply_to=request_nonce)
