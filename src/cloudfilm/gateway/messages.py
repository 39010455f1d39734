"""The message log: one JSON line per DICOM or HTTP message the gateway sends or receives.

Written to ``messages.log`` in ``gateway.data_dir`` (rotated at 10 MB, 5 files kept) for
the run and message logs the procurement asks for. Each line names the peer, the message
(association, C-FIND, C-MOVE, C-GET, C-STORE, STOW-RS, WADO-RS), its direction, status,
sizes and duration, and identifies objects by UID only: no patient name, patient ID or
any other demographic ever reaches this file (the callers pass UIDs and counts, never
datasets).
"""

from __future__ import annotations

import json
import logging
import time
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import Any

LOGGER_NAME = "cloudfilm.gateway.messages"
_logger = logging.getLogger(LOGGER_NAME)
_logger.propagate = False  # not in the application log: its own file only


class _JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = record.args if isinstance(record.args, dict) else {}
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "msg": record.msg,
            **fields,
        }
        return json.dumps(line, ensure_ascii=False, default=str)


def open_message_log(data_dir: Path, *, max_bytes: int = 10_000_000, backups: int = 5) -> Path:
    """Send message records to ``data_dir/messages.log`` (idempotent per path)."""
    path = (data_dir / "messages.log").resolve()
    for handler in _logger.handlers:
        if isinstance(handler, RotatingFileHandler) and Path(handler.baseFilename) == path:
            return path
    data_dir.mkdir(parents=True, exist_ok=True)
    handler = RotatingFileHandler(path, maxBytes=max_bytes, backupCount=backups, delay=True)
    handler.setFormatter(_JSONFormatter())
    _logger.addHandler(handler)
    _logger.setLevel(logging.INFO)
    return path


def close_message_log(data_dir: Path) -> None:
    path = (data_dir / "messages.log").resolve()
    for handler in list(_logger.handlers):
        if isinstance(handler, RotatingFileHandler) and Path(handler.baseFilename) == path:
            _logger.removeHandler(handler)
            handler.close()


def message(kind: str, /, **fields: Any) -> None:
    """Record one message: ``kind`` such as ``C-MOVE-RSP``; fields are UIDs, AE titles,
    statuses, counts, sizes and durations (never demographics)."""
    if _logger.handlers:
        _logger.info(kind, fields)


def since(start: float) -> float:
    """Milliseconds since ``start`` (``time.monotonic()``), rounded for the log."""
    return round((time.monotonic() - start) * 1000, 1)
