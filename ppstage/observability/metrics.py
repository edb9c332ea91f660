"""Per-chunk events recorded on rank 0 and the figures derived from them.

All times are rank-0 ``time.perf_counter`` values or stage-reported
durations, so no cross-host clock sync is needed. Pure: no I/O.

OverlapScore (issue 4): the median over chunks after warm-up of
``max(0, s0 + s1 - period) / min(s0, s1)`` with ``s0`` = stage-0 time of
the chunk (envelope build + decode) and ``s1`` = generator time (the longest
stage duration reported for the chunk). 1.0 means stage 0 and the generator
fully overlap; 0.0 means they run one after the other.

``ChunkLedger`` keeps rank 0's bookkeeping in constant memory: a ring of the
most recent chunks (the medians and OverlapScore of the summary are over it)
plus running totals over the whole run (counts, frames/s).
"""

from __future__ import annotations

from collections import OrderedDict
from statistics import median
from typing import Callable

import msgspec

RING_CHUNKS = 1024  # chunks rank 0 keeps whole; older ones live on only in the totals


class ChunkEvents(msgspec.Struct, kw_only=True):
    chunk_index: int
    call_id: int
    cache_epoch: int
    build_start: float = 0.0
    build_end: float = 0.0
    sent: float = 0.0
    received: float = 0.0
    queued: float = 0.0  # entered the decode queue (after ``received``: the put may wait)
    decode_start: float = 0.0
    decode_end: float = 0.0
    decode_wait: float = 0.0  # inside the decode span, waiting for the next envelope to go out
    emitted: float = 0.0
    stage_durations: tuple[float, ...] = ()
    output_digest: str | None = None
    outcome: str = "in_flight"  # emitted | stale_epoch | flushed | in_flight

    @property
    def s0(self) -> float:
        decode = self.decode_end - self.decode_start - self.decode_wait
        return (self.build_end - self.build_start) + decode

    @property
    def s1(self) -> float:
        return max(self.stage_durations, default=0.0)


class RunSummary(msgspec.Struct, kw_only=True):
    chunks_planned: int
    chunks_emitted: int
    frames_per_s: float
    median_period_ms: float | None  # None: fewer than 2 emitted chunks, so no period at all
    median_s0_ms: float
    median_s1_ms: float
    stage_median_ms: tuple[float, ...]
    max_in_flight: int
    max_decode_queue: int
    overlap_score: float
    dropped: dict[str, int]
    wall_s: float
    # Rank 0's event-loop thread CPU per emitted chunk (plan, validate, frame,
    # gate, log: the control plane), and as a share of the median period.
    loop_cpu_ms_per_chunk: float = 0.0
    loop_cpu_pct_of_period: float | None = 0.0  # None with no period


class RunTotals(msgspec.Struct, kw_only=True):
    """Running aggregates over every chunk of a run (constant size)."""

    planned: int = 0
    emitted: int = 0
    first_emitted: float = 0.0
    last_emitted: float = 0.0


class ChunkLedger:
    """Rank 0's per-chunk events: a ring of the last ``capacity`` chunks plus ``RunTotals``.

    ``open`` starts a chunk's record; ``finish`` sets its final outcome
    (emitted | stale_epoch | flushed), updates the totals and hands the record
    to ``on_final`` (rank 0 appends it to the chunk stream that ``ppstage demo``
    checks). The oldest chunks leave the ring once final, so a run of any
    length holds at most ``capacity`` records plus the few still in flight.
    """

    def __init__(self, capacity: int = RING_CHUNKS, on_final: Callable[[ChunkEvents], None] | None = None) -> None:
        if capacity < 1:
            raise ValueError("a ledger keeps at least one chunk")
        self.capacity = capacity
        self.on_final = on_final
        self.totals = RunTotals()
        self._ring: OrderedDict[int, ChunkEvents] = OrderedDict()

    def open(self, chunk_index: int, call_id: int, cache_epoch: int) -> ChunkEvents:
        ev = ChunkEvents(chunk_index=chunk_index, call_id=call_id, cache_epoch=cache_epoch)
        self._ring[chunk_index] = ev
        self.totals.planned += 1
        while len(self._ring) > self.capacity:
            oldest = next(iter(self._ring.values()))
            if oldest.outcome == "in_flight":
                break  # at most D_in + D_out chunks are in flight: the ring stays bounded
            self._ring.popitem(last=False)
        return ev

    def get(self, chunk_index: int) -> ChunkEvents | None:
        return self._ring.get(chunk_index)

    def finish(self, ev: ChunkEvents, outcome: str) -> None:
        ev.outcome = outcome
        if outcome == "emitted":
            t = self.totals
            t.emitted += 1
            if t.emitted == 1:
                t.first_emitted = ev.emitted
            t.last_emitted = ev.emitted
        if self.on_final is not None:
            self.on_final(ev)

    def unfinished(self) -> list[ChunkEvents]:
        return [e for e in self._ring.values() if e.outcome == "in_flight"]

    def recent(self) -> list[ChunkEvents]:
        """The ring's records in chunk order."""
        return sorted(self._ring.values(), key=lambda e: e.chunk_index)


def overlap_score(events: list[ChunkEvents], *, warmup: int = 2) -> float:
    """OverlapScore over emitted chunks after ``warmup`` (see module docstring)."""
    done = [e for e in events if e.outcome == "emitted"]
    scores = []
    for prev, cur in zip(done, done[1:]):
        if cur.chunk_index < done[0].chunk_index + warmup:
            continue
        period = cur.emitted - prev.emitted
        s0, s1 = cur.s0, cur.s1
        if min(s0, s1) <= 0:
            continue
        scores.append(max(0.0, s0 + s1 - period) / min(s0, s1))
    return float(median(scores)) if scores else 0.0


def summarize(
    events: list[ChunkEvents],
    *,
    frames_per_chunk: int,
    max_in_flight: int,
    max_decode_queue: int,
    dropped: dict[str, int],
    wall_s: float,
    warmup: int = 2,
    totals: RunTotals | None = None,
    loop_cpu_s: float = 0.0,
) -> RunSummary:
    """Figures of a run. ``events`` may be only the recent ring: then ``totals``
    carries the counts and frames/s over the whole run, and the medians are
    over the ring."""
    done = [e for e in events if e.outcome == "emitted"]
    if totals is None:
        totals = RunTotals(
            planned=len(events),
            emitted=len(done),
            first_emitted=done[0].emitted if done else 0.0,
            last_emitted=done[-1].emitted if done else 0.0,
        )
    # Warm-up periods are skipped only while the ring still holds the run's start.
    skip = warmup if totals.emitted == len(done) else 0
    periods = [b.emitted - a.emitted for a, b in zip(done, done[1:])]
    # A run too short to leave a period after the warm-up still has its periods;
    # a run with fewer than 2 emitted chunks has none (None, printed n/a, never 0.0).
    periods = periods[skip:] or periods
    n_stages = max((len(e.stage_durations) for e in done), default=0)
    stage_medians = tuple(
        1e3 * median([e.stage_durations[i] for e in done if len(e.stage_durations) > i])
        for i in range(n_stages)
    )
    span = totals.last_emitted - totals.first_emitted if totals.emitted > 1 else 0.0
    period_ms = 1e3 * median(periods) if periods else None
    cpu_ms = 1e3 * loop_cpu_s / totals.emitted if totals.emitted else 0.0
    return RunSummary(
        chunks_planned=totals.planned,
        chunks_emitted=totals.emitted,
        frames_per_s=(frames_per_chunk * (totals.emitted - 1) / span) if span > 0 else 0.0,
        median_period_ms=period_ms,
        median_s0_ms=1e3 * median([e.s0 for e in done]) if done else 0.0,
        median_s1_ms=1e3 * median([e.s1 for e in done]) if done else 0.0,
        stage_median_ms=stage_medians,
        max_in_flight=max_in_flight,
        max_decode_queue=max_decode_queue,
        overlap_score=overlap_score(events, warmup=warmup),
        dropped=dict(dropped),
        wall_s=wall_s,
        loop_cpu_ms_per_chunk=cpu_ms,
        loop_cpu_pct_of_period=100.0 * cpu_ms / period_ms if period_ms else None,
    )
