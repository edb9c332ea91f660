"""Building the wire messages of a chunk from a plan (phase A) and from stage output."""

from __future__ import annotations

import torch

from protocol import ChunkResult, InferEnvelope, StageHop, StageReport

from ppstage.core.plan import ChunkPlan
from ppstage.model.stream_inputs import ChunkInputs
from ppstage.distributed.transport import make_spec


def infer_envelope(plan: ChunkPlan, inputs: ChunkInputs) -> tuple[InferEnvelope, list[torch.Tensor]]:
    """The INFER envelope of ``plan`` and its tensors in spec order (digests filled)."""
    tensors = [inputs.latents_in, inputs.conditioning, inputs.step_list]
    names = ["latents_in", "conditioning_embeds", "denoising_step_list"]
    if plan.do_kv_recompute:
        if inputs.context_frames is None:
            # The transport's preflight would refuse it too; failing here names the plan.
            raise ValueError("recompute planned but no context frames were built")
        tensors.append(inputs.context_frames)
        names.append("context_frames_override")
    specs = tuple(make_spec(n, t, with_digest=True) for n, t in zip(names, tensors))
    f, c, h, w = inputs.latents_in.shape
    env = InferEnvelope(
        call_id=plan.call_id,
        chunk_index=plan.chunk_index,
        cache_epoch=plan.cache_epoch,
        height=h,
        width=w,
        num_frames=f,
        latent_channels=c,
        current_start_frame=plan.current_start_frame,
        init_cache=plan.init_cache,
        reset_kv_cache=plan.reset_kv_cache,
        reset_crossattn_cache=plan.reset_crossattn_cache,
        do_kv_recompute=plan.do_kv_recompute,
        num_denoise_steps=plan.num_denoise_steps,
        expected_generator_calls=plan.expected_generator_calls,
        kv_cache_attention_bias=plan.kv_cache_attention_bias,
        base_seed=plan.base_seed,
        recompute_mode=plan.recompute_mode,
        anchor_mode=plan.anchor_mode,
        context_frame_indices=plan.context_frame_indices,
        tensors=specs,
        position_offset=plan.position_offset,
    )
    return env, tensors


def hop(
    env: InferEnvelope,
    *,
    call_kind: str,
    step: int,
    target: str,
    tensor: torch.Tensor,
    stages: tuple[StageReport, ...] = (),
) -> StageHop:
    name = "hidden" if target == "hidden" else "latents"
    return StageHop(
        call_id=env.call_id,
        chunk_index=env.chunk_index,
        cache_epoch=env.cache_epoch,
        call_kind=call_kind,  # type: ignore[arg-type]
        step=step,
        target=target,  # type: ignore[arg-type]
        tensors=(make_spec(name, tensor),),
        stages=stages,
    )


def ok_result(
    env: InferEnvelope, latents_out: torch.Tensor, output_digest: str, stages: tuple[StageReport, ...]
) -> ChunkResult:
    return ChunkResult(
        call_id=env.call_id,
        chunk_index=env.chunk_index,
        cache_epoch=env.cache_epoch,
        ok=True,
        observed_generator_calls=stages[-1].observed_generator_calls,
        stages=stages,
        output_digest=output_digest,
        tensors=(make_spec("latents_out", latents_out, with_digest=True),),
    )


def error_result(ids, reason: str) -> ChunkResult:
    return ChunkResult(
        call_id=ids.call_id,
        chunk_index=ids.chunk_index,
        cache_epoch=ids.cache_epoch,
        ok=False,
        error=reason,
    )
