"""A per-caller sliding-window rate limit on generations, for every way in.

Keyed on a caller key (`masuka.studio.Caller.key`: the login name when the app has
a password, else the client's address, else the browser session).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from typing import Callable

log = logging.getLogger(__name__)

WINDOW_S = 60.0
_SWEEP_AT = 1024  # keys held before idle ones are swept out


class RateLimited(ValueError):
    """Too many generations in the window; the message names the limit and the wait."""


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

    def check(self, key: str) -> None:
        """Count one generation for this caller (`masuka.studio.Caller.key`), or raise `RateLimited`."""
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
