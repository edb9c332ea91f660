"""Fault injection from a real log: re-feed rank 0's recorded result stream into a fresh ``EpochGate``.

The stream is rebuilt in the order rank 0 lived it: every plan registration
(``PlanRecord`` -> ``gate.expect``) and every result admission (``GateRecord``
-> ``gate.admit`` of the recorded ``ChunkResult``). The unperturbed stream
must reproduce the recorded verdicts; then one perturbation is applied:

| mode | perturbation | expected |
|---|---|---|
| ``duplicate`` | every result delivered twice | each copy dropped (``duplicate``, or ``stale_epoch`` after a cut); emitted stream unchanged |
| ``delay`` | every result delivered after ``DELAY_PLANS`` more plans were registered | results overtaken by a hard cut dropped (``stale_epoch``), never emitted; everything else unchanged (B8) |
| ``reorder`` | the first two consecutive results of one epoch swapped | ``OutOfOrderResult`` (B9) |
| ``stale`` | after each hard cut, the previous epoch's last result delivered again | dropped (``stale_epoch``); emitted stream unchanged |
"""

from __future__ import annotations

from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from typing import Literal

import msgspec

from protocol import ChunkResult
from protocol.msglog import GateRecord, PlanRecord

from ppstage.core.gate import EpochGate
from ppstage.core.plan import ChunkPlan
from ppstage.errors import GateError
from ppstage.replay.errors import ReplayError
from ppstage.replay.runlog import RankLog

Mode = Literal["duplicate", "delay", "reorder", "stale"]
MODES: tuple[str, ...] = ("duplicate", "delay", "reorder", "stale")
DELAY_PLANS = 2  # the runtime's default D_in: a result later than this is late indeed

Event = tuple[str, object]  # ("expect", ChunkPlan) | ("admit", ChunkResult)


@dataclass
class Drop:
    call_id: int
    chunk_index: int
    cache_epoch: int
    reason: str


@dataclass
class InjectReport:
    mode: str
    baseline: list[int]  # accepted call_ids of the recorded stream
    emitted: list[int]  # accepted call_ids of the perturbed stream
    drops: list[Drop] = field(default_factory=list)
    baseline_drops: Counter = field(default_factory=Counter)
    error: GateError | None = None
    overtaken: list[int] = field(default_factory=list)  # delay: results a cut made stale

    @property
    def drop_counts(self) -> Counter:
        return Counter(d.reason for d in self.drops)

    @property
    def unchanged(self) -> bool:
        """The perturbed stream emits what the recorded one did (less what a cut legitimately overtook)."""
        expected = [c for c in self.baseline if c not in self.overtaken]
        return self.error is None and self.emitted == expected


def recorded_stream(s0: RankLog) -> list[Event]:
    """Rank 0's gate inputs, in the order it saw them."""
    if s0.role != "stage0":
        raise ReplayError(f"{s0.path}: result streams are in rank 0's log, this is {s0.role}'s")
    results: dict[int, deque[ChunkResult]] = defaultdict(deque)
    for _, m in s0.decoded("recv", "RESULT"):
        results[m.call_id].append(m)  # type: ignore[union-attr]
    events: list[Event] = []
    for r in s0.records:
        if isinstance(r, PlanRecord):
            events.append(("expect", msgspec.msgpack.decode(r.plan, type=ChunkPlan)))
        elif isinstance(r, GateRecord) and r.verdict not in ("emitted", "flushed"):
            queue = results.get(r.call_id)
            if queue:
                events.append(("admit", queue.popleft()))
    if not any(kind == "admit" for kind, _ in events):
        raise ReplayError(f"{s0.path}: no results recorded, nothing to re-feed")
    return events


def feed(events: list[Event]) -> tuple[list[int], list[Drop], GateError | None]:
    gate = EpochGate()
    accepted: list[int] = []
    drops: list[Drop] = []
    for kind, item in events:
        try:
            if kind == "expect":
                gate.expect(item)  # type: ignore[arg-type]
                continue
            verdict = gate.admit(item)  # type: ignore[arg-type]
        except GateError as exc:
            return accepted, drops, exc
        r: ChunkResult = item  # type: ignore[assignment]
        if verdict.accepted:
            accepted.append(r.call_id)
        else:
            drops.append(Drop(r.call_id, r.chunk_index, r.cache_epoch, verdict.reason))
    return accepted, drops, None


def perturb(events: list[Event], mode: str) -> tuple[list[Event], list[int]]:
    """The perturbed stream, and (delay) the call_ids of results a hard cut overtakes."""
    if mode == "duplicate":
        out: list[Event] = []
        for ev in events:
            out.append(ev)
            if ev[0] == "admit":
                out.append(ev)
        return out, []
    if mode == "delay":
        out, held, overtaken = [], [], []
        for ev in events:
            if ev[0] == "admit":
                held.append([DELAY_PLANS, ev])
                continue
            out.append(ev)
            plan: ChunkPlan = ev[1]  # type: ignore[assignment]
            for h in held:
                h[0] -= 1
                if plan.init_cache and h[1][1].cache_epoch < plan.cache_epoch:  # type: ignore[union-attr]
                    if h[1][1].call_id not in overtaken:  # type: ignore[union-attr]
                        overtaken.append(h[1][1].call_id)  # type: ignore[union-attr]
            while held and held[0][0] <= 0:
                out.append(held.pop(0)[1])
        out.extend(h[1] for h in held)
        return out, overtaken
    if mode == "reorder":
        admits = [i for i, ev in enumerate(events) if ev[0] == "admit"]
        for a, b in zip(admits, admits[1:]):
            ra, rb = events[a][1], events[b][1]
            if ra.cache_epoch == rb.cache_epoch and rb.call_id > ra.call_id:  # type: ignore[union-attr]
                # b's plan must be registered before b arrives: move a to just after b.
                out = events[:a] + events[a + 1 : b + 1] + [events[a]] + events[b + 1 :]
                return out, []
        raise ReplayError("no two results of one epoch to reorder (record at least two chunks)")
    if mode == "stale":
        out, last_of_epoch, injected = [], {}, False
        for ev in events:
            out.append(ev)
            if ev[0] == "admit":
                last_of_epoch[ev[1].cache_epoch] = ev  # type: ignore[union-attr]
            elif ev[1].init_cache:  # type: ignore[union-attr]
                old = [e for epoch, e in last_of_epoch.items() if epoch < ev[1].cache_epoch]  # type: ignore[union-attr]
                if old:
                    out.append(old[-1])
                    injected = True
        if not injected:
            raise ReplayError("the log has no hard cut after a result: nothing can be stale (record with --cut-at)")
        return out, []
    raise ReplayError(f"unknown injection {mode!r}; choose from {', '.join(MODES)}")


def inject(s0: RankLog, mode: str) -> InjectReport:
    """Re-feed the recorded stream, check it reproduces the log, then feed it perturbed."""
    events = recorded_stream(s0)
    baseline, base_drops, base_error = feed(events)
    recorded = [g.call_id for g in s0.gates if g.verdict == "accepted"]
    if base_error is not None or baseline != recorded:
        raise ReplayError(
            f"re-feeding the recorded stream does not reproduce the log's verdicts "
            f"(accepted {baseline}, log says {recorded}; error: {base_error})"
        )
    perturbed, overtaken = perturb(events, mode)
    emitted, drops, error = feed(perturbed)
    # Report only the drops the perturbation caused (the recorded run may have had its own).
    remaining = Counter((d.call_id, d.reason) for d in base_drops)
    caused: list[Drop] = []
    for d in drops:
        if remaining[(d.call_id, d.reason)] > 0:
            remaining[(d.call_id, d.reason)] -= 1
        else:
            caused.append(d)
    return InjectReport(mode, baseline, emitted, caused, Counter(d.reason for d in base_drops), error, overtaken)
