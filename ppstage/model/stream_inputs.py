"""``StreamInputs``: stage 0's model-side state, shared by the reference pipeline and rank 0.

Owns the text encoder and the VAE (a ``Stage0Backend``), the latents of the
current epoch and the ``decoded_frame_buffer`` (the last
``decoded_buffer_frames`` decoded frames, pixels). It builds every chunk's
inputs (phase A) and decodes results (phase C):

- ``chunk_inputs(plan)``: ``latents_in`` (seeded noise), conditioning, step
  list and, iff the plan recomputes, ``context_frames`` per ``plan.context_source``;
- ``anchor_ready(plan)``: whether ``chunk_inputs`` has what it needs now
  (R0a: the decoded anchor; every recompute: the latest latents);
- ``record_latents(plan, latents_out)`` then ``decode(plan, latents_out)``,
  or frame by frame with ``decode_frames`` (R0a anchor-first: the frame a
  coming chunk's anchor needs, ``anchor_offsets(plan)``, before the others).
  The backend's decode is frame-independent (``check_frame_independent_decode``),
  so the bytes are the same in any order.

Device: ``device`` (default CPU) is where the backend is built (if its factory
takes one) and where every chunk input is made; latents and pixels are kept on
whatever device they are handed in on. Rank 0 and the reference pipeline keep
stage 0 on the host (rank 0 copies each result there, ``HostStage``), so their
envelopes are the same bytes; the generator moves them to its own device.

``decode`` runs the VAE outside the lock, so rank 0 may call it from a worker
thread while the event loop builds the next envelope. A plan of a newer epoch
clears the old epoch's latents and pixels; a plan of an older epoch is refused
(``StaleInputs``): rank 0's gate drops such results before they get here. The
exception is a *forced* cut (``cache.on_position_overflow = "cut"``): the old
epoch's results in flight are still decoded and emitted, but never stored (the
new epoch never reads them). Memory is bounded: at most
``decoded_buffer_frames + 2 * chunk_frames + 1`` latent frames and
``decoded_buffer_frames`` decoded frames, however long the stream.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

from ppstage.config import PPStageConfig
from ppstage.errors import PPStageError
from ppstage.model.backend import Stage0Backend
from ppstage.model.loader import build_stage0
from ppstage.model.scheduler import initial_latents, latent_shape
from ppstage.core.plan import ChunkPlan


class StreamInputError(PPStageError):
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


class StreamInputs:
    def __init__(
        self,
        config: PPStageConfig,
        backend: Stage0Backend | None = None,
        *,
        device: torch.device | str | None = None,
    ) -> None:
        self.config = config
        self.device = torch.device(device if device is not None else "cpu")
        self.backend: Stage0Backend = backend if backend is not None else build_stage0(config, self.device)
        self._shape = latent_shape(config)
        self._lock = threading.Lock()
        self._epoch = -1
        self._live_from = -1  # oldest epoch still decoded (moves only at a requested cut)
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
            latents_in=initial_latents(plan, self._shape, self.device),
            conditioning=self.backend.encode_text(plan.prompt),
            step_list=torch.tensor(plan.denoising_step_list, dtype=torch.int64, device=self.device),
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
                f"latents_out {tuple(latents_out.shape)} != {self._shape}", chunk=plan.id
            )
        with self._lock:
            if not self._enter_epoch(plan):
                return  # an epoch a forced cut ended: emitted, never a context frame
            # One copy of the chunk (the caller's tensor may be a reused receive
            # buffer), then a view per frame: a torch clone per frame cost ~5 us each
            # of rank 0's loop.
            kept = latents_out.detach().clone()
            for i in range(kept.shape[0]):
                self._latents[plan.current_start_frame + i] = kept[i]
            oldest = plan.end_frame - self._keep_latents
            for f in [f for f in self._latents if 0 < f < oldest]:  # frame 0 anchors the early regime
                del self._latents[f]

    def decode(self, plan: ChunkPlan, latents_out: Tensor) -> Tensor:
        """VAE-decode ``latents_out`` -> ``[F, 3, H, W]`` uint8 and keep the newest frames."""
        return self.decode_frames(plan, latents_out, range(latents_out.shape[0]))

    def decode_frames(self, plan: ChunkPlan, latents_out: Tensor, offsets) -> Tensor:
        """Decode the frames at ``offsets`` (within the chunk) -> ``[n, 3, H, W]`` uint8.

        Keeps them in the decoded-frame buffer in timeline order (a frame
        decoded early is not evicted by frames before it decoded later).
        """
        offsets = list(offsets)
        if not offsets:
            return torch.empty((0,), dtype=torch.uint8, device=latents_out.device)
        whole = offsets == list(range(latents_out.shape[0]))
        pixels = self.backend.vae_decode(latents_out if whole else latents_out[offsets])
        with self._lock:
            if not self._enter_epoch(plan):
                return pixels  # an epoch a forced cut ended: emitted, never an anchor
            for i, off in enumerate(offsets):
                # A copy: the sink gets `pixels` and may edit them in place; the
                # R0a anchor must stay what was decoded.
                self._decoded[plan.current_start_frame + off] = pixels[i].clone()
            if not whole:
                self._decoded = OrderedDict(sorted(self._decoded.items()))
            keep = self.config.recompute.decoded_buffer_frames
            while len(self._decoded) > keep:
                self._decoded.popitem(last=False)
        return pixels

    def anchor_offsets(self, plan: ChunkPlan) -> tuple[int, ...]:
        """Offsets of this chunk's frames that the very next R0a chunk takes as its anchor.

        The anchor of a chunk starting at ``s`` is decoded frame ``s - decoded_buffer_frames``
        (``Planner._context``), and the next chunk starts at ``end_frame``. Empty unless
        the mode is R0a and that frame lies in this chunk (``decoded_buffer_frames <=
        chunk_frames``); anchors of chunks further ahead are decoded long before they
        are needed. A hard cut only makes the prediction unused.
        """
        if self.config.recompute.mode != "r0a":
            return ()
        anchor = plan.end_frame - self.config.recompute.decoded_buffer_frames
        if plan.current_start_frame <= anchor < plan.end_frame:
            return (anchor - plan.current_start_frame,)
        return ()

    # -- internals ---------------------------------------------------------
    def _enter_epoch(self, plan: ChunkPlan) -> bool:
        """Move to ``plan``'s epoch if newer; False for an older epoch still decoded."""
        if plan.cache_epoch < self._live_from:
            raise StaleInputs(f"plan of epoch {plan.cache_epoch}, serving {self._epoch}", chunk=plan.id)
        if plan.cache_epoch < self._epoch:
            return False
        if plan.cache_epoch > self._epoch:  # hard cut: nothing of the old epoch may leak
            self._epoch = plan.cache_epoch
            if not plan.forced_cut:
                self._live_from = plan.cache_epoch
            self._latents.clear()
            self._decoded.clear()
        return True

    def _needed(self, plan: ChunkPlan) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(latent frames, decoded frames)`` the plan's context is built from."""
        idx = tuple(plan.context_frame_indices)
        src = plan.context_source
        if src == "decoded":
            if plan.anchor_frame is None or not idx or idx[0] != plan.anchor_frame:
                raise ContextUnavailable("decoded context must start at its anchor frame", chunk=plan.id)
            return idx[1:], (plan.anchor_frame,)
        if src in ("early", "latent"):
            return idx, ()
        raise ContextUnavailable(f"recompute planned with context source {src!r}", chunk=plan.id)

    def _context(self, plan: ChunkPlan) -> Tensor:
        with self._lock:
            latent_frames, decoded_frames = self._needed(plan)
            missing = [f for f in latent_frames if f not in self._latents]
            missing_px = [f for f in decoded_frames if f not in self._decoded]
            if missing or missing_px:
                raise ContextUnavailable(
                    f"context needs latents {missing} and decoded frames {missing_px}, not held",
                    chunk=plan.id,
                )
            latents = [self._latents[f] for f in latent_frames]
            pixels = [self._decoded[f] for f in decoded_frames]
        if pixels:  # R0a: the anchor is the VAE round trip of the decoded frame
            latents = [self.backend.vae_encode(torch.stack(pixels))[0], *latents]
        return torch.stack(latents).contiguous()
