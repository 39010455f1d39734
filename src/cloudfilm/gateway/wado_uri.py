"""Retrieval by WADO-URI (PS3.18 9, "Retrieve DICOM objects over HTTP GET"), one request
per instance.

WADO-URI names one object by its study, series and SOP Instance UIDs, so the instances of
the study are listed first: by QIDO-RS Search For Instances (PS3.18 10.6) when the source
has a DICOMweb root (``wado_url``), else by C-FIND at SERIES and IMAGE level. Each object
is then requested with ``requestType=WADO&...&contentType=application/dicom`` and kept in
the spool by :meth:`GatewayQueue.accept` (durable before its row) exactly like the other
methods. Instances already held are not asked for again, so a retry after a crash or a
partial failure fetches only what is missing.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Collection
from urllib.parse import urlencode

import httpx
import pydicom

from cloudfilm.config import GatewaySettings, GatewaySource
from cloudfilm.gateway.messages import message, since
from cloudfilm.gateway.pacs import PacsClient, PacsError

_SERIES_UID = "0020000E"
_SOP_UID = "00080018"


def list_instances(
    settings: GatewaySettings,
    source: GatewaySource,
    study_instance_uid: str,
    http: httpx.Client,
) -> list[tuple[str, str]]:
    """(Series Instance UID, SOP Instance UID) of every instance the PACS holds for the study."""
    if not source.wado_url:
        return PacsClient(settings, source).find_instances(study_instance_uid)
    url = f"{source.wado_url.rstrip('/')}/studies/{study_instance_uid}/instances"
    start = time.monotonic()
    try:
        response = http.get(
            url,
            params={"includefield": f"{_SERIES_UID},{_SOP_UID}"},
            headers={"Accept": "application/dicom+json"},
        )
    except httpx.HTTPError as exc:
        raise PacsError(f"QIDO-RS {url} failed: {type(exc).__name__}: {exc}") from exc
    message(
        "QIDO-RS",
        direction="in",
        peer=source.wado_url,
        study_uid=study_instance_uid,
        status=response.status_code,
        ms=since(start),
    )
    if response.status_code in (204, 404):
        return []
    if response.status_code != 200:
        raise PacsError(f"QIDO-RS answered {response.status_code}: {response.text[:300]}")
    out: list[tuple[str, str]] = []
    try:
        for item in response.json():
            series = item[_SERIES_UID]["Value"][0]
            sop = item[_SOP_UID]["Value"][0]
            out.append((str(series), str(sop)))
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise PacsError(f"QIDO-RS answer not understood: {type(exc).__name__}: {exc}") from exc
    return out


def retrieve_study(
    settings: GatewaySettings,
    source: GatewaySource,
    study_instance_uid: str,
    keep: Callable[[bytes, pydicom.Dataset], None],
    *,
    held: Collection[str] = (),
    transport: httpx.BaseTransport | None = None,
) -> int:
    """Fetch every instance of the study not in ``held``; ``keep(data, header)`` each one.

    Returns how many instances the PACS listed (the completeness check's expected count).

    Raises
    ------
    PacsError
        The listing failed, or some instances could not be fetched (the others are kept):
        the reason names the first of them and the PACS's answer.
    """
    if not source.wado_uri_url:
        raise PacsError("retrieve = 'wado-uri' needs the source's wado_uri_url")
    url = source.wado_uri_url
    failures: list[str] = []
    with httpx.Client(timeout=settings.http_timeout, transport=transport) as http:
        instances = list_instances(settings, source, study_instance_uid, http)
        for series_uid, sop_uid in instances:
            if sop_uid in held:
                continue
            params = {
                "requestType": "WADO",
                "studyUID": study_instance_uid,
                "seriesUID": series_uid,
                "objectUID": sop_uid,
                "contentType": "application/dicom",
            }
            # "/" stays literal in the query (RFC 3986 3.4 allows it): some PACS (Orthanc's
            # DICOMweb plugin 1.x) do not decode contentType=application%2Fdicom.
            query = urlencode(params, safe="/")
            start = time.monotonic()
            try:
                response = http.get(
                    f"{url}{'&' if '?' in url else '?'}{query}",
                    headers={"Accept": "application/dicom"},
                )
            except httpx.HTTPError as exc:
                raise PacsError(f"WADO-URI {url} failed: {type(exc).__name__}: {exc}") from exc
            message(
                "WADO-URI",
                direction="in",
                peer=url,
                study_uid=study_instance_uid,
                sop_uid=sop_uid,
                status=response.status_code,
                bytes=len(response.content),
                ms=since(start),
            )
            if response.status_code != 200:
                failures.append(f"{sop_uid} answered {response.status_code}")
                continue
            data = response.content
            try:
                header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
                received = str(header.SOPInstanceUID)
            except Exception as exc:
                failures.append(f"{sop_uid} is not DICOM ({type(exc).__name__})")
                continue
            if received != sop_uid:
                failures.append(f"{sop_uid} answered with another object ({received})")
                continue
            keep(data, header)
    if failures:
        got = len(instances) - len(failures)
        raise PacsError(
            f"incomplete: {got} of {len(instances)} instances retrieved by WADO-URI; "
            + "; ".join(failures[:5])
            + (f"; {len(failures) - 5} more" if len(failures) > 5 else "")
        )
    return len(instances)
