"""``ppstage bench protocol`` runs, and its pickle baseline checks what validate checks."""

from __future__ import annotations

import pytest
from wire_samples import replace

from ppstage.bench import protocol_bench as pb
from ppstage.cli import main
from protocol import InvariantViolation, validate


def test_bench_protocol_prints_figures_and_a_verdict(capsys):
    assert main(["bench", "protocol", "--iterations", "20", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "round trip (a)" in out and "(b) / (a)" in out
    assert "target: <= 20 us and >= 3x faster than pickle: " in out


@pytest.mark.parametrize(
    "fields",
    [
        dict(expected_generator_calls=4),
        dict(anchor_mode="latent"),
        dict(do_kv_recompute=False, expected_generator_calls=4),
        dict(context_frame_indices=(15, 19, 21)),
        dict(kv_cache_attention_bias=0.0),
        dict(height=16),
        dict(init_cache=True, reset_kv_cache=True, reset_crossattn_cache=True),
    ],
)
def test_baseline_rejects_what_validate_rejects(fields):
    g = pb.typical_geometry()
    msg = replace(pb.typical_envelope(g), **fields)
    with pytest.raises(InvariantViolation):
        validate(msg, g)
    with pytest.raises(pb.BaselineError):
        pb._check_infer(pb._as_dict(msg), g)


def test_both_paths_reproduce_the_typical_envelope():
    g = pb.typical_geometry()
    msg = pb.typical_envelope(g)
    assert pb.msgspec_round_trip(msg, g) == msg
    d = pb._as_dict(msg)
    assert pb.pickle_round_trip(d, g) == d


# -- smoke runs of the multi-process benches (tiny sizes; figures are never asserted) --------


@pytest.mark.timeout(120)
def test_bench_transport_prints_raw_framed_and_hop_figures(capsys):
    assert main(["bench", "transport", "--sizes", "4KiB", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "framed/raw tput" in out and "4 KiB" in out


@pytest.mark.timeout(240)
def test_bench_pipeline_prints_the_ratio_to_one_stage(capsys):
    assert main(["bench", "pipeline", "--stages", "1", "2", "--chunks", "6"]) == 0
    out = capsys.readouterr().out
    assert "x K=1" in out and "target: K=2 <= 1.25x K=1" in out


@pytest.mark.timeout(300)
def test_bench_overlap_runs_r0a_against_both_baselines_and_draws_a_png(capsys, tmp_path):
    png = tmp_path / "overlap.png"
    argv = ["bench", "overlap", "--modes", "r0a", "--chunks", "8", "--simulate-decode-ms", "6", "--png", str(png)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for schedule in ("anchor-first", "decode-first", "sequential"):
        assert schedule in out
    assert "target r0a balanced D=2" in out
    assert png.exists() or "matplotlib is not installed" in out
