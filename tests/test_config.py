"""PPStageConfig: TOML, overrides, precise errors, layer split and the parity digest."""

from __future__ import annotations

import json
import re

import pytest

from ppstage.config import ConfigError, PPStageConfig

TOML = """
[model]
layers = 12
rope_max_frames = 60

[cache]
window_frames = 8
chunk_frames = 2

[recompute]
mode = "r0"
cadence = 2
context_frames = 4
decoded_buffer_frames = 8

[denoise]
step_list = [1000, 500]

[topology]
stages = 3
tp = 2
"""


def write(tmp_path, text: str):
    path = tmp_path / "ppstage.toml"
    path.write_text(text)
    return path


def test_toml_file_loads_into_typed_sections(tmp_path):
    cfg = PPStageConfig.from_toml(write(tmp_path, TOML))
    assert cfg.model.layers == 12 and cfg.model.rope_max_frames == 60
    assert (cfg.cache.window_frames, cfg.cache.chunk_frames, cfg.cache.max_context_frames) == (8, 2, 6)
    assert (cfg.recompute.mode, cfg.recompute.cadence) == ("r0", 2)
    assert cfg.denoise.step_list == (1000, 500)
    assert (cfg.topology.world_size, cfg.layer_ranges()) == (7, ((0, 4), (4, 8), (8, 12)))
    # Everything not in the file keeps its default.
    assert cfg.runtime == PPStageConfig().runtime and cfg.model.dim == 64


def test_empty_toml_is_the_default_config(tmp_path):
    assert PPStageConfig.from_toml(write(tmp_path, "")) == PPStageConfig()


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        PPStageConfig.from_toml(tmp_path / "nope.toml")


def test_malformed_toml_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        PPStageConfig.from_toml(write(tmp_path, "[model\nlayers = "))


@pytest.mark.parametrize(
    "text", ["[model]\nlayerz = 3\n", "[modle]\nlayers = 3\n", "stray = 1\n"], ids=["key", "section", "top"]
)
def test_unknown_toml_key_is_a_config_error(tmp_path, text):
    with pytest.raises(ConfigError, match="invalid config"):
        PPStageConfig.from_toml(write(tmp_path, text))


def test_overrides_replace_single_keys():
    cfg = PPStageConfig().with_overrides({"recompute.mode": "r1", "runtime.d_in": 3, "denoise.step_list": [900]})
    assert (cfg.recompute.mode, cfg.runtime.d_in, cfg.denoise.step_list) == ("r1", 3, (900,))
    assert cfg.model == PPStageConfig().model


@pytest.mark.parametrize("key", ["recompute.modes", "recompute", "nosuch.mode", "", "model."])
def test_unknown_override_key_is_a_config_error(key):
    with pytest.raises(ConfigError, match="unknown config key"):
        PPStageConfig().with_overrides({key: 1})


INVALID = {
    "odd patch": {"model.latent_height": 7},
    "heads do not split dim": {"model.heads": 5},
    "odd head size": {"model.dim": 12, "model.heads": 4},
    "no layers": {"model.layers": 0},
    "zero chunk": {"cache.chunk_frames": 0},
    "negative sinks": {"cache.sink_frames": -1},
    "window too small": {"cache.window_frames": 4},
    "zero cadence": {"recompute.cadence": 0},
    "unknown mode": {"recompute.mode": "r2"},
    "one context frame": {"recompute.context_frames": 1},
    "context exceeds window": {"recompute.context_frames": 4},
    "decoded buffer too small": {"recompute.decoded_buffer_frames": 2},
    "empty steps": {"denoise.step_list": []},
    "increasing steps": {"denoise.step_list": [250, 500]},
    "step above 1000": {"denoise.step_list": [1001]},
    "zero stages": {"topology.stages": 0},
    "too many stages": {"topology.stages": 9},
    "tp does not split heads": {"topology.tp": 3},
    "bad backend": {"topology.backend": "mpi"},
    "zero queue": {"runtime.d_in": 0},
    "keepalive too slow": {"runtime.keepalive_interval_s": 10.0},
    "rope too short": {"model.rope_max_frames": 5},
    "rope too short to re-base": {"model.rope_max_frames": 8},  # r0a keeps anchor..chunk: 9
    "unknown overflow policy": {"cache.on_position_overflow": "wrap"},
    "wrong type": {"model.layers": "eight"},
    "ranges count": {"topology.layer_ranges": [[0, 8]]},
}


@pytest.mark.parametrize("overrides", INVALID.values(), ids=INVALID.keys())
def test_invalid_values_are_config_errors(overrides):
    with pytest.raises(ConfigError):
        PPStageConfig().with_overrides(overrides)


def test_config_error_is_a_value_error_with_a_precise_message():
    with pytest.raises(ValueError, match=r"recompute\.cadence: must be >= 1, got 0$"):
        PPStageConfig().with_overrides({"recompute.cadence": 0})


def test_config_error_is_a_ppstage_error():
    from ppstage.errors import PPStageError

    assert issubclass(ConfigError, PPStageError) and issubclass(ConfigError, ValueError)


# Every bounded key, with a value just outside its bound and the message that names it.
OUT_OF_BOUNDS = {
    "liveness.phase_deadline_min_s": (0, "must be > 0, got 0"),
    "liveness.phase_deadline_factor": (0.5, "must be >= 1, got 0.5"),
    "liveness.warmup_deadline_s": (-1, "must be > 0, got -1"),
    "record.flight_records": (0, "must be >= 1, got 0"),
    "service.port": (70000, "must be <= 65535, got 70000"),
    "service.max_body_bytes": (10, "must be >= 64, got 10"),
    "service.max_viewers": (0, "must be >= 1, got 0"),
    "service.viewer_queue_frames": (0, "must be >= 1, got 0"),
    "service.viewer_drop_limit": (0, "must be >= 1, got 0"),
    "service.viewer_send_timeout_s": (0, "must be > 0, got 0"),
    "service.jpeg_quality": (96, "must be <= 95, got 96"),
    "service.status_window_chunks": (1, "must be >= 2, got 1"),
    "runtime.pg_timeout_s": (-1, "must be > 0, got -1"),
    "runtime.startup_timeout_s": (0, "must be > 0, got 0"),
    "runtime.drain_deadline_s": (-5, "must be > 0, got -5"),
    "runtime.result_deadline_min_s": (0.0, "must be > 0, got 0.0"),
    "runtime.result_deadline_factor": (0.5, "must be >= 1, got 0.5"),
    "runtime.stage_idle_deadline_s": (-1.0, "must be > 0, got -1.0"),
    "runtime.keepalive_interval_s": (0, "must be > 0, got 0"),
    "runtime.simulated_decode_ms": (-1, "must be >= 0, got -1"),
    "runtime.simulated_call_ms": (-0.5, "must be >= 0, got -0.5"),
    "runtime.d_in": (0, "must be >= 1, got 0"),
    "runtime.d_out": (0, "must be >= 1, got 0"),
    "model.latent_channels": (0, "must be >= 1, got 0"),
    "model.latent_height": (0, "must be >= 1, got 0"),
    "model.latent_width": (-8, "must be >= 1, got -8"),
    "model.patch_size": (0, "must be >= 1, got 0"),
    "model.dim": (0, "must be >= 1, got 0"),
    "model.heads": (0, "must be >= 1, got 0"),
    "model.layers": (0, "must be >= 1, got 0"),
    "model.mlp_ratio": (0, "must be >= 1, got 0"),
    "model.text_tokens": (0, "must be >= 1, got 0"),
    "model.text_dim": (0, "must be >= 1, got 0"),
    "model.vae_scale": (0, "must be >= 1, got 0"),
    "model.seed": (-1, "must be >= 0, got -1"),
    "model.rope_max_frames": (0, "must be >= 1, got 0"),
    "cache.window_frames": (0, "must be >= 1, got 0"),
    "cache.sink_frames": (-1, "must be >= 0, got -1"),
    "cache.chunk_frames": (0, "must be >= 1, got 0"),
    "recompute.cadence": (0, "must be >= 1, got 0"),
    "recompute.context_frames": (1, "must be >= 2, got 1"),
    "recompute.decoded_buffer_frames": (0, "must be >= 1, got 0"),
    "denoise.shift": (0, "must be > 0, got 0"),
    "denoise.base_seed": (-3, "must be >= 0, got -3"),
    "topology.stages": (0, "must be >= 1, got 0"),
    "topology.tp": (0, "must be >= 1, got 0"),
}


@pytest.mark.parametrize("key", sorted(OUT_OF_BOUNDS))
def test_out_of_bounds_values_are_refused_at_load_naming_the_key_path(tmp_path, key):
    value, problem = OUT_OF_BOUNDS[key]
    section, name = key.split(".")
    path = write(tmp_path, f"[{section}]\n{name} = {json.dumps(value)}\n")
    with pytest.raises(ConfigError) as info:
        PPStageConfig.from_toml(path)
    assert str(info.value) == f"invalid config: {key}: {problem}"


def test_every_numeric_key_has_a_bound():
    numeric = {
        k for k, v in PPStageConfig().flat().items()
        if isinstance(json.loads(v), (int, float)) and not isinstance(json.loads(v), bool)
    }
    assert numeric == set(OUT_OF_BOUNDS)


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 86_401.0])
def test_timeouts_must_be_finite_and_at_most_a_day(value):
    with pytest.raises(ConfigError, match=r"runtime\.pg_timeout_s: must be"):
        PPStageConfig().with_overrides({"runtime.pg_timeout_s": value})


def test_a_negative_layer_range_bound_names_its_position():
    with pytest.raises(ConfigError, match=r"topology\.layer_ranges\[0\]\[1\]: must be >= 0, got -4"):
        PPStageConfig().with_overrides({"topology.stages": 2, "topology.layer_ranges": [[0, -4], [4, 8]]})


def test_unknown_keys_and_wrong_types_name_the_key_path(tmp_path):
    with pytest.raises(ConfigError, match=r"runtime: unknown key `pg_timeout`"):
        PPStageConfig.from_toml(write(tmp_path, "[runtime]\npg_timeout = 3\n"))
    with pytest.raises(ConfigError, match=r"runtime\.d_in: expected `int`, got `str`"):
        PPStageConfig.from_toml(write(tmp_path, '[runtime]\nd_in = "two"\n'))


def test_cross_field_rules_name_both_keys():
    with pytest.raises(ConfigError, match=r"runtime\.keepalive_interval_s: must be < runtime\.stage_idle_deadline_s"):
        PPStageConfig().with_overrides({"runtime.keepalive_interval_s": 10.0})
    with pytest.raises(ConfigError, match=r"recompute\.decoded_buffer_frames: must be >= recompute\.context_frames"):
        PPStageConfig().with_overrides({"recompute.decoded_buffer_frames": 2})


def test_startup_and_steady_state_timeouts_are_separate_keys():
    rt = PPStageConfig().runtime
    assert rt.startup_timeout_s >= 10 * rt.pg_timeout_s  # minutes to start, seconds once running
    cfg = PPStageConfig().with_overrides({"runtime.startup_timeout_s": 1800.0, "runtime.pg_timeout_s": 5.0})
    assert (cfg.runtime.startup_timeout_s, cfg.runtime.pg_timeout_s) == (1800.0, 5.0)


# -- step lists: one rule for config and planner ------------------------------------------------

STEP_LISTS = {
    "default": ([1000, 750, 500, 250], None),
    "single": ([1000], None),
    "repeated": ([500, 500], "strictly decreasing"),
    "increasing": ([250, 500], "strictly decreasing"),
    "empty": ([], "at least one timestep"),
    "zero": ([500, 0], "(0, 1000]"),
    "above 1000": ([1001], "(0, 1000]"),
    "not an integer": ([500.5], "int"),
}


@pytest.mark.parametrize("steps, problem", STEP_LISTS.values(), ids=STEP_LISTS.keys())
def test_config_and_planner_give_the_same_verdict_on_a_step_list(steps, problem):
    from ppstage.core.planner import Planner, PlannerError, StepListChange

    planner = Planner(PPStageConfig())
    if problem is None:
        assert PPStageConfig().with_overrides({"denoise.step_list": steps}).denoise.step_list == tuple(steps)
        planner.submit(StepListChange(tuple(steps)))
        return
    with pytest.raises(ConfigError, match=r"denoise\.step_list(\[\d+\])?: .*" + re.escape(problem)):
        PPStageConfig().with_overrides({"denoise.step_list": steps})
    with pytest.raises(PlannerError, match=re.escape(problem)):
        planner.submit(StepListChange(tuple(steps)))


def test_cache_geometry_comes_from_the_config():
    g = PPStageConfig().with_overrides({"cache.window_frames": 7, "cache.sink_frames": 2}).cache_geometry()
    assert (g.window_frames, g.sink_frames, g.chunk_frames, g.tokens_per_frame) == (7, 2, 3, 16)
    assert g.capacity == 7 * 16


# -- layer ranges -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layers, stages, ranges",
    [
        (8, 2, ((0, 4), (4, 8))),
        (8, 3, ((0, 3), (3, 6), (6, 8))),
        (7, 3, ((0, 3), (3, 5), (5, 7))),
        (5, 5, ((0, 1), (1, 2), (2, 3), (3, 4), (4, 5))),
        (4, 1, ((0, 4),)),
    ],
)
def test_layers_split_evenly_with_the_remainder_on_the_first_stages(layers, stages, ranges):
    cfg = PPStageConfig().with_overrides({"model.layers": layers, "topology.stages": stages})
    assert cfg.layer_ranges() == ranges


def test_explicit_layer_ranges_are_used_as_given(tmp_path):
    cfg = PPStageConfig.from_toml(write(tmp_path, "[topology]\nstages = 2\nlayer_ranges = [[0, 2], [2, 8]]\n"))
    assert cfg.layer_ranges() == ((0, 2), (2, 8))


@pytest.mark.parametrize(
    "ranges",
    [[[0, 4], [5, 8]], [[0, 4], [3, 8]], [[0, 4], [4, 7]], [[1, 4], [4, 8]], [[0, 0], [0, 8]], [[4, 8], [0, 4]]],
    ids=["gap", "overlap", "short", "late start", "empty", "out of order"],
)
def test_explicit_layer_ranges_must_tile_the_layers_in_order(ranges):
    with pytest.raises(ConfigError, match="layer_ranges"):
        PPStageConfig().with_overrides({"topology.layer_ranges": ranges})


# -- digest ---------------------------------------------------------------------------------------

# One valid alternative value for every leaf of the config.
ALTERNATIVE = {
    "model.latent_channels": 8,
    "model.latent_height": 16,
    "model.latent_width": 16,
    "model.patch_size": 4,
    "model.dim": 128,
    "model.heads": 8,
    "model.layers": 6,
    "model.mlp_ratio": 2,
    "model.text_tokens": 16,
    "model.text_dim": 64,
    "model.vae_scale": 4,
    "model.seed": 1,
    "model.rope_max_frames": 512,
    "model.backend": "tiny",
    "cache.window_frames": 7,
    "cache.sink_frames": 0,
    "cache.chunk_frames": 2,
    "cache.on_position_overflow": "cut",
    "cache.rebase_quality_report": "reports/rebase-vs-oracle.json",
    "recompute.mode": "r1",
    "recompute.cadence": 2,
    "recompute.context_frames": 2,
    "recompute.decoded_buffer_frames": 7,
    "recompute.r0_quality_report": "reports/r0-vs-r0a.json",
    "denoise.step_list": [1000, 500],
    "denoise.shift": 3.0,
    "denoise.base_seed": 0,
    "topology.stages": 4,
    "topology.tp": 2,
    "topology.layer_ranges": [[0, 5], [5, 8]],
    "topology.backend": "nccl",
    "runtime.d_in": 1,
    "runtime.d_out": 3,
    "runtime.startup_timeout_s": 900.0,
    "runtime.pg_timeout_s": 60.0,
    "runtime.result_deadline_min_s": 2.0,
    "runtime.result_deadline_factor": 4.0,
    "runtime.stage_idle_deadline_s": 8.0,
    "runtime.keepalive_interval_s": 0.5,
    "runtime.drain_deadline_s": 5.0,
    "runtime.simulated_decode_ms": 1.0,
    "runtime.simulated_call_ms": 1.0,
    "runtime.debug_extra_collective": True,
    "service.host": "0.0.0.0",
    "service.port": 9000,
    "service.max_body_bytes": 4096,
    "service.max_viewers": 8,
    "service.viewer_queue_frames": 4,
    "service.viewer_drop_limit": 8,
    "service.viewer_send_timeout_s": 2.0,
    "service.jpeg_quality": 70,
    "service.status_window_chunks": 8,
    "record.dir": "logs",
    "record.tensors": "full",
    "record.flight_records": 16,
    "runtime.anchor_first_decode": False,
    "runtime.fused_steps": False,
    "runtime.sequential_schedule": True,
    "runtime.device": "cpu",
    "liveness.phase_deadline_min_s": 1.5,
    "liveness.phase_deadline_factor": 4.0,
    "liveness.warmup_deadline_s": 20.0,
    # A drill is part of the digest, so it can never be active on one rank by accident.
    "faults.drill": [{"kind": "stall_decode", "rank": 0, "chunk": 4, "ms": 0}],
}


def test_alternative_values_cover_every_config_key():
    assert set(ALTERNATIVE) == set(PPStageConfig().flat())


def test_digest_is_stable_for_equal_configs(tmp_path):
    a = PPStageConfig()
    assert a.digest() == PPStageConfig().digest() == a.digest()
    assert PPStageConfig.from_toml(write(tmp_path, "")).digest() == a.digest()
    # Setting a key to its default value is no change at all.
    assert a.with_overrides({"recompute.mode": "r0a"}).digest() == a.digest()


@pytest.mark.parametrize("key", sorted(ALTERNATIVE))
def test_digest_changes_when_any_field_changes(key):
    base = PPStageConfig()
    changed = base.with_overrides({key: ALTERNATIVE[key]})
    assert changed.flat()[key] != base.flat()[key]
    assert changed.digest() != base.digest()


def test_flat_lists_every_leaf_as_json_for_parity_reports():
    flat = PPStageConfig().flat()
    assert flat["recompute.mode"] == '"r0a"'
    assert json.loads(flat["denoise.step_list"]) == [1000, 750, 500, 250]
    assert flat["topology.layer_ranges"] == "null"


def test_wire_geometry_follows_model_and_cache():
    g = PPStageConfig().with_overrides({"cache.chunk_frames": 2}).wire_geometry()
    assert (g.num_frames, g.latent_channels, g.height, g.width) == (2, 4, 8, 8)
    assert (g.tokens_per_frame, g.hidden_dim, g.max_context_frames) == (16, 64, 4)


def test_to_toml_reads_back_into_an_equal_config(tmp_path):
    cfg = PPStageConfig().with_overrides(
        {
            "topology.stages": 2,
            "topology.layer_ranges": ((0, 3), (3, 8)),
            "recompute.mode": "r1",
            "recompute.r0_quality_report": 'reports/"r0" quality.json',
            "denoise.step_list": (1000, 500),
        }
    )
    path = tmp_path / "pipeline.toml"
    path.write_text(cfg.to_toml())
    assert PPStageConfig.from_toml(path) == cfg
    assert PPStageConfig.from_toml(path).digest() == cfg.digest()


def test_config_command_prints_a_loadable_config(tmp_path):
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "ppstage.cli", "config", "--stages", "3", "--mode", "r0"],
        check=True, capture_output=True, text=True,
    ).stdout
    path = tmp_path / "c.toml"
    path.write_text(out)
    cfg = PPStageConfig.from_toml(path)
    assert (cfg.topology.stages, cfg.recompute.mode) == (3, "r0")
