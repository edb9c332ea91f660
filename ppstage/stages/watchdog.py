"""Liveness deadlines with an injected clock (tests use a fake one).

A ``Watchdog`` is fed whenever something proves the peer alive (a message,
a keepalive, a result) and reports expiry; the actor that owns it decides
what expiry means (always: exit with a clear error, never wait on).
"""

from __future__ import annotations

import time
from statistics import median
from typing import Callable

Clock = Callable[[], float]


class Watchdog:
    def __init__(self, deadline_s: float, *, clock: Clock = time.monotonic) -> None:
        if deadline_s <= 0:
            raise ValueError("a watchdog deadline must be positive")
        self._clock = clock
        self.deadline_s = deadline_s
        self._last = clock()

    def feed(self) -> None:
        self._last = self._clock()

    def remaining(self) -> float:
        return self.deadline_s - (self._clock() - self._last)

    def expired(self) -> bool:
        return self.remaining() <= 0


class ResultDeadline:
    """Rank 0's deadline for the next owed result, derived from recent chunk times.

    deadline = max(minimum, factor x median of the last ``window`` chunk
    periods): generous enough for jitter, still seconds rather than the
    backend's 10-30 minute timeout.
    """

    def __init__(self, *, minimum_s: float, factor: float, window: int = 16) -> None:
        self.minimum_s = minimum_s
        self.factor = factor
        self._periods: list[float] = []
        self._window = window

    def observe(self, period_s: float) -> None:
        self._periods.append(period_s)
        del self._periods[: -self._window]

    def deadline_s(self) -> float:
        if not self._periods:
            return self.minimum_s
        return max(self.minimum_s, self.factor * median(self._periods))
