"""``ppstage soak``: a 200-chunk random stream through a real pipeline (CI size), and its counters."""

from __future__ import annotations

import pytest

from ppstage.bench.soak import SoakReport, count_out_of_order, count_stale, format_report, random_stream, run_soak
from ppstage.config import PPStageConfig


def ev(k: int, epoch: int, planned: float, emitted: float | None, outcome: str = "emitted") -> dict:
    return {"chunk_index": k, "cache_epoch": epoch, "build_end": planned,
            "emitted": emitted or 0.0, "outcome": outcome if emitted else "stale_epoch"}


def test_a_frame_emitted_after_a_newer_epoch_was_planned_counts_as_stale():
    events = [ev(0, 0, 1.0, 2.0), ev(1, 0, 1.5, 4.0), ev(2, 1, 3.0, 5.0)]
    assert count_stale(events) == 1  # chunk 1 (epoch 0) emitted at 4.0, after epoch 1 planned at 3.0
    assert count_stale([ev(0, 0, 1.0, 2.0), ev(1, 0, 1.5, None), ev(2, 1, 3.0, 5.0)]) == 0


def test_emissions_out_of_chunk_order_are_counted():
    assert count_out_of_order([ev(0, 0, 1, 2.0), ev(1, 0, 1, 3.0), ev(2, 0, 1, 4.0)]) == 0
    assert count_out_of_order([ev(0, 0, 1, 2.0), ev(1, 0, 1, 5.0), ev(2, 0, 1, 4.0)]) == 1


def test_the_random_stream_is_a_function_of_its_seed():
    a, b = random_stream(500, 7), random_stream(500, 7)
    assert a.script == b.script and a.pauses == b.pauses
    assert a.script.cut_at and a.script.prompt_at and a.script.bias_at and a.pauses
    assert random_stream(500, 8).script != a.script


@pytest.mark.timeout(240)
def test_a_200_chunk_soak_emits_nothing_stale_or_out_of_order_within_its_queues_and_memory(tmp_path):
    cfg = PPStageConfig().with_overrides({"runtime.keepalive_interval_s": 0.5, "runtime.drain_deadline_s": 20.0})
    report = run_soak(cfg, 200, tmp_path / "soak", seed=3, warmup_chunks=40, timeout_s=200.0)
    print("\n" + format_report(report))
    assert report.exit_codes == [0, 0, 0], report.error
    assert report.cuts > 0 and report.prompt_updates > 0 and report.bias_changes > 0
    assert report.stale_emitted == 0 and report.out_of_order == 0
    assert report.max_in_flight <= report.d_in and report.max_decode_queue <= report.d_out
    assert report.emitted + sum(report.drops.values()) == 200
    assert report.passed  # includes every rank's RSS growth < 5 % after warm-up


def test_the_soak_rate_is_from_the_first_emitted_chunk_not_over_the_wall_time():
    # 100 chunks in 100 s of wall time, of which most was start-up: rank 0 saw 10 chunks/s.
    r = SoakReport(chunks=100, emitted=100, cuts=0, prompt_updates=0, bias_changes=0, pauses=0, drops={},
                   stale_emitted=0, out_of_order=0, max_in_flight=1, max_decode_queue=1, d_in=2, d_out=2,
                   rss_warm_kib=[1], rss_end_kib=[1], exit_codes=[0], wall_s=100.0, rss_growth_limit=0.05,
                   frames_per_s=30.0, frames_per_chunk=3)
    text = format_report(r)
    assert "10.0 chunks/s = 30.0 frames/s  (start-up excluded)" in text
    assert "100.0 s  (start-up and shutdown included)" in text
    assert "1.0 chunks/s" not in text


def _report(**kw):
    base = dict(chunks=30, emitted=30, cuts=0, prompt_updates=0, bias_changes=0, pauses=0, drops={},
                stale_emitted=0, out_of_order=0, max_in_flight=1, max_decode_queue=1, d_in=2, d_out=2,
                rss_warm_kib=[1000, 1000], rss_end_kib=[1001, 1002], exit_codes=[0, 0], wall_s=3.0,
                rss_growth_limit=0.05, warmup_chunks=20)
    return SoakReport(**{**base, **kw})


def test_a_soak_verdict_names_every_reason_it_fails():
    assert _report().passed and format_report(_report()).rstrip().endswith("PASS")
    short = _report(rss_warm_kib=[None, None])
    assert not short.passed
    text = format_report(short)
    assert "RSS not measured: the stream ended before a reading after 20 warm-up chunks" in text
    assert "not read -> 1.0 MiB  (n/a)" in text  # never printed as 0.0 MiB
    both = _report(stale_emitted=2, exit_codes=[0, 1])
    assert both.failures == ["exit codes [0, 1]", "2 stale frame(s) emitted"]
    grew = _report(rss_end_kib=[1000, 1100])
    assert grew.failures == ["a rank's RSS grew 5 % or more"]
