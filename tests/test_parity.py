"""Start-up parity handshake (B1): any differing setting stops every rank, by name."""

from __future__ import annotations

import pytest
from dist_helpers import run_ranks

from ppstage.config import PPStageConfig
from ppstage.distributed.parity import compare_settings, parity_settings

BASE = {"topology.stages": 1, "topology.tp": 2, "runtime.pg_timeout_s": 5.0}

# rank -> overrides on top of BASE (ranks not named use BASE)
SKEWED = {
    1: {"runtime.debug_extra_collective": True},
    2: {"recompute.mode": "r1", "topology.stages": 2, "topology.tp": 1},
}


def _worker(ctx):
    from ppstage.errors import ParityError
    from ppstage.distributed.parity import parity_handshake
    from ppstage.distributed.topology import build_groups, role_for

    overrides = dict(BASE)
    overrides.update(ctx.args.get("skew", {}).get(str(ctx.rank), {}))
    cfg = PPStageConfig().with_overrides(overrides)
    ctx.init(cfg)
    role = role_for(cfg, ctx.rank)
    try:
        parity_handshake(cfg, role, None, {"flag.extra": ctx.args.get("extra", "same")})
    except ParityError as exc:
        return {"error": "ParityError", "message": str(exc), "keys": sorted(exc.differences)}
    groups = build_groups(cfg, ctx.rank)  # parity passed: groups can be built in step
    return {"error": None, "links": sorted(map(list, groups.link_groups))}


@pytest.mark.timeout(60)
def test_a_differing_mode_flag_or_topology_stops_every_rank_naming_the_keys():
    outcomes = run_ranks("test_parity:_worker", 3, args={"skew": {str(k): v for k, v in SKEWED.items()}})
    keys = ["recompute.mode", "runtime.debug_extra_collective", "topology.stages", "topology.tp"]
    for o in outcomes:
        assert o.result["error"] == "ParityError", o.output
        assert o.result["keys"] == keys
        message = o.result["message"]
        assert 'recompute.mode: ranks 0,1 = "r0a"; rank 2 = "r1"' in message
        assert "runtime.debug_extra_collective: ranks 0,2 = false; rank 1 = true" in message
    # every rank raised the same report
    assert len({o.result["message"] for o in outcomes}) == 1


@pytest.mark.timeout(60)
def test_equal_settings_pass_and_groups_are_built_after():
    outcomes = run_ranks("test_parity:_worker", 3)
    assert [o.result for o in outcomes] == [
        {"error": None, "links": [[0, 1]]},
        {"error": None, "links": [[0, 1]]},
        {"error": None, "links": []},
    ]


def test_compare_names_each_differing_key_with_its_ranks_and_values():
    diffs = compare_settings(
        {
            0: {"a": "1", "b": "x", "c": "same"},
            1: {"a": "1", "b": "y", "c": "same"},
            2: {"a": "2", "c": "same"},
        }
    )
    assert diffs == {"a": {"1": [0, 1], "2": [2]}, "b": {"x": [0], "y": [1], None: [2]}}


def test_extra_settings_may_not_shadow_config_or_environment_keys():
    cfg = PPStageConfig()
    assert parity_settings(cfg, {"flag.new": "1"})["flag.new"] == "1"
    for key in ("recompute.mode", "env.torch"):
        with pytest.raises(ValueError, match=key):
            parity_settings(cfg, {key: "x"})


def test_settings_cover_the_config_and_the_runtime_environment():
    settings = parity_settings(PPStageConfig(), {})
    for key in ("recompute.mode", "topology.backend", "runtime.debug_extra_collective"):
        assert key in settings
    for key in ("env.torch", "env.python", "env.ppstage", "env.protocol", "env.backend"):
        assert key in settings
