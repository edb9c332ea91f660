"""The break-it rows about liveness (SPEC sections 10 and 11): a stalled phase is named by its
rank within its deadline (B15); cold chunks get the warm-up deadline and the first warm one a
deadline from them (B16); the end of a stream is bounded by the result and phase deadlines, a
stop by its drain deadline; every rank exits when its launcher dies (B17).

Real ``ppstage launch`` processes with drills in the config (``breakit_helpers.py``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from breakit_helpers import all_failed, config, drill, report_figure, run

from ppstage.stages.launcher import start_pipeline


# -- B15: rank 0's decode stalls -----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_b15_a_stalled_decode_is_named_by_rank0_and_every_stage_points_at_it(tmp_path):
    r = run(tmp_path, config(drill("stall_decode", 0, 4)))
    all_failed(r)
    assert "PhaseStalled: rank 0 decode of chunk 4 exceeded" in r.error, r.error
    for rank in (1, 2):  # their reports point at rank 0's decode, not at their own wait
        assert "terminal action received" in r.log(rank)
        assert "rank 0 decode of chunk 4 exceeded" in r.log(rank), r.log(rank)[-1500:]
        assert "WatchdogExpired" not in r.log(rank) and "stopped making progress" not in r.log(rank)
    assert 2 <= r.emitted_match_reference() <= 4
    assert r.seconds_to_exit() < 15.0
    report_figure("B15 stall_decode", r)


@pytest.mark.timeout(60)
def test_b15_a_stalled_generator_call_is_named_by_its_rank_and_rank0_reports_it(tmp_path):
    r = run(tmp_path, config(drill("stall_generator_call", 1, 3)))
    all_failed(r)
    assert "PhaseStalled: rank 1 (stage 1) generator call (denoise step 3) of chunk 3 exceeded" in r.error, r.error
    assert "rank 1 (stage 1) generator call" in r.log(2)  # stage 2 points at rank 1, not at its own wait
    assert 1 <= r.emitted_match_reference() <= 3
    report_figure("B15 stall_generator_call", r)


@pytest.mark.timeout(60)
def test_b15_a_result_owed_past_the_result_deadline_is_named_by_rank0_and_ends_the_stalled_stage(tmp_path):
    # The stage's own call deadline is out of reach (30 s): rank 0's result deadline
    # (2 s, re-checked every watchdog tick) names the last stage, and its ERROR ends
    # the stage although its worker is still inside the stalled call.
    cfg = config(drill("stall_generator_call", 1, 3, ms=8000), stages=1,
                 **{"runtime.result_deadline_min_s": 2.0, "liveness.phase_deadline_min_s": 30.0})
    r = run(tmp_path, cfg)
    all_failed(r)
    assert "PhaseStalled: rank 0 got no result from the pipeline (last stage leader rank 1) within 2.0 s" in r.error, r.error
    assert "terminal action received" in r.log(1)
    assert r.seconds_to_exit() < 7.0  # not the 8 s stall: the abort ended the stage
    assert r.emitted_match_reference() == 3


# -- B16: cold chunks get the warm-up deadline; the same stall at a steady chunk is caught ---------


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind, rank, phase", [("stall_decode", 0, "rank 0 decode of chunk 3"),
                                                ("stall_generator_call", 2, "rank 2 (stage 2) generator call")])
def test_b16_a_cold_first_chunk_is_no_false_alarm_and_the_same_stall_at_a_steady_chunk_is_caught(
    tmp_path, kind, rank, phase
):
    # One run, two drills: a 3.5 s stall at chunk 0 (cold: above the 2 s steady floor,
    # within the 12 s warm-up deadline) passes; the same stall at chunk 3 is caught.
    r = run(tmp_path, config(drill(kind, rank, 0, ms=3500), drill(kind, rank, 3, ms=3500)), chunks=6)
    all_failed(r)
    assert "PhaseStalled" in r.error and phase in r.error, r.error
    assert "chunk 0" not in r.error
    emitted = [e["chunk_index"] for e in r.result["events"] if e["outcome"] == "emitted"]
    assert emitted[:1] == [0]  # the cold chunk went through
    assert 1 <= r.emitted_match_reference() <= 3


@pytest.mark.timeout(90)
def test_b16_a_slow_cold_decode_that_backs_up_the_results_is_no_result_alarm(tmp_path):
    # 7 s of cold decode: within the 12 s warm-up deadline, past the 4 s result deadline.
    # The decode queue fills and results wait unread on rank 0's link: the pipeline is
    # not late, so rank 0 must not blame the last stage (a regression caught in review).
    r = run(tmp_path, config(drill("stall_decode", 0, 0, ms=7000)), chunks=6)
    assert r.codes == [0, 0, 0], (r.error, r.tails())
    assert r.emitted_match_reference() == 6


def test_b16_a_step_list_change_makes_the_next_chunk_cold_again():
    # Chunk 0 is cold, and so is the first chunk with a new step list (the pure
    # tracker and deadline; the pipeline path is above).
    from ppstage.stages.deadlines import PhaseDeadline, WarmupTracker

    w = WarmupTracker()
    keys = [(1000, 500), (1000, 500), (1000, 750, 500), (1000, 750, 500)]
    assert [w.enter(k) for k in keys] == [True, False, True, False]
    d = PhaseDeadline("decode", minimum_s=1.0, factor=10.0, warmup_s=30.0)
    d.observe(25.0, cold=True)  # a slow cold sample stands in only until a steady one is known
    assert d.deadline_s() == 30.0 and d.deadline_s(cold=True) == 30.0
    for _ in range(5):
        d.observe(0.2)
    assert d.deadline_s() == pytest.approx(2.0)
    d.observe(25.0, cold=True)  # the next cold chunk: the steady deadline stays its own
    assert d.deadline_s() == pytest.approx(2.0) and d.deadline_s(cold=True) == 30.0


@pytest.mark.timeout(60)
def test_b16_the_first_warm_chunk_after_a_slow_cold_one_is_no_false_alarm(tmp_path):
    # 0.7 s per generator call, above the 0.5 s phase floor: the first warm chunk has
    # no steady history yet, and took the floor (PhaseStalled at its first call);
    # its result, owed ~2.8 s, took the 1.5 s result floor. Both now stand on the
    # cold chunk's durations until steady ones are known.
    cfg = config(stages=1, **{"runtime.simulated_call_ms": 700.0, "liveness.phase_deadline_min_s": 0.5,
                              "runtime.result_deadline_min_s": 1.5})
    r = run(tmp_path, cfg, chunks=2)
    assert r.codes == [0, 0], (r.error, r.tails())
    assert r.emitted_match_reference() == 2


# -- the end of the stream: bounded by the result and phase deadlines, not by a stop's drain deadline --


@pytest.mark.timeout(60)
def test_an_end_of_stream_wait_longer_than_the_drain_deadline_is_no_stop_and_exits_zero(tmp_path):
    # The last chunk's ~2.8 s of generator calls are still owed when the producer is
    # done; runtime.drain_deadline_s (1 s) bounds a stop, not the normal end.
    cfg = config(stages=1, **{"runtime.simulated_call_ms": 700.0, "runtime.drain_deadline_s": 1.0})
    r = run(tmp_path, cfg, chunks=1)
    assert r.codes == [0, 0], (r.error, r.tails())
    assert "drain missed" not in r.log(0)
    assert r.emitted_match_reference() == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind, rank, overrides, words", [
    ("stall_decode", 0, {}, "PhaseStalled: rank 0 decode of chunk 3 exceeded 2.0 s"),
    ("stall_generator_call", 1, {"liveness.phase_deadline_min_s": 30.0},
     "PhaseStalled: rank 0 got no result from the pipeline (last stage leader rank 1) within 4.0 s"),
])
def test_a_stall_of_the_last_chunk_during_the_end_of_stream_wait_is_caught_by_its_deadline(
    tmp_path, kind, rank, overrides, words
):
    # The producer is done when the last chunk stalls: the watchdog tick keeps checking the
    # owed result and rank 0's decode while rank 0 waits, with a drain deadline out of reach.
    cfg = config(drill(kind, rank, 3, ms=20000), stages=1, **{"runtime.drain_deadline_s": 60.0, **overrides})
    r = run(tmp_path, cfg, chunks=4)
    all_failed(r)
    assert words in r.error, r.error
    assert r.seconds_to_exit() < 10.0  # the phase's deadline, not the stall's 20 s nor the 60 s drain


@pytest.mark.timeout(60)
def test_a_stop_during_the_end_of_stream_wait_is_bounded_by_the_drain_deadline_from_the_stop(tmp_path):
    # Both chunks are sent; chunk 1 (~6 s of generator calls) is still owed when rank 0
    # gets SIGTERM: from then on its drain may take 1 s, and it reports that it missed it.
    cfg = config(stages=1, **{"runtime.simulated_call_ms": 1500.0, "runtime.drain_deadline_s": 1.0})
    pipe = start_pipeline(cfg, tmp_path / "run", chunks=2, launch_args=["--quiet"])
    try:
        end = time.monotonic() + 40.0
        while not (pipe.out_dir / "latents" / "chunk0.f32").exists():  # chunk 0's result is in
            assert time.monotonic() < end and all(p.poll() is None for p in pipe.procs), pipe.log_tail(0)
            time.sleep(0.05)
        stopped = time.monotonic()
        pipe.signal_rank0(signal.SIGTERM)
        codes = pipe.wait(30.0, grace_s=10.0)
        exited = time.monotonic() - stopped
    finally:
        pipe.kill()
    assert all(c not in (0, None) for c in codes), (codes, pipe.log_tail(0))
    error = (pipe.summary() or {}).get("error") or ""
    assert error.startswith("WatchdogExpired: drain missed its 1.0s deadline: 1 result(s) in flight"), error
    assert exited < 4.5, exited  # the 1 s drain deadline, not chunk 1's remaining ~6 s


# -- B17: the launcher of the ranks dies ---------------------------------------------------------------


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


@pytest.mark.timeout(90)
def test_b17_when_the_launcher_dies_every_rank_exits_within_the_watchdog_window(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "ppstage.cli", "demo", "--chunks", "100000", "--no-check", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ranks: list[int] = []
    try:
        end = time.monotonic() + 60
        stream = out / "chunks.jsonl"  # one line per finished chunk (the demo writes no latents here)
        while not stream.exists() or len(stream.read_text().splitlines()) < 2:
            assert proc.poll() is None and time.monotonic() < end, "demo made no progress"
            time.sleep(0.1)
        ranks = _children(proc.pid)
        assert len(ranks) == 3
        proc.send_signal(signal.SIGKILL)  # the launcher dies; nobody forwards a signal
        proc.wait()
        t0 = time.monotonic()
        alive = list(ranks)
        while alive and time.monotonic() - t0 < 20:
            alive = [p for p in alive if Path(f"/proc/{p}").exists() and _state(p) != "Z"]
            time.sleep(0.1)
        elapsed = time.monotonic() - t0
        assert not alive, f"ranks {alive} outlived their launcher"
        print(f"\nFIGURE B17 launcher killed: every rank exited {elapsed:.2f} s later")
        # The first rank to notice names the launcher; the others may follow it
        # through their dead channels before their own 0.5 s poll comes round.
        assert any("its launcher (pid" in (out / f"rank{r}.log").read_text() for r in range(3))
    finally:
        for p in [proc.pid, *ranks]:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()  # reaped on every path


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"
