"""The sections of the config (``[model]``, ``[cache]``, ... ``[liveness]``), bounded in their types.

Constraints live in the types (msgspec ``Meta``: durations > 0, queue depths
>= 1, ...) and a section's own cross-field rules in its ``__post_init__``;
rules that join sections are ``PPStageConfig``'s (``_root.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from protocol import RecomputeMode

from ppstage.config._load import ConfigError

# Bounded number types: msgspec checks them while converting, so no value
# outside them ever reaches a ``__post_init__`` or the runtime.
Count = Annotated[int, Meta(ge=1)]
"""A size or count that must be at least 1 (layers, frames, queue depth)."""
NonNegative = Annotated[int, Meta(ge=0)]
Seed = Annotated[int, Meta(ge=0, le=2**63 - 1)]
Seconds = Annotated[float, Meta(gt=0, le=86_400)]
"""A duration in seconds: > 0 (0 would mean "fail at once"), at most a day."""
Millis = Annotated[float, Meta(ge=0, le=60_000)]
"""A simulated cost in milliseconds: 0 (off) up to a minute."""

MAX_TIMESTEP = 1000


def step_list_problem(steps: Sequence[int]) -> str | None:
    """Why ``steps`` is not a valid denoising step list, or None if it is.

    The one rule for config (``denoise.step_list``) and the planner's
    ``StepListChange`` intent: non-empty, integer timesteps in ``(0, 1000]``,
    strictly decreasing (so no timestep twice).
    """
    steps = list(steps)
    if not steps:
        return "must hold at least one timestep"
    if any(type(t) is not int or not 0 < t <= MAX_TIMESTEP for t in steps):
        return f"timesteps must be integers in (0, {MAX_TIMESTEP}], got {steps}"
    if any(a <= b for a, b in zip(steps, steps[1:])):
        return f"must be strictly decreasing, got {steps}"
    return None


class CacheGeometry(msgspec.Struct, frozen=True, kw_only=True):
    """The KV-cache window in frames and tokens (``PPStageConfig.cache_geometry()``).

    Attributes
    ----------
    window_frames, sink_frames, chunk_frames : int
        Window, sink and chunk sizes in latent frames (``[cache]``).
    tokens_per_frame : int
        Tokens of one latent frame (``model.tokens_per_frame``).
    max_positions : int or None
        The rotary table's length in frames (``model.rope_max_frames``); None: unchecked.
    """

    window_frames: int
    sink_frames: int
    tokens_per_frame: int
    chunk_frames: int
    max_positions: int | None = None

    @property
    def capacity(self) -> int:
        return self.window_frames * self.tokens_per_frame

    @property
    def sink_tokens(self) -> int:
        return self.sink_frames * self.tokens_per_frame

    @property
    def chunk_tokens(self) -> int:
        return self.chunk_frames * self.tokens_per_frame


class ModelConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Sizes of the embedded causal generator (and of any model behind the backends)."""

    latent_channels: Count = 4
    latent_height: Count = 8
    latent_width: Count = 8
    patch_size: Count = 2
    dim: Count = 64
    heads: Count = 4
    layers: Count = 8
    mlp_ratio: Count = 4
    text_tokens: Count = 8
    text_dim: Count = 32
    vae_scale: Count = 8
    seed: Seed = 0
    rope_max_frames: Count = 1024
    # "toy" (the embedded model), an entry point of group ``ppstage.backends``,
    # or "package.module:factory" (ppstage/model/loader.py, docs/models.md).
    backend: str = "toy"

    def __post_init__(self) -> None:
        if not self.backend.strip() or self.backend.count(":") > 1 or self.backend.strip(":") != self.backend:
            raise ConfigError(f"model.backend = {self.backend!r}: expected a name or 'package.module:factory'")
        if self.latent_height % self.patch_size or self.latent_width % self.patch_size:
            raise ConfigError("model.latent_height and model.latent_width must be multiples of model.patch_size")
        if self.dim % self.heads or (self.dim // self.heads) % 2:
            raise ConfigError("model.dim must split into model.heads heads of even size (rotary pairs)")

    @property
    def tokens_per_frame(self) -> int:
        return (self.latent_height // self.patch_size) * (self.latent_width // self.patch_size)


class CacheConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """KV-cache window (in latent frames) and chunking.

    ``on_position_overflow``: what the planner does when the next chunk would pass
    the positional (RoPE) table: ``"rebase"`` moves every position down at that
    chunk boundary (same epoch, nothing dropped; docs/lifecycle.md), ``"cut"``
    forces a hard cut that still emits every chunk planned before it.
    ``rebase_quality_report``: a passing ``ppstage quality --rebase`` report, needed
    where a re-base changes what the model sees (``rebase_changes_view``).
    """

    window_frames: Count = 6
    sink_frames: NonNegative = 1
    chunk_frames: Count = 3
    on_position_overflow: Literal["rebase", "cut"] = "rebase"
    rebase_quality_report: str | None = None

    def __post_init__(self) -> None:
        if self.window_frames < self.sink_frames + self.chunk_frames + 1:
            raise ConfigError(
                f"cache.window_frames: must hold the sinks, one past frame and a chunk "
                f"(>= {self.sink_frames + self.chunk_frames + 1}), got {self.window_frames}"
            )

    @property
    def max_context_frames(self) -> int:
        return self.window_frames - self.chunk_frames


class RecomputeConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The R1 -> R0a -> R0 rollout flag and the recompute cadence.

    ``cadence`` = recompute every n-th chunk of an epoch (1 = every chunk after
    the first). It is a correctness setting, not a speed knob (SPEC section 4).
    ``decoded_buffer_frames`` is how many decoded frames stage 0 keeps; the R0a
    anchor of a chunk starting at frame s is decoded frame ``s - decoded_buffer_frames``.
    """

    mode: RecomputeMode = "r0a"
    cadence: Count = 1
    # The anchor and at least one recent frame.
    context_frames: Annotated[int, Meta(ge=2)] = 3
    decoded_buffer_frames: Count = 6
    r0_quality_report: str | None = None


class DenoiseConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The denoising schedule: timesteps per chunk (``step_list_problem`` says which are valid)."""

    step_list: tuple[int, ...] = (1000, 750, 500, 250)
    shift: Annotated[float, Meta(gt=0, le=1_000)] = 5.0
    base_seed: Seed = 42

    def __post_init__(self) -> None:
        problem = step_list_problem(self.step_list)
        if problem is not None:
            raise ConfigError(f"denoise.step_list: {problem}")


class TopologyConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """World = rank 0 + stages x tp ranks. ``layer_ranges`` overrides the even split."""

    stages: Count = 2
    tp: Count = 1
    layer_ranges: tuple[tuple[NonNegative, NonNegative], ...] | None = None
    backend: Literal["gloo", "nccl"] = "gloo"

    def __post_init__(self) -> None:
        if self.layer_ranges is not None and len(self.layer_ranges) != self.stages:
            raise ConfigError(
                f"topology.layer_ranges: needs one [start, end) per stage ({self.stages}), "
                f"got {len(self.layer_ranges)}"
            )

    @property
    def world_size(self) -> int:
        return 1 + self.stages * self.tp


class RuntimeConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Queue depths, deadlines and simulated costs of the distributed runtime.

    Two backend timeouts, kept apart as torchtitan keeps them
    (``init_timeout_seconds`` / ``train_timeout_seconds``): ``startup_timeout_s``
    bounds the rendezvous and the first collective (the parity handshake), where
    ranks on different nodes may start minutes apart; ``pg_timeout_s`` bounds
    every later collective and every started frame, where a peer that takes
    longer than seconds is dead. The steady-state groups are created only after
    the parity handshake has passed on every rank (``build_groups``), so the
    short timeout never applies to a rank that is merely late to start.
    """

    d_in: Count = 2
    d_out: Count = 2
    startup_timeout_s: Seconds = 600.0
    pg_timeout_s: Seconds = 30.0
    result_deadline_min_s: Seconds = 5.0
    # Deadline = factor x median chunk period: below 1 it would fire on a typical chunk.
    result_deadline_factor: Annotated[float, Meta(ge=1, le=1_000)] = 10.0
    stage_idle_deadline_s: Seconds = 6.0
    keepalive_interval_s: Seconds = 1.0
    # Bounds a stop's drain (SIGTERM, SIGINT, service shutdown), not the planned end of a
    # stream: that waits on the result and phase deadlines, which name who stalled.
    drain_deadline_s: Seconds = 10.0
    simulated_decode_ms: Millis = 0.0
    simulated_call_ms: Millis = 0.0
    # Adds one mesh all_reduce per chunk (tp > 1): a flag that changes the
    # communication count, so every rank must agree on it (parity handshake).
    debug_extra_collective: bool = False
    # R0a: decode the frame the next chunk's anchor needs first, send that
    # chunk's envelope, then decode the rest (docs/performance.md). Output bytes
    # are the same either way; false decodes every frame before anything else.
    anchor_first_decode: bool = True
    # Each chunk's denoise steps on a generator leader run as one worker-thread job:
    # take the input hop from the link's mailbox, call, queue the output hop (the
    # loop only watches deadlines). False routes every hop through the loop, as
    # before issue 11; same bytes either way (docs/performance.md, "Fused steps").
    fused_steps: bool = True
    # Benchmark baseline: plan a chunk only after the previous one was emitted
    # (no overlap of stage 0 and the generator at all).
    sequential_schedule: bool = False
    # Where rank 0's and the generator ranks' tensors live: "auto" = cpu on gloo,
    # cuda:<local rank> on nccl (docs/performance.md).
    device: str = "auto"

    def __post_init__(self) -> None:
        if self.keepalive_interval_s >= self.stage_idle_deadline_s:
            raise ConfigError(
                f"runtime.keepalive_interval_s: must be < runtime.stage_idle_deadline_s "
                f"({self.stage_idle_deadline_s}), got {self.keepalive_interval_s}"
            )
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"runtime.device: must be auto, cpu or cuda, got {self.device!r}")


class ServiceConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``ppstage serve``: rank 0's HTTP API and live frame stream (unused by ``launch``).

    ``viewer_queue_frames`` bounds each WebSocket viewer's queue: a viewer that
    does not read loses its oldest frames, and after ``viewer_drop_limit`` frames
    lost since its last successful send it is disconnected. ``max_body_bytes``
    caps every request body. The bearer token is never configured here (it is a
    secret): see ``ppstage serve --help``.
    """

    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8000
    max_body_bytes: Annotated[int, msgspec.Meta(ge=64, le=1 << 20)] = 16384
    max_viewers: Annotated[int, msgspec.Meta(ge=1)] = 256
    viewer_queue_frames: Annotated[int, msgspec.Meta(ge=1)] = 24
    viewer_drop_limit: Annotated[int, msgspec.Meta(ge=1)] = 96
    viewer_send_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    jpeg_quality: Annotated[int, msgspec.Meta(ge=1, le=95)] = 85
    status_window_chunks: Annotated[int, msgspec.Meta(ge=2, le=4096)] = 32


class RecordConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Message logs (docs/replay.md). ``dir`` set: every rank writes ``dir/rank<r>.ppslog``.

    ``tensors``: ``"digest"`` logs tensor digests only, ``"full"`` their bytes too.
    ``flight_records``: how many recent records each rank keeps in memory (always
    on) and writes out when it fails.
    """

    dir: str | None = None
    tensors: Literal["full", "digest"] = "digest"
    flight_records: Annotated[int, Meta(ge=1, le=1 << 20)] = 256


class LivenessConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Deadlines of named phases (SPEC section 7, B15/B16): rank 0's decode and
    sink, a stage's generator call and mesh collective.

    Steady deadline = ``max(phase_deadline_min_s, phase_deadline_factor x median)``
    of recent durations of that phase. A cold chunk (the first of a run, the
    first after a step-list or geometry change) gets ``warmup_deadline_s``
    instead, for every phase and for hop waits and rank 0's result deadline.
    Its durations stay out of the steady history, but until a steady duration
    is known (the first warm chunk) factor x median of the cold ones stands in,
    capped at ``warmup_deadline_s``.
    Keep ``phase_deadline_min_s`` below ``runtime.result_deadline_min_s`` so the
    rank that stalled names itself before rank 0's generic result deadline fires.
    """

    phase_deadline_min_s: Seconds = 3.0
    phase_deadline_factor: Annotated[float, Meta(ge=1, le=1000)] = 10.0
    warmup_deadline_s: Seconds = 60.0
