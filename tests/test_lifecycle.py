"""CacheLifecycle: every legal transition of SPEC section 3 and every refusal."""

from __future__ import annotations

import pytest
from wire_samples import infer_envelope, replace

from ppstage.config import PPStageConfig
from ppstage.errors import CallCountMismatch, IllegalTransition
from ppstage.core.lifecycle import CacheGeometry, CacheLifecycle
from ppstage.core.plan import ChunkPlan
from ppstage.core.planner import HardCut, Planner, PromptUpdate, StreamStart

TPF = 16
GEOMETRY = CacheGeometry(window_frames=6, sink_frames=1, tokens_per_frame=TPF, chunk_frames=3)
STEPS = (1000, 750, 500, 250)


def make_plan(**fields) -> ChunkPlan:
    """The first chunk of epoch 0 unless ``fields`` say otherwise."""
    recompute = fields.get("do_kv_recompute", False)
    steps = fields.get("denoising_step_list", STEPS)
    init = fields.get("init_cache", True)
    base = dict(
        call_id=0,
        chunk_index=0,
        cache_epoch=0,
        current_start_frame=0,
        num_frames=3,
        init_cache=init,
        reset_kv_cache=init,
        reset_crossattn_cache=init,
        do_kv_recompute=recompute,
        num_denoise_steps=len(steps),
        expected_generator_calls=len(steps) + (1 if recompute else 0),
        kv_cache_attention_bias=1.0,
        denoising_step_list=steps,
        recompute_mode="r0a",
        anchor_mode="decoded",
        context_frame_indices=(),
        context_source="none",
        anchor_frame=None,
        prompt="a fox",
        base_seed=42,
    )
    base.update(fields)
    return ChunkPlan(**base)


def next_plan(lc: CacheLifecycle, **fields) -> ChunkPlan:
    """The plan that legally follows ``lc``'s state (same epoch, next ids and frame)."""
    s = lc.state
    base = dict(
        call_id=s.last_call_id + 1,
        chunk_index=s.last_chunk_index + 1,
        cache_epoch=s.cache_epoch,
        current_start_frame=s.next_start_frame,
        init_cache=False,
    )
    base.update(fields)
    return make_plan(**base)


def run_chunk(lc: CacheLifecycle, plan) -> tuple:
    window = lc.begin_chunk(plan)
    if plan.do_kv_recompute:
        lc.record_call("recompute")
    for _ in range(plan.num_denoise_steps):
        lc.record_call("denoise")
    return window, lc.end_chunk()


def fresh(*plans) -> CacheLifecycle:
    lc = CacheLifecycle(GEOMETRY)
    for p in plans:
        run_chunk(lc, p)
    return lc


def started() -> CacheLifecycle:
    return fresh(make_plan())


# -- construction --------------------------------------------------------------------


def test_geometry_that_cannot_hold_sinks_and_a_chunk_is_refused():
    with pytest.raises(ValueError):
        CacheLifecycle(CacheGeometry(window_frames=3, sink_frames=1, tokens_per_frame=TPF, chunk_frames=3))


def test_initial_state_has_no_stream():
    s = CacheLifecycle(GEOMETRY).state
    assert (s.cache_epoch, s.last_call_id, s.global_end_index, s.local_end_index) == (-1, -1, 0, 0)
    assert not s.in_chunk


# -- hard cut ----------------------------------------------------------------------------


def test_first_chunk_must_be_a_hard_cut():
    with pytest.raises(IllegalTransition, match="must be a hard cut"):
        CacheLifecycle(GEOMETRY).begin_chunk(make_plan(init_cache=False, cache_epoch=-1))


def test_hard_cut_moves_the_epoch_by_exactly_one_and_resets_everything():
    lc = fresh(make_plan(), next_plan(started()))
    assert lc.state.local_end_index == 6 * TPF
    cut = make_plan(call_id=2, chunk_index=2, cache_epoch=1)
    window = lc.begin_chunk(cut)
    assert window.reset_kv and window.reset_crossattn
    assert (window.write_start, window.write_end, window.roll_tokens) == (0, 3 * TPF, 0)
    s = lc.state
    assert (s.cache_epoch, s.current_start_frame, s.global_end_index, s.local_end_index) == (1, 0, 0, 0)
    assert not s.crossattn_is_init


@pytest.mark.parametrize("epoch", [0, 2, 5])
def test_hard_cut_that_does_not_move_the_epoch_by_one_is_refused(epoch):
    lc = started()
    with pytest.raises(IllegalTransition, match="hard cut must move epoch 0 -> 1"):
        lc.begin_chunk(make_plan(call_id=1, chunk_index=1, cache_epoch=epoch))


def test_hard_cut_must_start_at_frame_zero_without_recompute():
    lc = started()
    with pytest.raises(IllegalTransition, match="frame 0"):
        lc.begin_chunk(make_plan(call_id=1, chunk_index=1, cache_epoch=1, current_start_frame=3))
    with pytest.raises(IllegalTransition, match="frame 0"):
        lc.begin_chunk(
            make_plan(call_id=1, chunk_index=1, cache_epoch=1, do_kv_recompute=True, context_frame_indices=(0,))
        )


def test_hard_cut_must_also_reset_the_cross_attention_cache():
    with pytest.raises(IllegalTransition, match="cross-attention"):
        CacheLifecycle(GEOMETRY).begin_chunk(make_plan(reset_crossattn_cache=False))


@pytest.mark.parametrize("init, reset_kv", [(True, False), (False, True)])
def test_kv_cache_is_reset_exactly_at_a_hard_cut(init, reset_kv):
    lc = started()
    plan = next_plan(lc, init_cache=init, reset_kv_cache=reset_kv, cache_epoch=1 if init else 0)
    with pytest.raises(IllegalTransition, match="exactly at a hard cut"):
        lc.begin_chunk(plan)


def test_epoch_change_without_a_hard_cut_is_refused():
    lc = started()
    with pytest.raises(IllegalTransition, match="without a hard cut"):
        lc.begin_chunk(next_plan(lc, cache_epoch=1))


# -- ids and start frame ------------------------------------------------------------------


@pytest.mark.parametrize("delta", [-1, 1, 3])
def test_start_frame_must_follow_the_previous_chunk(delta):
    lc = started()
    with pytest.raises(IllegalTransition, match="current_start_frame"):
        lc.begin_chunk(next_plan(lc, current_start_frame=3 + delta))


@pytest.mark.parametrize("call_id", [0, -1])
def test_call_id_must_increase(call_id):
    lc = started()
    with pytest.raises(IllegalTransition, match="call_id"):
        lc.begin_chunk(next_plan(lc, call_id=call_id))


@pytest.mark.parametrize("chunk_index", [0, -1])
def test_chunk_index_must_increase(chunk_index):
    lc = started()
    with pytest.raises(IllegalTransition, match="chunk_index"):
        lc.begin_chunk(next_plan(lc, chunk_index=chunk_index))


def test_ids_may_skip_values_consumed_by_control_messages():
    lc = started()
    run_chunk(lc, next_plan(lc, call_id=5))
    assert lc.state.last_call_id == 5


def test_the_same_epoch_and_call_id_is_never_applied_twice():
    first = make_plan()
    lc = fresh(first)
    with pytest.raises(IllegalTransition, match="applied twice"):
        lc.begin_chunk(first)
    second = next_plan(lc)
    run_chunk(lc, second)
    with pytest.raises(IllegalTransition, match="applied twice"):
        lc.begin_chunk(second)


def test_a_refused_plan_leaves_the_state_untouched():
    lc = started()
    before = (lc.state, lc.digest())
    with pytest.raises(IllegalTransition):
        lc.begin_chunk(next_plan(lc, current_start_frame=4))
    assert (lc.state, lc.digest()) == before


def test_inconsistent_call_count_in_the_plan_is_refused():
    with pytest.raises(IllegalTransition, match="expected_generator_calls"):
        CacheLifecycle(GEOMETRY).begin_chunk(make_plan(expected_generator_calls=5))


def test_begin_chunk_twice_is_refused():
    lc = CacheLifecycle(GEOMETRY)
    lc.begin_chunk(make_plan())
    with pytest.raises(IllegalTransition, match="still in progress"):
        lc.begin_chunk(make_plan(call_id=1, chunk_index=1, cache_epoch=1))


def test_window_outside_a_chunk_is_refused():
    lc = started()
    with pytest.raises(IllegalTransition, match="no chunk"):
        lc.window


# -- advance and roll: W=6, S=1, 16 tokens/frame, 3-frame chunks ---------------------------


def test_advance_and_roll_follow_the_documented_worked_example():
    # docs/lifecycle.md: chunk 0 writes [0,48), chunk 1 [48,96), chunk 2 rolls
    # 48 tokens (frames 1,2,3 evicted, frame 0 kept as sink) and writes [48,96).
    lc = CacheLifecycle(GEOMETRY)
    rows = []
    plan = make_plan()
    for _ in range(4):
        w, s = run_chunk(lc, plan)
        rows.append(
            (w.current_start_frame, w.roll_tokens, w.sink_tokens, w.write_start, w.write_end,
             w.global_start, w.global_end, w.bias_keys, s.local_end_index, s.global_end_index)
        )
        plan = next_plan(lc)
    assert rows == [
        (0, 0, 0, 0, 48, 0, 48, (0, 0), 48, 48),
        (3, 0, 16, 48, 96, 48, 96, (16, 48), 96, 96),
        (6, 48, 16, 48, 96, 96, 144, (16, 48), 96, 144),
        (9, 48, 16, 48, 96, 144, 192, (16, 48), 96, 192),
    ]


@pytest.mark.parametrize("sinks", [0, 1, 2])
def test_roll_never_drops_sink_frames_and_is_derived_identically(sinks):
    geo = CacheGeometry(window_frames=7, sink_frames=sinks, tokens_per_frame=TPF, chunk_frames=2)
    a, b = CacheLifecycle(geo), CacheLifecycle(geo)
    plan = make_plan(num_frames=2)
    for _ in range(8):
        wa, _ = run_chunk(a, plan)
        wb, _ = run_chunk(b, plan)
        assert wa == wb and a.digest() == b.digest()
        assert wa.write_end <= geo.capacity
        if wa.roll_tokens:
            # Tokens before the sinks' end never move: roll shifts only what follows them.
            assert wa.sink_tokens == geo.sink_tokens
            assert wa.write_start == geo.capacity - geo.chunk_tokens
        plan = next_plan(a, num_frames=2)


def test_every_denoise_call_leaves_the_write_window_unchanged():
    lc = started()
    plan = next_plan(lc)
    window = lc.begin_chunk(plan)
    before = lc.state
    for i in range(plan.num_denoise_steps):
        assert lc.record_call("denoise") == i
        assert lc.window == window
        s = lc.state
        assert (s.local_end_index, s.global_end_index, s.current_start_frame) == (
            before.local_end_index,
            before.global_end_index,
            before.current_start_frame,
        )
    after = lc.end_chunk()
    assert (after.local_end_index, after.global_end_index) == (window.write_end, window.global_end)


def test_pointers_move_once_per_chunk():
    lc = started()
    assert (lc.state.global_end_index, lc.state.next_start_frame) == (48, 3)
    run_chunk(lc, next_plan(lc))
    assert (lc.state.global_end_index, lc.state.next_start_frame) == (96, 6)


def test_write_window_is_a_pure_function_of_start_frame_and_tokens_per_frame():
    lc = started()
    w = lc.begin_chunk(next_plan(lc, denoising_step_list=(1000,)))
    assert (w.global_start, w.global_end) == (3 * TPF, 6 * TPF)


# -- recompute -----------------------------------------------------------------------------


def test_recompute_rebuilds_the_window_from_the_context_frames():
    lc = fresh(make_plan())
    run_chunk(lc, next_plan(lc))  # frames 0..5 in the cache
    plan = next_plan(lc, do_kv_recompute=True, context_frame_indices=(0, 4, 5))
    w = lc.begin_chunk(plan)
    assert w.recompute is not None
    assert w.recompute.frame_positions == (0, 4, 5)
    assert w.recompute.local_end == 3 * TPF
    # The chunk is denoised right after the context: no roll needed.
    assert (w.roll_tokens, w.write_start, w.write_end) == (0, 48, 96)
    assert lc.state.global_end_index == 6 * TPF
    assert lc.record_call("recompute") == 0
    for _ in range(4):
        lc.record_call("denoise")
    assert lc.end_chunk().local_end_index == 96


def test_early_regime_recompute_with_fewer_context_frames():
    lc = started()
    w = lc.begin_chunk(next_plan(lc, do_kv_recompute=True, context_frame_indices=(0, 2)))
    assert w.recompute.local_end == 2 * TPF
    assert (w.write_start, w.write_end) == (32, 80)


@pytest.mark.parametrize(
    "ctx, match",
    [
        ((), "strictly increasing"),
        ((2, 1), "strictly increasing"),
        ((1, 1), "strictly increasing"),
        ((-1, 2), "strictly increasing"),
        ((0, 3), "precede the chunk"),
        ((1, 4), "precede the chunk"),
        ((0, 1, 2, 2), "strictly increasing"),
    ],
)
def test_bad_recompute_context_is_refused(ctx, match):
    lc = started()
    with pytest.raises(IllegalTransition, match=match):
        lc.begin_chunk(next_plan(lc, do_kv_recompute=True, context_frame_indices=ctx))


def test_context_larger_than_the_window_allows_is_refused():
    lc = fresh(make_plan())
    run_chunk(lc, next_plan(lc))
    with pytest.raises(IllegalTransition, match="exceed the window"):
        lc.begin_chunk(next_plan(lc, do_kv_recompute=True, context_frame_indices=(0, 3, 4, 5)))


def test_context_frames_without_a_planned_recompute_are_refused():
    lc = started()
    with pytest.raises(IllegalTransition, match="without a planned recompute"):
        lc.begin_chunk(next_plan(lc, context_frame_indices=(0, 1, 2)))


# -- call counting ------------------------------------------------------------------------------


def test_recompute_call_not_planned_is_refused():
    lc = CacheLifecycle(GEOMETRY)
    lc.begin_chunk(make_plan())
    with pytest.raises(CallCountMismatch, match="not planned"):
        lc.record_call("recompute")


def test_recompute_call_after_a_denoise_call_is_refused():
    lc = started()
    lc.begin_chunk(next_plan(lc, do_kv_recompute=True, context_frame_indices=(0, 1, 2)))
    lc.record_call("recompute")
    with pytest.raises(CallCountMismatch, match="not planned"):
        lc.record_call("recompute")


def test_denoise_before_the_planned_recompute_is_refused():
    lc = started()
    lc.begin_chunk(next_plan(lc, do_kv_recompute=True, context_frame_indices=(0, 1, 2)))
    with pytest.raises(CallCountMismatch, match="before the planned recompute"):
        lc.record_call("denoise")


def test_excess_denoise_call_is_a_call_count_mismatch():
    lc = CacheLifecycle(GEOMETRY)
    lc.begin_chunk(make_plan(denoising_step_list=(1000, 500)))
    lc.record_call("denoise")
    lc.record_call("denoise")
    with pytest.raises(CallCountMismatch, match="exceeds the planned 2") as info:
        lc.record_call("denoise")
    assert (info.value.call_id, info.value.chunk_index, info.value.cache_epoch) == (0, 0, 0)


@pytest.mark.parametrize("calls", [0, 1, 3])
def test_end_chunk_with_too_few_calls_is_a_call_count_mismatch(calls):
    lc = CacheLifecycle(GEOMETRY)
    lc.begin_chunk(make_plan())
    for _ in range(calls):
        lc.record_call("denoise")
    with pytest.raises(CallCountMismatch, match=f"after {calls} generator calls, planned 4"):
        lc.end_chunk()
    assert lc.state.in_chunk  # the chunk is not silently closed


def test_calls_outside_a_chunk_are_refused():
    lc = started()
    with pytest.raises(IllegalTransition, match="outside a chunk"):
        lc.record_call("denoise")
    with pytest.raises(IllegalTransition, match="without a chunk"):
        lc.end_chunk()


def test_unknown_call_kind_is_refused():
    lc = CacheLifecycle(GEOMETRY)
    lc.begin_chunk(make_plan())
    with pytest.raises(IllegalTransition, match="unknown call kind"):
        lc.record_call("decode")


# -- cross-attention and soft transitions ------------------------------------------------------


def test_prompt_update_resets_cross_attention_but_keeps_kv():
    lc = started()
    assert lc.state.crossattn_is_init
    w = lc.begin_chunk(next_plan(lc, reset_crossattn_cache=True))
    assert w.reset_crossattn and not w.reset_kv
    assert not lc.state.crossattn_is_init
    assert lc.state.local_end_index == 48  # KV kept
    lc.record_call("denoise")
    assert lc.state.crossattn_is_init


def test_attention_bias_change_is_carried_into_window_and_state():
    lc = started()
    w = lc.begin_chunk(next_plan(lc, kv_cache_attention_bias=0.5))
    assert w.attention_bias == lc.state.attention_bias == 0.5


def test_envelopes_drive_the_lifecycle_like_plans():
    # Stages hold InferEnvelopes, rank 0 holds ChunkPlans: both fit LifecyclePlan.
    lc = CacheLifecycle(GEOMETRY)
    env = infer_envelope(
        recompute=False, call_id=0, chunk_index=0, current_start_frame=0,
        init_cache=True, reset_kv_cache=True, reset_crossattn_cache=True,
    )
    run_chunk(lc, env)
    run_chunk(lc, replace(env, call_id=1, chunk_index=1, current_start_frame=3, init_cache=False,
                          reset_kv_cache=False, reset_crossattn_cache=False))
    assert lc.state.next_start_frame == 6


# -- digest -------------------------------------------------------------------------------------


def _history(cut_at: int | None = None, prompt_at: int | None = None, mode: str = "r0a") -> CacheLifecycle:
    cfg = PPStageConfig().with_overrides({"recompute.mode": mode})
    planner = Planner(cfg)
    planner.submit(StreamStart("a fox"))
    lc = CacheLifecycle(GEOMETRY)
    for k in range(6):
        if k == cut_at:
            planner.submit(HardCut())
        if k == prompt_at:
            planner.submit(PromptUpdate("a wolf"))
        run_chunk(lc, planner.next_chunk())
    return lc


def test_digest_is_equal_for_equal_histories():
    assert _history().digest() == _history().digest()
    assert _history(cut_at=3).digest() == _history(cut_at=3).digest()


@pytest.mark.parametrize(
    "other",
    [dict(cut_at=3), dict(mode="r1"), dict(mode="r0")],
    ids=["hard cut", "mode r1", "mode r0"],
)
def test_digest_differs_for_different_histories(other):
    assert _history().digest() != _history(**other).digest()


def test_digest_differs_when_any_state_field_differs():
    lc = started()
    base = lc.state
    changed = dict(
        cache_epoch=5,
        last_call_id=9,
        last_chunk_index=9,
        current_start_frame=3,
        next_start_frame=9,
        global_end_index=1,
        local_end_index=1,
        crossattn_is_init=not base.crossattn_is_init,
        in_chunk=True,
        calls_made=1,
        expected_calls=9,
        recompute_planned=True,
        num_denoise_steps=9,
        attention_bias=0.5,
        recompute_mode="r0",
        anchor_mode="latent",
        position_offset=3,
        slot_positions=(7, 8),
    )
    assert set(changed) == set(base.__struct_fields__), "cover every state field"
    digests = {lc.digest()}
    for field, value in changed.items():
        lc._state = replace(base, **{field: value})
        digests.add(lc.digest())
    assert len(digests) == len(changed) + 1


def test_every_planner_plan_is_a_legal_transition_over_a_long_stream():
    cfg = PPStageConfig().with_overrides({"model.rope_max_frames": 30})
    planner = Planner(cfg)
    planner.submit(StreamStart("a fox"))
    lc = CacheLifecycle(GEOMETRY)
    for k in range(40):
        if k % 13 == 12:
            planner.submit(HardCut())
        if k % 7 == 3:
            planner.submit(PromptUpdate(f"prompt {k}"))
        window, state = run_chunk(lc, planner.next_chunk())
        assert window.write_end <= GEOMETRY.capacity
        assert state.local_end_index <= GEOMETRY.capacity
