"""``PPStageConfig``: the whole config, its cross-section rules, derived values, TOML and digest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from protocol import WireGeometry, digest_bytes

from ppstage.config._drills import FaultsConfig, check_sites
from ppstage.config._load import ConfigError, convert, read_toml
from ppstage.config._sections import (
    CacheConfig,
    CacheGeometry,
    DenoiseConfig,
    LivenessConfig,
    ModelConfig,
    RecomputeConfig,
    RecordConfig,
    RuntimeConfig,
    ServiceConfig,
    TopologyConfig,
)


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
        return convert(data, cls)

    @classmethod
    def from_toml(cls, path: str | Path) -> "PPStageConfig":
        """Read a TOML file (raises ``ConfigError`` if it cannot be read, parsed or validated)."""
        return cls.from_dict(read_toml(path))

    def with_overrides(self, overrides: dict[str, Any]) -> "PPStageConfig":
        """Apply ``{"section.key": value}`` overrides (from CLI flags)."""
        data = msgspec.to_builtins(self)
        for dotted, value in overrides.items():
            section, _, key = dotted.partition(".")
            if section not in data or not key or key not in data[section]:
                raise ConfigError(f"unknown config key {dotted!r}")
            data[section][key] = value
        return self.from_dict(data)
