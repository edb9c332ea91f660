"""``ChunkPlan``: the immutable lifecycle decision rank 0 makes for one chunk."""

from __future__ import annotations

from typing import Literal

import msgspec

from protocol import AnchorMode, ChunkId, RecomputeMode

__all__ = ["ChunkPlan", "ContextSource"]

ContextSource = Literal["none", "early", "decoded", "latent"]


class ChunkPlan(msgspec.Struct, frozen=True, kw_only=True):
    """Everything every rank must agree on for one chunk.

    Carries the same lifecycle fields as ``protocol.InferEnvelope``, so the
    cache lifecycle accepts either (stages hold envelopes, rank 0 and the
    reference pipeline hold plans). ``context_source`` and ``anchor_frame`` tell
    stage 0 how to build ``context_frames_override``: ``early`` = first latent
    frame of the epoch + latest latents; ``decoded`` = VAE round trip of decoded
    frame ``anchor_frame`` + latest latents (R0a); ``latent`` = latent frame
    ``anchor_frame`` + latest latents (R0).
    """

    call_id: int
    chunk_index: int
    cache_epoch: int
    current_start_frame: int
    num_frames: int
    init_cache: bool
    reset_kv_cache: bool
    reset_crossattn_cache: bool
    do_kv_recompute: bool
    num_denoise_steps: int
    expected_generator_calls: int
    kv_cache_attention_bias: float
    denoising_step_list: tuple[int, ...]
    recompute_mode: RecomputeMode
    anchor_mode: AnchorMode
    context_frame_indices: tuple[int, ...]
    context_source: ContextSource
    anchor_frame: int | None
    prompt: str
    base_seed: int
    forced_cut: bool = False
    position_offset: int = 0  # rotary position of timeline frame f is f - position_offset
    rebased: bool = False  # the offset moved at this boundary (a re-base, SPEC section 13)

    @property
    def id(self) -> ChunkId:
        """The plan's identity, stamped on its envelope and every message of the chunk."""
        return ChunkId.of(self)

    @property
    def end_frame(self) -> int:
        return self.current_start_frame + self.num_frames
