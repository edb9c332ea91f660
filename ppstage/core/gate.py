"""``EpochGate``: which results rank 0 may decode and emit (SPEC section 6).

Rank 0 registers every chunk plan it sends (``expect``) and passes every
result it receives through ``admit``. A result is accepted only if it is of
the current epoch, is the oldest outstanding call, is ok, reports the planned
call count and carries ``latents_out``. An error result is checked first,
whatever its ids or epoch: a stage that sent one has failed and is exiting,
so its cause is the stream's cause (never hidden as "never planned" or
dropped as stale). Results of an older epoch and duplicates are *dropped* (counted, idempotent: the same stale result twice
changes nothing but the counter). Anything else raises a ``GateError``.
Pure: no I/O, no clocks.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Literal

import msgspec

from protocol import ChunkResult

from ppstage.errors import (
    CallCountMismatch,
    FutureResult,
    GateError,
    MissingTensor,
    OutOfOrderResult,
    RemoteStageError,
)
from ppstage.core.plan import ChunkPlan

DropReason = Literal["stale_epoch", "duplicate"]


class Outstanding(msgspec.Struct, frozen=True):
    call_id: int
    chunk_index: int
    cache_epoch: int
    expected_generator_calls: int


class Verdict(msgspec.Struct, frozen=True):
    accepted: bool
    reason: str
    plan: Outstanding | None = None


class EpochGate:
    def __init__(self) -> None:
        self._epoch = -1
        self._outstanding: OrderedDict[int, Outstanding] = OrderedDict()
        self._last_accepted_call = -1
        self.accepted = 0
        self.dropped: Counter[str] = Counter()

    @property
    def epoch(self) -> int:
        return self._epoch

    def in_flight(self) -> int:
        """Results still owed by the pipeline, of any epoch (each must be received)."""
        return len(self._outstanding)

    def in_flight_current(self) -> int:
        return sum(1 for o in self._outstanding.values() if o.cache_epoch == self._epoch)

    def expect(self, plan: ChunkPlan) -> None:
        """Register a plan that is about to be sent; a hard cut moves the epoch."""
        if plan.init_cache:
            if plan.cache_epoch <= self._epoch:
                raise GateError(
                    f"hard cut to epoch {plan.cache_epoch} not after {self._epoch}",
                    call_id=plan.call_id,
                    chunk_index=plan.chunk_index,
                    cache_epoch=plan.cache_epoch,
                )
            self._epoch = plan.cache_epoch
        elif plan.cache_epoch != self._epoch:
            raise GateError(
                f"plan of epoch {plan.cache_epoch} while the gate is at {self._epoch}",
                call_id=plan.call_id,
                chunk_index=plan.chunk_index,
                cache_epoch=plan.cache_epoch,
            )
        if self._outstanding and plan.call_id <= next(reversed(self._outstanding)):
            raise GateError("plans must be registered in call_id order", call_id=plan.call_id)
        self._outstanding[plan.call_id] = Outstanding(
            plan.call_id, plan.chunk_index, plan.cache_epoch, plan.expected_generator_calls
        )

    def admit(self, result: ChunkResult) -> Verdict:
        """Accept or drop ``result``; raise ``GateError`` for a broken contract."""
        ids = dict(
            call_id=result.call_id, chunk_index=result.chunk_index, cache_epoch=result.cache_epoch
        )
        if not result.ok:
            # Terminal whatever the ids: the stage is gone. The head call stays
            # outstanding, so nothing after it may be accepted either.
            raise RemoteStageError(f"stage error: {result.error}", **ids)
        if result.cache_epoch < self._epoch:
            owed = self._outstanding.get(result.call_id)
            if owed is not None and owed.cache_epoch == result.cache_epoch:
                del self._outstanding[result.call_id]
            return self._drop("stale_epoch")
        if result.cache_epoch > self._epoch:
            raise FutureResult(f"result from future epoch (gate at {self._epoch})", **ids)
        if result.call_id <= self._last_accepted_call and result.call_id not in self._outstanding:
            return self._drop("duplicate")
        current = [o for o in self._outstanding.values() if o.cache_epoch == self._epoch]
        if not current:
            raise FutureResult("result for a call that was never planned", **ids)
        head = current[0]
        if result.call_id != head.call_id:
            if result.call_id in self._outstanding:
                raise OutOfOrderResult(f"result arrived before call {head.call_id}'s", **ids)
            raise FutureResult("result for a call that was never planned", **ids)
        if result.chunk_index != head.chunk_index:
            raise GateError(f"chunk_index differs from the plan's {head.chunk_index}", **ids)
        # A contract failure of the head call is terminal for the stream, so it
        # stays outstanding: nothing after it may be accepted either.
        if result.observed_generator_calls != head.expected_generator_calls:
            raise CallCountMismatch(
                f"observed {result.observed_generator_calls} generator calls, "
                f"planned {head.expected_generator_calls}",
                **ids,
            )
        if [t.name for t in result.tensors] != ["latents_out"]:
            raise MissingTensor("ok result without latents_out", **ids)
        del self._outstanding[head.call_id]
        self._last_accepted_call = head.call_id
        self.accepted += 1
        return Verdict(True, "accepted", head)

    def statistics(self) -> dict[str, int]:
        return {
            "accepted": self.accepted,
            "in_flight": self.in_flight(),
            **{f"dropped_{k}": v for k, v in sorted(self.dropped.items())},
        }

    def _drop(self, reason: DropReason) -> Verdict:
        self.dropped[reason] += 1
        return Verdict(False, reason)
