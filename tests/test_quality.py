"""R0 and R1 differ measurably from R0a, and ``ppstage quality`` says so."""

from __future__ import annotations

import math

import msgspec
import pytest
import torch

from ppstage.cli import main
from ppstage.config import PPStageConfig
from ppstage.model.quality import (
    QualityError,
    check_quality_report,
    first_decoded_anchor_chunk,
    psnr_db,
    quality_config_digest,
    read_report,
    run_quality,
    write_report,
)
from ppstage.model.reference import run_reference

CHUNKS = 5


@pytest.fixture(scope="module")
def runs():
    return {
        mode: run_reference(PPStageConfig().with_overrides({"recompute.mode": mode}), CHUNKS)
        for mode in ("r1", "r0a", "r0")
    }


def test_psnr_is_infinite_for_identical_frames_and_finite_otherwise():
    a = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    assert math.isinf(psnr_db(a, a.clone()))
    b = a.clone()
    b[0, 0, 0, 0] ^= 1
    assert 60 < psnr_db(a, b) < math.inf


def test_r0_matches_r0a_in_the_early_regime_and_differs_once_the_anchor_is_decoded(runs):
    for a, b in zip(runs["r0a"], runs["r0"]):
        diff = float((a.latents_out - b.latents_out).abs().max())
        if a.context_source in ("none", "early"):
            assert a.output_digest == b.output_digest
        else:
            assert a.context_source == "decoded" and b.context_source == "latent"
            assert diff > 1e-3 and not torch.equal(a.pixels, b.pixels)


def test_r1_differs_from_r0a_from_the_first_recompute_on(runs):
    assert runs["r1"][0].output_digest == runs["r0a"][0].output_digest
    for a, b in list(zip(runs["r0a"], runs["r1"]))[1:]:
        assert float((a.latents_out - b.latents_out).abs().max()) > 1e-3


@pytest.mark.parametrize("candidate", ["r0", "r1"])
def test_quality_command_detects_the_difference(tmp_path, capsys, candidate):
    out = tmp_path / f"{candidate}.json"
    rc = main(["quality", "--baseline", "r0a", "--candidate", candidate, "--chunks", str(CHUNKS),
               "--threshold", "60", "--out", str(out)])
    assert rc == 1
    report = read_report(out)
    assert report.verdict == "FAIL" and report.candidate == candidate
    assert report.config_digest == quality_config_digest(PPStageConfig())
    assert report.min_psnr_db is not None and report.min_psnr_db < 60
    assert report.max_abs_diff > 0
    assert "FAIL" in capsys.readouterr().out


def test_identical_modes_pass_with_infinite_psnr(tmp_path):
    rc = main(["quality", "--baseline", "r0a", "--candidate", "r0a", "--chunks", "3",
               "--out", str(tmp_path / "same.json")])
    assert rc == 0
    report = read_report(tmp_path / "same.json")
    assert report.passed and report.min_psnr_db is None
    assert all(r.psnr_db is None and r.max_abs_diff == 0 for r in report.rows)


def test_r1_is_judged_worse_than_r0():
    r0 = run_quality(PPStageConfig(), candidate="r0", chunks=CHUNKS, threshold_db=0.0)
    r1 = run_quality(PPStageConfig(), candidate="r1", chunks=CHUNKS, threshold_db=0.0)
    assert r1.min_psnr_db < r0.min_psnr_db


def test_a_stored_report_enables_r0_only_for_the_same_config_and_a_pass(tmp_path):
    config = PPStageConfig()
    passed = run_quality(config, candidate="r0", chunks=3, threshold_db=0.0)
    path = tmp_path / "r0.json"
    write_report(path, passed)
    r0_config = config.with_overrides({"recompute.mode": "r0", "recompute.r0_quality_report": str(path)})
    assert check_quality_report(r0_config).passed
    with pytest.raises(QualityError, match="different model"):
        check_quality_report(r0_config.with_overrides({"model.seed": 1}))
    write_report(path, msgspec.structs.replace(passed, verdict="FAIL"))
    with pytest.raises(QualityError, match="FAIL"):
        check_quality_report(r0_config)
    with pytest.raises(QualityError):
        check_quality_report(config)  # no report configured


def test_a_report_that_ends_before_the_first_decoded_anchor_does_not_enable_r0(tmp_path):
    # Until the first decoded anchor, R0 and R0a build the same context: such a report
    # passes trivially (min PSNR inf) and must not unlock R0.
    config = PPStageConfig()
    first = first_decoded_anchor_chunk(config)
    empty = run_quality(config, candidate="r0", chunks=first, threshold_db=0.0)
    assert empty.passed and empty.min_psnr_db is None
    path = tmp_path / "r0.json"
    write_report(path, empty)
    r0_config = config.with_overrides({"recompute.mode": "r0", "recompute.r0_quality_report": str(path)})
    with pytest.raises(QualityError, match="first decoded anchor"):
        check_quality_report(r0_config)
