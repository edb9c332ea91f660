"""Record and replay end to end: real gloo pipelines record, the replay tools read them back.

Golden logs in ``tests/data/golden/`` were recorded by this version; today's
reader must decode them and replay must verify them. Regenerate them only on
a deliberate, compatible format change (docs/protocol.md, "Message logs")::

    PPSTAGE_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_replay.py -k golden
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import msgspec
import pytest

from protocol.msglog import ChunkRecord, EventRecord, LogHeader, MessageRecord, encode_log, read_log
from ppstage.cli import main
from ppstage.config import Drill, FaultsConfig, PPStageConfig
from ppstage.replay.errors import DrillsRecorded
from ppstage.replay.inject import inject
from ppstage.replay.pipeline import replay_pipeline
from ppstage.replay.runlog import RunLogs
from ppstage.replay.verify import bisect, replay
from ppstage.stages.launcher import start_pipeline

pytestmark = pytest.mark.timeout(240)

GOLDEN = Path(__file__).parent / "data" / "golden"
UPDATE_GOLDEN = os.environ.get("PPSTAGE_UPDATE_GOLDEN") == "1"


def config_for(mode: str = "r0a", **runtime) -> PPStageConfig:
    return PPStageConfig().with_overrides({
        "recompute.mode": mode,
        "denoise.step_list": (1000, 500),  # two hops per stage and chunk: small logs, quick runs
        "runtime.pg_timeout_s": 20.0,
        "runtime.stage_idle_deadline_s": 5.0,
        "runtime.keepalive_interval_s": 0.5,
        "runtime.drain_deadline_s": 10.0,
        **{f"runtime.{k}": v for k, v in runtime.items()},
    })


def with_drill(config: PPStageConfig, kind: str, rank: int, chunk: int) -> PPStageConfig:
    """``config`` with one fault drill (part of every rank's config, so parity passes)."""
    return msgspec.structs.replace(config, faults=FaultsConfig(drill=(Drill(kind=kind, rank=rank, chunk=chunk),)))


def record_run(out: Path, config: PPStageConfig, *, chunks: int, args=(), env=None, timeout=60.0):
    rec = out / "rec"
    pipe = start_pipeline(config, out, chunks=chunks, env_overrides=env,
                          launch_args=["--quiet", "--record", str(rec), *args])
    try:
        codes = pipe.wait(timeout)
    finally:
        pipe.kill()
    return pipe, codes, rec


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A clean recorded run: 2 stages, R0a, a hard cut at chunk 3 (one result dropped by epoch)."""
    out = tmp_path_factory.mktemp("recorded")
    pipe, codes, rec = record_run(out, config_for(), chunks=5, args=["--cut-at", "3", "--prompt-at", "1:a grey wolf"])
    assert codes == [0, 0, 0], [pipe.log_tail(r) for r in range(3)]
    return rec


def test_a_recorded_demo_replays_through_the_reference_and_every_digest_matches(recorded, capsys):
    assert main(["replay", str(recorded), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "ALL MATCH: 5 chunk(s) from epoch 0" in out
    report = replay(RunLogs.load([recorded]))
    assert [c.chunk_index for c in report.checks] == [0, 1, 2, 3, 4]
    fields = set().union(*(c.compared for c in report.checks))
    assert {"state_digest", "output_digest", "input.latents_in", "input.context_frames_override",
            "envelope.current_start_frame"} <= fields
    # Every generator rank's chunk records were compared, not just rank 0's view.
    assert all(c.compared.count("state_digest") >= 1 + 2 + 2 for c in report.checks if c.result.startswith("match"))


def test_replay_can_start_at_a_later_epoch_boundary_only(recorded, capsys):
    assert main(["replay", str(recorded), "--from-epoch", "1"]) == 0
    assert "ALL MATCH: 2 chunk(s) from epoch 1" in capsys.readouterr().out
    assert main(["replay", str(recorded), "--from-epoch", "7"]) == 2
    assert "must start at an epoch boundary" in capsys.readouterr().err


def test_a_recorded_demo_replays_through_a_fresh_gloo_pipeline(recorded, tmp_path, capsys):
    from ppstage.replay.pipeline import replay_pipeline

    report = replay_pipeline(RunLogs.load([recorded]), work_dir=tmp_path)
    assert len(report.checks) == 5 and report.ok
    assert all("output_digest" in c.compared for c in report.checks)


def test_a_run_recorded_with_drills_is_refused_by_pipeline_replay_and_replays_without_them(tmp_path, capsys):
    # delay_result only slows the last stage's send: without it the re-run must match bitwise.
    config = msgspec.structs.replace(config_for(), faults=FaultsConfig(
        drill=(Drill(kind="delay_result", rank=2, chunk=1, ms=200.0),)))
    pipe, codes, rec = record_run(tmp_path / "drilled", config, chunks=3)
    assert codes == [0, 0, 0], pipe.log_tail(0)
    capsys.readouterr()
    assert main(["replay", str(rec), "--pipeline"]) == 2
    err = capsys.readouterr().err
    assert "delay_result (rank 2, chunk 1)" in err and "--without-drills" in err
    with pytest.raises(DrillsRecorded) as info:
        replay_pipeline(RunLogs.load([rec]), work_dir=tmp_path / "refused")
    assert [d.kind for d in info.value.drills] == ["delay_result"]
    assert not (tmp_path / "refused" / "replayed").exists()  # refused before any process started
    assert main(["replay", str(rec), "--pipeline", "--without-drills"]) == 0
    out = capsys.readouterr().out
    assert "without its fault drills: delay_result (rank 2, chunk 1)" in out and "ALL MATCH: 3 chunk(s)" in out


def test_without_drills_is_only_for_pipeline_replay(recorded, capsys):
    assert main(["replay", str(recorded), "--without-drills"]) == 2
    assert "--without-drills needs --pipeline" in capsys.readouterr().err


def _tamper(src: Path, dst: Path, rank: int, chunk_index: int) -> None:
    """Copy the logs; in ``rank``'s, change the state digest of one chunk record (checksums redone)."""
    dst.mkdir()
    for f in src.glob("rank*.ppslog"):
        shutil.copy(f, dst / f.name)
    log = read_log(src / f"rank{rank}.ppslog")
    import msgspec

    records = [
        msgspec.structs.replace(r, state_digest="0" * 32)
        if isinstance(r, ChunkRecord) and r.chunk_index == chunk_index else r
        for r in log.records
    ]
    (dst / f"rank{rank}.ppslog").write_bytes(encode_log(log.header, records))


def test_verify_stops_at_the_first_mismatch_naming_chunk_stage_and_field(recorded, tmp_path, capsys):
    bad = tmp_path / "bad"
    _tamper(recorded, bad, rank=2, chunk_index=2)
    assert main(["replay", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "MISMATCH at chunk 2 (epoch 0), rank 2 (stage 2), field state_digest" in err


def test_log_inspect_reads_complete_logs_with_exit_0_and_locates_damage_with_exit_2(recorded, tmp_path, capsys):
    assert main(["log", "inspect", str(recorded)]) == 0
    out = capsys.readouterr().out
    assert "stale_epoch 1" in out and "send INFER 5" in out and "complete" in out
    cut = tmp_path / "rank1.ppslog"
    data = (recorded / "rank1.ppslog").read_bytes()
    cut.write_bytes(data[: len(data) - 7])
    assert main(["log", "inspect", str(cut)]) == 2
    captured = capsys.readouterr()
    assert "recv INFER" in captured.out  # the readable part is printed
    assert "LogTruncated" in captured.err and "at byte" in captured.err and "Traceback" not in captured.err


@pytest.mark.parametrize("mode", ["duplicate", "stale", "delay"])
def test_injected_perturbations_drop_the_right_results_and_leave_the_stream_unchanged(recorded, mode):
    s0 = RunLogs.load([recorded]).stage0
    accepted = [g.call_id for g in s0.gates if g.verdict == "accepted"]
    stale = [g.call_id for g in s0.gates if g.verdict == "stale_epoch"]
    assert stale, "the cut at chunk 3 drops the result(s) still in flight"  # which ones depends on timing
    rep = inject(s0, mode)
    assert rep.baseline == accepted and dict(rep.baseline_drops) == {"stale_epoch": len(stale)}
    assert rep.error is None and rep.unchanged
    if mode == "duplicate":  # each result twice: the copy of an accepted one is a duplicate, of a stale one stale
        assert dict(rep.drop_counts) == {"duplicate": len(accepted), "stale_epoch": len(stale)}
        assert rep.emitted == accepted
    elif mode == "stale":  # the last result of epoch 0, again, after the cut
        assert dict(rep.drop_counts) == {"stale_epoch": 1} and rep.emitted == accepted
    else:  # results held back past the cut are dropped by epoch, never emitted (B8)
        assert rep.overtaken and all(c in accepted and c < 3 for c in rep.overtaken)
        assert dict(rep.drop_counts) == {"stale_epoch": len(rep.overtaken)}
        assert rep.emitted == [c for c in accepted if c not in rep.overtaken]


def test_injected_reorder_is_a_typed_gate_error(recorded, capsys):
    from ppstage.errors import OutOfOrderResult

    rep = inject(RunLogs.load([recorded]).stage0, "reorder")
    assert isinstance(rep.error, OutOfOrderResult)
    assert main(["replay", str(recorded), "--inject", "reorder"]) == 0
    assert "OutOfOrderResult" in capsys.readouterr().out


def test_trace_and_plot_export_every_rank_with_aligned_clocks(recorded, tmp_path):
    from ppstage.replay.timeline import align_clocks, message_pairs

    run = RunLogs.load([recorded])
    offsets = align_clocks(run)
    for a, send, b, recv in message_pairs(run):
        assert recv.t_ns + offsets[b] >= send.t_ns + offsets[a]
    assert main(["log", "trace", str(recorded), "-o", str(tmp_path / "trace.json")]) == 0
    events = json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    assert {e["pid"] for e in events} == {0, 1, 2}
    starts = [e for e in events if e["ph"] == "s"]
    ends = {e["id"]: e for e in events if e["ph"] == "f"}
    assert starts and all(ends[s["id"]]["ts"] >= s["ts"] for s in starts)
    assert main(["log", "plot", str(recorded), "-o", str(tmp_path / "timeline.png")]) == 0
    assert (tmp_path / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_clock_alignment_undoes_a_skewed_rank_clock(recorded, tmp_path):
    import msgspec

    from ppstage.replay.timeline import align_clocks

    skewed = tmp_path / "skewed"
    skewed.mkdir()
    for f in recorded.glob("rank*.ppslog"):
        log = read_log(f)
        shift = -5_000_000_000 if log.header.rank == 2 else 0  # rank 2's clock reads 5 s early
        recs = [msgspec.structs.replace(r, t_ns=r.t_ns + shift) if hasattr(r, "t_ns") else r for r in log.records]
        (skewed / f.name).write_bytes(encode_log(log.header, recs))
    offsets = align_clocks(RunLogs.load([skewed]))
    assert offsets[0] == offsets[1] == 0
    assert abs(offsets[2] - 5_000_000_000) < 50_000_000  # within the gap between message pairs


def test_bisect_names_the_first_chunk_and_rank_of_an_injected_divergence(tmp_path, capsys):
    # B6: after chunk 1, rank 2 (stage 2's leader) zeroes its KV cache and tells no one.
    # R1: a recompute would rebuild the cache and repair it.
    config = with_drill(config_for("r1"), "reset_cache_one_rank", rank=2, chunk=1)
    pipe, codes, rec = record_run(tmp_path, config, chunks=4)
    assert all(c not in (0, None) for c in codes), codes
    report = bisect(RunLogs.load([rec]))
    check, cause = report.first_departure()
    assert (check.chunk_index, cause.where, cause.field) == (2, "rank 2 (stage 2)", "state_digest")
    assert all(c.ok for c in report.checks if c.chunk_index < 2)
    assert main(["replay", "--bisect", str(rec)]) == 1
    out = capsys.readouterr().out
    assert "first divergence: chunk 2" in out and "rank 2 (stage 2)" in out
    assert "rank 1 (stage 1)" in out.split("agree:")[1]
    # Re-run without the drill, the fresh pipeline departs where the drill's damage first shows.
    assert main(["replay", "--pipeline", "--without-drills", str(rec)]) == 1
    assert "MISMATCH at chunk 2 (epoch 0), rank 2 (stage 2), field state_digest" in capsys.readouterr().err
    # The typed error made every rank write its flight recorder into the run's directory.
    for r in range(3):
        dump = read_log(tmp_path / f"rank{r}.flight.ppslog")
        assert dump.complete and dump.header.flight
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["flight_record"] == str(tmp_path / "rank0.flight.ppslog")
    failures = [r.detail for r in read_log(tmp_path / "rank0.flight.ppslog").records
                if isinstance(r, EventRecord) and r.name == "failure"]
    assert failures and "StateDivergence" in failures[0]


def _wait_for_chunks(pipe, n: int, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while len(list((pipe.out_dir / "latents").glob("*.f32"))) < n:
        assert time.monotonic() < end and all(p.poll() is None for p in pipe.procs), "no progress"
        time.sleep(0.1)


def test_a_killed_peer_leaves_flight_records_that_name_the_dead_channel(tmp_path):
    pipe = start_pipeline(config_for("r1"), tmp_path, chunks=100000, launch_args=["--quiet"])
    try:
        _wait_for_chunks(pipe, 2)
        pipe.procs[1].send_signal(signal.SIGUSR1)  # a dump on request, while the rank goes on
        end = time.monotonic() + 20
        while not (tmp_path / "rank1.flight.ppslog").exists():
            assert time.monotonic() < end, pipe.log_tail(1)
            time.sleep(0.05)
        on_request = read_log(tmp_path / "rank1.flight.ppslog")
        assert on_request.complete and on_request.records[-1].detail.startswith("SIGUSR1")
        assert pipe.procs[1].poll() is None
        pipe.procs[2].send_signal(signal.SIGKILL)
        codes = pipe.wait(30.0, grace_s=20.0)
    finally:
        pipe.kill()
    assert codes[2] == -signal.SIGKILL and all(c not in (0, None) for c in codes[:2]), codes
    for r in (0, 1):
        path = tmp_path / f"rank{r}.flight.ppslog"
        dump = read_log(path)
        assert dump.complete and dump.header.flight and dump.header.rank == r
        assert 0 < len(dump.records) <= PPStageConfig().record.flight_records + 1
        assert any(isinstance(m, MessageRecord) for m in dump.records)  # the traffic before the failure
        assert str(path) in pipe.log_tail(r, lines=40)  # the failure report names the file
    events = [e.name for e in read_log(tmp_path / "rank0.flight.ppslog").records if isinstance(e, EventRecord)]
    assert "channel_failed" in events


def test_a_watchdog_expiry_leaves_a_flight_record(tmp_path):
    config = with_drill(config_for("r1", result_deadline_min_s=2.0), "stall_generator_call", rank=2, chunk=1)
    pipe = start_pipeline(config, tmp_path, chunks=4, launch_args=["--quiet"])
    try:
        codes = pipe.wait(60.0, grace_s=20.0)
    finally:
        pipe.kill()
    assert all(c not in (0, None) for c in codes), codes
    dump = read_log(tmp_path / "rank0.flight.ppslog")
    failures = [r.detail for r in dump.records if isinstance(r, EventRecord) and r.name == "failure"]
    # Rank 0's result deadline (2 s) fires first and names the stalled last stage leader.
    assert failures and failures[0].startswith("PhaseStalled") and "rank 2" in failures[0], failures
    assert json.loads((tmp_path / "summary.json").read_text())["flight_record"].endswith("rank0.flight.ppslog")


def test_sigterm_mid_stream_leaves_logs_that_inspect_reads_to_the_end(tmp_path, capsys):
    rec = tmp_path / "rec"
    pipe = start_pipeline(config_for(), tmp_path, chunks=100000, launch_args=["--quiet", "--record", str(rec)])
    try:
        _wait_for_chunks(pipe, 3)
        pipe.signal_rank0(signal.SIGTERM)
        codes = pipe.wait(40.0)
    finally:
        pipe.kill()
    assert codes == [0, 0, 0], [pipe.log_tail(r) for r in range(3)]
    assert main(["log", "inspect", str(rec)]) == 0
    capsys.readouterr()
    for r in range(3):
        log = read_log(rec / f"rank{r}.ppslog")
        assert log.complete
        assert any(isinstance(m, MessageRecord) and m.action == "SHUTDOWN" for m in log.records)
        assert isinstance(log.records[-1], EventRecord) and log.records[-1].name == "exit"
    assert not list(tmp_path.glob("*.flight.ppslog"))  # a clean exit writes no flight dump
    assert main(["replay", str(rec)]) == 0  # and what was recorded replays


def _write_golden() -> None:
    import tempfile

    GOLDEN.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        pipe, codes, rec = record_run(Path(tmp), config_for(), chunks=4, args=["--cut-at", "2"])
        assert codes == [0, 0, 0]
        for f in GOLDEN.glob("rank*.ppslog"):
            f.unlink()
        for f in rec.glob("rank*.ppslog"):
            shutil.copy(f, GOLDEN / f.name)


def test_golden_logs_decode_with_todays_reader_and_replay_verifies_them(capsys):
    if UPDATE_GOLDEN:
        _write_golden()
    files = sorted(GOLDEN.glob("rank*.ppslog"))
    assert [f.name for f in files] == ["rank0.ppslog", "rank1.ppslog", "rank2.ppslog"]
    for f in files:
        log = read_log(f)
        assert log.complete, log.error
        assert isinstance(log.header, LogHeader) and log.header.tensors == "digest"
    assert main(["replay", str(GOLDEN), "--verify"]) == 0
    assert "ALL MATCH: 4 chunk(s)" in capsys.readouterr().out
    assert main(["log", "inspect", str(GOLDEN)]) == 0


def test_bench_record_measures_the_hook_cost_from_a_real_log():
    from ppstage.bench.record_bench import hook_cost_per_chunk

    seconds, chunks = hook_cost_per_chunk(GOLDEN, RunLogs.load([GOLDEN]).config())
    assert chunks == 4 and 0 < seconds < 1.0  # a figure, not a target: the target is printed, never asserted


def test_logs_of_two_runs_are_refused_naming_the_odd_file(tmp_path, capsys):
    # A directory reused by a smaller run keeps the old run's rank<r> files; a command line may
    # name two runs. Replaying them together would blame a rank for another run's state.
    mixed = tmp_path / "mixed"
    shutil.copytree(GOLDEN, mixed)
    (mixed / "rank3.ppslog").write_bytes((GOLDEN / "rank1.ppslog").read_bytes())  # rank 1 again, renamed
    assert main(["replay", str(mixed)]) == 2
    assert "both rank 1's log" in capsys.readouterr().err
    other = read_log(GOLDEN / "rank2.ppslog")
    renamed = msgspec.structs.replace(other.header, config_digest="0" * 32)
    (mixed / "rank3.ppslog").unlink()
    (mixed / "rank2.ppslog").write_bytes(encode_log(renamed, other.records))
    assert main(["replay", str(mixed)]) == 2
    assert "is not of the same run" in capsys.readouterr().err


def test_a_run_recorded_on_a_cuda_device_is_refused_where_there_is_none():
    import torch

    from ppstage.config import PPStageConfig
    from ppstage.replay.errors import ReplayError
    from ppstage.replay.verify import _replay_device

    assert _replay_device(PPStageConfig()).type == "cpu"  # gloo: the ranks computed on the CPU
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the recorded device")
    with pytest.raises(ReplayError, match="no such device"):
        _replay_device(PPStageConfig().with_overrides({"topology.backend": "nccl"}))


@pytest.mark.parametrize("out", ["timeline.txt", "timeline"])
def test_a_plot_not_named_png_is_refused_in_one_line_before_reading(tmp_path, capsys, out):
    # No logs needed: the name is refused first (was a matplotlib traceback for .txt, and a
    # silent timeline.png beside the 'timeline' that was reported as written).
    assert main(["log", "plot", str(tmp_path / "missing"), "-o", str(tmp_path / out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ppstage log plot: -o ") and "ending in .png" in err[0]
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("mode", ["--verify", "--bisect"])
def test_a_replay_with_a_damaged_log_is_incomplete_not_all_match(recorded, tmp_path, capsys, mode):
    """What was readable matches, but rank 1's chunks after the damage were never compared:
    exit 2 and INCOMPLETE naming the log (it said ALL MATCH, exit 0)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(recorded, run)
    data = (run / "rank1.ppslog").read_bytes()
    (run / "rank1.ppslog").write_bytes(data[: len(data) * 2 // 3])
    assert main(["replay", str(run), mode]) == 2
    captured = capsys.readouterr()
    assert "ALL MATCH" not in captured.out and "no divergence:" not in captured.out
    assert "INCOMPLETE: " in captured.out and "rank1.ppslog (from record " in captured.out
    assert "records before it are readable and replayed" in captured.err


@pytest.mark.parametrize("argv, words", [
    (["--pipeline", "--bisect"], "--pipeline verifies only: --bisect replays against the reference"),
    (["--pipeline", "--inject", "stale"], "--pipeline verifies only: --inject replays against the reference"),
    (["--inject", "stale", "--from-epoch", "1"], "--inject re-feeds rank 0's whole result stream"),
])
def test_replay_refuses_flags_it_would_ignore(recorded, capsys, argv, words):
    assert main(["replay", str(recorded), *argv]) == 2
    assert words in capsys.readouterr().err


def test_a_pipeline_replay_past_its_timeout_says_so_with_exit_1(recorded, capsys):
    assert main(["replay", str(recorded), "--pipeline", "--timeout", "0.5"]) == 1
    err = capsys.readouterr().err
    assert "timed out after 0.5 s (--timeout); every rank was killed" in err and "Traceback" not in err
