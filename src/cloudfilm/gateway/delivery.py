"""Delivery to the archive: STOW-RS (PS3.18 10.5) with an OAuth2 client-credentials token,
or DICOM C-STORE (:class:`CStoreClient`, ``gateway.delivery = "cstore"``).

The token comes from the archive's ``POST /api/oauth/token`` (RFC 6749 4.4) and is fetched
again once when a request is answered 401 (expired or revoked). One STOW-RS request carries
up to ``gateway.batch_size`` instances of one study; the answer says per instance what
happened:

* ReferencedSOPSequence (0008,1199): stored, or an identical copy was already stored
  (the archive treats a resent identical instance as a success, so resending is harmless);
* FailedSOPSequence (0008,1198) with FailureReason (0008,1197): refused. ``0xA700`` (out of
  resources) is retried later; any other reason is the archive's verdict on the object and
  the instance goes to the dead letter with it.

Failed items that carry no SOP Instance UID (an object the archive could not even parse)
cannot be matched to an instance: the unmatched instances are sent again one per request,
so each answer names its own instance.
"""

from __future__ import annotations

import io
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from cloudfilm.config import GatewaySettings
from cloudfilm.gateway.bandwidth import Throttle
from cloudfilm.gateway.messages import message, since

_REASONS = {
    0x0110: "processing failure",
    0x0111: "a different object with this SOP Instance UID is already archived",
    0xA700: "out of resources (archive storage full)",
    0xA900: "the object belongs to another study",
    0xC000: "cannot understand (the archive refused the object as invalid DICOM)",
}
_RETRY_LATER = {0xA700}
_D = TypeVar("_D", bound=Dataset)


class DeliveryError(Exception):
    """The whole request failed (unreachable, refused credentials, 5xx): retry later."""


@dataclass(slots=True)
class StowOutcome:
    delivered: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    transient: dict[str, str] = field(default_factory=dict)
    anonymous_failures: list[str] = field(default_factory=list)
    """Reasons of failed items without a SOP Instance UID."""


def describe_reason(code: int) -> str:
    return f"archive FailureReason 0x{code:04X}: {_REASONS.get(code, 'refused')}"


class ArchiveClient:
    """STOW-RS to the archive as an integration client."""

    def __init__(
        self, settings: GatewaySettings, *, transport: Any = None, throttle: Throttle | None = None
    ) -> None:
        self.settings = settings
        self.throttle = throttle
        """Bandwidth limit of the STOW-RS bodies (and of the send-back downloads)."""
        self._token: str | None = None
        self.http = httpx.Client(
            base_url=settings.archive_url.rstrip("/"),
            timeout=settings.http_timeout,
            transport=transport,
        )

    def close(self) -> None:
        self.http.close()

    def _fetch_token(self) -> str:
        if not self.settings.client_id or self.settings.client_secret is None:
            raise DeliveryError(
                "no archive credentials: set gateway.client_id and "
                "CLOUDFILM_GATEWAY__CLIENT_SECRET (cloudfilm client create on the archive)"
            )
        try:
            response = self.http.post(
                "/api/oauth/token",
                data={
                    "grant_type": "client_credentials",
                    "client_id": self.settings.client_id,
                    "client_secret": self.settings.client_secret.get_secret_value(),
                },
            )
        except httpx.HTTPError as exc:
            raise DeliveryError(f"archive unreachable: {type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            raise DeliveryError(
                f"the archive refused the gateway's credentials ({response.status_code}); "
                "check gateway.client_id and its secret"
            )
        token = str(response.json()["access_token"])
        self._token = token
        return token

    def fetch_study(self, study_instance_uid: str, keep: Callable[[bytes, Dataset], None]) -> int:
        """WADO-RS Retrieve Study from the archive (the way back) with the gateway's client
        credentials, ``transfer-syntax=*`` (the objects as archived); ``keep(data, header)``
        for each instance as it streams in. Returns how many instances the answer held.

        Raises
        ------
        DeliveryError
            No credentials, the archive unreachable or refusing them, no such study.
        """
        from cloudfilm.gateway.pacs import PacsError
        from cloudfilm.gateway.wado import Unauthorised, stream_study

        url = f"{self.settings.archive_url.rstrip('/')}/dicom-web/studies/{study_instance_uid}"
        for again in (True, False):
            token = self._token or self._fetch_token()
            try:
                return stream_study(
                    self.http,
                    url,
                    study_instance_uid,
                    keep,
                    peer=self.settings.archive_url,
                    headers={"Authorization": f"Bearer {token}"},
                    throttle=self.throttle,
                )
            except Unauthorised as exc:
                self._token = None  # expired or revoked: one fresh token, then give up
                if not again:
                    raise DeliveryError(f"the archive refused the gateway's token: {exc}") from exc
            except PacsError as exc:
                raise DeliveryError(str(exc).replace("WADO-RS", "archive WADO-RS", 1)) from exc
        raise AssertionError("unreachable")

    def send(self, study_instance_uid: str, parts: Sequence[tuple[str, bytes]]) -> StowOutcome:
        """Send ``parts`` (SOP Instance UID, file bytes) of one study in one request."""
        boundary = secrets.token_hex(16)
        pieces: list[bytes] = []
        for _, data in parts:
            pieces.append(
                f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii")
            )
            pieces += (data, b"\r\n")
        pieces.append(f"--{boundary}--\r\n".encode("ascii"))
        length = sum(len(piece) for piece in pieces)
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        }
        response = None
        for _ in range(2):
            token = self._token or self._fetch_token()
            start = time.monotonic()
            message(
                "STOW-RS-RQ",
                direction="out",
                peer=self.settings.archive_url,
                study_uid=study_instance_uid,
                instances=len(parts),
                bytes=length,
            )
            try:
                response = self.http.post(
                    f"/dicom-web/studies/{study_instance_uid}",
                    # Limited: streamed through the bucket (Content-Length still sent).
                    content=(
                        self.throttle.chunks(pieces)
                        if self.throttle is not None
                        else b"".join(pieces)
                    ),
                    headers={
                        **headers,
                        "Authorization": f"Bearer {token}",
                        "Content-Length": str(length),
                    },
                )
            except httpx.HTTPError as exc:
                message(
                    "STOW-RS-RSP",
                    direction="in",
                    peer=self.settings.archive_url,
                    study_uid=study_instance_uid,
                    status=None,
                    error=type(exc).__name__,
                    ms=since(start),
                )
                raise DeliveryError(f"archive unreachable: {type(exc).__name__}: {exc}") from exc
            message(
                "STOW-RS-RSP",
                direction="in",
                peer=self.settings.archive_url,
                study_uid=study_instance_uid,
                status=response.status_code,
                bytes=len(response.content),
                ms=since(start),
            )
            if response.status_code != 401:
                break
            self._token = None  # expired or revoked: one fresh token, then give up
        assert response is not None
        if response.status_code not in (200, 202, 409):
            raise DeliveryError(f"STOW-RS answered {response.status_code}: {response.text[:300]}")
        return _outcome(response.json(), [uid for uid, _ in parts])


def _outcome(body: dict[str, Any], sent: list[str]) -> StowOutcome:
    outcome = StowOutcome()
    for item in (body.get("00081199") or {}).get("Value", []):
        uid = _uid(item)
        if uid:
            outcome.delivered.append(uid)
    for item in (body.get("00081198") or {}).get("Value", []):
        code = int(((item.get("00081197") or {}).get("Value") or [0x0110])[0])
        reason = describe_reason(code)
        uid = _uid(item)
        if uid is None:
            outcome.anonymous_failures.append(reason)
        elif code in _RETRY_LATER:
            outcome.transient[uid] = reason
        else:
            outcome.refused[uid] = reason
    known = set(outcome.delivered) | set(outcome.refused) | set(outcome.transient)
    unknown = [uid for uid in sent if uid not in known]
    if len(unknown) == 1 and len(outcome.anonymous_failures) == 1:
        # The only instance not named is the one the anonymous failure is about.
        reason = outcome.anonymous_failures.pop()
        if "0xA700" in reason:
            outcome.transient[unknown[0]] = reason
        else:
            outcome.refused[unknown[0]] = reason
    return outcome


def _uid(item: dict[str, Any]) -> str | None:
    values = (item.get("00081155") or {}).get("Value") or []
    return str(values[0]) if values else None


class CStoreClient:
    """C-STORE to the archive's DIMSE port (PS3.4 B.2): one association per batch.

    Each instance is proposed in its own transfer syntax (one presentation context per SOP
    class and transfer syntax), so objects reach the archive as the PACS sent them. The
    per-instance status (PS3.4 B.2.3) decides like the STOW-RS answer does: success or a
    warning (0xB000, 0xB006, 0xB007) → delivered; 0xA7xx (out of resources) → retried
    later; any other failure → dead letter with the status and its Error Comment.
    """

    def __init__(
        self,
        settings: GatewaySettings,
        *,
        aet: str | None = None,
        host: str | None = None,
        port: int | None = None,
        hint: str | None = None,
        throttle: Throttle | None = None,
        decompress_fallback: bool = False,
    ) -> None:
        """To the archive's DIMSE port, or to the node ``aet``/``host``/``port`` (a hospital
        destination of the way back); ``hint`` ends the message of a refused association.

        ``decompress_fallback``: also propose Explicit VR Little Endian for every SOP class,
        and send a compressed object decoded to it when the node did not accept its own
        transfer syntax (a workstation without JPEG-LS, for an object the archive keeps
        compressed). The pixels stay the same: only lossless syntaxes are decoded.
        """
        self.decompress_fallback = decompress_fallback
        self.settings = settings
        self.aet = aet or settings.archive_aet
        self.host = host or (
            settings.archive_host or (httpx.URL(settings.archive_url).host or "127.0.0.1")
        )
        self.port = port or settings.archive_port
        self.what = "archive" if aet is None else f"destination {aet}"
        self.throttle = throttle
        """Bandwidth limit: each object is taken whole from the bucket before it is sent."""
        self.hint = hint or (
            f"check gateway.archive_* and that the archive's dimse.nodes lists {settings.ae_title}"
        )

    def close(self) -> None:
        """Nothing held between batches."""

    def send(self, study_instance_uid: str, parts: Sequence[tuple[str, bytes]]) -> StowOutcome:
        from pydicom import dcmread
        from pynetdicom import AE

        datasets = [(uid, dcmread(io.BytesIO(data))) for uid, data in parts]
        sizes = {uid: len(data) for uid, data in parts}
        ae = AE(ae_title=self.settings.ae_title)
        ae.network_timeout = self.settings.network_timeout
        ae.acse_timeout = min(30.0, self.settings.network_timeout)
        ae.dimse_timeout = self.settings.network_timeout
        pairs = {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for _, ds in datasets}
        if self.decompress_fallback:
            pairs |= {(sop_class, ExplicitVRLittleEndian) for sop_class, _ in pairs}
        if len(pairs) > 128:
            raise DeliveryError("more than 128 SOP class/transfer syntax pairs in one batch")
        for sop_class, syntax in sorted(pairs):
            ae.add_requested_context(sop_class, syntax)
        where = f"{self.aet} at {self.host}:{self.port}"
        assoc = ae.associate(self.host, self.port, ae_title=self.aet)
        if not assoc.is_established:
            what = "rejected" if assoc.is_rejected else "aborted or unreachable"
            raise DeliveryError(
                f"{self.what} unreachable: association with {where} {what}; {self.hint}"
            )
        outcome = StowOutcome()
        try:
            for uid, ds in datasets:
                if str(ds.get("StudyInstanceUID", "")) != study_instance_uid:
                    outcome.refused[uid] = describe_reason(0xA900)
                    continue
                if self.decompress_fallback:
                    try:
                        ds = _as_accepted(assoc, ds)
                    except Exception as exc:  # noqa: BLE001 - any decoder failure
                        outcome.refused[uid] = f"C-STORE not possible: cannot decode: {exc}"
                        continue
                if self.throttle is not None:
                    self.throttle.take(sizes[uid])
                start = time.monotonic()
                try:
                    status = assoc.send_c_store(ds)
                except ValueError as exc:  # no accepted context for this object
                    outcome.refused[uid] = f"C-STORE not possible: {exc}"
                    continue
                if not status or "Status" not in status:
                    raise DeliveryError(
                        f"{self.what} unreachable: the C-STORE association with {where} ended "
                        "without a response"
                    )
                code = int(status.Status)
                comment = str(status.get("ErrorComment", "") or "")
                message(
                    "C-STORE",
                    direction="out",
                    peer=self.aet,
                    study_uid=study_instance_uid,
                    sop_uid=uid,
                    bytes=sizes[uid],
                    status=f"0x{code:04X}",
                    ms=since(start),
                )
                reason = f"C-STORE status 0x{code:04X}" + (f": {comment}" if comment else "")
                if code == 0x0000 or code in (0xB000, 0xB006, 0xB007):
                    outcome.delivered.append(uid)
                elif code & 0xFF00 == 0xA700:
                    outcome.transient[uid] = reason
                else:
                    outcome.refused[uid] = reason
        finally:
            if assoc.is_established:
                assoc.release()
        return outcome


def _as_accepted(assoc: Any, ds: _D) -> _D:
    """``ds``, decoded to Explicit VR Little Endian when the association accepted its SOP
    class only uncompressed; unchanged otherwise (a lossy object is never decoded here)."""
    syntax = UID(str(ds.file_meta.TransferSyntaxUID))
    accepted = {
        str(cx.transfer_syntax[0])
        for cx in assoc.accepted_contexts
        if cx.abstract_syntax == str(ds.SOPClassUID)
    }
    if str(syntax) in accepted or not syntax.is_compressed or "PixelData" not in ds:
        return ds
    if ExplicitVRLittleEndian not in accepted or not _lossless(syntax):
        return ds  # send_c_store then says no context was accepted
    ds.decompress()
    return ds


def _lossless(syntax: UID) -> bool:
    from pydicom import uid

    return syntax in (
        uid.JPEGLSLossless,
        uid.JPEG2000Lossless,
        uid.JPEGLossless,
        uid.JPEGLosslessSV1,
        uid.RLELossless,
        uid.HTJ2KLossless,
        uid.HTJ2KLosslessRPCL,
    )
