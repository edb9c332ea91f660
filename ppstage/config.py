"""The one typed configuration of a ppstage deployment.

Loaded from TOML (``PPStageConfig.from_toml``), overridable by CLI flags
(``with_overrides``), and reduced to a canonical digest for the start-up
parity handshake: every rank must resolve exactly the same config.

Constraints live in the types (msgspec ``Meta``: durations > 0, queue depths
>= 1, ...) and cross-field rules in ``__post_init__``; either way a bad value
is refused at load with a ``ConfigError`` naming its key path, e.g.
``runtime.pg_timeout_s: must be > 0, got -1``.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from protocol import RecomputeMode, WireGeometry, digest_bytes

from ppstage.errors import PPStageError

__all__ = [
    "CacheConfig",
    "CacheGeometry",
    "ConfigError",
    "DenoiseConfig",
    "ModelConfig",
    "PPStageConfig",
    "RecomputeConfig",
    "RecomputeMode",
    "RuntimeConfig",
    "TopologyConfig",
    "step_list_problem",
]

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


class ConfigError(PPStageError, ValueError):
    """A config value is missing, malformed or inconsistent with another (names the key path)."""


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
    # Each denoise step of a generator leader runs as one worker-thread job: take
    # the input hop from the link's mailbox, call, queue the output hop (the loop
    # only watches deadlines). False routes every hop through the loop, as before
    # issue 11; same bytes either way (docs/performance.md, "Fused steps").
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
    Keep ``phase_deadline_min_s`` below ``runtime.result_deadline_min_s`` so the
    rank that stalled names itself before rank 0's generic result deadline fires.
    """

    phase_deadline_min_s: Seconds = 3.0
    phase_deadline_factor: Annotated[float, Meta(ge=1, le=1000)] = 10.0
    warmup_deadline_s: Seconds = 60.0


# -- fault drills (the schema; ppstage/faults/drills.py acts on them) ----------

DrillKind = Literal[
    "delay_result",
    "extra_generator_call",
    "skip_generator_call",
    "perturb_start_frame",
    "reset_cache_one_rank",
    "wrong_group_collective",
    "corrupt_envelope",
    "unknown_version_envelope",
    "drop_context_override",
    "wrong_type_field",
    "payload_length_lie",
    "exit_rank",
    "stall_generator_call",
    "stall_decode",
    "no_keepalives",
]

# Where each kind can act: "rank0", "leader" (a stage leader), "last_leader",
# "generator" (any stage rank) or "any". Checked against the topology by
# ``PPStageConfig`` so a drill on a rank that cannot act on it is refused.
DRILL_SITE: dict[str, str] = {
    "delay_result": "last_leader",
    "extra_generator_call": "leader",
    "skip_generator_call": "leader",
    "perturb_start_frame": "rank0",
    "reset_cache_one_rank": "generator",
    "wrong_group_collective": "leader",
    "corrupt_envelope": "rank0",
    "unknown_version_envelope": "rank0",
    "drop_context_override": "rank0",
    "wrong_type_field": "rank0",
    "payload_length_lie": "rank0",
    "exit_rank": "any",
    "stall_generator_call": "leader",
    "stall_decode": "rank0",
    "no_keepalives": "rank0",
}

FOREVER_S = 3600.0  # a stall of ms = 0: only a deadline can end it


class Drill(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One fault drill (see the module docstring)."""

    kind: DrillKind
    rank: int
    chunk: int = 0
    ms: float = 0.0

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ValueError(f"drill {self.kind}: rank must be >= 0, got {self.rank}")
        if self.chunk < 0:
            raise ValueError(f"drill {self.kind}: chunk must be >= 0, got {self.chunk}")
        if not 0.0 <= self.ms <= FOREVER_S * 1e3:
            raise ValueError(f"drill {self.kind}: ms must be in [0, {FOREVER_S * 1e3:.0f}], got {self.ms}")
        if self.kind == "delay_result" and self.ms <= 0:
            raise ValueError("drill delay_result needs ms > 0")

    @property
    def seconds(self) -> float:
        """The drill's duration; 0 ms means "forever" (an hour) for the stall kinds."""
        return self.ms / 1e3 if self.ms > 0 else FOREVER_S


class FaultsConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The ``[faults]`` section: a list of ``[[faults.drill]]`` entries (none by default)."""

    drill: tuple[Drill, ...] = ()


def check_sites(faults: FaultsConfig, *, world_size: int, tp: int, stages: int) -> str | None:
    """Why a drill cannot act where it is placed, or None when all can."""
    last_leader = 1 + (stages - 1) * tp
    for d in faults.drill:
        if d.rank >= world_size:
            return f"drill {d.kind} names rank {d.rank}, the world has {world_size} ranks"
        site = DRILL_SITE[d.kind]
        ok = {
            "any": True,
            "rank0": d.rank == 0,
            "generator": d.rank > 0,
            "leader": d.rank > 0 and (d.rank - 1) % tp == 0,
            "last_leader": d.rank == last_leader,
        }[site]
        if not ok:
            where = {"rank0": "rank 0", "generator": "a generator rank", "leader": "a stage leader",
                     "last_leader": f"the last stage leader (rank {last_leader})"}[site]
            return f"drill {d.kind} acts on {where}, not on rank {d.rank}"
    return None


class PPStageConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    model: ModelConfig = msgspec.field(default_factory=ModelConfig)
    cache: CacheConfig = msgspec.field(default_factory=CacheConfig)
    recompute: RecomputeConfig = msgspec.field(default_factory=RecomputeConfig)
    denoise: DenoiseConfig = msgspec.field(default_factory=DenoiseConfig)
    topology: TopologyConfig = msgspec.field(default_factory=TopologyConfig)
    runtime: RuntimeConfig = msgspec.field(default_factory=RuntimeConfig)
    service: ServiceConfig = msgspec.field(default_factory=ServiceConfig)
    record: RecordConfig = msgspec.field(default_factory=RecordConfig)
    liveness: LivenessConfig = msgspec.field(default_factory=LivenessConfig)
    faults: FaultsConfig = msgspec.field(default_factory=FaultsConfig)

    def __post_init__(self) -> None:
        if self.recompute.context_frames > self.cache.max_context_frames:
            raise ConfigError(
                f"recompute.context_frames: {self.recompute.context_frames} does not fit the "
                f"window ({self.cache.max_context_frames} frames besides the chunk)"
            )
        if self.recompute.decoded_buffer_frames < self.recompute.context_frames:
            raise ConfigError(
                f"recompute.decoded_buffer_frames: must be >= recompute.context_frames "
                f"({self.recompute.context_frames}), got {self.recompute.decoded_buffer_frames}"
            )
        if self.model.rope_max_frames < self.cache.chunk_frames * 2:
            raise ConfigError(
                f"model.rope_max_frames: must hold at least two chunks "
                f"(>= {self.cache.chunk_frames * 2}), got {self.model.rope_max_frames}"
            )
        if self.cache.on_position_overflow == "rebase" and self.model.rope_max_frames < self.rebase_span():
            raise ConfigError(
                f"model.rope_max_frames: {self.model.rope_max_frames} cannot hold what a re-base keeps "
                f"({self.rebase_span()} positions for this window, mode and cadence); "
                'raise it or set cache.on_position_overflow = "cut"'
            )
        if self.topology.tp > 1 and self.model.heads % self.topology.tp:
            raise ConfigError(
                f"topology.tp: model.heads ({self.model.heads}) must divide evenly over it, got {self.topology.tp}"
            )
        self.layer_ranges()  # raises on a bad explicit split
        t = self.topology
        bad_drill = check_sites(self.faults, world_size=t.world_size, tp=t.tp, stages=t.stages)
        if bad_drill is not None:
            raise ConfigError(bad_drill)

    # -- derived -----------------------------------------------------------
    def rebase_span(self) -> int:
        """Positions a chunk needs right after a re-base (docs/lifecycle.md, "Re-base").

        Rolled windows: the pinned sinks' positions and the other ``W - S`` frames
        (chunk included), at most ``W``. Rebuilt windows: anchor to chunk end,
        ``decoded_buffer_frames + F``; with no sinks the anchor of the last rebuild
        may still move with the window for ``cadence - 1`` more chunks.
        """
        c, rc = self.cache, self.recompute
        if rc.mode == "r1":
            return c.window_frames
        carried = rc.cadence - 1 if c.sink_frames == 0 else 0
        return max(c.window_frames, rc.decoded_buffer_frames + c.chunk_frames * (1 + carried))

    def layer_ranges(self) -> tuple[tuple[int, int], ...]:
        """Each stage's ``[start, end)``: explicit, or an even split of the layers."""
        k, n = self.topology.stages, self.model.layers
        if self.topology.layer_ranges is not None:
            ranges = tuple(tuple(r) for r in self.topology.layer_ranges)
            pos = 0
            for a, b in ranges:
                if a != pos or b <= a:
                    raise ConfigError(f"topology.layer_ranges: {ranges} must tile [0, {n}) in order")
                pos = b
            if pos != n:
                raise ConfigError(f"topology.layer_ranges: {ranges} must end at {n}")
            return ranges  # type: ignore[return-value]
        if k > n:
            raise ConfigError(f"topology.stages: {k} stages cannot split model.layers ({n})")
        base, extra = divmod(n, k)
        out, pos = [], 0
        for i in range(k):
            size = base + (1 if i < extra else 0)
            out.append((pos, pos + size))
            pos += size
        return tuple(out)

    def cache_geometry(self) -> CacheGeometry:
        """The KV-cache window every generator rank (and rank 0's shadow lifecycle) uses."""
        return CacheGeometry(
            window_frames=self.cache.window_frames,
            sink_frames=self.cache.sink_frames,
            tokens_per_frame=self.model.tokens_per_frame,
            chunk_frames=self.cache.chunk_frames,
            max_positions=self.model.rope_max_frames,
        )

    def wire_geometry(self) -> WireGeometry:
        m = self.model
        return WireGeometry(
            num_frames=self.cache.chunk_frames,
            latent_channels=m.latent_channels,
            height=m.latent_height,
            width=m.latent_width,
            text_tokens=m.text_tokens,
            text_dim=m.text_dim,
            hidden_dim=m.dim,
            tokens_per_frame=m.tokens_per_frame,
            max_context_frames=self.cache.max_context_frames,
        )

    def to_toml(self) -> str:
        """TOML text that ``from_toml`` reads back into an equal config."""
        lines: list[str] = []
        for section, values in msgspec.to_builtins(self).items():
            if section == "faults":  # an array of tables: one [[faults.drill]] per drill
                for drill in values["drill"]:
                    lines.append("[[faults.drill]]")
                    lines += [f"{k} = {msgspec.json.encode(v).decode()}" for k, v in drill.items()]
                    lines.append("")
                continue
            lines.append(f"[{section}]")
            for key, value in values.items():
                if value is not None:  # TOML has no null: an absent key takes its default (None)
                    lines.append(f"{key} = {msgspec.json.encode(value).decode()}")
            lines.append("")
        return "\n".join(lines)

    def canonical_bytes(self) -> bytes:
        return msgspec.json.encode(self, order="sorted")

    def digest(self) -> str:
        return digest_bytes(self.canonical_bytes())

    def flat(self) -> dict[str, str]:
        """Every leaf as ``section.key -> json text``, for key-by-key parity reports."""
        out: dict[str, str] = {}
        for section, values in msgspec.to_builtins(self).items():
            for key, value in values.items():
                out[f"{section}.{key}"] = msgspec.json.encode(value, order="sorted").decode()
        return out

    # -- construction ------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PPStageConfig":
        """Build a config from nested ``{section: {key: value}}`` data (TOML's shape).

        Raises
        ------
        ConfigError
            A key is unknown, a value has the wrong type or breaks a bound or a
            cross-field rule; the message names the key path.
        """
        try:
            return msgspec.convert(data, cls)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"invalid config: {_explain(exc, data)}") from exc
        except ConfigError as exc:
            raise ConfigError(f"invalid config: {exc}") from exc

    @classmethod
    def from_toml(cls, path: str | Path) -> "PPStageConfig":
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:  # (not UTF-8: found by fuzzing)
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
        return cls.from_dict(data)

    def with_overrides(self, overrides: dict[str, Any]) -> "PPStageConfig":
        """Apply ``{"section.key": value}`` overrides (from CLI flags)."""
        data = msgspec.to_builtins(self)
        for dotted, value in overrides.items():
            section, _, key = dotted.partition(".")
            if section not in data or not key or key not in data[section]:
                raise ConfigError(f"unknown config key {dotted!r}")
            data[section][key] = value
        return self.from_dict(data)


_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_BOUND = re.compile(r"^Expected `\w+` (?P<bound>[<>]=? \S+)$")


def _explain(exc: msgspec.ValidationError, data: Any) -> str:
    """msgspec's ``Expected `float` > 0.0 - at `$.runtime.pg_timeout_s``` as
    ``runtime.pg_timeout_s: must be > 0, got -1``; a ``__post_init__`` rule's
    own message (it names its keys) as is."""
    if isinstance(exc.__cause__, ConfigError):
        return str(exc.__cause__)
    m = _AT.match(str(exc))
    what, path = (m["what"], m["path"]) if m else (str(exc), None)
    key = (path or "").lstrip(".")
    if what.startswith("Object contains unknown field"):
        field = what.rsplit(" ", 1)[-1]
        return f"{key}: unknown key {field}" if key else f"unknown section or key {field}"
    bound = _BOUND.match(what)
    if bound is not None:
        limit = re.sub(r"(\d)\.0$", r"\1", bound["bound"])
        return f"{key}: must be {limit}, got {_lookup(data, key)!r}"
    text = what[:1].lower() + what[1:]
    return f"{key}: {text}" if key else text


def _lookup(data: Any, path: str) -> Any:
    """The value at a msgspec path such as ``runtime.d_in`` or ``topology.layer_ranges[1][0]``."""
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        try:
            data = data[int(part[1:-1])] if part.startswith("[") else data[part]
        except (KeyError, IndexError, TypeError, ValueError):
            return "?"
    return data
