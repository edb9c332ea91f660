"""Tensors <-> wire specs: the dtype mapping, spec building and send-side checks.

On the wire every tensor travels as its raw bytes (a flat ``uint8`` view), so
the same code path serves every whitelisted dtype on gloo and NCCL alike; the
receiver rebuilds dtype and shape from the spec, never from the bytes.
"""

from __future__ import annotations

from typing import Sequence

import msgspec
import torch

from protocol import DTYPE_ITEMSIZE, MAX_TENSORS, ChunkId, TensorSpec, TensorSpecError, WireGeometry
from protocol.codec import MAX_TENSOR_BYTES

from ppstage.digests import byte_view, tensor_digest

MAX_STEPS = 1000  # a step list holds at most one entry per timestep in (0, 1000]

WIRE_DTYPE: dict[torch.dtype, str] = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.int64: "int64",
    torch.int32: "int32",
    torch.uint8: "uint8",
}
TORCH_DTYPE: dict[str, torch.dtype] = {v: k for k, v in WIRE_DTYPE.items()}
if set(TORCH_DTYPE) != set(DTYPE_ITEMSIZE):  # the whitelist lives in protocol/
    raise ImportError("transport dtype map differs from protocol.DTYPE_ITEMSIZE")


def make_spec(name: str, tensor: torch.Tensor, with_digest: bool = False) -> TensorSpec:
    """The wire spec of ``tensor`` (dtype name, shape, byte length, optional digest).

    Raises ``TensorSpecError`` for a dtype outside the wire whitelist.
    """
    wire = WIRE_DTYPE.get(tensor.dtype)
    if wire is None:
        raise TensorSpecError(f"tensor {name!r}: dtype {tensor.dtype} is not sent on the wire")
    shape = tuple(int(d) for d in tensor.shape)
    digest = tensor_digest(tensor.detach().contiguous()) if with_digest else None
    return TensorSpec(
        name=name,
        dtype=wire,
        shape=shape,
        nbytes=tensor.numel() * tensor.element_size(),
        digest=digest,
    )


def prepare_tensors(
    specs: Sequence[TensorSpec],
    tensors: Sequence[torch.Tensor],
    device: torch.device,
    *,
    fill_digests: bool,
    chunk: ChunkId | None,
) -> tuple[tuple[TensorSpec, ...], tuple[torch.Tensor, ...]]:
    """Check ``tensors`` against ``specs`` and turn them into contiguous byte views.

    Returns the (possibly digest-filled) specs and one flat ``uint8`` tensor per
    spec, on ``device``. Raises ``TensorSpecError`` (never anything else) on a
    count, dtype, shape or size mismatch, or when a tensor cannot be moved.
    """
    if len(tensors) != len(specs):
        raise TensorSpecError(f"{len(tensors)} tensors given for {len(specs)} specs", chunk=chunk)
    out_specs: list[TensorSpec] = []
    out_bytes: list[torch.Tensor] = []
    for spec, tensor in zip(specs, tensors):
        if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
            raise TensorSpecError(f"tensor {spec.name!r}: not a dense torch.Tensor", chunk=chunk)
        wire = WIRE_DTYPE.get(tensor.dtype)
        if wire is None:
            raise TensorSpecError(
                f"tensor {spec.name!r}: dtype {tensor.dtype} is not sent on the wire", chunk=chunk
            )
        if wire != spec.dtype:
            raise TensorSpecError(f"tensor {spec.name!r}: dtype {wire}, spec says {spec.dtype}", chunk=chunk)
        if tuple(tensor.shape) != tuple(spec.shape):
            raise TensorSpecError(
                f"tensor {spec.name!r}: shape {tuple(tensor.shape)}, spec says {tuple(spec.shape)}", chunk=chunk
            )
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes != spec.nbytes:
            raise TensorSpecError(f"tensor {spec.name!r}: {nbytes} bytes, spec says {spec.nbytes}", chunk=chunk)
        try:
            flat = byte_view(tensor.detach().to(device).contiguous())
        except (RuntimeError, ValueError) as exc:  # device OOM, odd strides: still preflight
            raise TensorSpecError(f"tensor {spec.name!r}: cannot prepare for sending: {exc}", chunk=chunk) from exc
        if fill_digests:
            spec = msgspec.structs.replace(spec, digest=tensor_digest(flat))
        out_specs.append(spec)
        out_bytes.append(flat)
    return tuple(out_specs), tuple(out_bytes)


def frame_limit_bytes(geometry: WireGeometry | None) -> int:
    """The most tensor bytes one frame may carry under ``geometry``.

    Twice the largest legitimate frame (an envelope with the largest context,
    or a hop of the largest hidden state), so that a valid frame is never near
    it; without a geometry, the codec's own bound. A receiver refuses a frame
    announcing more before it allocates anything.
    """
    if geometry is None:
        return MAX_TENSORS * MAX_TENSOR_BYTES
    g = geometry
    frame = g.latent_channels * g.height * g.width * 4
    frames = max(g.num_frames, g.max_context_frames)
    envelope = (g.num_frames + g.max_context_frames) * frame + g.text_tokens * g.text_dim * 4 + MAX_STEPS * 8
    hop = frames * g.tokens_per_frame * g.hidden_dim * 4 + frames * frame
    return 2 * max(envelope, hop)


def rebuild(spec: TensorSpec, flat: torch.Tensor) -> torch.Tensor:
    """The tensor ``spec`` describes, viewing received bytes ``flat`` (no copy)."""
    return flat.view(TORCH_DTYPE[spec.dtype]).reshape(spec.shape)


__all__ = [
    "TORCH_DTYPE",
    "WIRE_DTYPE",
    "frame_limit_bytes",
    "make_spec",
    "prepare_tensors",
    "rebuild",
]
