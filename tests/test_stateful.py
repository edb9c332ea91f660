"""Planner + EpochGate + per-stage CacheLifecycles under random delivery (B8, B9).

A hypothesis state machine plays rank 0 and a pipeline of simulated stages:
intents arrive at random, chunks are planned and sent, and results come back
delayed, duplicated or out of order, across hard cuts (requested, and forced by
a short RoPE table under ``on_position_overflow = "cut"``) and re-bases (the
same table under ``"rebase"``). It checks, after every step, that nothing of an
epoch a requested cut ended is ever accepted (a forced cut keeps the chunks
planned before it), that acceptance follows the plan order, that nothing is
accepted twice, and that every stage holds the same lifecycle state.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from wire_samples import result_for

from ppstage.config import PPStageConfig
from ppstage.errors import OutOfOrderResult
from ppstage.core.gate import EpochGate
from ppstage.core.lifecycle import CacheLifecycle
from ppstage.core.planner import (
    AttentionBiasChange,
    HardCut,
    Planner,
    PromptUpdate,
    StepListChange,
    StreamStart,
)
from protocol import ChunkResult

CONFIG = PPStageConfig().with_overrides(
    {"model.rope_max_frames": 15, "recompute.cadence": 1, "cache.on_position_overflow": "cut"}
)
REBASE_CONFIG = CONFIG.with_overrides({"cache.on_position_overflow": "rebase", "recompute.cadence": 2})
CACHE = CONFIG.cache_geometry()
MAX_IN_FLIGHT = 5

step_lists = st.lists(st.sampled_from([1000, 750, 500, 250]), min_size=1, max_size=4, unique=True).map(
    lambda s: tuple(sorted(s, reverse=True))
)
intents = st.one_of(
    st.just(HardCut()),
    st.sampled_from(["a wolf", "a fox", "rain"]).map(PromptUpdate),
    st.floats(0.1, 2.0).map(AttentionBiasChange),
    step_lists.map(StepListChange),
)


class PipelineUnderChaos(RuleBasedStateMachine):
    config = CONFIG

    def __init__(self) -> None:
        super().__init__()
        self.planner = Planner(self.config)
        self.planner.submit(StreamStart("a fox"))
        self.gate = EpochGate()
        self.stage = CacheLifecycle(CACHE)
        self.plans = {}  # call_id -> plan
        self.in_flight: list[ChunkResult] = []  # sent, result not yet received
        self.received: list[ChunkResult] = []  # every result delivered at least once
        self.accepted: list[ChunkResult] = []

    # -- rank 0 ----------------------------------------------------------------------------
    @rule(intent=intents)
    def submit_intent(self, intent):
        self.planner.submit(intent)

    @rule()
    def send_control_message(self):
        self.planner.control_ids()  # a NOOP keepalive consumes a call_id

    @precondition(lambda self: len(self.in_flight) < MAX_IN_FLIGHT)
    @rule()
    def send_chunk(self):
        plan = self.planner.next_chunk()
        self.gate.expect(plan)
        self.plans[plan.call_id] = plan
        if plan.forced_cut:
            event("forced hard cut")
        if plan.rebased:
            event("re-base")
        # A stage applies the plan: every plan the planner emits, whatever the
        # interleaving of intents, must be a legal transition with exactly its calls.
        lc = self.stage
        lc.begin_chunk(plan)
        if plan.do_kv_recompute:
            lc.record_call("recompute")
        for _ in range(plan.num_denoise_steps):
            lc.record_call("denoise")
        lc.end_chunk()
        self.in_flight.append(result_for(plan))

    # -- deliveries ------------------------------------------------------------------------
    def _deliverable(self) -> list[int]:
        """Positions whose delivery is legal now: any stale result, or the oldest current one."""
        out, head_seen = [], False
        for i, r in enumerate(self.in_flight):
            if self.gate.is_stale(r.cache_epoch):
                out.append(i)
            elif not head_seen:
                out.append(i)
                head_seen = True
        return out

    def _admit(self, result: ChunkResult):
        before = len(self.accepted)
        verdict = self.gate.admit(result)
        if verdict.accepted:
            plan = self.plans[result.call_id]
            assert not self.gate.is_stale(result.cache_epoch)
            assert result.cache_epoch <= self.gate.epoch == self.planner.cache_epoch
            assert all(a.call_id != result.call_id for a in self.accepted), "accepted twice"
            if self.accepted and self.accepted[-1].cache_epoch == result.cache_epoch:
                assert result.chunk_index > self.accepted[-1].chunk_index
            assert result.observed_generator_calls == plan.expected_generator_calls
            assert verdict.plan.expected_generator_calls == plan.expected_generator_calls
            self.accepted.append(result)
        else:
            assert len(self.accepted) == before
        return verdict

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data())
    def deliver(self, data):
        """Deliver a legal result now; everything else stays delayed."""
        i = data.draw(st.sampled_from(self._deliverable()))
        result = self.in_flight.pop(i)
        stale = self.gate.is_stale(result.cache_epoch)
        if not stale and result.cache_epoch < self.gate.epoch:
            event("result planned before a forced cut accepted")
        verdict = self._admit(result)
        assert verdict.accepted != stale
        if stale:
            assert verdict.reason == "stale_epoch"
            event("stale result dropped")
        self.received.append(result)

    @precondition(lambda self: self.received)
    @rule(data=st.data())
    def deliver_duplicate(self, data):
        result = data.draw(st.sampled_from(self.received))
        before = (self.gate.in_flight(), self.gate.accepted, self.gate.epoch)
        verdict = self._admit(result)
        assert not verdict.accepted and verdict.reason in ("duplicate", "stale_epoch")
        assert (self.gate.in_flight(), self.gate.accepted, self.gate.epoch) == before

    @precondition(
        lambda self: sum(not self.gate.is_stale(r.cache_epoch) for r in self.in_flight) >= 2
    )
    @rule(data=st.data())
    def deliver_reordered(self, data):
        """A current-epoch result overtaking an earlier one is a protocol error.

        The gate refuses it without changing state, so the stream stays
        consistent; in the runtime this error fails the stream.
        """
        current = [r for r in self.in_flight if not self.gate.is_stale(r.cache_epoch)]
        result = data.draw(st.sampled_from(current[1:]))
        before = (self.gate.in_flight(), self.gate.accepted, dict(self.gate.dropped))
        with pytest.raises(OutOfOrderResult):
            self.gate.admit(result)
        event("reorder refused")
        assert (self.gate.in_flight(), self.gate.accepted, dict(self.gate.dropped)) == before

    # -- invariants ------------------------------------------------------------------------
    @invariant()
    def gate_owes_exactly_the_undelivered_results(self):
        assert self.gate.in_flight() == len(self.in_flight)
        assert self.gate.in_flight_current() == sum(
            not self.gate.is_stale(r.cache_epoch) for r in self.in_flight
        )

    @invariant()
    def nothing_of_an_old_epoch_was_accepted_after_its_cut(self):
        # Accepted in plan order, so epochs never go back (a forced cut's old epoch comes first).
        epochs = [r.cache_epoch for r in self.accepted]
        assert epochs == sorted(epochs)
        call_ids = [r.call_id for r in self.accepted]
        assert call_ids == sorted(set(call_ids))

    @invariant()
    def planner_stage_and_gate_agree_on_the_epoch(self):
        if self.plans:
            assert self.stage.state.cache_epoch == self.planner.cache_epoch == self.gate.epoch

    @invariant()
    def counters_add_up(self):
        stats = self.gate.statistics()
        assert stats["accepted"] == len(self.accepted)


PipelineUnderChaos.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestPipelineUnderChaos = PipelineUnderChaos.TestCase


class RebasingPipelineUnderChaos(PipelineUnderChaos):
    """The same chaos with re-bases instead of forced cuts: one epoch until a requested cut."""

    config = REBASE_CONFIG

    @invariant()
    def stage_follows_every_rebase(self):
        if self.plans:
            assert self.stage.state.position_offset == self.planner.position_offset


RebasingPipelineUnderChaos.TestCase.settings = PipelineUnderChaos.TestCase.settings
TestRebasingPipelineUnderChaos = RebasingPipelineUnderChaos.TestCase
