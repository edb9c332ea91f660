"""The two seams where a real model plugs in (docs/models.md).

``GeneratorBackend`` is what every generator rank runs: exactly the API of
``GeneratorStage``. ``Stage0Backend`` is what rank 0 runs: text encoder and
VAE. The runtime and the reference pipeline only use these methods, so a
real model (Wan/Self-Forcing layers, a real VAE) that implements them slots
in without touching the lifecycle, planner or transport.
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

from ppstage.config import ModelConfig
from ppstage.core.lifecycle import CacheLifecycle, ChunkWindow, LifecyclePlan, LifecycleState
from ppstage.model.text import ToyTextEncoder
from ppstage.model.vae import ToyVAE


@runtime_checkable
class GeneratorBackend(Protocol):
    """Layers ``[a, b)`` of a causal generator with their KV and cross-attention caches.

    Construction: ``(config, layer_range, *, tp_rank=0, tp_size=1, reduce=None[, device])``;
    ``device`` (the rank's, ``runtime.device``) is passed only to a factory that
    takes it (``ppstage.model.loader``): inbound tensors arrive on that device.
    Contract:

    - ``begin_chunk`` applies the plan through ``lifecycle.begin_chunk`` and does
      exactly what the returned ``ChunkWindow`` says (reset, cross-attn reset,
      recompute rebuild, roll, re-base of the kept keys by ``rebase_shift``), in
      that order; it never computes an index or a position itself (positions:
      ``position_start``, ``RecomputeWindow.positions``).
    - ``run_call`` first calls ``lifecycle.record_call(kind)``; denoise calls write
      ``[write_start, write_end)`` and attend to ``[0, write_end)``; a recompute call
      (timestep 0) rebuilds ``[0, recompute.local_end)`` from the context frames.
    - tensor-parallel partial sums go through ``reduce``, never another collective.
    - output is deterministic: same plans and inputs -> same bytes.
    """

    is_first: bool
    is_last: bool
    lifecycle: CacheLifecycle

    def begin_chunk(self, plan: LifecyclePlan, conditioning: Tensor) -> ChunkWindow: ...

    def run_call(self, kind: Literal["recompute", "denoise"], timestep: float, x: Tensor) -> Tensor: ...

    def end_chunk(self) -> LifecycleState: ...

    def state_digest(self) -> str: ...

    def weight_fingerprint(self) -> str: ...


@runtime_checkable
class Stage0Backend(Protocol):
    """Rank 0's models: prompt -> conditioning, latents <-> pixels.

    ``encode_text(prompt) -> [text_tokens, text_dim]`` float32;
    ``vae_decode([F, C, h, w] float32) -> [F, 3, H, W] uint8``;
    ``vae_encode([F, 3, H, W] uint8) -> [F, C, h, w] float32``.
    All deterministic. Rank 0 calls them from worker threads, text encoding
    and VAE encode (building the next envelope) concurrently with decode, so
    they must share no mutable state.

    Decode is **frame-independent**: decoding any subset of frames gives, for
    each of them, exactly the bytes the whole-chunk decode gives (R0a decodes
    the next anchor's frame first; ``check_frame_independent_decode``). A VAE
    whose decoder mixes frames (a temporal VAE with a causal cache) must decode
    in chunk order and report that instead; see docs/performance.md.
    """

    def encode_text(self, prompt: str) -> Tensor: ...

    def vae_encode(self, pixels: Tensor) -> Tensor: ...

    def vae_decode(self, latents: Tensor) -> Tensor: ...


class BackendContractError(AssertionError):
    """A backend does not honour a contract the runtime relies on."""


def check_frame_independent_decode(backend: Stage0Backend, latents: Tensor) -> None:
    """Raise ``BackendContractError`` unless every frame of ``latents`` ``[F, C, h, w]``
    decodes alone to the same bytes as in the whole-chunk decode, and in reverse order too."""
    whole = backend.vae_decode(latents)
    for i in range(latents.shape[0]):
        alone = backend.vae_decode(latents[i : i + 1])
        if alone.shape[0] != 1 or not torch.equal(alone[0], whole[i]):
            raise BackendContractError(f"frame {i} decoded alone differs from the whole-chunk decode")
    backwards = backend.vae_decode(latents.flip(0))
    if not torch.equal(backwards, whole.flip(0)):
        raise BackendContractError("decoding frames in another order changes their bytes")


class ToyStage0:
    """The embedded ``Stage0Backend``: ``ToyTextEncoder`` + ``ToyVAE`` on ``device`` (default CPU).

    Its tensors come back on ``device``: ``encode_text`` and ``vae_encode`` results
    and ``vae_decode`` pixels alike; inputs must be there too.
    """

    def __init__(self, model_config: ModelConfig, device: torch.device | str = "cpu") -> None:
        self.text = ToyTextEncoder(model_config, device)
        self.vae = ToyVAE(model_config, device)

    def encode_text(self, prompt: str) -> Tensor:
        return self.text.encode(prompt)

    def vae_encode(self, pixels: Tensor) -> Tensor:
        return self.vae.encode(pixels)

    def vae_decode(self, latents: Tensor) -> Tensor:
        return self.vae.decode(latents)
