"""Valid sample messages and plans shared by the protocol and core tests.

Every builder returns a message that passes ``protocol.validate`` against
``GEOMETRY`` (the default config's wire geometry); tests break one field at a
time with ``msgspec.structs.replace``.
"""

from __future__ import annotations

from math import prod

import msgspec

from ppstage.config import PPStageConfig
from ppstage.core.plan import ChunkPlan
from protocol import (
    DTYPE_ITEMSIZE,
    ChunkResult,
    ErrorEnvelope,
    InferEnvelope,
    NoopEnvelope,
    ParityHello,
    ShutdownEnvelope,
    StageHop,
    StageReport,
    TensorSpec,
)

CONFIG = PPStageConfig()
GEOMETRY = CONFIG.wire_geometry()
FRAME = (GEOMETRY.latent_channels, GEOMETRY.height, GEOMETRY.width)
CHUNK = (GEOMETRY.num_frames, *FRAME)
STEPS = (1000, 750, 500, 250)


def spec(name: str, shape: tuple[int, ...], dtype: str = "float32", digest: str | None = None) -> TensorSpec:
    """A self-consistent tensor spec (``nbytes`` from shape and dtype)."""
    return TensorSpec(
        name=name, dtype=dtype, shape=shape, nbytes=prod(shape) * DTYPE_ITEMSIZE[dtype], digest=digest
    )


def infer_tensors(
    *, steps: int = len(STEPS), context: int = 0
) -> tuple[TensorSpec, ...]:
    out = [
        spec("latents_in", CHUNK),
        spec("conditioning_embeds", (GEOMETRY.text_tokens, GEOMETRY.text_dim)),
        spec("denoising_step_list", (steps,), "int64"),
    ]
    if context:
        out.append(spec("context_frames_override", (context, *FRAME)))
    return tuple(out)


def infer_envelope(*, recompute: bool = True, **fields) -> InferEnvelope:
    """A steady-state R0a envelope: recompute over 3 context frames, 4 steps."""
    ctx = (15, 19, 20) if recompute else ()
    base = dict(
        call_id=7,
        chunk_index=7,
        cache_epoch=0,
        height=GEOMETRY.height,
        width=GEOMETRY.width,
        num_frames=GEOMETRY.num_frames,
        latent_channels=GEOMETRY.latent_channels,
        current_start_frame=21,
        init_cache=False,
        reset_kv_cache=False,
        reset_crossattn_cache=False,
        do_kv_recompute=recompute,
        num_denoise_steps=len(STEPS),
        expected_generator_calls=len(STEPS) + (1 if recompute else 0),
        kv_cache_attention_bias=1.0,
        base_seed=42,
        recompute_mode="r0a",
        anchor_mode="decoded",
        context_frame_indices=ctx,
        tensors=infer_tensors(context=len(ctx)),
    )
    base.update(fields)
    return InferEnvelope(**base)


def first_chunk_envelope(**fields) -> InferEnvelope:
    """The hard cut that opens an epoch: frame 0, both caches reset, no recompute."""
    base = dict(
        call_id=0,
        chunk_index=0,
        current_start_frame=0,
        init_cache=True,
        reset_kv_cache=True,
        reset_crossattn_cache=True,
    )
    base.update(fields)
    return infer_envelope(recompute=False, **base)


def stage_report(stage: int = 1, calls: int = 5) -> StageReport:
    return StageReport(
        stage=stage,
        current_start_frame=21,
        global_end_index=384,
        local_end_index=96,
        state_digest="ab" * 16,
        observed_generator_calls=calls,
        duration_s=0.012,
    )


def chunk_result(**fields) -> ChunkResult:
    """An ok result for ``infer_envelope()`` from a two-stage pipeline."""
    calls = fields.get("observed_generator_calls", 5)
    base = dict(
        call_id=7,
        chunk_index=7,
        cache_epoch=0,
        ok=True,
        observed_generator_calls=calls,
        stages=(stage_report(1, calls), stage_report(2, calls)),
        output_digest="cd" * 16,
        tensors=(spec("latents_out", CHUNK),),
    )
    base.update(fields)
    return ChunkResult(**base)


def error_result(**fields) -> ChunkResult:
    base = dict(call_id=7, chunk_index=7, cache_epoch=0, ok=False, error="stage 2: out of memory")
    base.update(fields)
    return ChunkResult(**base)


def stage_hop(**fields) -> StageHop:
    """A hidden-state hop of denoise step 0 (3 frames x 16 tokens x dim 64)."""
    base = dict(
        call_id=7,
        chunk_index=7,
        cache_epoch=0,
        call_kind="denoise",
        step=0,
        target="hidden",
        tensors=(spec("hidden", (GEOMETRY.num_frames * GEOMETRY.tokens_per_frame, GEOMETRY.hidden_dim)),),
    )
    base.update(fields)
    return StageHop(**base)


def latent_hop(**fields) -> StageHop:
    """The last stage hands the denoised latent back to stage 1."""
    base = dict(target="latent", tensors=(spec("latents", CHUNK),))
    base.update(fields)
    return stage_hop(**base)


def sample_messages() -> list:
    """One valid message of every wire type (and both INFER shapes)."""
    return [
        infer_envelope(),
        first_chunk_envelope(),
        NoopEnvelope(call_id=8, chunk_index=7, cache_epoch=0),
        ShutdownEnvelope(call_id=9, chunk_index=7, cache_epoch=0),
        ErrorEnvelope(call_id=10, chunk_index=7, cache_epoch=0, reason="stage 1 died", origin_rank=1),
        chunk_result(),
        error_result(),
        stage_hop(),
        latent_hop(),
        ParityHello(
            call_id=0,
            chunk_index=0,
            cache_epoch=0,
            rank=2,
            settings={"recompute.mode": '"r0a"', "topology.stages": "2"},
        ),
    ]


def result_for(plan: ChunkPlan, **fields) -> ChunkResult:
    """The ok result a healthy pipeline returns for ``plan``."""
    calls = plan.expected_generator_calls
    base = dict(
        call_id=plan.call_id,
        chunk_index=plan.chunk_index,
        cache_epoch=plan.cache_epoch,
        ok=True,
        observed_generator_calls=calls,
        stages=(stage_report(1, calls),),
        output_digest="cd" * 16,
        tensors=(spec("latents_out", (3, 4, 8, 8)),),
    )
    base.update(fields)
    return ChunkResult(**base)


def replace(msg, **fields):
    return msgspec.structs.replace(msg, **fields)
