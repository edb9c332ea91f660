"""Flow-matching scheduler and the one per-chunk denoise loop.

Convention: ``x_t = (1 - sigma) * x0 + sigma * noise`` and the model predicts
the flow ``noise - x0``, so ``x0 = x_t - sigma * flow``. ``sigma`` of a
timestep ``t`` in ``(0, 1000]`` is shifted: ``sigma = shift*s / (1 + (shift-1)*s)``
with ``s = t / 1000``.

Noise is a pure function of ``(base_seed, cache_epoch, current_start_frame,
step)``: the reference pipeline and the distributed last stage draw the same
bytes without exchanging them, on any device: it is drawn on the CPU and then
moved (``seeded_randn``). ``denoise_step`` is the single definition of a
step; ``denoise_chunk`` is the loop the reference pipeline runs, and the
distributed last stage calls ``denoise_step`` once per hop with the same
arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import Tensor

from ppstage.config import PPStageConfig
from ppstage.model.seeds import seeded_randn

RECOMPUTE_TIMESTEP = 0.0
"""The recompute call sees clean context frames: timestep 0."""


class NoisePlan(Protocol):
    """Plan fields that identify a chunk's noise (``ChunkPlan`` and ``InferEnvelope`` fit)."""

    base_seed: int
    cache_epoch: int
    current_start_frame: int


class FlowMatchScheduler:
    def __init__(self, shift: float = 5.0) -> None:
        if shift <= 0:
            raise ValueError("shift must be positive")
        self.shift = float(shift)

    @classmethod
    def from_config(cls, config: PPStageConfig) -> "FlowMatchScheduler":
        return cls(config.denoise.shift)

    def sigma(self, timestep: float) -> float:
        s = float(timestep) / 1000.0
        return self.shift * s / (1.0 + (self.shift - 1.0) * s)


def latent_shape(config: PPStageConfig) -> tuple[int, int, int, int]:
    m = config.model
    return (config.cache.chunk_frames, m.latent_channels, m.latent_height, m.latent_width)


def initial_latents(
    plan: NoisePlan, shape: tuple[int, ...], device: torch.device | str | None = None
) -> Tensor:
    """``latents_in`` of a chunk: pure noise keyed by ``(seed, epoch, start, "init")``, on ``device``."""
    return seeded_randn(shape, plan.base_seed, plan.cache_epoch, plan.current_start_frame, "init", device=device)


def step_noise(
    plan: NoisePlan, step_index: int, shape: tuple[int, ...], device: torch.device | str | None = None
) -> Tensor:
    """Re-noise after step ``step_index``, keyed by ``(seed, epoch, start, step_index)``, on ``device``."""
    return seeded_randn(
        shape, plan.base_seed, plan.cache_epoch, plan.current_start_frame, step_index, device=device
    )


def denoise_step(
    scheduler: FlowMatchScheduler,
    plan: NoisePlan,
    step_list: Sequence[int],
    step_index: int,
    x_t: Tensor,
    flow: Tensor,
    *,
    noise: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """One scheduler step: ``(x0, x_next)``; ``x_next`` is ``None`` after the last step.

    ``x0`` of the last step is the chunk's ``latents_out``. Runs on ``x_t``'s device
    (``flow`` must be on it too); the re-noise is drawn on the CPU and moved there.
    ``noise``: this step's ``step_noise(plan, step_index, x_t.shape, device=x_t.device)``
    drawn ahead of time (it depends only on the plan), else drawn here.
    """
    sigma = scheduler.sigma(step_list[step_index])
    x0 = x_t - sigma * flow
    if step_index + 1 >= len(step_list):
        return x0, None
    sigma_next = scheduler.sigma(step_list[step_index + 1])
    if noise is None:
        noise = step_noise(plan, step_index, tuple(x_t.shape), device=x_t.device)
    return x0, (1.0 - sigma_next) * x0 + sigma_next * noise


def denoise_chunk(
    call: Callable[[float, Tensor], Tensor],
    scheduler: FlowMatchScheduler,
    plan: NoisePlan,
    step_list: Sequence[int],
    latents_in: Tensor,
) -> Tensor:
    """Run every denoise call of a chunk; ``call(timestep, x_t) -> flow``. Returns ``latents_out``."""
    steps = [int(t) for t in step_list]
    x: Tensor | None = latents_in
    x0 = latents_in
    for i, t in enumerate(steps):
        assert x is not None
        x0, x = denoise_step(scheduler, plan, steps, i, x, call(float(t), x))
    return x0
