"""``EpochGate``: which results rank 0 may decode and emit (SPEC section 6).

Rank 0 registers every chunk plan it sends (``expect``) and passes every
result it receives through ``admit``. A result is accepted only if it is of
the current epoch, is the oldest outstanding call, is ok, reports the planned
call count and carries ``latents_out``. An error result is checked first,
whatever its ids or epoch: a stage that sent one has failed and is exiting,
so its cause is the stream's cause (never hidden as "never planned" or
dropped as stale). Results of an older epoch and duplicates are *dropped* (counted, idempotent: the same stale result twice
changes nothing but the counter). Anything else raises a ``GateError``.

Only a *requested* hard cut makes the results still in flight stale. A cut
the planner forced (``cache.on_position_overflow = "cut"``) moves the epoch
too, but the chunks planned before it are valid frames: they stay owed and are
accepted in plan order, so ``live_from`` (the oldest epoch still accepted)
moves only at a requested cut. Memory: ``_outstanding`` holds at most the
results in flight; the drop counter has one key per reason.
Pure: no I/O, no clocks.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Literal

import msgspec

from protocol import ChunkId, ChunkResult

from ppstage.errors import (
    CallCountMismatch,
    FutureResult,
    GateError,
    MissingTensor,
    OutOfOrderResult,
    RemoteStageError,
)
from ppstage.core.plan import ChunkPlan

__all__ = ["DropReason", "EpochGate", "Outstanding", "Verdict"]

DropReason = Literal["stale_epoch", "duplicate"]


class Outstanding(msgspec.Struct, frozen=True):
    """A registered plan whose result is still owed."""

    call_id: int
    chunk_index: int
    cache_epoch: int
    expected_generator_calls: int

    @property
    def id(self) -> ChunkId:
        return ChunkId.of(self)


class Verdict(msgspec.Struct, frozen=True):
    accepted: bool
    reason: str
    plan: Outstanding | None = None


class EpochGate:
    """Decides which results rank 0 may decode and emit (see the module docstring).

    Usage: ``expect(plan)`` for every plan in send order, then ``admit(result)``
    for every result received, in arrival order. ``accepted`` counts accepted
    results, ``dropped`` counts drops by reason (``"stale_epoch"``,
    ``"duplicate"``); ``statistics()`` reports both and the number in flight.
    Pure: no I/O, no clock, not thread-safe (rank 0's event loop owns it).
    """

    def __init__(self) -> None:
        self._epoch = -1
        self._live_from = -1
        self._outstanding: OrderedDict[int, Outstanding] = OrderedDict()
        self._last_accepted_call = -1
        self.accepted = 0
        self.dropped: Counter[str] = Counter()

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def live_from(self) -> int:
        """The oldest epoch whose results are still accepted (moves only at a requested cut)."""
        return self._live_from

    def is_stale(self, cache_epoch: int) -> bool:
        """Whether results of ``cache_epoch`` are to be dropped, never decoded or emitted."""
        return cache_epoch < self._live_from

    def in_flight(self) -> int:
        """Results still owed by the pipeline, of any epoch (each must be received)."""
        return len(self._outstanding)

    def oldest_owed(self) -> ChunkId | None:
        """The identity of the oldest result still owed (None when nothing is in flight)."""
        return next(iter(self._outstanding.values())).id if self._outstanding else None

    def in_flight_current(self) -> int:
        """Results still owed that will be accepted (not stale)."""
        return sum(1 for o in self._outstanding.values() if o.cache_epoch >= self._live_from)

    def expect(self, plan: ChunkPlan) -> None:
        """Register a plan that is about to be sent; a hard cut moves the epoch.

        Parameters
        ----------
        plan : ChunkPlan
            The next plan, in ``call_id`` order. ``init_cache`` plans must move
            to a later ``cache_epoch``; others must be of the gate's epoch.

        Raises
        ------
        GateError
            The plan is out of ``call_id`` order or of the wrong epoch.
        """
        if plan.init_cache:
            if plan.cache_epoch <= self._epoch:
                raise GateError(
                    f"hard cut to epoch {plan.cache_epoch} not after {self._epoch}", chunk=plan.id
                )
            self._epoch = plan.cache_epoch
            if not plan.forced_cut:
                self._live_from = plan.cache_epoch
        elif plan.cache_epoch != self._epoch:
            raise GateError(
                f"plan of epoch {plan.cache_epoch} while the gate is at {self._epoch}", chunk=plan.id
            )
        if self._outstanding and plan.call_id <= next(reversed(self._outstanding)):
            raise GateError("plans must be registered in call_id order", chunk=plan.id)
        self._outstanding[plan.call_id] = Outstanding(
            plan.call_id, plan.chunk_index, plan.cache_epoch, plan.expected_generator_calls
        )

    def admit(self, result: ChunkResult) -> Verdict:
        """Accept or drop ``result``; raise for a broken contract.

        Parameters
        ----------
        result : ChunkResult
            A received (validated) result.

        Returns
        -------
        Verdict
            ``accepted=True`` with the ``Outstanding`` plan it answers, or
            ``accepted=False`` with ``reason`` ``"stale_epoch"`` (an older epoch)
            or ``"duplicate"`` (already accepted). Drops are idempotent.

        Raises
        ------
        FutureResult
            The result is of a later epoch or a call never planned.
        OutOfOrderResult
            An older result of the current epoch is still owed.
        RemoteStageError
            The result is an error result (``ok=False``), whatever its ids or epoch.
        CallCountMismatch
            ``observed_generator_calls`` differs from the plan's.
        MissingTensor
            An ok result without ``latents_out``.
        GateError
            ``chunk_index`` differs from the plan's (the base of all the above).
        """
        chunk = result.id
        if not result.ok:
            # Terminal whatever the ids or epoch: the stage is gone, and its reason
            # must reach the operator. The head call stays outstanding, so nothing
            # after it may be accepted either.
            raise RemoteStageError(f"stage error: {result.error}", chunk=chunk)
        if result.cache_epoch < self._live_from:
            owed = self._outstanding.get(result.call_id)
            if owed is not None and owed.cache_epoch == result.cache_epoch:
                del self._outstanding[result.call_id]
            return self._drop("stale_epoch")
        if result.cache_epoch > self._epoch:
            raise FutureResult(f"result from future epoch (gate at {self._epoch})", chunk=chunk)
        if result.call_id <= self._last_accepted_call and result.call_id not in self._outstanding:
            return self._drop("duplicate")
        current = [o for o in self._outstanding.values() if o.cache_epoch >= self._live_from]
        if not current:
            raise FutureResult("result for a call that was never planned", chunk=chunk)
        head = current[0]
        if result.call_id != head.call_id:
            if result.call_id in self._outstanding:
                raise OutOfOrderResult(f"result arrived before call {head.call_id}'s", chunk=chunk)
            raise FutureResult("result for a call that was never planned", chunk=chunk)
        if result.chunk_index != head.chunk_index or result.cache_epoch != head.cache_epoch:
            raise GateError(
                f"chunk_index / epoch differ from the plan's {head.chunk_index} / {head.cache_epoch}", chunk=chunk
            )
        # A contract failure of the head call is terminal for the stream, so it
        # stays outstanding: nothing after it may be accepted either.
        if result.observed_generator_calls != head.expected_generator_calls:
            raise CallCountMismatch(
                f"observed {result.observed_generator_calls} generator calls, "
                f"planned {head.expected_generator_calls}",
                chunk=chunk,
            )
        if [t.name for t in result.tensors] != ["latents_out"]:
            raise MissingTensor("ok result without latents_out", chunk=chunk)
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
