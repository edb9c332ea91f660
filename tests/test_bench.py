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
