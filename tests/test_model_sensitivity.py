"""Every lifecycle fault the protocol guards against visibly changes the generated video.

Each test runs the same planned stream twice, injects one fault into the
second run at chunk ``k``, and requires the outputs of chunk ``k`` and of the
next chunk to differ by more than 1e-3 (and the runs before ``k`` to agree).
If a fault were invisible in the output, the toy model could not stand in for
a real one when testing franken-model detection.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec
import torch

from ppstage.config import PPStageConfig
from ppstage.core.plan import ChunkPlan
from ppstage.core.planner import HardCut, Planner, PromptUpdate, StreamStart
from ppstage.model.reference import ReferencePipeline

TOL = 1e-3


def plans(mode: str, chunks: int, intents: dict[int, list] | None = None) -> list[ChunkPlan]:
    planner = Planner(PPStageConfig().with_overrides({"recompute.mode": mode}))
    planner.submit(StreamStart("a red fox running through snow"))
    out = []
    for k in range(chunks):
        for intent in (intents or {}).get(k, []):
            planner.submit(intent)
        out.append(planner.next_chunk())
    return out


def run_with_fault(
    plan_list: list[ChunkPlan],
    k: int,
    inject: Callable[[ReferencePipeline, ChunkPlan], ChunkPlan],
    undo: Callable[[ReferencePipeline], None] = lambda pipe: None,
) -> None:
    """Run ``plan_list`` clean and with ``inject`` applied at chunk ``k``; compare outputs."""
    config = PPStageConfig().with_overrides({"recompute.mode": plan_list[0].recompute_mode})
    good, bad = ReferencePipeline(config), ReferencePipeline(config)
    for i, plan in enumerate(plan_list):
        ref = good.run_chunk(plan).latents_out
        if i == k:
            out = bad.run_chunk(inject(bad, plan)).latents_out
            undo(bad)
        else:
            out = bad.run_chunk(plan).latents_out
        diff = float((ref - out).abs().max())
        if i < k:
            assert diff == 0.0, f"chunk {i} differs before the fault"
        elif i in (k, k + 1):
            assert diff > TOL, f"chunk {i}: fault changed the output by only {diff:.2e}"


def test_reset_skipped_on_one_layer_at_a_hard_cut_changes_the_output():
    # The KV zeroing itself is unobservable (every read range is written first,
    # which is the point of taking indices from the lifecycle); what a layer
    # that skips the reset leaks is its cross-attention cache of the old stream.
    plan_list = plans("r0a", 6, {3: [HardCut(), PromptUpdate("a blue whale in the deep sea")]})
    assert plan_list[3].init_cache

    def skip_reset_on_layer_5(pipe, plan):
        cache = pipe.stages[0].caches[5]
        cache.reset_kv = lambda: None
        cache.reset_crossattn = lambda: None
        return plan

    def restore(pipe):
        del pipe.stages[0].caches[5].reset_kv, pipe.stages[0].caches[5].reset_crossattn

    run_with_fault(plan_list, 3, skip_reset_on_layer_5, restore)


def test_start_frame_off_by_one_changes_the_output():
    plan_list = plans("r1", 5)
    saved = {}

    def positions_off_by_one(pipe, plan):
        rope = pipe.stages[0]._rope
        saved["for_frames"] = rope.for_frames
        rope.for_frames = lambda frames: saved["for_frames"]([f + 1 for f in frames])
        return plan

    def restore(pipe):
        pipe.stages[0]._rope.for_frames = saved["for_frames"]

    run_with_fault(plan_list, 2, positions_off_by_one, restore)


def test_stale_cross_attention_after_a_prompt_change_changes_the_output():
    plan_list = plans("r0a", 5, {2: [PromptUpdate("a blue whale in the deep sea")]})
    assert plan_list[2].reset_crossattn_cache and not plan_list[2].init_cache

    def ignore_crossattn_reset(pipe, plan):
        for c in pipe.stages[0].caches:
            c.reset_crossattn = lambda: None
        return plan

    def restore(pipe):
        for c in pipe.stages[0].caches:
            del c.reset_crossattn

    run_with_fault(plan_list, 2, ignore_crossattn_reset, restore)


def test_latent_anchor_where_the_decoded_anchor_is_planned_changes_the_output():
    plan_list = plans("r0a", 5)
    assert plan_list[2].context_source == "decoded"
    run_with_fault(
        plan_list, 2, lambda pipe, plan: msgspec.structs.replace(plan, context_source="latent")
    )


def test_skipped_recompute_changes_the_output():
    plan_list = plans("r0a", 5)
    assert plan_list[2].do_kv_recompute

    def skip_recompute(pipe, plan):
        return msgspec.structs.replace(
            plan,
            do_kv_recompute=False,
            expected_generator_calls=plan.num_denoise_steps,
            context_frame_indices=(),
            context_source="none",
            anchor_frame=None,
        )

    run_with_fault(plan_list, 2, skip_recompute)


def test_attention_bias_reweights_past_frames():
    from ppstage.core.planner import AttentionBiasChange

    plain = plans("r1", 4)
    biased = plans("r1", 4, {2: [AttentionBiasChange(0.25)]})
    config = PPStageConfig().with_overrides({"recompute.mode": "r1"})
    a, b = ReferencePipeline(config), ReferencePipeline(config)
    outs = [(a.run_chunk(p).latents_out, b.run_chunk(q).latents_out) for p, q in zip(plain, biased)]
    assert torch.equal(*outs[1])
    assert float((outs[2][0] - outs[2][1]).abs().max()) > TOL
