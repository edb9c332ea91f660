"""The embedded model is device-generic: weights, caches, scheduler noise on the device asked for.

No GPU here: placement is checked on ``meta`` (shapes only, every op runs), values on the CPU.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from ppstage.config import PPStageConfig
from ppstage.core.planner import Planner, StreamStart
from ppstage.model.backend import ToyStage0
from ppstage.model.loader import ModelBackend, build_generator, build_stage0, takes_device
from ppstage.model.reference import ReferencePipeline, run_reference
from ppstage.model.scheduler import (
    FlowMatchScheduler,
    denoise_step,
    initial_latents,
    latent_shape,
    step_noise,
)
from ppstage.model.seeds import seeded_randn
from ppstage.model.stage import GeneratorStage, StageInputError

META = torch.device("meta")


def _stage_tensors(stage: GeneratorStage) -> list[tuple[str, torch.Tensor]]:
    """Every tensor a stage holds: weights, derived layouts, tables and caches."""
    out: list[tuple[str, torch.Tensor]] = []
    modules = [("time", stage._time), ("rope", stage._rope), *((f"block{b.index}", b) for b in stage.blocks)]
    if stage.patch_embed is not None:
        modules.append(("patch_embed", stage.patch_embed))
    if stage.head is not None:
        modules.append(("head", stage.head))
    for prefix, module in modules:
        for name, value in vars(module).items():
            values = value.values() if isinstance(value, dict) else value if isinstance(value, tuple) else [value]
            if not name.startswith("host_"):  # kept on the CPU on purpose (named so)
                out += [(f"{prefix}.{name}", t) for t in values if isinstance(t, torch.Tensor)]
    for i, c in enumerate(stage.caches):
        out += [(f"cache{i}.k", c.k), (f"cache{i}.v", c.v)]
    return out


def _plan(config: PPStageConfig):
    planner = Planner(config)
    planner.submit(StreamStart("a red fox"))
    return planner.next_chunk()


def test_model_built_on_meta_puts_every_weight_and_cache_on_meta() -> None:
    config = PPStageConfig()
    stage = GeneratorStage(config, (0, config.model.layers), device=META)
    tensors = _stage_tensors(stage)
    assert any(name.startswith("cache") for name, _ in tensors)
    assert any(name.startswith("block") for name, _ in tensors)
    off = [name for name, t in tensors if t.device != META]
    assert off == [], f"left off the device: {off}"


def test_a_chunk_runs_on_meta_and_its_output_and_caches_stay_there() -> None:
    config = PPStageConfig()
    m = config.model
    stage = GeneratorStage(config, (0, m.layers), device=META)
    plan = _plan(config)
    stage.begin_chunk(plan, torch.empty(m.text_tokens, m.text_dim, device=META))
    x_t = initial_latents(plan, latent_shape(config), META)
    flow = stage.run_call("denoise", float(plan.denoising_step_list[0]), x_t)
    assert flow.device == META and tuple(flow.shape) == latent_shape(config)
    x0, x_next = denoise_step(FlowMatchScheduler.from_config(config), plan, plan.denoising_step_list, 0, x_t, flow)
    assert x0.device == META and x_next is not None and x_next.device == META
    assert all(c.cross_k is not None and c.cross_k.device == META for c in stage.caches)


def test_a_stage_refuses_inputs_on_another_device() -> None:
    config = PPStageConfig()
    m = config.model
    stage = GeneratorStage(config, (0, m.layers), device=META)
    with pytest.raises(StageInputError, match="on cpu, expected .* on meta"):
        stage.begin_chunk(_plan(config), torch.zeros(m.text_tokens, m.text_dim))


@pytest.mark.parametrize("draw", [
    lambda plan, shape, dev: initial_latents(plan, shape, dev),
    lambda plan, shape, dev: step_noise(plan, 1, shape, dev),
    lambda plan, shape, dev: seeded_randn(shape, 7, "x", std=0.3, device=dev),
])
def test_noise_is_drawn_on_the_cpu_and_lands_on_the_device_asked_for(draw) -> None:
    config = PPStageConfig()
    plan, shape = _plan(config), latent_shape(config)
    on_cpu = draw(plan, shape, None)
    assert on_cpu.device.type == "cpu"
    assert torch.equal(draw(plan, shape, torch.device("cpu")), on_cpu)
    on_meta = draw(plan, shape, META)
    assert on_meta.device == META and on_meta.shape == on_cpu.shape and on_meta.dtype == on_cpu.dtype
    if torch.cuda.is_available():  # the point of drawing on the CPU: the same bytes on a GPU
        assert torch.equal(draw(plan, shape, torch.device("cuda")).cpu(), on_cpu)


def test_weights_do_not_depend_on_the_device_they_are_built_for() -> None:
    # Weights are drawn and derived on the CPU, then moved: a CPU build is the reference bytes.
    config = PPStageConfig()
    a = GeneratorStage(config, (0, config.model.layers))
    b = GeneratorStage(config, (0, config.model.layers), device="cpu")
    assert a.weight_fingerprint() == b.weight_fingerprint()
    if torch.cuda.is_available():
        assert GeneratorStage(config, (0, config.model.layers), device="cuda").weight_fingerprint() == a.weight_fingerprint()


def test_stage0_models_are_built_on_the_device_asked_for() -> None:
    config = PPStageConfig()
    s0 = ToyStage0(config.model, META)
    assert {t.device for t in (s0.text.pos, s0.text.mix, s0.vae.dec_w, s0.vae.dec_b, s0.vae.enc_w, s0.vae.blur)} == {META}
    assert s0.encode_text("a red fox").device == META
    cpu = ToyStage0(config.model)
    assert torch.equal(cpu.encode_text("a red fox"), ToyStage0(config.model, "cpu").encode_text("a red fox"))


def test_the_loader_passes_device_only_to_factories_that_take_it(monkeypatch) -> None:
    config = PPStageConfig()
    seen: dict[str, object] = {}

    def old_generator(config, layer_range, *, tp_rank=0, tp_size=1, reduce=None):  # no device parameter
        seen["generator"] = "called"
        return GeneratorStage(config, layer_range, tp_rank=tp_rank, tp_size=tp_size, reduce=reduce)

    def old_stage0(config):
        seen["stage0"] = "called"
        return ToyStage0(config.model)

    monkeypatch.setattr("ppstage.model.loader.load_backend", lambda cfg: ModelBackend(old_generator, old_stage0))
    assert build_generator(config, (0, 1), device=META).device.type == "cpu"  # chose its own
    assert isinstance(build_stage0(config, device=META), ToyStage0)
    assert seen == {"generator": "called", "stage0": "called"}
    monkeypatch.undo()
    assert build_generator(config, (0, 1), device=META).device == META


@pytest.mark.parametrize(("factory", "takes"), [
    (GeneratorStage, True),
    (lambda config, layer_range, **kwargs: None, True),
    (lambda config, layer_range, *, device=None: None, True),
    (lambda config, layer_range, *, tp_rank=0: None, False),
    (lambda config: None, False),
])
def test_takes_device_reads_the_factory_signature(factory, takes) -> None:
    assert takes_device(factory) is takes


def test_takes_device_is_false_for_a_callable_without_a_signature() -> None:
    with pytest.raises(ValueError):
        inspect.signature(max)
    assert takes_device(max) is False


def test_the_reference_on_an_explicit_cpu_device_gives_the_same_bytes() -> None:
    config = PPStageConfig()
    default = run_reference(config, 2)
    explicit = run_reference(config, 2, device=torch.device("cpu"))
    assert [r.output_digest for r in default] == [r.output_digest for r in explicit]
    assert all(r.latents_out.device.type == "cpu" and r.pixels.device.type == "cpu" for r in explicit)


def test_the_reference_builds_its_generator_on_its_device_and_keeps_stage0_on_the_host() -> None:
    pipeline = ReferencePipeline(PPStageConfig(), device=META)
    assert all(s.device == META for s in pipeline.stages)
    assert pipeline.stream.device.type == "cpu"
