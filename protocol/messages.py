"""Wire types: every message that crosses a process boundary.

Rules (docs/protocol.md): explicit string tags in the ``action`` field, new
fields only appended with a default, unknown fields tolerated on decode, a
``version`` (protocol major) on every top-level message.
"""

from __future__ import annotations

from typing import Literal, Union, get_args

import msgspec

from .identity import ChunkId

PROTOCOL_VERSION = 1
"""Protocol major version. Bump it for any change docs/protocol.md forbids."""

RecomputeMode = Literal["r1", "r0a", "r0"]
"""The rollout flag (SPEC section 4): r1 never recomputes, r0a anchors on a decoded frame, r0 on a latent."""
AnchorMode = Literal["none", "decoded", "latent"]
CallKind = Literal["recompute", "denoise"]
HopTarget = Literal["hidden", "latent"]

RECOMPUTE_MODES: tuple[RecomputeMode, ...] = get_args(RecomputeMode)
ANCHOR_FOR_MODE: dict[RecomputeMode, AnchorMode] = {"r1": "none", "r0a": "decoded", "r0": "latent"}
"""The anchor every recompute of a mode uses; an envelope must declare exactly this pair."""
if tuple(ANCHOR_FOR_MODE) != RECOMPUTE_MODES:  # pragma: no cover - a guard for editors
    raise ImportError("ANCHOR_FOR_MODE must name every recompute mode, in order")



def hop_tensor_name(target: HopTarget) -> str:
    """The name of the one tensor a ``StageHop`` to ``target`` carries.

    ``"hidden"`` for a hidden-state hop (stage k -> k+1), ``"latents"`` for the
    latent hand-back (last stage -> stage 1).
    """
    return "hidden" if target == "hidden" else "latents"


# ``gc=False``: wire structs hold only ints, floats, strs, tuples of other wire
# structs and (HELLO) a dict of strs, so they can never be part of a reference
# cycle; untracked by the garbage collector, they decode ~10% faster.
class TensorSpec(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Describes one tensor that follows the metadata on the wire, in order."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    digest: str | None = None


class _Top(msgspec.Struct, frozen=True, kw_only=True, tag_field="action", gc=False):
    version: int = PROTOCOL_VERSION
    call_id: int
    chunk_index: int
    cache_epoch: int

    @property
    def id(self) -> ChunkId:
        """The message's identity (``call_id``, ``chunk_index``, ``cache_epoch``)."""
        return ChunkId(self.call_id, self.chunk_index, self.cache_epoch)


class InferEnvelope(_Top, tag="INFER"):
    """Rank 0 -> stage 1: everything the generator stages need for one chunk.

    ``conditioning_embeds`` travels with every chunk (not only on a prompt
    change): stages then never hold conditioning they could disagree on, and a
    replay can start at any chunk of an epoch without extra state.
    """

    height: int
    width: int
    num_frames: int
    latent_channels: int
    current_start_frame: int
    init_cache: bool
    reset_kv_cache: bool
    reset_crossattn_cache: bool
    do_kv_recompute: bool
    num_denoise_steps: int
    expected_generator_calls: int
    kv_cache_attention_bias: float
    base_seed: int
    recompute_mode: RecomputeMode
    anchor_mode: AnchorMode
    context_frame_indices: tuple[int, ...] = ()
    tensors: tuple[TensorSpec, ...] = ()
    # Appended (protocol 1 compatible): rotary position of timeline frame f is
    # f - position_offset. It moves only at a planned re-base (SPEC section 13).
    position_offset: int = 0


class NoopEnvelope(_Top, tag="NOOP"):
    """Keepalive sent while idle so stage watchdogs do not fire."""

    tensors: tuple[TensorSpec, ...] = ()


class ShutdownEnvelope(_Top, tag="SHUTDOWN"):
    """Orderly end of stream, relayed down the chain and into every mesh."""

    tensors: tuple[TensorSpec, ...] = ()


class ErrorEnvelope(_Top, tag="ERROR"):
    """Terminal action: the receiver stops after relaying it."""

    reason: str
    origin_rank: int = -1
    tensors: tuple[TensorSpec, ...] = ()


class StageReport(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """What one generator stage (its leader) reports about a chunk."""

    stage: int
    current_start_frame: int
    global_end_index: int
    local_end_index: int
    state_digest: str
    observed_generator_calls: int
    duration_s: float


class ChunkResult(_Top, tag="RESULT"):
    """Last stage -> rank 0: the chunk's output and every stage's report."""

    ok: bool
    error: str | None = None
    observed_generator_calls: int = 0
    stages: tuple[StageReport, ...] = ()
    output_digest: str | None = None
    tensors: tuple[TensorSpec, ...] = ()


class StageHop(_Top, tag="HOP"):
    """Stage k -> stage k+1 (hidden states) or last stage -> stage 1 (latent).

    ``stages`` accumulates the reports of the stages already passed on the
    final hop of a chunk, so the last stage can forward them to rank 0.
    """

    call_kind: CallKind
    step: int
    target: HopTarget
    tensors: tuple[TensorSpec, ...] = ()
    stages: tuple[StageReport, ...] = ()


class ParityHello(_Top, tag="HELLO"):
    """Start-up handshake: each rank's resolved settings, compared key by key."""

    rank: int
    settings: dict[str, str]
    tensors: tuple[TensorSpec, ...] = ()


Envelope = Union[InferEnvelope, NoopEnvelope, ShutdownEnvelope, ErrorEnvelope]
WireMessage = Union[
    InferEnvelope,
    NoopEnvelope,
    ShutdownEnvelope,
    ErrorEnvelope,
    ChunkResult,
    StageHop,
    ParityHello,
]

WIRE_TYPES: tuple[type[msgspec.Struct], ...] = get_args(WireMessage)

# Header action codes. Append only: a code is never reused for another tag.
ACTION_CODES: dict[str, int] = {
    "INFER": 1,
    "NOOP": 2,
    "SHUTDOWN": 3,
    "ERROR": 4,
    "RESULT": 5,
    "HOP": 6,
    "HELLO": 7,
}
ACTION_BY_CODE: dict[int, str] = {v: k for k, v in ACTION_CODES.items()}


_TAG_OF: dict[type, str] = {t: t.__struct_config__.tag for t in WIRE_TYPES}  # type: ignore[misc]


def action_of(msg: WireMessage) -> str:
    """The string tag of a wire message."""
    tag = _TAG_OF.get(type(msg))
    return tag if tag is not None else type(msg).__struct_config__.tag  # type: ignore[return-value]
