"""Scheduler, toy VAE, toy text encoder, digests and the stage's guard rails."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
import torch

from ppstage.config import PPStageConfig
from ppstage.errors import CallCountMismatch, IllegalTransition
from ppstage.model import (
    FlowMatchScheduler,
    GeneratorBackend,
    GeneratorStage,
    Stage0Backend,
    StageInputError,
    ToyStage0,
    ToyTextEncoder,
    ToyVAE,
    denoise_step,
    initial_latents,
    step_noise,
    tensor_digest,
)
from ppstage.core.planner import Planner, StreamStart
from protocol import digest_bytes


class NoiseId(msgspec.Struct):
    base_seed: int = 42
    cache_epoch: int = 0
    current_start_frame: int = 0


SHAPE = (3, 4, 8, 8)


def test_tensor_digest_is_the_digest_of_the_contiguous_bytes():
    t = torch.arange(12, dtype=torch.float32).view(3, 4)
    assert tensor_digest(t) == digest_bytes(t.numpy().tobytes())
    assert tensor_digest(t.t()) == digest_bytes(np.ascontiguousarray(t.t().numpy()).tobytes())
    bumped = t.clone()
    bumped[0, 0] = torch.nextafter(bumped[0, 0], torch.tensor(1.0))
    assert tensor_digest(bumped) != tensor_digest(t)


def test_sigma_is_shifted_and_monotone():
    s = FlowMatchScheduler(5.0)
    assert s.sigma(1000) == 1.0 and s.sigma(0) == 0.0
    assert s.sigma(250) == pytest.approx(5 * 0.25 / (1 + 4 * 0.25))
    assert s.sigma(750) > s.sigma(500) > s.sigma(250)


def test_noise_is_a_pure_function_of_seed_epoch_start_and_step():
    base = NoiseId()
    assert torch.equal(step_noise(base, 1, SHAPE), step_noise(NoiseId(), 1, SHAPE))
    assert torch.equal(initial_latents(base, SHAPE), initial_latents(NoiseId(), SHAPE))
    variants = [
        step_noise(NoiseId(base_seed=43), 1, SHAPE),
        step_noise(NoiseId(cache_epoch=1), 1, SHAPE),
        step_noise(NoiseId(current_start_frame=3), 1, SHAPE),
        step_noise(base, 2, SHAPE),
        initial_latents(base, SHAPE),
    ]
    for v in variants:
        assert not torch.equal(v, step_noise(base, 1, SHAPE))


def test_denoise_step_converts_flow_to_x0_and_renoises_until_the_last_step():
    s, steps = FlowMatchScheduler(5.0), (1000, 750, 500, 250)
    x0_true = torch.randn(SHAPE)
    noise = torch.randn(SHAPE)
    sigma = s.sigma(750)
    x_t = (1 - sigma) * x0_true + sigma * noise
    x0, x_next = denoise_step(s, NoiseId(), steps, 1, x_t, noise - x0_true)
    assert torch.allclose(x0, x0_true, atol=1e-5)
    sn = s.sigma(500)
    assert torch.allclose(x_next, (1 - sn) * x0 + sn * step_noise(NoiseId(), 1, SHAPE))
    x0_last, none = denoise_step(s, NoiseId(), steps, 3, x_t, noise - x0_true)
    assert none is None and x0_last.shape == SHAPE


def test_vae_round_trip_is_lossy_but_close():
    m = PPStageConfig().model
    vae = ToyVAE(m)
    z = torch.randn(SHAPE)
    px = vae.decode(z)
    assert px.dtype == torch.uint8 and px.shape == (3, 3, 64, 64)
    assert torch.equal(px, ToyVAE(m).decode(z))
    back = vae.encode(px)
    assert back.shape == z.shape and back.dtype == torch.float32
    assert float((back - z).abs().mean()) > 0.05  # measurably lossy
    assert float(torch.corrcoef(torch.stack([back.flatten(), z.flatten()]))[0, 1]) > 0.8


def test_text_encoder_is_deterministic_and_prompt_sensitive():
    m = PPStageConfig().model
    enc = ToyTextEncoder(m)
    a = enc.encode("a red fox")
    assert a.shape == (m.text_tokens, m.text_dim) and a.dtype == torch.float32
    assert torch.equal(a, ToyTextEncoder(m).encode("a red fox"))
    assert not torch.equal(a, enc.encode("a blue fox"))
    assert not torch.equal(a, enc.encode("fox red a"))


def test_embedded_models_satisfy_the_backend_protocols():
    config = PPStageConfig()
    assert isinstance(GeneratorStage(config, (0, 8)), GeneratorBackend)
    assert isinstance(ToyStage0(config.model), Stage0Backend)


def _stage_in_chunk(mode: str = "r0a", chunks_before: int = 1):
    config = PPStageConfig().with_overrides({"recompute.mode": mode})
    stage = GeneratorStage(config, (0, 8))
    planner = Planner(config)
    planner.submit(StreamStart("a fox"))
    cond = ToyTextEncoder(config.model).encode("a fox")
    for _ in range(chunks_before):
        plan = planner.next_chunk()
        stage.begin_chunk(plan, cond)
        for _ in range(plan.expected_generator_calls):
            stage.run_call("denoise", 500.0, torch.zeros(SHAPE))
        stage.end_chunk()
    plan = planner.next_chunk()
    stage.begin_chunk(plan, cond)
    return stage, plan


def test_a_denoise_call_before_the_planned_recompute_is_refused():
    stage, plan = _stage_in_chunk("r0a")
    assert plan.do_kv_recompute
    with pytest.raises(CallCountMismatch):
        stage.run_call("denoise", 1000.0, torch.zeros(SHAPE))


def test_an_extra_call_and_an_early_end_are_refused():
    stage, plan = _stage_in_chunk("r1")
    for _ in range(plan.num_denoise_steps):
        stage.run_call("denoise", 1000.0, torch.zeros(SHAPE))
    with pytest.raises(CallCountMismatch):
        stage.run_call("denoise", 1000.0, torch.zeros(SHAPE))
    stage2, _ = _stage_in_chunk("r1")
    stage2.run_call("denoise", 1000.0, torch.zeros(SHAPE))
    with pytest.raises(CallCountMismatch):
        stage2.end_chunk()


def test_a_call_outside_a_chunk_is_refused():
    stage = GeneratorStage(PPStageConfig(), (0, 8))
    with pytest.raises(IllegalTransition):
        stage.run_call("denoise", 1000.0, torch.zeros(SHAPE))


@pytest.mark.parametrize(
    "x", [torch.zeros(2, 4, 8, 8), torch.zeros(48, 64), torch.zeros(SHAPE, dtype=torch.float64)]
)
def test_inputs_of_the_wrong_shape_or_dtype_raise_a_typed_error(x):
    stage, plan = _stage_in_chunk("r1")
    with pytest.raises(StageInputError) as info:
        stage.run_call("denoise", 1000.0, x)
    assert info.value.chunk_index == plan.chunk_index


def test_wrong_conditioning_is_refused_before_the_lifecycle_moves():
    config = PPStageConfig()
    stage = GeneratorStage(config, (0, 8))
    planner = Planner(config)
    planner.submit(StreamStart("a fox"))
    with pytest.raises(StageInputError):
        stage.begin_chunk(planner.next_chunk(), torch.zeros(4, 32))
    assert not stage.lifecycle.state.in_chunk


@pytest.mark.parametrize("bad", [(0, 0), (3, 2), (0, 9), (-1, 4)])
def test_bad_layer_ranges_are_refused(bad):
    with pytest.raises(ValueError):
        GeneratorStage(PPStageConfig(), bad)


def test_a_shard_without_a_reduce_is_refused():
    with pytest.raises(ValueError):
        GeneratorStage(PPStageConfig(), (0, 8), tp_rank=0, tp_size=2)


def test_a_stage_accepts_the_wire_envelope_in_place_of_the_plan():
    from protocol import InferEnvelope

    config = PPStageConfig()
    planner = Planner(config)
    planner.submit(StreamStart("a fox"))
    plan = planner.next_chunk()
    fields = {f: getattr(plan, f) for f in InferEnvelope.__struct_fields__ if hasattr(plan, f)}
    envelope = InferEnvelope(**fields, height=8, width=8, latent_channels=4)
    cond = ToyTextEncoder(config.model).encode("a fox")
    a, b = GeneratorStage(config, (0, 8)), GeneratorStage(config, (0, 8))
    assert a.begin_chunk(plan, cond) == b.begin_chunk(envelope, cond)
    x = initial_latents(envelope, SHAPE)
    assert torch.equal(x, initial_latents(plan, SHAPE))
    assert torch.equal(a.run_call("denoise", 1000.0, x), b.run_call("denoise", 1000.0, x))
