"""Rank 0's liveness deadline for owed results (the actor decides what expiry means:
always a clear error, never waiting on)."""

from __future__ import annotations

from statistics import median


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
