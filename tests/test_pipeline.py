"""The distributed runtime end to end: real processes, gloo, the embedded model.

Every run here is a real ``ppstage launch`` process per rank (started by
``ppstage.stages.launcher``), always reaped. Equivalence is against the
single-process reference pipeline.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from ppstage.config import PPStageConfig
from ppstage.observability.report import check_digests
from ppstage.stages.launcher import start_pipeline
from ppstage.model.quality import format_table, run_quality, write_report
from ppstage.model.reference import StreamScript, run_reference

CHUNKS = 12
SCRIPT = StreamScript(prompt="a red fox", prompt_at={4: "a grey wolf"}, cut_at=(8,))
LAUNCH_ARGS = ["--prompt", "a red fox", "--prompt-at", "4:a grey wolf", "--cut-at", "8", "--quiet"]

pytestmark = pytest.mark.timeout(180)


def drill(kind: str, rank: int, chunk: int = 0, ms: float = 0.0) -> dict:
    """A ``[[faults.drill]]`` entry (part of every rank's parity-checked config)."""
    return {"kind": kind, "rank": rank, "chunk": chunk, "ms": ms}


def config_for(
    stages: int, mode: str, *, tp: int = 1, ranges=None, cadence: int = 1, drills=(), **runtime
) -> PPStageConfig:
    overrides = {
        "recompute.cadence": cadence,
        "topology.stages": stages,
        "topology.tp": tp,
        "topology.layer_ranges": ranges,
        "recompute.mode": mode,
        "runtime.pg_timeout_s": 20.0,
        "runtime.stage_idle_deadline_s": 5.0,
        "runtime.keepalive_interval_s": 0.5,
        "runtime.drain_deadline_s": 10.0,
        "faults.drill": list(drills),
        **{f"runtime.{k}": v for k, v in runtime.items()},
    }
    return PPStageConfig().with_overrides(overrides)


def r0_report(tmp_path, config: PPStageConfig) -> str:
    """Run the real R0-vs-R0a quality comparison and write its report (the R0 gate needs one).

    The threshold is this test's choice of acceptable quality (the comparison
    itself is real); the pipeline tests are about transport equivalence.
    """
    report = run_quality(config, chunks=6, script=SCRIPT, threshold_db=10.0)
    assert report.passed, format_table(report)
    path = tmp_path / "r0_quality.json"
    write_report(path, report)
    return str(path)


def run_pipeline(tmp_path, config: PPStageConfig, *, chunks=CHUNKS, args=LAUNCH_ARGS, timeout=120.0):
    pipe = start_pipeline(config, tmp_path / "run", chunks=chunks, launch_args=list(args))
    try:
        codes = pipe.wait(timeout)
    finally:
        pipe.kill()
    return pipe, codes


@pytest.mark.parametrize(
    "stages, ranges",
    [(1, None), (2, ((0, 3), (3, 8))), (3, ((0, 2), (2, 3), (3, 8)))],
    ids=["K1", "K2-uneven", "K3-uneven"],
)
@pytest.mark.parametrize("mode", ["r1", "r0a", "r0"])
def test_every_emitted_chunk_is_bitwise_equal_to_the_reference(tmp_path, stages, ranges, mode):
    # R1 rolls the cache from chunk 2 on. With recompute every chunk nothing would ever
    # roll, so K=2 recomputes every second chunk: chunks 3, 5, ... roll after a rebuild.
    config = config_for(stages, mode, ranges=ranges, cadence=2 if stages == 2 else 1)
    if mode == "r0":
        config = config.with_overrides({"recompute.r0_quality_report": r0_report(tmp_path, config)})
    pipe, codes = run_pipeline(tmp_path, config)
    assert codes == [0] * config.topology.world_size, [pipe.log_tail(r) for r in range(len(codes))]
    result = pipe.summary()
    check = check_digests(result["events"], run_reference(config, CHUNKS, SCRIPT))
    assert check.ok, check
    # Only chunks superseded by the hard cut at chunk 8 may be missing, and at most D_in of them.
    assert set(check.dropped_by_cut) <= {6, 7}
    assert check.compared == CHUNKS - len(check.dropped_by_cut)
    assert result["gate"]["accepted"] >= CHUNKS - 2


@pytest.mark.parametrize("mode", ["r1", "r0a"])
def test_loop_hops_the_schedule_before_fused_steps_give_the_same_bytes(tmp_path, mode):
    # runtime.fused_steps = false routes every hop through the loop (the fallback
    # and the benchmark's baseline); the bytes must not depend on the route.
    config = config_for(3, mode, fused_steps=False)
    pipe, codes = run_pipeline(tmp_path, config)
    assert codes == [0] * config.topology.world_size, [pipe.log_tail(r) for r in range(len(codes))]
    check = check_digests(pipe.summary()["events"], run_reference(config, CHUNKS, SCRIPT))
    assert check.ok, check
    assert check.compared == CHUNKS - len(check.dropped_by_cut)


def test_r1_sends_the_next_envelope_before_decoding_the_previous_chunk(tmp_path):
    config = config_for(2, "r1", simulated_decode_ms=20.0)
    pipe, codes = run_pipeline(tmp_path, config, args=["--quiet"])
    assert codes == [0, 0, 0]
    events = {e["chunk_index"]: e for e in pipe.summary()["events"]}
    assert all(e["outcome"] == "emitted" for e in events.values())
    for k in range(CHUNKS - 1):
        assert events[k + 1]["sent"] < events[k]["decode_start"], f"chunk {k + 1} waited for decode of {k}"


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals ``[start, end)`` open at any one instant."""
    return max(sum(1 for a, b in intervals if a <= t < b) for t, _ in intervals)


def test_queues_fill_up_to_d_in_and_d_out_and_never_beyond(tmp_path):
    # Decode (60 ms) is the bottleneck, so both queues fill; occupancy is
    # recomputed from rank 0's timestamps, not taken from its own counters.
    config = config_for(2, "r1", simulated_decode_ms=60.0)
    pipe, codes = run_pipeline(tmp_path, config, args=["--quiet"])
    assert codes == [0, 0, 0]
    events = pipe.summary()["events"]
    in_flight = _max_overlap([(e["sent"], e["received"]) for e in events])
    decode_queue = _max_overlap([(e["queued"], e["decode_start"]) for e in events])
    assert in_flight == config.runtime.d_in
    assert decode_queue == config.runtime.d_out


def test_tensor_parallel_mesh_matches_the_reference_within_tolerance(tmp_path):
    # Mesh ranks compare state and output digests every chunk (a mismatch fails the
    # run), so exit 0 means the two ranks of each mesh were bitwise identical.
    config = config_for(1, "r0a", tp=2)
    # 8 chunks: the module's cut at chunk 8 would lie past the end (refused), so none here.
    args = ["--prompt", "a red fox", "--prompt-at", "4:a grey wolf", "--quiet"]
    pipe, codes = run_pipeline(tmp_path, config, chunks=8, args=args)
    assert codes == [0, 0, 0], [pipe.log_tail(r) for r in range(len(codes))]
    result = pipe.summary()
    records = run_reference(config, 8, StreamScript(prompt="a red fox", prompt_at={4: "a grey wolf"}))
    check = check_digests(result["events"], records, latents=pipe.latents, atol=1e-4)
    assert check.ok, check
    assert check.compared == 8 and not check.dropped_by_cut


@pytest.mark.parametrize(
    "stages, tp, victim",
    [(2, 1, 2), (2, 1, 0), (1, 2, 2)],
    ids=["last-stage-leader", "rank0", "mesh-follower"],
)
def test_killing_any_rank_makes_every_other_rank_exit_nonzero_quickly(tmp_path, stages, tp, victim):
    config = config_for(stages, "r1", tp=tp)
    pipe = start_pipeline(config, tmp_path / "run", chunks=100000, launch_args=["--quiet"])
    try:
        _wait_for_progress(pipe)
        pipe.procs[victim].send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        codes = pipe.wait(30.0, grace_s=30.0)
        elapsed = time.monotonic() - t0
    finally:
        pipe.kill()
    assert codes[victim] == -signal.SIGKILL
    others = [c for r, c in enumerate(codes) if r != victim]
    assert all(c not in (0, None) for c in others), codes
    assert elapsed < 15.0


def test_sigterm_to_rank0_drains_and_every_rank_exits_zero(tmp_path):
    config = config_for(2, "r0a")
    pipe = start_pipeline(config, tmp_path / "run", chunks=100000, launch_args=["--quiet"])
    try:
        _wait_for_progress(pipe)
        pipe.signal_rank0(signal.SIGTERM)
        codes = pipe.wait(30.0)
    finally:
        pipe.kill()
    assert codes == [0, 0, 0], [pipe.log_tail(r) for r in range(3)]
    result = pipe.summary()
    assert result["exit_code"] == 0
    assert result["gate"]["in_flight"] == 0
    # Drained: every chunk planned before the signal was decoded and emitted.
    assert result["summary"]["chunks_emitted"] == result["summary"]["chunks_planned"] >= 3


@pytest.mark.parametrize("keepalives", [True, False], ids=["keepalives", "control-without"])
def test_idle_pipeline_outlives_the_stage_watchdog_thanks_to_keepalives(tmp_path, keepalives):
    drills = () if keepalives else (drill("no_keepalives", 0),)
    config = config_for(2, "r0a", stage_idle_deadline_s=1.5, keepalive_interval_s=0.3, drills=drills)
    args = ["--quiet", "--pause-at", "2:4.0"]
    pipe = start_pipeline(config, tmp_path / "run", chunks=4, launch_args=args)
    try:
        codes = pipe.wait(60.0)
    finally:
        pipe.kill()
    if keepalives:
        assert codes == [0, 0, 0], [pipe.log_tail(r) for r in range(3)]
        assert pipe.summary()["summary"]["chunks_emitted"] == 4
    else:  # the same idle gap without keepalives trips stage 1's watchdog
        assert all(c not in (0, None) for c in codes), codes
        # PhaseStalled is the WatchdogExpired that names who stopped: rank 0 sent nothing.
        assert "rank 0 stopped making progress" in pipe.log_tail(1), pipe.log_tail(1)


def _wait_for_progress(pipe, timeout: float = 60.0) -> None:
    """Until rank 0 has accepted a few results (it writes their latents on receipt)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if len(list((pipe.out_dir / "latents").glob("*.f32"))) >= 3:
            return
        if any(p.poll() is not None for p in pipe.procs):
            raise AssertionError(f"a rank exited early: {[p.poll() for p in pipe.procs]}")
        time.sleep(0.1)
    raise AssertionError("pipeline made no progress")


def test_sigterm_to_the_demo_command_drains_and_exits_zero(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "ppstage.cli", "demo", "--chunks", "100000", "--no-check", "--out", str(out)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, cwd=tmp_path
    )
    try:
        end = time.monotonic() + 60
        while _finished_chunks(out) < 3:  # rank 0's chunk stream (--no-check writes no latents)
            assert proc.poll() is None and time.monotonic() < end, "demo made no progress"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        stdout, _ = proc.communicate(timeout=40)
    finally:
        try:  # the demo and every rank it started: nothing outlives the test
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    assert proc.returncode == 0, stdout[-2000:]
    assert "summary" in stdout
    assert not (out / "latents").exists()  # nothing to check, so no latents on disk


def _finished_chunks(out) -> int:
    try:
        return len((out / "chunks.jsonl").read_text().splitlines())
    except OSError:
        return 0


@pytest.mark.parametrize(
    "fault_rank, kind, chunk, expected, detector",
    [
        (2, "extra_generator_call", 3, "CallCountMismatch", 2),  # B2, at the stage itself
        (0, "corrupt_envelope", 2, "DigestMismatch", 1),  # B5, at the receiving leader
        (0, "perturb_start_frame", 2, "IllegalTransition", 1),  # B7
        (2, "stall_generator_call", 3, "PhaseStalled", 2),  # a hang is named by the stalled rank itself
        (2, "reset_cache_one_rank", 3, "StateDivergence", 0),  # B6, rank 0's shadow lifecycle
        (4, "reset_cache_one_rank", 3, "StateDivergence", 4),  # B6 on a mesh follower, in the mesh
    ],
)
@pytest.mark.parametrize("fused", [True, False], ids=["fused-steps", "loop-hops"])
def test_injected_fault_ends_every_rank_nonzero_with_a_typed_report(
    tmp_path, fault_rank, kind, chunk, expected, detector, fused
):
    # R1 for the reset: an R0a recompute rebuilds the cache every chunk, which would repair it.
    mode = "r1" if kind == "reset_cache_one_rank" else "r0a"
    tp = 2 if kind == "corrupt_envelope" or fault_rank == 4 else 1
    config = config_for(2, mode, tp=tp, drills=[drill(kind, fault_rank, chunk)], fused_steps=fused)
    pipe = start_pipeline(config, tmp_path / "run", chunks=8, launch_args=["--quiet"])
    t0 = time.monotonic()
    try:
        codes = pipe.wait(60.0, grace_s=15.0)
    finally:
        pipe.kill()
    assert time.monotonic() - t0 < 45.0
    assert all(c not in (0, None) for c in codes), codes  # nobody hung (None) or pretended success
    result = pipe.summary()
    assert result["exit_code"] == 1 and expected in result["error"], result["error"]
    # Everything before the fault was emitted; a B6 reset after chunk k shows in chunk k + 1.
    emitted = result["summary"]["chunks_emitted"]
    assert emitted == chunk + (1 if kind == "reset_cache_one_rank" else 0)
    assert expected in pipe.log_tail(detector, lines=60), pipe.log_tail(detector)
    if kind == "corrupt_envelope":  # B5: the leader ended its mesh with a terminal action
        assert "terminal action from leader" in pipe.log_tail(2, lines=60)


def test_launch_runs_each_rank_under_torchrun(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    config = config_for(2, "r0a")
    cfg = tmp_path / "pipeline.toml"
    cfg.write_text(config.to_toml())
    summary = tmp_path / "summary.json"
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    cmd = [
        torchrun, "--standalone", "--nproc-per-node", str(config.topology.world_size),
        "-m", "ppstage.cli", "launch", "--config", str(cfg), "--chunks", "6", "--quiet",
        "--summary-out", str(summary),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            cwd=tmp_path)
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    assert proc.returncode == 0, out[-3000:]
    result = json.loads(summary.read_text())
    check = check_digests(result["events"], run_reference(config, 6, StreamScript()))
    assert check.ok and check.compared == 6, check
