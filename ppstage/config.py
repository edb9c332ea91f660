"""The one typed configuration of a ppstage deployment.

Loaded from TOML (``PPStageConfig.from_toml``), overridable by CLI flags
(``with_overrides``), and reduced to a canonical digest for the start-up
parity handshake: every rank must resolve exactly the same config.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

import msgspec

from protocol import WireGeometry, digest_bytes

from ppstage.faults.drills import FaultsConfig, check_sites

RecomputeMode = Literal["r1", "r0a", "r0"]


class ConfigError(ValueError):
    """A config value is missing, malformed or inconsistent with another."""


class ModelConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Sizes of the embedded causal generator (and of any model behind the backends)."""

    latent_channels: int = 4
    latent_height: int = 8
    latent_width: int = 8
    patch_size: int = 2
    dim: int = 64
    heads: int = 4
    layers: int = 8
    mlp_ratio: int = 4
    text_tokens: int = 8
    text_dim: int = 32
    vae_scale: int = 8
    seed: int = 0
    rope_max_frames: int = 1024

    def __post_init__(self) -> None:
        if self.latent_height % self.patch_size or self.latent_width % self.patch_size:
            raise ConfigError("latent height and width must be multiples of patch_size")
        if self.dim % self.heads or (self.dim // self.heads) % 2:
            raise ConfigError("dim must split into heads of even size (rotary pairs)")
        if self.layers < 1:
            raise ConfigError("the model needs at least one layer")

    @property
    def tokens_per_frame(self) -> int:
        return (self.latent_height // self.patch_size) * (self.latent_width // self.patch_size)


class CacheConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """KV-cache window (in latent frames) and chunking."""

    window_frames: int = 6
    sink_frames: int = 1
    chunk_frames: int = 3

    def __post_init__(self) -> None:
        if self.chunk_frames < 1:
            raise ConfigError("chunk_frames must be at least 1")
        if not 0 <= self.sink_frames:
            raise ConfigError("sink_frames must be >= 0")
        if self.window_frames < self.sink_frames + self.chunk_frames + 1:
            raise ConfigError("window_frames must hold the sinks, one past frame and a chunk")

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
    cadence: int = 1
    context_frames: int = 3
    decoded_buffer_frames: int = 6
    r0_quality_report: str | None = None

    def __post_init__(self) -> None:
        if self.cadence < 1:
            raise ConfigError("recompute cadence must be >= 1")
        if self.context_frames < 2:
            raise ConfigError("context_frames must hold the anchor and at least one recent frame")


class DenoiseConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    step_list: tuple[int, ...] = (1000, 750, 500, 250)
    shift: float = 5.0
    base_seed: int = 42

    def __post_init__(self) -> None:
        if not self.step_list or any(not 0 < s <= 1000 for s in self.step_list):
            raise ConfigError("step_list must be non-empty timesteps in (0, 1000]")
        if list(self.step_list) != sorted(self.step_list, reverse=True):
            raise ConfigError("step_list must be strictly decreasing")


class TopologyConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """World = rank 0 + stages x tp ranks. ``layer_ranges`` overrides the even split."""

    stages: int = 2
    tp: int = 1
    layer_ranges: tuple[tuple[int, int], ...] | None = None
    backend: Literal["gloo", "nccl"] = "gloo"

    def __post_init__(self) -> None:
        if self.stages < 1 or self.tp < 1:
            raise ConfigError("stages and tp must be >= 1")
        if self.layer_ranges is not None and len(self.layer_ranges) != self.stages:
            raise ConfigError("layer_ranges needs one [start, end) per stage")

    @property
    def world_size(self) -> int:
        return 1 + self.stages * self.tp


class RuntimeConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Queue depths, deadlines and simulated costs of the distributed runtime."""

    d_in: int = 2
    d_out: int = 2
    pg_timeout_s: float = 30.0
    result_deadline_min_s: float = 5.0
    result_deadline_factor: float = 10.0
    stage_idle_deadline_s: float = 6.0
    keepalive_interval_s: float = 1.0
    drain_deadline_s: float = 10.0
    simulated_decode_ms: float = 0.0
    simulated_call_ms: float = 0.0
    # Adds one mesh all_reduce per chunk (tp > 1): a flag that changes the
    # communication count, so every rank must agree on it (parity handshake).
    debug_extra_collective: bool = False

    def __post_init__(self) -> None:
        if self.d_in < 1 or self.d_out < 1:
            raise ConfigError("queue depths must be >= 1")
        if self.keepalive_interval_s >= self.stage_idle_deadline_s:
            raise ConfigError("keepalives must be more frequent than the stage idle deadline")


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

    phase_deadline_min_s: float = 3.0
    phase_deadline_factor: float = 10.0
    warmup_deadline_s: float = 60.0

    def __post_init__(self) -> None:
        if not self.phase_deadline_min_s > 0 or not self.warmup_deadline_s > 0:
            raise ConfigError("liveness deadlines must be positive")
        if self.phase_deadline_factor < 1:
            raise ConfigError("liveness.phase_deadline_factor must be >= 1")


class PPStageConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    model: ModelConfig = msgspec.field(default_factory=ModelConfig)
    cache: CacheConfig = msgspec.field(default_factory=CacheConfig)
    recompute: RecomputeConfig = msgspec.field(default_factory=RecomputeConfig)
    denoise: DenoiseConfig = msgspec.field(default_factory=DenoiseConfig)
    topology: TopologyConfig = msgspec.field(default_factory=TopologyConfig)
    runtime: RuntimeConfig = msgspec.field(default_factory=RuntimeConfig)
    liveness: LivenessConfig = msgspec.field(default_factory=LivenessConfig)
    faults: FaultsConfig = msgspec.field(default_factory=FaultsConfig)

    def __post_init__(self) -> None:
        if self.recompute.context_frames > self.cache.max_context_frames:
            raise ConfigError(
                f"recompute.context_frames={self.recompute.context_frames} does not fit the "
                f"window ({self.cache.max_context_frames} frames besides the chunk)"
            )
        if self.recompute.decoded_buffer_frames < self.recompute.context_frames:
            raise ConfigError("decoded_buffer_frames must be >= context_frames")
        if self.model.rope_max_frames < self.cache.chunk_frames * 2:
            raise ConfigError("rope_max_frames must hold at least two chunks")
        if self.topology.tp > 1 and self.model.heads % self.topology.tp:
            raise ConfigError("heads must divide evenly over the tp degree")
        self.layer_ranges()  # raises on a bad explicit split
        t = self.topology
        bad_drill = check_sites(self.faults, world_size=t.world_size, tp=t.tp, stages=t.stages)
        if bad_drill is not None:
            raise ConfigError(bad_drill)

    # -- derived -----------------------------------------------------------
    def layer_ranges(self) -> tuple[tuple[int, int], ...]:
        """Each stage's ``[start, end)``: explicit, or an even split of the layers."""
        k, n = self.topology.stages, self.model.layers
        if self.topology.layer_ranges is not None:
            ranges = tuple(tuple(r) for r in self.topology.layer_ranges)
            pos = 0
            for a, b in ranges:
                if a != pos or b <= a:
                    raise ConfigError(f"layer_ranges {ranges} must tile [0, {n}) in order")
                pos = b
            if pos != n:
                raise ConfigError(f"layer_ranges {ranges} must end at {n}")
            return ranges  # type: ignore[return-value]
        if k > n:
            raise ConfigError(f"{k} stages cannot split {n} layers")
        base, extra = divmod(n, k)
        out, pos = [], 0
        for i in range(k):
            size = base + (1 if i < extra else 0)
            out.append((pos, pos + size))
            pos += size
        return tuple(out)

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
        try:
            return msgspec.convert(data, cls)
        except (msgspec.ValidationError, ConfigError) as exc:
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
