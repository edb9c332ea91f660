"""Roles, links and process groups; mesh collectives refused on the wrong group (B10)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_helpers import run_ranks

from ppstage.config import ConfigError, PPStageConfig
from ppstage.distributed.topology import (
    MeshComm,
    ProcessGroups,
    WrongGroup,
    build_groups,
    link_group_keys,
    links,
    role_for,
)


def _config(stages: int, tp: int, backend: str = "gloo", layers: int = 8) -> PPStageConfig:
    return PPStageConfig().with_overrides(
        {
            "topology.stages": stages,
            "topology.tp": tp,
            "topology.backend": backend,
            "model.layers": layers,
            "runtime.pg_timeout_s": 5.0,
        }
    )


def test_ranks_are_laid_out_stage_by_stage_with_the_first_rank_leading():
    cfg = _config(stages=3, tp=2, layers=9)
    roles = [role_for(cfg, r) for r in range(7)]
    assert [(r.stage, r.tp_rank, r.is_leader) for r in roles] == [
        (0, 0, True),
        (1, 0, True),
        (1, 1, False),
        (2, 0, True),
        (2, 1, False),
        (3, 0, True),
        (3, 1, False),
    ]
    assert [r.layer_range for r in roles] == [None, (0, 3), (0, 3), (3, 6), (3, 6), (6, 9), (6, 9)]
    assert [roles[0].leader_of(k) for k in range(4)] == [0, 1, 3, 5]
    assert roles[4].mesh_ranks == (3, 4) and roles[0].mesh_ranks == (0,)
    assert {r.world_size for r in roles} == {7}


def test_a_rank_outside_the_world_has_no_role():
    with pytest.raises(ConfigError):
        role_for(_config(stages=2, tp=1), 3)


def test_leaders_form_a_ring_plus_the_latent_hand_back():
    cfg = _config(stages=3, tp=2)
    assert links(cfg) == ((0, 1), (1, 3), (3, 5), (5, 0), (5, 1))
    roles = {r: role_for(cfg, r) for r in (0, 1, 2, 3, 5)}
    assert (roles[0].send_peers(), roles[0].recv_peers()) == ((1,), (5,))
    assert (roles[1].send_peers(), roles[1].recv_peers()) == ((3,), (0, 5))
    assert (roles[3].send_peers(), roles[3].recv_peers()) == ((5,), (1,))
    assert (roles[5].send_peers(), roles[5].recv_peers()) == ((0, 1), (3,))
    assert (roles[2].send_peers(), roles[2].recv_peers()) == ((), ())


def test_one_stage_shares_one_link_group_with_rank_zero_and_has_no_hand_back():
    cfg = _config(stages=1, tp=2)
    assert links(cfg) == ((0, 1), (1, 0))
    assert link_group_keys(cfg) == ((0, 1),)
    leader = role_for(cfg, 1)
    assert (leader.send_peers(), leader.recv_peers()) == ((0,), (0,))
    assert leader.handback_src is None and leader.handback_dst is None


def test_link_groups_are_one_per_unordered_pair_on_gloo_and_one_per_direction_on_nccl():
    assert link_group_keys(_config(stages=2, tp=1)) == ((0, 1), (1, 2), (0, 2))
    assert link_group_keys(_config(stages=2, tp=1, backend="nccl")) == ((0, 1), (1, 2), (2, 0), (2, 1))


def test_link_lookup_names_the_direction_and_refuses_strangers():
    g01, g12 = object(), object()
    groups = ProcessGroups(rank=1, world=None, link_groups={(0, 1): g01, (1, 2): g12})
    assert groups.link(0, 1) is g01 and groups.link(1, 0) is g01 and groups.link(2, 1) is g12
    with pytest.raises(WrongGroup):
        groups.link(1, 3)
    with pytest.raises(WrongGroup):
        groups.link(0, 2)


# -- MeshComm without processes: refusals happen before anything is issued ---------


@pytest.fixture
def issued(monkeypatch):
    """Records every collective torch.distributed would have been asked to issue."""
    calls: list[str] = []
    for name in ("broadcast", "all_reduce", "all_gather"):
        monkeypatch.setattr(dist, name, lambda *a, _n=name, **k: calls.append(_n))
    return calls


def _ops(comm: MeshComm, src: int):
    t = torch.ones(2)
    return {
        "broadcast": lambda: comm.broadcast(t, src),
        "all_reduce": lambda: comm.all_reduce(t),
        "all_gather": lambda: comm.all_gather(t),
    }


@pytest.mark.parametrize("op", ["broadcast", "all_reduce", "all_gather"])
@pytest.mark.parametrize("tp", [1, 2])
def test_rank_zero_is_refused_every_mesh_collective(issued, op, tp):
    cfg = _config(stages=2, tp=tp)
    groups = ProcessGroups(rank=0, world=None, mesh_members={1: (1, 2)})
    for stage in (None, 1):
        with pytest.raises(WrongGroup, match="rank 0"):
            _ops(MeshComm(role_for(cfg, 0), groups, stage), src=1)[op]()
    assert issued == []


@pytest.mark.parametrize("op", ["broadcast", "all_reduce", "all_gather"])
def test_a_rank_is_refused_another_stages_mesh(issued, op):
    cfg = _config(stages=2, tp=2)
    other_mesh = object()
    groups = ProcessGroups(rank=3, world=None, meshes={1: other_mesh}, mesh_members={1: (1, 2), 2: (3, 4)})
    with pytest.raises(WrongGroup, match="own stage"):
        _ops(MeshComm(role_for(cfg, 3), groups, stage=1), src=1)[op]()
    assert issued == []


def test_a_member_without_its_mesh_group_is_refused(issued):
    cfg = _config(stages=2, tp=2)
    groups = ProcessGroups(rank=3, world=None, meshes={}, mesh_members={1: (1, 2), 2: (3, 4)})
    with pytest.raises(WrongGroup):
        MeshComm(role_for(cfg, 3), groups).all_reduce(torch.ones(1))
    assert issued == []


def test_a_broadcast_from_outside_the_mesh_is_refused(issued):
    cfg = _config(stages=2, tp=2)
    groups = ProcessGroups(rank=3, world=None, meshes={2: object()}, mesh_members={1: (1, 2), 2: (3, 4)})
    with pytest.raises(WrongGroup, match="source rank 1"):
        MeshComm(role_for(cfg, 3), groups).broadcast(torch.ones(1), src_rank=1)
    assert issued == []


def test_a_one_rank_mesh_is_a_local_no_op(issued):
    cfg = _config(stages=2, tp=1)
    comm = MeshComm(role_for(cfg, 2), ProcessGroups(rank=2, world=None))
    t = torch.arange(3.0)
    assert comm.broadcast(t, src_rank=2) is t
    assert comm.all_reduce(t) is t
    gathered = comm.all_gather(t)
    assert len(gathered) == 1 and gathered[0] is t
    assert issued == []


# -- B10 on real processes: a 2-rank mesh beside rank 0 ------------------------------


def _mesh_worker(ctx):
    from ppstage.distributed.parity import parity_handshake

    cfg = _config(stages=1, tp=2)
    ctx.init(cfg)
    role = role_for(cfg, ctx.rank)
    parity_handshake(cfg, role, None, {})
    groups = build_groups(cfg, ctx.rank)
    if ctx.rank == 0:
        refused = {}
        for stage in (None, 1):
            for op, call in _ops(MeshComm(role, groups, stage), src=1).items():
                try:
                    call()
                    refused[f"{stage}:{op}"] = False
                except WrongGroup:
                    refused[f"{stage}:{op}"] = True
        return {"refused": refused, "meshes": sorted(groups.meshes)}
    comm = MeshComm(role, groups)
    out = {
        "broadcast": comm.broadcast(torch.full((2,), float(ctx.rank)), src_rank=1).tolist(),
        "all_reduce": comm.all_reduce(torch.full((2,), float(ctx.rank))).tolist(),
        "all_gather": [t.tolist() for t in comm.all_gather(torch.tensor([ctx.rank]))],
    }
    try:
        comm.broadcast(torch.zeros(1), src_rank=0)
        out["broadcast_from_rank0"] = "issued"
    except WrongGroup:
        out["broadcast_from_rank0"] = "refused"
    comm.all_reduce(torch.zeros(1))  # the mesh is still in step after the refusal
    return out


@pytest.mark.timeout(60)
def test_mesh_collectives_run_on_the_mesh_and_are_refused_to_rank_zero():
    control, leader, follower = (o.result for o in run_ranks("test_topology:_mesh_worker", 3))
    assert control["meshes"] == []
    assert all(control["refused"].values()) and len(control["refused"]) == 6
    for r in (leader, follower):
        assert r["broadcast"] == [1.0, 1.0]
        assert r["all_reduce"] == [3.0, 3.0]
        assert r["all_gather"] == [[1], [2]]
        assert r["broadcast_from_rank0"] == "refused"


def test_start_up_uses_the_start_up_timeout_and_groups_the_steady_state_one(monkeypatch):
    # torchtitan's split: minutes for the rendezvous and the parity handshake (ranks on other
    # nodes start late), seconds for every group the pipeline uses afterwards.
    from datetime import timedelta

    from ppstage.distributed import bootstrap

    seen = {}
    monkeypatch.setattr(bootstrap.dist, "init_process_group", lambda **kw: seen.update(kw))
    cfg = _config(stages=1, tp=1).with_overrides({"runtime.startup_timeout_s": 900.0})
    bootstrap.init_process_group(cfg, 0, 2, "127.0.0.1", 29500)
    assert seen["timeout"] == timedelta(seconds=900.0)

    created = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "new_group", lambda ranks, timeout, **kw: created.append(timeout) or object())
    build_groups(cfg, 0)
    assert created and set(created) == {timedelta(seconds=cfg.runtime.pg_timeout_s)}
