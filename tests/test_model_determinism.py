"""Determinism, pipeline splits and tensor-parallel shards of the embedded generator."""

from __future__ import annotations

import threading

import pytest
import torch

from ppstage.config import PPStageConfig
from ppstage.model.transformer import full_block_weights, shard_block_weights
from ppstage.model.scheduler import (
    RECOMPUTE_TIMESTEP,
    FlowMatchScheduler,
    denoise_chunk,
)
from ppstage.model.stage import GeneratorStage
from ppstage.core.planner import Planner, StreamStart
from ppstage.model.reference import ReferencePipeline, StreamScript, run_reference
from ppstage.model.stream_inputs import StreamInputs

SCRIPT = StreamScript(prompt="a red fox", cut_at=(5,), prompt_at={3: "a blue whale"})


def test_two_runs_with_the_same_seeds_are_bitwise_identical():
    config = PPStageConfig()
    a, b = run_reference(config, 7, SCRIPT), run_reference(config, 7, SCRIPT)
    for x, y in zip(a, b):
        assert x.output_digest == y.output_digest and x.state_digest == y.state_digest
        assert torch.equal(x.latents_out, y.latents_out) and torch.equal(x.pixels, y.pixels)
    other = run_reference(config.with_overrides({"denoise.base_seed": 1}), 2, SCRIPT)
    assert other[0].output_digest != a[0].output_digest


def test_weights_differ_per_model_seed_and_are_rebuilt_identically():
    config = PPStageConfig()
    s1, s2 = GeneratorStage(config, (0, 8)), GeneratorStage(config, (0, 8))
    assert s1.weight_fingerprint() == s2.weight_fingerprint()
    other = GeneratorStage(config.with_overrides({"model.seed": 1}), (0, 8))
    assert other.weight_fingerprint() != s1.weight_fingerprint()


@pytest.mark.parametrize("mode", ["r1", "r0a"])
def test_layer_ranges_run_one_after_another_match_the_whole_model_bitwise(mode):
    config = PPStageConfig().with_overrides({"recompute.mode": mode})
    whole = ReferencePipeline(config)
    split = ReferencePipeline(config, layer_ranges=[(0, 3), (3, 5), (5, 8)])
    assert [s.is_first for s in split.stages] == [True, False, False]
    assert [s.is_last for s in split.stages] == [False, False, True]
    assert [len(s.blocks) for s in split.stages] == [3, 2, 3]
    planner = Planner(config)
    for k in range(7):
        for intent in SCRIPT.intents_at(k):
            planner.submit(intent)
        plan = planner.next_chunk()
        a, b = whole.run_chunk(plan), split.run_chunk(plan)
        assert a.output_digest == b.output_digest
        assert a.state_digest == b.state_digest


def test_middle_stages_pass_hidden_states():
    config = PPStageConfig()
    first, middle = GeneratorStage(config, (0, 2)), GeneratorStage(config, (2, 4))
    assert first.head is None and middle.patch_embed is None and middle.head is None
    planner = Planner(config)
    planner.submit(StreamStart("a fox"))
    plan = planner.next_chunk()
    cond = StreamInputs(config).chunk_inputs(plan).conditioning
    for s in (first, middle):
        s.begin_chunk(plan, cond)
    hidden = first.run_call("denoise", 1000.0, torch.randn(3, 4, 8, 8))
    assert hidden.shape == (3 * config.model.tokens_per_frame, config.model.dim)
    assert middle.run_call("denoise", 1000.0, hidden).shape == hidden.shape


def test_tensor_parallel_shards_are_exact_slices_of_the_full_weights():
    m = PPStageConfig().model
    full = full_block_weights(m, 3)
    s0, s1 = (shard_block_weights(full, m, r, 2) for r in range(2))
    d, hl = m.dim, m.dim // 2
    q0, k0, v0 = s0["qkv_w"].view(3, hl, d)
    assert torch.equal(q0, full["qkv_w"][:hl]) and torch.equal(v0, full["qkv_w"][2 * d : 2 * d + hl])
    assert torch.equal(torch.cat([s0["out_w"], s1["out_w"]], 1), full["out_w"])
    assert torch.equal(torch.cat([s0["fc1_w"], s1["fc1_w"]], 0), full["fc1_w"])
    assert torch.equal(s0["fc2_b"], full["fc2_b"])  # row-shard biases are not split


class ThreadMesh:
    """An in-process all-reduce for ``size`` ranks running in threads (sum in rank order)."""

    def __init__(self, size: int) -> None:
        self.barrier = threading.Barrier(size, timeout=60)
        self.slots: list[torch.Tensor | None] = [None] * size

    def reduce_for(self, rank: int):
        def reduce(t: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = t
            self.barrier.wait()
            total = self.slots[0]
            for s in self.slots[1:]:
                total = total + s
            self.barrier.wait()  # nobody overwrites a slot before every rank summed
            return total

        return reduce


def test_tensor_parallel_shards_with_a_summing_reduce_match_tp1():
    config = PPStageConfig().with_overrides({"recompute.mode": "r0a"})
    chunks = 4
    reference = run_reference(config, chunks, SCRIPT)
    mesh = ThreadMesh(2)
    stages = [
        GeneratorStage(config, (0, 8), tp_rank=r, tp_size=2, reduce=mesh.reduce_for(r)) for r in range(2)
    ]
    assert stages[0].weight_fingerprint() != stages[1].weight_fingerprint()
    assert stages[0].caches[0].k.shape[0] == config.model.heads // 2  # a shard caches its heads only

    # Rank 0 (stage 0) builds the inputs from the reference's own latents, as it would in the runtime.
    stream = StreamInputs(config)
    scheduler = FlowMatchScheduler.from_config(config)
    planner = Planner(config)
    outputs: list[list[torch.Tensor]] = [[], []]
    errors: list[BaseException] = []

    def rank_main(rank: int, plan, inputs) -> None:
        try:
            stage = stages[rank]
            stage.begin_chunk(plan, inputs.conditioning)
            if plan.do_kv_recompute:
                stage.run_call("recompute", RECOMPUTE_TIMESTEP, inputs.context_frames)
            call = lambda t, x: stage.run_call("denoise", t, x)  # noqa: E731
            outputs[rank].append(denoise_chunk(call, scheduler, plan, inputs.step_list.tolist(), inputs.latents_in))
            stage.end_chunk()
        except BaseException as exc:  # surfaced below; a dead rank breaks the barrier
            errors.append(exc)
            mesh.barrier.abort()

    for k in range(chunks):
        for intent in SCRIPT.intents_at(k):
            planner.submit(intent)
        plan = planner.next_chunk()
        inputs = stream.chunk_inputs(plan)
        threads = [threading.Thread(target=rank_main, args=(r, plan, inputs)) for r in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "a mesh rank hung"
        assert not errors, errors
        out0, out1 = outputs[0][-1], outputs[1][-1]
        assert torch.equal(out0, out1)  # both ranks of the mesh agree bitwise
        assert stages[0].state_digest() == stages[1].state_digest() == reference[k].state_digest
        assert float((out0 - reference[k].latents_out).abs().max()) < 1e-4
        stream.record_latents(plan, reference[k].latents_out)
        stream.decode(plan, reference[k].latents_out)
