"""The embedded reference model: causal generator, scheduler, toy VAE and text encoder.

See docs/models.md. ``GeneratorStage`` is the interface the distributed
runtime drives; ``tensor_digest`` (from ``ppstage.digests``) is the one output digest.
"""

from ppstage.digests import tensor_digest
from ppstage.model.backend import GeneratorBackend, Stage0Backend, ToyStage0
from ppstage.model.seeds import derive_seed
from ppstage.model.scheduler import (
    RECOMPUTE_TIMESTEP,
    FlowMatchScheduler,
    denoise_chunk,
    denoise_step,
    initial_latents,
    latent_shape,
    step_noise,
)
from ppstage.model.stage import GeneratorStage, StageInputError
from ppstage.model.text import ToyTextEncoder
from ppstage.model.vae import ToyVAE

__all__ = [
    "RECOMPUTE_TIMESTEP",
    "FlowMatchScheduler",
    "GeneratorBackend",
    "GeneratorStage",
    "Stage0Backend",
    "StageInputError",
    "ToyStage0",
    "ToyTextEncoder",
    "ToyVAE",
    "denoise_chunk",
    "denoise_step",
    "derive_seed",
    "initial_latents",
    "latent_shape",
    "step_noise",
    "tensor_digest",
]
