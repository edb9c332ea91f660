"""EpochGate: the acceptance rules of SPEC section 6 (B8, B9)."""

from __future__ import annotations

import pytest
from wire_samples import replace, result_for, spec

from ppstage.config import PPStageConfig
from ppstage.errors import (
    CallCountMismatch,
    FutureResult,
    GateError,
    MissingTensor,
    OutOfOrderResult,
    PPStageError,
    RemoteStageError,
)
from ppstage.core.gate import EpochGate
from ppstage.core.planner import HardCut, Planner, StreamStart
from protocol import ChunkResult, ProtocolError


class Stream:
    """Rank 0's side of the loop: planner -> gate.expect, results -> gate.admit."""

    def __init__(self, **overrides) -> None:
        self.planner = Planner(PPStageConfig().with_overrides(overrides))
        self.planner.submit(StreamStart("a fox"))
        self.gate = EpochGate()

    def send(self):
        plan = self.planner.next_chunk()
        self.gate.expect(plan)
        return plan

    def cut(self):
        self.planner.submit(HardCut())
        return self.send()


def snapshot(gate: EpochGate):
    return (gate.epoch, gate.in_flight(), gate.in_flight_current(), gate.accepted)


# -- acceptance -------------------------------------------------------------------------------


def test_result_of_the_current_epoch_in_order_is_accepted():
    s = Stream()
    p0, p1 = s.send(), s.send()
    assert s.gate.in_flight() == 2
    v0 = s.gate.admit(result_for(p0))
    assert v0.accepted and v0.reason == "accepted" and v0.plan.call_id == p0.call_id
    assert s.gate.admit(result_for(p1)).accepted
    assert s.gate.statistics() == {"accepted": 2, "in_flight": 0}


def test_recompute_chunk_is_accepted_with_its_extra_call():
    s = Stream()
    s.gate.admit(result_for(s.send()))
    p1 = s.send()
    assert p1.do_kv_recompute and p1.expected_generator_calls == 5
    assert s.gate.admit(result_for(p1)).accepted


def test_ids_skipped_by_control_messages_do_not_block_acceptance():
    s = Stream()
    p0 = s.send()
    s.planner.control_ids()  # a NOOP consumed call_id 1
    p1 = s.send()
    assert p1.call_id == 2
    assert s.gate.admit(result_for(p0)).accepted
    assert s.gate.admit(result_for(p1)).accepted


# -- stale epoch and duplicates -----------------------------------------------------------------


def test_stale_result_after_hard_cut_is_never_accepted():
    s = Stream()
    late = s.send()
    cut = s.cut()
    assert s.gate.epoch == 1 and s.gate.in_flight() == 2 and s.gate.in_flight_current() == 1
    v = s.gate.admit(result_for(late))
    assert not v.accepted and v.reason == "stale_epoch"
    # The stale result was still owed (it had to be received) and now is not.
    assert s.gate.in_flight() == 1
    assert s.gate.admit(result_for(cut)).accepted
    assert s.gate.statistics() == {"accepted": 1, "in_flight": 0, "dropped_stale_epoch": 1}


def test_the_new_epoch_streams_normally_after_a_late_stale_result():
    s = Stream()
    late = s.send()
    cut = s.cut()
    nxt = s.send()
    assert s.gate.admit(result_for(cut)).accepted
    assert not s.gate.admit(result_for(late)).accepted
    assert s.gate.admit(result_for(nxt)).accepted


def test_stale_drop_is_idempotent():
    s = Stream()
    late = s.send()
    s.cut()
    s.gate.admit(result_for(late))
    before = snapshot(s.gate)
    v = s.gate.admit(result_for(late))
    assert not v.accepted and v.reason == "stale_epoch"
    assert snapshot(s.gate) == before  # nothing changed but the counter
    assert s.gate.dropped["stale_epoch"] == 2


def test_stale_ok_result_with_a_broken_count_is_dropped_without_inspection():
    # A stale ok result is merely dropped once its epoch is over: it is never decoded.
    s = Stream()
    late = s.send()
    s.cut()
    assert s.gate.admit(result_for(late, observed_generator_calls=0)).reason == "stale_epoch"


@pytest.mark.parametrize("which", ["stale_epoch", "never_planned", "duplicate", "future_epoch"])
def test_error_result_keeps_its_cause_whatever_its_ids_or_epoch(which):
    # A stage that sends an error result has failed and is exiting: its reason is
    # the stream's cause, never "never planned" or a silent stale drop.
    s = Stream()
    p0 = s.send()
    if which == "stale_epoch":
        s.cut()
        target = p0
    elif which == "duplicate":
        s.gate.admit(result_for(p0))
        s.send()
        target = p0
    else:
        target = p0
    fields = {"never_planned": dict(call_id=p0.call_id + 50, chunk_index=p0.chunk_index + 50),
              "future_epoch": dict(cache_epoch=p0.cache_epoch + 3)}.get(which, {})
    broken = result_for(target, ok=False, error="rank 2 relaying a NOOP: boom", observed_generator_calls=0,
                        tensors=(), **fields)
    with pytest.raises(RemoteStageError, match="relaying a NOOP: boom"):
        s.gate.admit(broken)


def test_stale_result_of_an_accepted_call_does_not_touch_outstanding_calls():
    s = Stream()
    p0 = s.send()
    s.gate.admit(result_for(p0))
    s.cut()
    before = snapshot(s.gate)
    assert s.gate.admit(result_for(p0)).reason == "stale_epoch"
    assert snapshot(s.gate) == before


def test_duplicate_is_dropped_and_changes_nothing():
    s = Stream()
    p0, p1 = s.send(), s.send()
    assert s.gate.admit(result_for(p0)).accepted
    before = snapshot(s.gate)
    for _ in range(2):
        v = s.gate.admit(result_for(p0))
        assert not v.accepted and v.reason == "duplicate"
    assert snapshot(s.gate) == before
    assert s.gate.dropped["duplicate"] == 2
    assert s.gate.admit(result_for(p1)).accepted


# -- protocol errors ----------------------------------------------------------------------------


def test_reordered_result_is_a_protocol_error_and_changes_nothing():
    s = Stream()
    p0, p1 = s.send(), s.send()
    before = snapshot(s.gate)
    with pytest.raises(OutOfOrderResult) as info:
        s.gate.admit(result_for(p1))
    assert info.value.call_id == p1.call_id
    assert snapshot(s.gate) == before
    assert s.gate.admit(result_for(p0)).accepted


def test_result_from_a_future_epoch_is_a_protocol_error():
    s = Stream()
    p0 = s.send()
    with pytest.raises(FutureResult, match="future epoch"):
        s.gate.admit(result_for(p0, cache_epoch=1))


def test_result_for_a_call_never_planned_is_a_protocol_error():
    s = Stream()
    p0 = s.send()
    with pytest.raises(FutureResult, match="never planned"):
        s.gate.admit(result_for(p0, call_id=5))
    s.gate.admit(result_for(p0))
    with pytest.raises(FutureResult, match="never planned"):
        s.gate.admit(result_for(p0, call_id=1, chunk_index=1))


def test_result_before_anything_was_planned_is_a_protocol_error():
    gate = EpochGate()
    with pytest.raises(FutureResult):
        gate.admit(result_for(Stream().planner.next_chunk()))


def test_error_result_is_a_remote_stage_error():
    s = Stream()
    p0 = s.send()
    with pytest.raises(RemoteStageError, match="out of memory"):
        s.gate.admit(result_for(p0, ok=False, error="out of memory", tensors=()))
    assert s.gate.in_flight() == 1  # the head stays owed: nothing after it may be accepted


def test_a_remote_error_that_already_names_its_chunk_names_it_once():
    # The last stage's text ends with the ids of the chunk it failed on (its own
    # ChunkError's str()); rank 0's RemoteStageError for the same chunk adds nothing.
    s = Stream()
    p0 = s.send()
    ids = f"(call_id={p0.call_id}, chunk_index={p0.chunk_index}, cache_epoch={p0.cache_epoch})"
    remote = f"stage 1 (rank 1): PhaseStalled: rank 1 (stage 1) generator call exceeded 3.0 s {ids}"
    with pytest.raises(RemoteStageError) as info:
        s.gate.admit(result_for(p0, ok=False, error=remote, tensors=()))
    assert str(info.value) == f"stage error: {remote}"
    assert str(info.value).count("call_id=") == 1
    plain = result_for(p0, ok=False, error="out of memory", tensors=())
    with pytest.raises(RemoteStageError) as info:
        s.gate.admit(plain)
    assert str(info.value) == f"stage error: out of memory {ids}"  # a reason without ids gets them


@pytest.mark.parametrize("observed", [0, 3, 5])
def test_call_count_mismatch_is_refused(observed):
    s = Stream()
    p0 = s.send()
    assert p0.expected_generator_calls == 4
    with pytest.raises(CallCountMismatch, match=f"observed {observed} generator calls, planned 4"):
        s.gate.admit(result_for(p0, observed_generator_calls=observed))


@pytest.mark.parametrize(
    "tensors",
    [(), (spec("latents", (3, 4, 8, 8)),), (spec("latents_out", (3, 4, 8, 8)),) * 2],
    ids=["none", "wrong name", "two"],
)
def test_ok_result_without_latents_out_is_a_missing_tensor(tensors):
    s = Stream()
    p0 = s.send()
    # Built directly: the gate does not rely on validate() having run.
    result = ChunkResult(
        call_id=p0.call_id,
        chunk_index=p0.chunk_index,
        cache_epoch=p0.cache_epoch,
        ok=True,
        observed_generator_calls=p0.expected_generator_calls,
        tensors=tensors,
    )
    with pytest.raises(MissingTensor):
        s.gate.admit(result)


def test_chunk_index_differing_from_the_plan_is_a_gate_error():
    s = Stream()
    p0 = s.send()
    with pytest.raises(GateError, match="chunk_index"):
        s.gate.admit(result_for(p0, chunk_index=3))


@pytest.mark.parametrize(
    "error", [GateError, FutureResult, OutOfOrderResult, RemoteStageError, MissingTensor, CallCountMismatch]
)
def test_every_gate_refusal_is_a_runtime_error_not_a_wire_error(error):
    assert issubclass(error, PPStageError)
    assert not issubclass(error, ProtocolError)


# -- registering plans ---------------------------------------------------------------------------


def test_hard_cut_must_move_the_gate_epoch_forward():
    s = Stream()
    first = s.send()
    gate = EpochGate()
    gate.expect(first)
    with pytest.raises(GateError, match="hard cut"):
        gate.expect(first)


def test_plan_of_another_epoch_without_a_cut_is_refused():
    s = Stream()
    s.send()
    plan = s.planner.next_chunk()
    with pytest.raises(GateError, match="epoch 3"):
        s.gate.expect(replace(plan, cache_epoch=3))


def test_plans_must_be_registered_in_call_id_order():
    s = Stream()
    p0, p1 = s.planner.next_chunk(), s.planner.next_chunk()
    gate = EpochGate()
    gate.expect(p0)
    gate.expect(p1)
    with pytest.raises(GateError, match="call_id order"):
        gate.expect(p1)


def test_the_oldest_owed_result_names_the_chunk_a_watchdog_reports():
    s = Stream()
    assert s.gate.oldest_owed() is None
    p0, p1 = s.send(), s.send()
    assert s.gate.oldest_owed() == p0.id
    s.gate.admit(result_for(p0))
    assert s.gate.oldest_owed() == p1.id
