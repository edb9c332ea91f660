"""KV-cache semantics of the embedded generator (SPEC section 3), observed on real tensors."""

from __future__ import annotations

import torch

from ppstage.config import PPStageConfig
from ppstage.model.stage import GeneratorStage
from ppstage.core.planner import HardCut, Planner, PromptUpdate, StreamStart
from ppstage.model.reference import ReferencePipeline

TPF = PPStageConfig().model.tokens_per_frame


def cfg(mode: str = "r0a", **overrides) -> PPStageConfig:
    return PPStageConfig().with_overrides({"recompute.mode": mode, **overrides})


def keys(stage: GeneratorStage) -> list[torch.Tensor]:
    return [c.k.clone() for c in stage.caches]


def spy_calls(monkeypatch, stage: GeneratorStage) -> list[tuple[str, list[torch.Tensor], int]]:
    """Record (kind, keys after the call, local_end_index) for every generator call."""
    seen: list[tuple[str, list[torch.Tensor], int]] = []
    run_call = stage.run_call

    def spy(kind, timestep, x):
        out = run_call(kind, timestep, x)
        seen.append((kind, keys(stage), stage.lifecycle.state.local_end_index))
        return out

    monkeypatch.setattr(stage, "run_call", spy)
    return seen


def start(config: PPStageConfig, prompt: str = "a fox") -> tuple[Planner, ReferencePipeline]:
    planner = Planner(config)
    planner.submit(StreamStart(prompt))
    return planner, ReferencePipeline(config)


def test_a_full_window_rolls_left_keeping_the_sink_frame():
    planner, pipe = start(cfg("r1"))
    stage = pipe.stages[0]
    pipe.run_chunk(planner.next_chunk())
    pipe.run_chunk(planner.next_chunk())  # window now full: frames 0..5
    before_roll = keys(stage)
    plan = planner.next_chunk()
    window = stage.begin_chunk(plan, pipe.stream.chunk_inputs(plan).conditioning)
    assert window.roll_tokens == 3 * TPF and window.write_start == 3 * TPF
    for k, old in zip(keys(stage), before_roll):
        assert torch.equal(k[:, :TPF], old[:, :TPF])  # sink frame 0 kept
        assert torch.equal(k[:, TPF : 3 * TPF], old[:, 4 * TPF : 6 * TPF])  # frames 4, 5 shifted left


def test_sink_frame_keys_outlive_many_evictions():
    planner, pipe = start(cfg("r1"))
    stage = pipe.stages[0]
    pipe.run_chunk(planner.next_chunk())
    sink = [k[:, :TPF].clone() for k in keys(stage)]
    for _ in range(8):
        pipe.run_chunk(planner.next_chunk())
    assert stage.lifecycle.state.current_start_frame == 24
    for k, s in zip(keys(stage), sink):
        assert torch.equal(k[:, :TPF], s)


def test_every_denoise_call_overwrites_the_same_slot_and_pointers_move_once(monkeypatch):
    planner, pipe = start(cfg("r1"))
    stage = pipe.stages[0]
    pipe.run_chunk(planner.next_chunk())
    before = keys(stage)
    seen = spy_calls(monkeypatch, stage)
    pipe.run_chunk(planner.next_chunk())
    ws, we = 3 * TPF, 6 * TPF
    assert [kind for kind, _, _ in seen] == ["denoise"] * 4
    assert {local_end for _, _, local_end in seen} == {3 * TPF}  # unchanged during the chunk
    assert stage.lifecycle.state.local_end_index == 6 * TPF  # moved once, at end_chunk
    prev = before
    for _, after, _ in seen:
        for k_prev, k_after in zip(prev, after):
            assert torch.equal(k_after[:, :ws], k_prev[:, :ws])  # older tokens untouched
            assert not torch.equal(k_after[:, ws:we], k_prev[:, ws:we])  # the slot rewritten
        prev = after


def test_recompute_rebuilds_the_cache_from_the_context_frames_alone(monkeypatch):
    # Two streams with different histories (seeds) rebuild identical caches from the same context.
    planner_a, pipe_a = start(cfg("r0a"))
    planner_b, pipe_b = start(cfg("r0a", **{"denoise.base_seed": 7}))
    pipe_a.run_chunk(planner_a.next_chunk())
    pipe_b.run_chunk(planner_b.next_chunk())
    assert not torch.equal(keys(pipe_a.stages[0])[0], keys(pipe_b.stages[0])[0])
    plan_a, plan_b = planner_a.next_chunk(), planner_b.next_chunk()
    assert plan_a.do_kv_recompute and plan_a.context_frame_indices == (0, 1, 2)
    context = pipe_a.stream.chunk_inputs(plan_a).context_frames
    rebuilt = []
    for pipe, plan in ((pipe_a, plan_a), (pipe_b, plan_b)):
        stage = pipe.stages[0]
        stage.begin_chunk(plan, pipe.stream.chunk_inputs(plan).conditioning)
        assert all(torch.count_nonzero(c.k) == 0 for c in stage.caches)  # cleared first
        stage.run_call("recompute", 0.0, context)
        rebuilt.append(keys(stage))
    for ka, kb in zip(*rebuilt):
        assert torch.equal(ka[:, : 3 * TPF], kb[:, : 3 * TPF])
        assert torch.count_nonzero(ka[:, : 3 * TPF]) > 0
        assert torch.count_nonzero(ka[:, 3 * TPF :]) == 0


def test_prompt_update_recomputes_cross_attention_and_keeps_the_kv_cache():
    planner, pipe = start(cfg("r1"), prompt="a red fox")
    stage = pipe.stages[0]
    pipe.run_chunk(planner.next_chunk())
    kv_before = keys(stage)
    cross_before = [c.cross_k.clone() for c in stage.caches]
    planner.submit(PromptUpdate("a blue whale"))
    plan = planner.next_chunk()
    assert plan.reset_crossattn_cache and not plan.reset_kv_cache
    inputs = pipe.stream.chunk_inputs(plan)
    stage.begin_chunk(plan, inputs.conditioning)
    assert not any(c.cross_is_init for c in stage.caches)
    for k, old in zip(keys(stage), kv_before):
        assert torch.equal(k, old)  # KV kept
    stage.run_call("denoise", 1000.0, inputs.latents_in)
    fresh_planner, fresh = start(cfg("r1"), prompt="a blue whale")
    fresh_plan = fresh_planner.next_chunk()
    fresh.stages[0].begin_chunk(fresh_plan, fresh.stream.chunk_inputs(fresh_plan).conditioning)
    fresh.stages[0].run_call("denoise", 1000.0, inputs.latents_in)
    for c, old, ref in zip(stage.caches, cross_before, fresh.stages[0].caches):
        assert c.cross_is_init
        assert not torch.equal(c.cross_k, old)
        assert torch.equal(c.cross_k, ref.cross_k) and torch.equal(c.cross_v, ref.cross_v)


def test_without_a_reset_the_cross_attention_cache_is_reused():
    planner, pipe = start(cfg("r1"))
    stage = pipe.stages[0]
    pipe.run_chunk(planner.next_chunk())
    cross = [c.cross_k for c in stage.caches]
    pipe.run_chunk(planner.next_chunk())
    assert all(c.cross_k is old for c, old in zip(stage.caches, cross))


def test_hard_cut_zeroes_every_cache_and_restarts_the_indices():
    planner, pipe = start(cfg("r0a"))
    stage = pipe.stages[0]
    for _ in range(3):
        pipe.run_chunk(planner.next_chunk())
    assert all(torch.count_nonzero(c.k) > 0 for c in stage.caches)
    planner.submit(HardCut())
    plan = planner.next_chunk()
    window = stage.begin_chunk(plan, pipe.stream.chunk_inputs(plan).conditioning)
    assert window.reset_kv and window.write_start == 0 and window.current_start_frame == 0
    for c in stage.caches:
        assert torch.count_nonzero(c.k) == 0 and torch.count_nonzero(c.v) == 0
        assert not c.cross_is_init
    s = stage.lifecycle.state
    assert (s.cache_epoch, s.global_end_index, s.local_end_index) == (1, 0, 0)
