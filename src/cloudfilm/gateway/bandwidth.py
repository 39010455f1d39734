"""Bandwidth limit of one gateway (``gateway.bandwidth_bytes_per_second``): a token bucket.

The bucket is the generic cell rate algorithm's form of a token bucket: every ``take(n)``
moves a theoretical arrival time on by ``n / rate`` and sleeps while that time is more than
one burst ahead of the clock. Over any span of ``T`` seconds at most ``burst + rate × T``
bytes pass, however the callers interleave (threads share one bucket under a lock).
STOW-RS bodies are streamed through it in chunks of one burst, C-STORE objects are taken
whole before each request, and the send-back download is read through it (TCP flow control
then slows the archive down).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator


class Throttle:
    """At most ``rate`` bytes per second on average, in bursts of at most ``burst`` bytes."""

    def __init__(self, rate: float, *, burst: int | None = None) -> None:
        if rate <= 0:
            raise ValueError("the rate must be positive")
        self.rate = float(rate)
        self.burst = burst or max(1024, min(65536, int(rate) // 10))
        """Bytes that may pass at once: a tenth of a second's worth, 1 KiB to 64 KiB."""
        self._tolerance = self.burst / self.rate
        self._arrival = time.monotonic()
        self._lock = threading.Lock()

    def take(self, size: int) -> float:
        """Wait until ``size`` bytes may pass; returns the seconds waited."""
        if size <= 0:
            return 0.0
        with self._lock:
            now = time.monotonic()
            self._arrival = max(self._arrival, now) + size / self.rate
            wait = self._arrival - now - self._tolerance
        if wait > 0:
            time.sleep(wait)
            return wait
        return 0.0

    def chunks(self, pieces: Iterable[bytes]) -> Iterator[bytes]:
        """``pieces`` again, cut to at most one burst each, each released by the bucket."""
        for piece in pieces:
            view = memoryview(piece)
            for start in range(0, len(view), self.burst):
                chunk = bytes(view[start : start + self.burst])
                self.take(len(chunk))
                yield chunk


def throttle_for(rate: int | None) -> Throttle | None:
    """The bucket for ``gateway.bandwidth_bytes_per_second``; None when unlimited."""
    return Throttle(rate) if rate else None
