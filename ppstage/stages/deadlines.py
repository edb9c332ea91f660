"""Liveness deadlines, derived from recent history (the actors decide what expiry means:
always a clear error naming the rank and the phase, never waiting on).

Two regimes (SPEC section 7, B16):

- **steady**: ``max(minimum, factor x median of the last `window` durations)``:
  generous enough for jitter, still seconds rather than the backend's 10-30
  minute timeout;
- **cold**: the first chunk of a run, and the first chunk after a step-list or
  geometry change (warm-up, compilation, allocator growth) get the separate
  ``warmup_s`` deadline, and their durations are kept out of the steady history
  (one slow cold sample must not loosen the steady deadline).

Between the two, a steady chunk that comes before any steady duration is known
(the first warm chunk) would get the bare ``minimum``, although the cold chunk
just showed what the phase costs. Until the first steady duration arrives, the
steady deadline falls back to ``factor x median`` of the cold durations, capped
at ``warmup_s`` (a warm chunk never gets more than a cold one) and never below
``minimum``. A cold duration includes the warm-up, so this over-estimates:
generous for one chunk, then the steady history replaces it.
"""

from __future__ import annotations

from statistics import median
from typing import Hashable


class _History:
    """Recent steady and cold durations of one deadline, and the steady limit they give."""

    __slots__ = ("minimum_s", "factor", "cap_s", "_window", "_steady", "_cold")

    def __init__(self, *, minimum_s: float, factor: float, cap_s: float, window: int) -> None:
        self.minimum_s = minimum_s
        self.factor = factor
        self.cap_s = cap_s  # bound of the cold fallback (the warm-up deadline); 0: no fallback
        self._window = window
        self._steady: list[float] = []
        self._cold: list[float] = []

    def observe(self, seconds: float, cold: bool) -> None:
        durations = self._cold if cold else self._steady
        durations.append(seconds)
        del durations[: -self._window]

    def steady_s(self) -> float:
        if self._steady:
            return max(self.minimum_s, self.factor * median(self._steady))
        if self._cold and self.cap_s > 0:
            return max(self.minimum_s, min(self.factor * median(self._cold), self.cap_s))
        return self.minimum_s


class ResultDeadline:
    """Rank 0's deadline for the next owed result, derived from recent chunk times.

    deadline = max(minimum, factor x median of the last ``window`` chunk
    periods); ``warmup_s`` (if given) is the floor while the owed chunk is cold.
    Until a steady period is known, ``factor x median`` of the cold chunks'
    owed times stands in for it (capped at ``warmup_s``; no fallback without it).
    """

    def __init__(self, *, minimum_s: float, factor: float, window: int = 16, warmup_s: float = 0.0) -> None:
        self.minimum_s = minimum_s
        self.factor = factor
        self.warmup_s = warmup_s
        self._history = _History(minimum_s=minimum_s, factor=factor, cap_s=warmup_s, window=window)

    def observe(self, period_s: float, *, cold: bool = False) -> None:
        """Record a steady chunk period, or (``cold``) how long a cold chunk's result was owed."""
        self._history.observe(period_s, cold)

    def deadline_s(self, cold: bool = False) -> float:
        steady = self._history.steady_s()
        return max(steady, self.warmup_s) if cold else steady


class PhaseDeadline:
    """The deadline of one named phase (decode, sink, generator call, ...).

    Parameters
    ----------
    name:
        The phase as reports name it (``"decode"``, ``"generator call"``).
    minimum_s, factor, window:
        Steady deadline = ``max(minimum_s, factor x median)`` of the last
        ``window`` steady durations. Until one is known: the same over the cold
        durations, at most ``warmup_s``; ``minimum_s`` before any duration.
    warmup_s:
        The deadline of a cold chunk's phase (never below the steady one).
    """

    def __init__(self, name: str, *, minimum_s: float, factor: float, warmup_s: float, window: int = 16) -> None:
        self.name = name
        self.minimum_s = minimum_s
        self.factor = factor
        self.warmup_s = warmup_s
        self._history = _History(minimum_s=minimum_s, factor=factor, cap_s=warmup_s, window=window)

    def observe(self, duration_s: float, *, cold: bool = False) -> None:
        """Record a completed phase; cold durations only stand in until a steady one is known."""
        self._history.observe(duration_s, cold)

    def deadline_s(self, *, cold: bool = False) -> float:
        steady = self._history.steady_s()
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
