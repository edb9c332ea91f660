"""Liveness deadlines, derived from recent history (the actors decide what expiry means:
always a clear error naming the rank and the phase, never waiting on).

Two regimes (SPEC section 7, B16):

- **steady**: ``max(minimum, factor x median of the last `window` durations)``:
  generous enough for jitter, still seconds rather than the backend's 10-30
  minute timeout;
- **cold**: the first chunk of a run, and the first chunk after a step-list or
  geometry change (warm-up, compilation, allocator growth) get the separate
  ``warmup_s`` deadline, and their durations are kept out of the history (one
  slow cold sample must not loosen the steady deadline).
"""

from __future__ import annotations

from statistics import median
from typing import Hashable


class ResultDeadline:
    """Rank 0's deadline for the next owed result, derived from recent chunk times.

    deadline = max(minimum, factor x median of the last ``window`` chunk
    periods); ``warmup_s`` (if given) is the floor while the owed chunk is cold.
    """

    def __init__(self, *, minimum_s: float, factor: float, window: int = 16, warmup_s: float = 0.0) -> None:
        self.minimum_s = minimum_s
        self.factor = factor
        self.warmup_s = warmup_s
        self._periods: list[float] = []
        self._window = window

    def observe(self, period_s: float) -> None:
        self._periods.append(period_s)
        del self._periods[: -self._window]

    def deadline_s(self, cold: bool = False) -> float:
        steady = self.minimum_s if not self._periods else max(self.minimum_s, self.factor * median(self._periods))
        return max(steady, self.warmup_s) if cold else steady


class PhaseDeadline:
    """The deadline of one named phase (decode, sink, generator call, ...).

    Parameters
    ----------
    name:
        The phase as reports name it (``"decode"``, ``"generator call"``).
    minimum_s, factor, window:
        Steady deadline = ``max(minimum_s, factor x median)`` of the last
        ``window`` steady durations (``minimum_s`` until one is known).
    warmup_s:
        The deadline of a cold chunk's phase (never below the steady one).
    """

    def __init__(self, name: str, *, minimum_s: float, factor: float, warmup_s: float, window: int = 16) -> None:
        self.name = name
        self.minimum_s = minimum_s
        self.factor = factor
        self.warmup_s = warmup_s
        self._window = window
        self._durations: list[float] = []

    def observe(self, duration_s: float, *, cold: bool = False) -> None:
        """Record a completed phase; cold durations never enter the history."""
        if cold:
            return
        self._durations.append(duration_s)
        del self._durations[: -self._window]

    def deadline_s(self, *, cold: bool = False) -> float:
        steady = self.minimum_s
        if self._durations:
            steady = max(self.minimum_s, self.factor * median(self._durations))
        return max(steady, self.warmup_s) if cold else steady


class WarmupTracker:
    """Which chunks are cold: the first one, and the first after its key changed.

    The key is whatever changes the work's shape: the step list and the latent
    geometry (``(steps, frames, height, width)``).
    """

    def __init__(self) -> None:
        self._last: Hashable | None = None

    def enter(self, key: Hashable) -> bool:
        """Note the next chunk's key; True if that chunk is cold."""
        cold = key != self._last
        self._last = key
        return cold


class Running:
    """One phase in progress: what, which chunk, since when, until when (monotonic s)."""

    __slots__ = ("phase", "chunk_index", "started", "deadline_s")

    def __init__(self, phase: str, chunk_index: int, started: float, deadline_s: float) -> None:
        self.phase = phase
        self.chunk_index = chunk_index
        self.started = started
        self.deadline_s = deadline_s

    def overdue(self, now: float) -> bool:
        return now - self.started > self.deadline_s
