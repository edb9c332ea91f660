"""``StreamInputs``: stage 0's model-side state, shared by the reference pipeline and rank 0.

Owns the text encoder and the VAE (a ``Stage0Backend``), the latents of the
current epoch and the ``decoded_frame_buffer`` (the last
``decoded_buffer_frames`` decoded frames, pixels). It builds every chunk's
inputs (phase A) and decodes results (phase C):

- ``chunk_inputs(plan)``: ``latents_in`` (seeded noise), conditioning, step
  list and, iff the plan recomputes, ``context_frames`` per ``plan.context_source``;
- ``anchor_ready(plan)``: whether ``chunk_inputs`` has what it needs now
  (R0a: the decoded anchor; every recompute: the latest latents);
- ``record_latents(plan, latents_out)`` then ``decode(plan, latents_out)``.

``decode`` runs the VAE outside the lock, so rank 0 may call it from a worker
thread while the event loop builds the next envelope. A plan of a newer epoch
clears the old epoch's latents and pixels; a plan of an older epoch is refused
(``StaleInputs``): rank 0's gate drops such results before they get here.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

from protocol import ProtocolError

from ppstage.config import PPStageConfig
from ppstage.model.backend import Stage0Backend, ToyStage0
from ppstage.model.scheduler import initial_latents, latent_shape
from ppstage.core.plan import ChunkPlan


class StreamInputError(ProtocolError):
    """Stage 0 cannot build or accept a chunk's tensors."""


class ContextUnavailable(StreamInputError):
    """A frame the plan's recompute context needs is not held (not produced yet, or evicted)."""


class StaleInputs(StreamInputError):
    """A plan of an epoch older than the one stage 0 now serves."""


@dataclass(frozen=True)
class ChunkInputs:
    """Phase A's tensors for one chunk (the envelope's payload)."""

    latents_in: Tensor  # [F, C, H, W] float32
    conditioning: Tensor  # [text_tokens, text_dim] float32
    step_list: Tensor  # [num_denoise_steps] int64
    context_frames: Tensor | None  # [n, C, H, W] float32 iff plan.do_kv_recompute


def _ids(plan: ChunkPlan) -> dict[str, int]:
    return dict(call_id=plan.call_id, chunk_index=plan.chunk_index, cache_epoch=plan.cache_epoch)


class StreamInputs:
    def __init__(self, config: PPStageConfig, backend: Stage0Backend | None = None) -> None:
        self.config = config
        self.backend: Stage0Backend = backend if backend is not None else ToyStage0(config.model)
        self._shape = latent_shape(config)
        self._lock = threading.Lock()
        self._epoch = -1
        self._latents: dict[int, Tensor] = {}  # frame -> [C, H, W] of the current epoch
        self._decoded: OrderedDict[int, Tensor] = OrderedDict()  # frame -> [3, H, W] uint8
        # Latents older than this many frames behind the newest are never a context frame.
        self._keep_latents = config.recompute.decoded_buffer_frames + 2 * config.cache.chunk_frames

    # -- read side ---------------------------------------------------------
    @property
    def cache_epoch(self) -> int:
        return self._epoch

    @property
    def decoded_frame_buffer(self) -> dict[int, Tensor]:
        """A snapshot ``frame -> pixels`` of the decoded buffer, oldest first."""
        with self._lock:
            return dict(self._decoded)

    def latent_frames(self) -> tuple[int, ...]:
        with self._lock:
            return tuple(sorted(self._latents))

    # -- phase A -----------------------------------------------------------
    def chunk_inputs(self, plan: ChunkPlan) -> ChunkInputs:
        with self._lock:
            self._enter_epoch(plan)
        context = self._context(plan) if plan.do_kv_recompute else None
        return ChunkInputs(
            latents_in=initial_latents(plan, self._shape),
            conditioning=self.backend.encode_text(plan.prompt),
            step_list=torch.tensor(plan.denoising_step_list, dtype=torch.int64),
            context_frames=context,
        )

    def anchor_ready(self, plan: ChunkPlan) -> bool:
        """Whether ``chunk_inputs(plan)`` can build the context now."""
        if not plan.do_kv_recompute:
            return True
        with self._lock:
            if plan.cache_epoch != self._epoch:
                return False
            latents, decoded = self._needed(plan)
            return all(f in self._latents for f in latents) and all(f in self._decoded for f in decoded)

    # -- phase C -----------------------------------------------------------
    def record_latents(self, plan: ChunkPlan, latents_out: Tensor) -> None:
        if tuple(latents_out.shape) != self._shape:
            raise StreamInputError(
                f"latents_out {tuple(latents_out.shape)} != {self._shape}", **_ids(plan)
            )
        with self._lock:
            self._enter_epoch(plan)
            for i in range(latents_out.shape[0]):
                self._latents[plan.current_start_frame + i] = latents_out[i].detach().clone()
            oldest = plan.end_frame - self._keep_latents
            for f in [f for f in self._latents if 0 < f < oldest]:  # frame 0 anchors the early regime
                del self._latents[f]

    def decode(self, plan: ChunkPlan, latents_out: Tensor) -> Tensor:
        """VAE-decode ``latents_out`` -> ``[F, 3, H, W]`` uint8 and keep the newest frames."""
        pixels = self.backend.vae_decode(latents_out)
        with self._lock:
            self._enter_epoch(plan)
            for i in range(pixels.shape[0]):
                # A copy: the sink gets `pixels` and may edit them in place; the
                # R0a anchor must stay what was decoded.
                self._decoded[plan.current_start_frame + i] = pixels[i].clone()
            while len(self._decoded) > self.config.recompute.decoded_buffer_frames:
                self._decoded.popitem(last=False)
        return pixels

    # -- internals ---------------------------------------------------------
    def _enter_epoch(self, plan: ChunkPlan) -> None:
        if plan.cache_epoch < self._epoch:
            raise StaleInputs(f"plan of epoch {plan.cache_epoch}, serving {self._epoch}", **_ids(plan))
        if plan.cache_epoch > self._epoch:  # hard cut: nothing of the old epoch may leak
            self._epoch = plan.cache_epoch
            self._latents.clear()
            self._decoded.clear()

    def _needed(self, plan: ChunkPlan) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(latent frames, decoded frames)`` the plan's context is built from."""
        idx = tuple(plan.context_frame_indices)
        src = plan.context_source
        if src == "decoded":
            if plan.anchor_frame is None or not idx or idx[0] != plan.anchor_frame:
                raise ContextUnavailable("decoded context must start at its anchor frame", **_ids(plan))
            return idx[1:], (plan.anchor_frame,)
        if src in ("early", "latent"):
            return idx, ()
        raise ContextUnavailable(f"recompute planned with context source {src!r}", **_ids(plan))

    def _context(self, plan: ChunkPlan) -> Tensor:
        with self._lock:
            latent_frames, decoded_frames = self._needed(plan)
            missing = [f for f in latent_frames if f not in self._latents]
            missing_px = [f for f in decoded_frames if f not in self._decoded]
            if missing or missing_px:
                raise ContextUnavailable(
                    f"context needs latents {missing} and decoded frames {missing_px}, not held",
                    **_ids(plan),
                )
            latents = [self._latents[f] for f in latent_frames]
            pixels = [self._decoded[f] for f in decoded_frames]
        if pixels:  # R0a: the anchor is the VAE round trip of the decoded frame
            latents = [self.backend.vae_encode(torch.stack(pixels))[0], *latents]
        return torch.stack(latents).contiguous()
