"""Media-type headers (RFC 9110 8.3.1): ``type/subtype; name=value; ...``."""

from __future__ import annotations


def media_type_parameters(header: str) -> tuple[str, dict[str, str]]:
    """``multipart/related; type="application/dicom"`` → (``multipart/related``,
    {``type``: ``application/dicom``}); type and parameter names in lower case."""
    media, *rest = header.split(";")
    params = {}
    for item in rest:
        name, _, value = item.partition("=")
        params[name.strip().lower()] = value.strip().strip('"')
    return media.strip().lower(), params
