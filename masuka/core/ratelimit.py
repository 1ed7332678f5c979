"""A per-user sliding-window rate limit on generations.

Keyed on the request: the login name when the app has a password, else the
client's address, else the browser session.  Through a Gradio share link every
visitor reaches the app from the tunnel's local address, so without a password
they would all share one budget; a share link always has a password here.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from typing import Any, Callable

log = logging.getLogger(__name__)

WINDOW_S = 60.0
_SWEEP_AT = 1024  # keys held before idle ones are swept out


class RateLimited(ValueError):
    """Too many generations in the window; the message names the limit and the wait."""


def request_key(request: Any) -> str:
    """Who is asking: `user:<name>`, `ip:<address>` or `session:<hash>`."""
    if request is None:
        return "local"
    username = getattr(request, "username", None)
    if username:
        return f"user:{username}"
    client = getattr(request, "client", None)
    host = getattr(client, "host", None) if client is not None else None
    if host:
        return f"ip:{host}"
    session = getattr(request, "session_hash", None)
    return f"session:{session}" if session else "local"


class RateLimiter:
    """At most `per_minute` accepted generations per key in any 60-second window."""

    def __init__(self, per_minute: int, *, window_s: float = WINDOW_S, clock: Callable[[], float] = time.monotonic):
        if per_minute < 1:
            raise ValueError(f"rate limit must be at least 1 per minute, got {per_minute}")
        self.per_minute = per_minute
        self.window_s = window_s
        self._clock = clock
        self._hits: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def check(self, request: Any) -> None:
        """Count one generation for this request's user, or raise `RateLimited`."""
        key = request_key(request)
        now = self._clock()
        with self._lock:
            if len(self._hits) >= _SWEEP_AT:
                self._sweep(now)
            hits = self._hits.setdefault(key, deque())
            self._expire(hits, now)
            if len(hits) >= self.per_minute:
                wait = max(1, math.ceil(hits[0] + self.window_s - now))
                log.info("rate limit reached for %s (%d per minute)", key, self.per_minute)
                raise RateLimited(
                    f"rate limit reached: at most {self.per_minute} generations per minute per user "
                    f"(set by the host with --rate-limit / MASUKA_RATE_LIMIT); try again in {wait} s"
                )
            hits.append(now)

    def _expire(self, hits: deque[float], now: float) -> None:
        while hits and hits[0] <= now - self.window_s:
            hits.popleft()

    def _sweep(self, now: float) -> None:
        for key in list(self._hits):
            self._expire(self._hits[key], now)
            if not self._hits[key]:
                del self._hits[key]


def limiter_for(per_minute: int) -> RateLimiter | None:
    """The limiter for a `--rate-limit` setting; None when it is 0 (off)."""
    return RateLimiter(per_minute) if per_minute > 0 else None
