"""The fault-drill schema: ``[[faults.drill]]`` entries (``ppstage/faults/drills.py`` acts on them)."""

from __future__ import annotations

from typing import Literal

import msgspec

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
