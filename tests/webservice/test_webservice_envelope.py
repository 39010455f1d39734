"""The envelope helpers integrators copy: the worked example of docs/webservice.md opens
byte for byte, and a response opens only as the answer to its own request."""

from __future__ import annotations

import base64

import pytest

from cloudfilm.soap.client import EnvelopeOpenError, open_envelope, open_response, seal

KEY = base64.b64decode("AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=")
EXAMPLE = {
    "client_id": "ris",
    "key_id": "ws1.5e2b9c07",
    "timestamp": 1795852800,
    "nonce": "AAECAwQFBgcICQoL",
    "ciphertext": "PCC3eKaAsWjkLvnU35wVD+akpQ7SOAtOCFXTtCxbOIIxIYyBpRwoa0JRvqFROyT1qNlBMQ==",
}


def test_envelope__documented_example_is_exact() -> None:
    again = seal(
        {"accession_number": "CT20261128001"}, client_id="ris", key=KEY, key_id="ws1.5e2b9c07",
        timestamp=1795852800, nonce=bytes(range(12)),
    )  # fmt: skip
    assert again == EXAMPLE
    assert open_envelope(EXAMPLE, key=KEY) == {"accession_number": "CT20261128001"}


def test_envelope__response_is_bound_to_its_request() -> None:
    answer = seal({"ok": 1}, client_id="ris", key=KEY, key_id="k", reply_to="request-a")
    assert open_response(answer, client_id="ris", key=KEY, request_nonce="request-a") == {"ok": 1}
    with pytest.raises(EnvelopeOpenError):
        open_response(answer, client_id="ris", key=KEY, request_nonce="request-b")
    with pytest.raises(EnvelopeOpenError):
        open_response({**answer, "reply_to": "request-b"}, client_id="ris", key=KEY,
                      request_nonce="request-b")  # fmt: skip
