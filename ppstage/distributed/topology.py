"""Ranks, roles and process groups of a ppstage world, and guarded mesh collectives.

Rank layout (SPEC section 2), with K generator stages of M tensor-parallel ranks::

    rank 0                      stage 0: control plane, no generator layers, no mesh
    ranks 1+(k-1)*M .. k*M      stage k (1-based); the first of them is the stage leader

Point-to-point traffic runs only between leaders, over a ring plus one back edge::

    0 -> L1 -> L2 -> ... -> LK -> 0      envelopes, hidden-state hops, results
    LK -> L1                              latent hand-back between denoise calls (K > 1)

Every process group is created by ``build_groups``, the one creation site, which
every rank calls in the same order (torch requires every rank of the world to
call ``new_group`` for every group, member or not). The order is a pure function
of the config, which the parity handshake has already proven identical on every
rank; that is why ``parity_handshake`` must run before ``build_groups``: with a
topology mismatch the ranks would issue different ``new_group`` sequences and
stall in the store rendezvous until the process-group timeout.

``MeshComm`` is the only way stage code issues a mesh collective: it names its
group explicitly and refuses, before anything is issued, a collective from rank
0, from a rank of another stage, or from a non-member (break-it B10).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Mapping

import msgspec

from ppstage.config import ConfigError, PPStageConfig
from ppstage.errors import PPStageError

if TYPE_CHECKING:  # torch stays out of import time for pure-logic users
    import torch

__all__ = [
    "MeshComm",
    "ProcessGroups",
    "Role",
    "WrongGroup",
    "build_groups",
    "link_group_keys",
    "links",
    "role_for",
]


class WrongGroup(PPStageError):
    """A collective or P2P call named a group this rank must not use (refused before issuing)."""


class Role(msgspec.Struct, frozen=True, kw_only=True):
    """What one rank is in the topology. Pure data, derived from the config alone.

    Attributes
    ----------
    rank, world_size:
        Global rank and world size (``1 + stages * tp``).
    stage:
        0 for rank 0, ``1..num_stages`` for generator ranks.
    num_stages:
        K, the number of generator stages.
    tp_rank, tp_size:
        Position inside the stage mesh and the mesh degree M (``topology.tp``).
        Rank 0 has ``tp_rank = 0`` and the world's ``tp_size`` but joins no mesh.
    is_leader:
        True for the first rank of each stage mesh, and for rank 0 (it alone
        speaks for stage 0).
    layer_range:
        ``[start, end)`` of generator layers owned by this stage; ``None`` on rank 0.
    """

    rank: int
    world_size: int
    stage: int
    num_stages: int
    tp_rank: int
    tp_size: int
    is_leader: bool
    layer_range: tuple[int, int] | None

    # -- layout ------------------------------------------------------------
    def leader_of(self, stage: int) -> int:
        """Global rank of the leader of ``stage`` (0 for stage 0)."""
        if stage == 0:
            return 0
        if not 1 <= stage <= self.num_stages:
            raise ValueError(f"stage {stage} outside 0..{self.num_stages}")
        return 1 + (stage - 1) * self.tp_size

    def ranks_of(self, stage: int) -> tuple[int, ...]:
        """Global ranks of ``stage``'s mesh, leader first (``(0,)`` for stage 0)."""
        first = self.leader_of(stage)
        return (0,) if stage == 0 else tuple(range(first, first + self.tp_size))

    @property
    def mesh_ranks(self) -> tuple[int, ...]:
        """This rank's own stage mesh (``(0,)`` on rank 0)."""
        return self.ranks_of(self.stage)

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 1

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.num_stages

    # -- point-to-point neighbours (leaders only) --------------------------
    @property
    def next_rank(self) -> int | None:
        """Where this leader sends along the ring: 0 -> L1 -> ... -> LK -> 0."""
        if not self.is_leader:
            return None
        if self.stage == self.num_stages:
            return 0
        return self.leader_of(self.stage + 1)

    @property
    def prev_rank(self) -> int | None:
        """Where this leader receives from along the ring (rank 0: from LK)."""
        if not self.is_leader:
            return None
        if self.stage == 0:
            return self.leader_of(self.num_stages)
        return self.leader_of(self.stage - 1) if self.stage > 1 else 0

    @property
    def handback_dst(self) -> int | None:
        """LK's destination for the latent hand-back (None unless LK with K > 1)."""
        if self.is_leader and self.stage == self.num_stages and self.num_stages > 1:
            return self.leader_of(1)
        return None

    @property
    def handback_src(self) -> int | None:
        """L1's source of the latent hand-back (None unless L1 with K > 1)."""
        if self.is_leader and self.stage == 1 and self.num_stages > 1:
            return self.leader_of(self.num_stages)
        return None

    def send_peers(self) -> tuple[int, ...]:
        """Every rank this rank sends to point-to-point (empty for non-leaders)."""
        return _dedupe(r for r in (self.next_rank, self.handback_dst) if r is not None)

    def recv_peers(self) -> tuple[int, ...]:
        """Every rank this rank receives from (one ``Transport.open_inbound`` each)."""
        return _dedupe(r for r in (self.prev_rank, self.handback_src) if r is not None)


def _dedupe(items) -> tuple[int, ...]:
    """Keep the first occurrence of each item, in order."""
    return tuple(dict.fromkeys(items))


def role_for(config: PPStageConfig, rank: int) -> Role:
    """The role of global ``rank`` under ``config`` (rank 0 = stage 0, see module doc)."""
    topo = config.topology
    world = topo.world_size
    if not 0 <= rank < world:
        raise ConfigError(f"rank {rank} outside a world of {world} (1 + {topo.stages} x {topo.tp})")
    if rank == 0:
        return Role(
            rank=0,
            world_size=world,
            stage=0,
            num_stages=topo.stages,
            tp_rank=0,
            tp_size=topo.tp,
            is_leader=True,
            layer_range=None,
        )
    stage, tp_rank = divmod(rank - 1, topo.tp)
    return Role(
        rank=rank,
        world_size=world,
        stage=stage + 1,
        num_stages=topo.stages,
        tp_rank=tp_rank,
        tp_size=topo.tp,
        is_leader=tp_rank == 0,
        layer_range=config.layer_ranges()[stage],
    )


def links(config: PPStageConfig) -> tuple[tuple[int, int], ...]:
    """Every directed leader-to-leader link ``(src, dst)``, in creation order.

    ``(0, L1)``, ``(Lk, Lk+1)`` for k < K, ``(LK, 0)``, and ``(LK, L1)`` when K > 1
    (with K == 1 the hand-back is local to the one stage and has no link).
    """
    role = role_for(config, 0)
    k_last = role.num_stages
    out = [(0, role.leader_of(1))]
    out += [(role.leader_of(k), role.leader_of(k + 1)) for k in range(1, k_last)]
    out.append((role.leader_of(k_last), 0))
    if k_last > 1:
        out.append((role.leader_of(k_last), role.leader_of(1)))
    return tuple(out)


def link_group_keys(config: PPStageConfig) -> tuple[tuple[int, int], ...]:
    """The link groups to create, in order: one per unordered leader pair on gloo.

    On gloo both directions of a pair share one 2-rank group (two threads drive
    it, one per direction; gloo pairs are safe for that, and each direction stays
    FIFO). On NCCL each *directed* link gets its own group: a 2-rank NCCL
    communicator runs sends and receives on one stream, so a large send in each
    direction at once could wait on each other's receive queued behind it, and
    NCCL communicators must not be driven from two threads concurrently.
    Keys are ``(src, dst)`` on NCCL and ``(min, max)`` on gloo.
    """
    directed = config.topology.backend == "nccl"
    keys = [(s, d) if directed else (min(s, d), max(s, d)) for s, d in links(config)]
    return tuple(dict.fromkeys(keys))


@dataclass(frozen=True)
class ProcessGroups:
    """Every process group of this rank, created once by ``build_groups``.

    Attributes
    ----------
    rank:
        This rank.
    world:
        The default (world) group; only the parity handshake uses it.
    meshes:
        ``stage -> group`` for the stage meshes this rank belongs to (at most its
        own). Empty when ``tp == 1``: a one-rank mesh has nothing to talk about.
    mesh_members:
        ``stage -> ranks`` for every stage mesh that exists (membership checks).
    link_groups:
        ``key -> group`` for the link groups this rank belongs to, keys as in
        ``link_group_keys`` (``(min, max)`` on gloo, ``(src, dst)`` on NCCL).
    directed_links:
        True when link groups are per direction (NCCL).
    """

    rank: int
    world: Any
    meshes: Mapping[int, Any] = field(default_factory=dict)
    mesh_members: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    link_groups: Mapping[tuple[int, int], Any] = field(default_factory=dict)
    directed_links: bool = False

    def link(self, src: int, dst: int) -> Any:
        """The group carrying messages ``src -> dst``; raises ``WrongGroup`` if none."""
        if self.rank not in (src, dst):
            raise WrongGroup(f"rank {self.rank} is not an end of link {src}->{dst}")
        key = (src, dst) if self.directed_links else (min(src, dst), max(src, dst))
        group = self.link_groups.get(key)
        if group is None:
            raise WrongGroup(f"no link group for {src}->{dst} on rank {self.rank}")
        return group

    def mesh(self, stage: int) -> Any | None:
        """This rank's group for ``stage``'s mesh, or None if it is not a member."""
        return self.meshes.get(stage)


def build_groups(config: PPStageConfig, rank: int) -> ProcessGroups:
    """Create every process group, in the same order on every rank.

    Order: stage meshes 1..K (only when ``tp > 1``), then the link groups of
    ``link_group_keys``. Each ``new_group`` is called on every rank, members or
    not, with ``use_local_synchronization=False`` and the config's steady-state
    ``runtime.pg_timeout_s`` (seconds, not the start-up timeout: every rank has
    passed the parity handshake, so a peer that is slower than this now is
    dead, not late). Call it once, after ``parity_handshake``.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        raise ConfigError("build_groups needs an initialised default process group")
    if dist.get_world_size() != config.topology.world_size:
        # Every rank sees the same (parity-checked) config and the same world, so
        # every rank raises here together: no rank is left waiting in new_group.
        raise ConfigError(
            f"world has {dist.get_world_size()} ranks, config needs {config.topology.world_size}"
        )
    role = role_for(config, rank)
    timeout = timedelta(seconds=config.runtime.pg_timeout_s)
    meshes: dict[int, Any] = {}
    members: dict[int, tuple[int, ...]] = {}
    if config.topology.tp > 1:
        for stage in range(1, role.num_stages + 1):
            ranks = role.ranks_of(stage)
            group = dist.new_group(list(ranks), timeout=timeout, use_local_synchronization=False)
            members[stage] = ranks
            if rank in ranks:
                meshes[stage] = group
    link_groups: dict[tuple[int, int], Any] = {}
    for key in link_group_keys(config):
        group = dist.new_group(list(key), timeout=timeout, use_local_synchronization=False)
        if rank in key:
            link_groups[key] = group
    return ProcessGroups(
        rank=rank,
        world=dist.group.WORLD,
        meshes=meshes,
        mesh_members=members,
        link_groups=link_groups,
        directed_links=config.topology.backend == "nccl",
    )


class MeshComm:
    """Guarded collectives on one stage's mesh group.

    Every op checks, before anything is issued, that the caller is not rank 0,
    that ``stage`` is the caller's own stage and that the caller is a member of
    the mesh; otherwise it raises ``WrongGroup``. Every op passes its group to
    torch explicitly. With ``tp_size == 1`` the ops are local no-ops that never
    touch ``torch.distributed``: ``broadcast`` returns its tensor, ``all_reduce``
    is the identity and ``all_gather`` returns ``[tensor]``.

    Ops block the calling thread: issue them from the stage's worker thread,
    never from the event loop or a transport thread.

    Parameters
    ----------
    role, groups:
        This rank's role and groups.
    stage:
        The stage whose mesh to use; defaults to ``role.stage``.
    """

    def __init__(self, role: Role, groups: ProcessGroups, stage: int | None = None) -> None:
        self.role = role
        self.groups = groups
        self.stage = role.stage if stage is None else stage

    @property
    def size(self) -> int:
        return self.role.tp_size

    def _group(self, op: str) -> Any | None:
        """The group to issue ``op`` on (None: local no-op), or ``WrongGroup``."""
        role, stage = self.role, self.stage
        where = f"{op} on the stage {stage} mesh from rank {role.rank}"
        if role.rank == 0:
            raise WrongGroup(f"refused {where}: rank 0 never joins a mesh collective")
        if stage != role.stage:
            raise WrongGroup(f"refused {where}: not this rank's own stage (stage {role.stage})")
        if not 1 <= stage <= role.num_stages or role.rank not in role.ranks_of(stage):
            raise WrongGroup(f"refused {where}: rank is not a member of the mesh")
        if role.tp_size == 1:
            return None
        group = self.groups.mesh(stage)
        if group is None or role.rank not in self.groups.mesh_members.get(stage, ()):
            raise WrongGroup(f"refused {where}: this rank holds no group for that mesh")
        return group

    def broadcast(self, tensor: "torch.Tensor", src_rank: int) -> "torch.Tensor":
        """Broadcast ``tensor`` in place from global ``src_rank`` (a mesh member)."""
        group = self._group("broadcast")
        if src_rank not in self.role.ranks_of(self.stage):
            raise WrongGroup(f"refused broadcast: source rank {src_rank} is not in stage {self.stage}'s mesh")
        if group is None:
            return tensor
        import torch.distributed as dist

        dist.broadcast(tensor, src=src_rank, group=group)
        return tensor

    def all_reduce(self, tensor: "torch.Tensor") -> "torch.Tensor":
        """Sum ``tensor`` in place over the mesh."""
        group = self._group("all_reduce")
        if group is None:
            return tensor
        import torch.distributed as dist

        dist.all_reduce(tensor, group=group)
        return tensor

    def all_gather(self, tensor: "torch.Tensor") -> list["torch.Tensor"]:
        """Every mesh rank's ``tensor``, in mesh order (leader first)."""
        group = self._group("all_gather")
        if group is None:
            return [tensor]
        import torch
        import torch.distributed as dist

        tensor = tensor.contiguous()
        out = [
            torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device)
            for _ in range(self.role.tp_size)
        ]
        dist.all_gather(out, tensor, group=group)
        return out
