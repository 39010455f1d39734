"""Retrieval over DICOMweb: WADO-RS Retrieve Study (PS3.18 10.4) from the PACS.

The answer is ``multipart/related; type="application/dicom"`` (PS3.18 8.7.3.3.2); each
part is parsed as it streams in (python-multipart), kept in the spool by
:meth:`GatewayQueue.accept` exactly like a C-STORE received from a C-MOVE, and dropped from
memory. ``transfer-syntax=*`` asks for the objects as the PACS holds them (PS3.18
8.7.3.5.2), so nothing is transcoded on the way.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable

import httpx
import pydicom
from python_multipart.multipart import MultipartParser

from cloudfilm.config import GatewaySettings, GatewaySource
from cloudfilm.gateway.bandwidth import Throttle
from cloudfilm.gateway.messages import message, since
from cloudfilm.gateway.pacs import PacsError

_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'


class Unauthorised(PacsError):
    """The DICOMweb server wants (new) credentials."""


def _boundary(content_type: str) -> str:
    for param in content_type.split(";")[1:]:
        name, _, value = param.strip().partition("=")
        if name.strip().lower() == "boundary":
            return value.strip().strip('"')
    raise PacsError(f"WADO-RS answer without a multipart boundary ({content_type!r})")


def retrieve_study(
    settings: GatewaySettings,
    source: GatewaySource,
    study_instance_uid: str,
    keep: Callable[[bytes, pydicom.Dataset], None],
    *,
    transport: httpx.BaseTransport | None = None,
) -> int:
    """GET ``{wado_url}/studies/{uid}`` and call ``keep(data, header)`` for every instance;
    returns how many instances the answer held."""
    if not source.wado_url:
        raise PacsError("retrieve = 'wado' needs the source's wado_url (its DICOMweb root)")
    url = f"{source.wado_url.rstrip('/')}/studies/{study_instance_uid}"
    with httpx.Client(timeout=settings.http_timeout, transport=transport) as http:
        return stream_study(http, url, study_instance_uid, keep, peer=source.wado_url)


def stream_study(
    http: httpx.Client,
    url: str,
    study_instance_uid: str,
    keep: Callable[[bytes, pydicom.Dataset], None],
    *,
    peer: str,
    headers: dict[str, str] | None = None,
    throttle: Throttle | None = None,
) -> int:
    """GET the WADO-RS study resource ``url`` on ``http`` and call ``keep(data, header)``
    for every part as it streams in; returns how many instances the answer held.

    Raises
    ------
    PacsError
        Not found, another status, a transport error or a part that is not DICOM.
    Unauthorised
        The server answered 401 (the caller may sign in again and repeat).
    """
    count = 0
    part = bytearray()
    failures: list[str] = []

    def on_part_begin() -> None:
        part.clear()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        part.extend(data[start:end])

    def on_part_end() -> None:
        nonlocal count
        data = bytes(part)
        part.clear()
        try:
            header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        except Exception as exc:
            failures.append(f"part {count + 1}: not DICOM ({type(exc).__name__})")
            return
        count += 1
        keep(data, header)

    start = time.monotonic()
    size = 0
    message("WADO-RS-RQ", direction="out", peer=peer, study_uid=study_instance_uid)
    try:
        with http.stream("GET", url, headers={"Accept": _ACCEPT, **(headers or {})}) as response:
            if response.status_code == 401:
                response.read()
                raise Unauthorised(f"WADO-RS answered 401 at {url}")
            if response.status_code == 404:
                raise PacsError(f"WADO-RS: {peer} has no study {study_instance_uid} (404)")
            if response.status_code != 200:
                response.read()
                raise PacsError(f"WADO-RS answered {response.status_code}: {response.text[:300]}")
            parser = MultipartParser(
                _boundary(response.headers.get("content-type", "")),
                {
                    "on_part_begin": on_part_begin,
                    "on_part_data": on_part_data,
                    "on_part_end": on_part_end,
                },
                max_header_count=16,
            )
            for chunk in response.iter_bytes():
                if throttle is not None:
                    throttle.take(len(chunk))
                size += len(chunk)
                parser.write(chunk)
            parser.finalize()
            message(
                "WADO-RS-RSP",
                direction="in",
                peer=peer,
                study_uid=study_instance_uid,
                status=response.status_code,
                parts=count,
                bytes=size,
                ms=since(start),
            )
    except httpx.HTTPError as exc:
        raise PacsError(f"WADO-RS from {url} failed: {type(exc).__name__}: {exc}") from exc
    if failures:
        raise PacsError("WADO-RS: " + "; ".join(failures[:5]))
    return count
