"""Building the wire messages of a chunk from a plan (phase A) and from stage output,
and checking that an inbound hop is the one a step expects."""

from __future__ import annotations

import torch

from protocol import (
    CallKind,
    ChunkId,
    ChunkResult,
    ErrorEnvelope,
    HopTarget,
    InferEnvelope,
    StageHop,
    StageReport,
    action_of,
    hop_tensor_name,
)

from ppstage.core.plan import ChunkPlan
from ppstage.errors import UnexpectedMessage, UpstreamFailed
from ppstage.model.stream_inputs import ChunkInputs
from ppstage.distributed.transport import Inbound, make_spec


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
        **plan.id.fields(),
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
    call_kind: CallKind,
    step: int,
    target: HopTarget,
    tensor: torch.Tensor,
    stages: tuple[StageReport, ...] = (),
) -> StageHop:
    """The hop of one generator call of ``env``'s chunk, carrying ``tensor`` (no digest)."""
    return StageHop(
        **env.id.fields(),
        call_kind=call_kind,
        step=step,
        target=target,
        tensors=(make_spec(hop_tensor_name(target), tensor),),
        stages=stages,
    )


def ok_result(
    env: InferEnvelope, latents_out: torch.Tensor, output_digest: str, stages: tuple[StageReport, ...]
) -> ChunkResult:
    """The chunk's ok result: ``latents_out`` (with its digest) and every stage's report."""
    return ChunkResult(
        **env.id.fields(),
        ok=True,
        observed_generator_calls=stages[-1].observed_generator_calls,
        stages=stages,
        output_digest=output_digest,
        tensors=(make_spec("latents_out", latents_out, with_digest=True),),
    )


def error_result(chunk: ChunkId, reason: str) -> ChunkResult:
    """An error result for ``chunk``: ``reason``, no tensors."""
    return ChunkResult(**chunk.fields(), ok=False, error=reason)


def check_hop(item: Inbound, env: InferEnvelope, kind: str, step: int, target: str) -> None:
    """Raise unless ``item`` is the ``kind`` ``target`` hop of step ``step`` of ``env``'s call.

    Raises the frame's own ``ProtocolError`` (it failed validation or a digest),
    ``UpstreamFailed`` for an ``ERROR`` in its place, ``UnexpectedMessage`` for
    any other message (SPEC section 5: a hop belongs to one epoch, call and step).
    """
    msg = item.msg
    if item.error is not None:
        raise item.error
    if isinstance(msg, ErrorEnvelope):
        raise UpstreamFailed(f"upstream failed: {msg.reason}", chunk=msg.id)
    if not isinstance(msg, StageHop) or (
        msg.cache_epoch, msg.call_id, msg.chunk_index, msg.call_kind, msg.step, msg.target
    ) != (env.cache_epoch, env.call_id, env.chunk_index, kind, step, target):
        raise UnexpectedMessage(
            f"expected the {kind} {target} hop of step {step}, got {action_of(msg)} "
            f"{getattr(msg, 'call_kind', '')} step {getattr(msg, 'step', '')}",
            chunk=msg.id,
        )
