"""Planner: intents at boundaries, forced cuts, recompute modes, cadence and context."""

from __future__ import annotations

import math

import pytest

from ppstage.config import PPStageConfig
from ppstage.core.planner import (
    AttentionBiasChange,
    HardCut,
    Planner,
    PlannerError,
    PromptUpdate,
    StepListChange,
    StreamStart,
)
from protocol import ProtocolError

from ppstage.errors import PPStageError


def planner(**overrides) -> Planner:
    p = Planner(PPStageConfig().with_overrides(overrides))
    p.submit(StreamStart("a fox"))
    return p


def plans(p: Planner, n: int) -> list:
    return [p.next_chunk() for _ in range(n)]


# -- stream start and intents ---------------------------------------------------------------


def test_no_stream_start_is_a_planner_error():
    p = Planner(PPStageConfig())
    with pytest.raises(PlannerError, match="StreamStart"):
        p.next_chunk()
    p.submit(HardCut())
    with pytest.raises(PlannerError):
        p.next_chunk()


def test_planner_error_is_a_runtime_error_not_a_wire_error():
    assert issubclass(PlannerError, PPStageError)
    assert not issubclass(PlannerError, ProtocolError)


def test_first_chunk_is_a_hard_cut_of_epoch_zero():
    first = planner().next_chunk()
    assert (first.call_id, first.chunk_index, first.cache_epoch, first.current_start_frame) == (0, 0, 0, 0)
    assert first.init_cache and first.reset_kv_cache and first.reset_crossattn_cache
    assert not first.do_kv_recompute and not first.forced_cut
    assert first.prompt == "a fox"


def test_intents_take_effect_at_the_next_boundary_only():
    p = planner()
    first = p.next_chunk()
    p.submit(PromptUpdate("a wolf"))
    p.submit(AttentionBiasChange(0.5))
    p.submit(StepListChange((1000, 500)))
    # Nothing changes until the next plan is made...
    assert p.cache_epoch == 0
    second = p.next_chunk()
    assert (first.prompt, second.prompt) == ("a fox", "a wolf")
    assert second.reset_crossattn_cache and not second.reset_kv_cache and not second.init_cache
    assert second.kv_cache_attention_bias == 0.5
    assert second.denoising_step_list == (1000, 500) and second.num_denoise_steps == 2
    # ...and then only once: the next chunk keeps the new values without a reset.
    third = p.next_chunk()
    assert not third.reset_crossattn_cache
    assert (third.prompt, third.kv_cache_attention_bias, third.num_denoise_steps) == ("a wolf", 0.5, 2)


def test_hard_cut_intent_starts_a_new_epoch_at_frame_zero():
    p = planner()
    plans(p, 3)
    p.submit(HardCut())
    cut = p.next_chunk()
    assert cut.init_cache and cut.reset_kv_cache and cut.reset_crossattn_cache
    assert (cut.cache_epoch, cut.current_start_frame, cut.chunk_index, cut.call_id) == (1, 0, 3, 3)
    assert not cut.do_kv_recompute and not cut.forced_cut
    assert p.next_chunk().current_start_frame == 3


def test_stream_start_during_a_stream_is_a_hard_cut_with_the_new_prompt():
    p = planner()
    plans(p, 2)
    p.submit(StreamStart("a wolf"))
    cut = p.next_chunk()
    assert cut.init_cache and cut.cache_epoch == 1 and cut.prompt == "a wolf"


def test_several_intents_at_one_boundary_apply_in_order():
    p = planner()
    p.next_chunk()
    p.submit(AttentionBiasChange(0.5))
    p.submit(AttentionBiasChange(0.25))
    p.submit(PromptUpdate("b"))
    p.submit(PromptUpdate("c"))
    plan = p.next_chunk()
    assert (plan.kv_cache_attention_bias, plan.prompt) == (0.25, "c")


def test_prompt_update_with_a_hard_cut_resets_both_caches_once():
    p = planner()
    plans(p, 2)
    p.submit(PromptUpdate("a wolf"))
    p.submit(HardCut())
    plan = p.next_chunk()
    assert plan.init_cache and plan.reset_crossattn_cache and plan.prompt == "a wolf"


@pytest.mark.parametrize(
    "intent",
    [
        AttentionBiasChange(0.0),
        AttentionBiasChange(-1.0),
        AttentionBiasChange(math.inf),
        AttentionBiasChange(math.nan),
        StepListChange(()),
        StepListChange((500, 1000)),
        StepListChange((1000, 1000, 500)),
        StepListChange((1000, 0)),
        StepListChange((1001, 500)),
        StepListChange((1000, -5)),
        PromptUpdate(""),
        PromptUpdate("   "),
        StreamStart(""),
    ],
    ids=repr,
)
def test_bad_intents_are_rejected_when_submitted(intent):
    p = planner()
    p.next_chunk()
    with pytest.raises(PlannerError):
        p.submit(intent)
    # A rejected intent never reaches a plan.
    plan = p.next_chunk()
    assert (plan.kv_cache_attention_bias, plan.num_denoise_steps, plan.prompt) == (1.0, 4, "a fox")


# -- forced hard cut before the RoPE table runs out (policy "cut") ------------------------------

CUT = {"cache.on_position_overflow": "cut"}


def test_hard_cut_is_forced_before_rope_frames_run_out():
    p = planner(**CUT, **{"model.rope_max_frames": 9})
    got = [(x.cache_epoch, x.current_start_frame, x.init_cache, x.forced_cut) for x in plans(p, 7)]
    assert got == [
        (0, 0, True, False),
        (0, 3, False, False),
        (0, 6, False, False),  # frames 6..8: exactly fills the 9-frame table
        (1, 0, True, True),
        (1, 3, False, False),
        (1, 6, False, False),
        (2, 0, True, True),
    ]


def test_no_chunk_ever_reaches_past_rope_max_frames():
    p = planner(**CUT, **{"model.rope_max_frames": 10})
    for plan in plans(p, 30):
        assert plan.end_frame <= 10


def test_requested_cut_at_the_rope_limit_is_not_marked_forced():
    p = planner(**CUT, **{"model.rope_max_frames": 6})
    plans(p, 2)
    p.submit(HardCut())
    cut = p.next_chunk()
    assert cut.init_cache and not cut.forced_cut


# -- recompute modes and cadence ---------------------------------------------------------------


@pytest.mark.parametrize("cadence", [1, 2, 3])
def test_r1_never_recomputes(cadence):
    p = planner(**{"recompute.mode": "r1", "recompute.cadence": cadence})
    for plan in plans(p, 10):
        assert not plan.do_kv_recompute
        assert plan.context_frame_indices == () and plan.context_source == "none"
        assert plan.anchor_mode == "none" and plan.anchor_frame is None
        assert plan.expected_generator_calls == plan.num_denoise_steps


@pytest.mark.parametrize("mode, anchor", [("r0a", "decoded"), ("r0", "latent")])
@pytest.mark.parametrize(
    "cadence, pattern",
    [(1, [0, 1, 1, 1, 1, 1, 1]), (2, [0, 0, 1, 0, 1, 0, 1]), (3, [0, 0, 0, 1, 0, 0, 1])],
)
def test_recompute_cadence_counts_chunks_of_the_epoch(mode, anchor, cadence, pattern):
    p = planner(**{"recompute.mode": mode, "recompute.cadence": cadence})
    got = plans(p, len(pattern))
    assert [int(x.do_kv_recompute) for x in got] == pattern
    for plan in got:
        assert plan.recompute_mode == mode and plan.anchor_mode == anchor
        assert plan.expected_generator_calls == plan.num_denoise_steps + int(plan.do_kv_recompute)


def test_cadence_restarts_with_every_epoch():
    p = planner(**{"recompute.cadence": 2})
    plans(p, 3)
    p.submit(HardCut())
    assert [int(x.do_kv_recompute) for x in plans(p, 4)] == [0, 0, 1, 0]


# -- recompute context: early regime vs steady state -------------------------------------------


@pytest.mark.parametrize("mode, steady", [("r0a", "decoded"), ("r0", "latent")])
def test_context_is_first_frame_plus_latest_latents_then_the_decoded_anchor(mode, steady):
    # Defaults: 3-frame chunks, context_frames=3, decoded_buffer_frames=6.
    p = planner(**{"recompute.mode": mode})
    got = [(x.current_start_frame, x.context_frame_indices, x.context_source, x.anchor_frame) for x in plans(p, 5)]
    assert got == [
        (0, (), "none", None),
        (3, (0, 1, 2), "early", 0),  # start < 6: epoch's first latent + latest latents
        (6, (0, 4, 5), steady, 0),  # anchor = 6 - 6
        (9, (3, 7, 8), steady, 3),
        (12, (6, 10, 11), steady, 6),
    ]


def test_context_never_exceeds_context_frames_and_precedes_the_chunk():
    p = planner(**{"recompute.decoded_buffer_frames": 9, "cache.window_frames": 8, "recompute.context_frames": 4})
    for plan in plans(p, 20):
        ctx = plan.context_frame_indices
        if plan.do_kv_recompute:
            assert 1 <= len(ctx) <= 4
            assert list(ctx) == sorted(set(ctx)) and ctx[-1] == plan.current_start_frame - 1
            assert ctx[0] == plan.anchor_frame
            want = "early" if plan.current_start_frame < 9 else "decoded"
            assert plan.context_source == want


def test_early_regime_restarts_after_a_hard_cut():
    p = planner()
    plans(p, 4)
    p.submit(HardCut())
    got = plans(p, 2)
    assert got[1].context_source == "early" and got[1].context_frame_indices == (0, 1, 2)


# -- identity ---------------------------------------------------------------------------------


def test_call_id_and_chunk_index_are_strictly_monotonic_across_epochs():
    p = planner(**{"cache.on_position_overflow": "cut", "model.rope_max_frames": 6})
    seen = []
    for k in range(12):
        if k % 5 == 4:
            p.submit(HardCut())
        seen.append(p.next_chunk())
    assert [x.call_id for x in seen] == list(range(12))
    assert [x.chunk_index for x in seen] == list(range(12))


def test_control_ids_consume_call_ids_but_not_chunk_indices():
    p = planner()
    first = p.next_chunk()
    noop = p.control_ids()
    assert (noop.call_id, noop.chunk_index, noop.cache_epoch) == (1, first.chunk_index, 0)
    assert p.control_ids().call_id == 2
    second = p.next_chunk()
    assert (second.call_id, second.chunk_index) == (3, 1)


def test_control_ids_before_any_chunk_are_non_negative():
    ids = Planner(PPStageConfig()).control_ids()
    assert (ids.call_id, ids.chunk_index, ids.cache_epoch) == (0, 0, 0)


def test_plans_carry_the_config_seed_and_geometry():
    cfg = PPStageConfig().with_overrides({"denoise.base_seed": 7, "cache.chunk_frames": 2})
    p = Planner(cfg)
    p.submit(StreamStart("x"))
    plan = p.next_chunk()
    assert (plan.base_seed, plan.num_frames, plan.end_frame) == (7, 2, 2)
