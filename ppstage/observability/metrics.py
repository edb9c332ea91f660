"""Per-chunk events recorded on rank 0 and the figures derived from them.

All times are rank-0 ``time.perf_counter`` values or stage-reported
durations, so no cross-host clock sync is needed. Pure: no I/O.

OverlapScore (issue 4): the median over chunks after warm-up of
``max(0, s0 + s1 - period) / min(s0, s1)`` with ``s0`` = stage-0 time of
the chunk (envelope build + decode) and ``s1`` = generator time (the longest
stage duration reported for the chunk). 1.0 means stage 0 and the generator
fully overlap; 0.0 means they run one after the other.
"""

from __future__ import annotations

from statistics import median

import msgspec


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
    median_period_ms: float
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
    loop_cpu_pct_of_period: float = 0.0


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
    loop_cpu_s: float = 0.0,
) -> RunSummary:
    done = [e for e in events if e.outcome == "emitted"]
    periods = [b.emitted - a.emitted for a, b in zip(done, done[1:])][warmup:]
    n_stages = max((len(e.stage_durations) for e in done), default=0)
    stage_medians = tuple(
        1e3 * median([e.stage_durations[i] for e in done if len(e.stage_durations) > i])
        for i in range(n_stages)
    )
    span = done[-1].emitted - done[0].emitted if len(done) > 1 else 0.0
    period_ms = 1e3 * median(periods) if periods else 0.0
    cpu_ms = 1e3 * loop_cpu_s / len(done) if done else 0.0
    return RunSummary(
        chunks_planned=len(events),
        chunks_emitted=len(done),
        frames_per_s=(frames_per_chunk * (len(done) - 1) / span) if span > 0 else 0.0,
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
        loop_cpu_pct_of_period=100.0 * cpu_ms / period_ms if period_ms > 0 else 0.0,
    )
