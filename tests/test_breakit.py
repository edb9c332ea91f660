"""The break-it matrix of SPEC section 11, driven by ``[[faults.drill]]`` config.

Each multi-process test runs real ``ppstage launch`` processes with a drill in
the one parity-checked config, and asserts: the exact error class, that the
report names the right rank and phase, that every process exited (or kept
streaming, for B8), and that no stale or wrong frame was emitted (every emitted
chunk is bitwise the reference's). Rows covered elsewhere:

| row | test |
|---|---|
| B1 | test_parity.py (mode/topology/debug flag); here: a drill on one rank only |
| B2 | test_pipeline.py (extra call); here: a skipped call |
| B3 | test_validate.py + test_transport.py (sender); here: forced onto the wire |
| B4 | test_transport.py::test_preflight_* |
| B5 | test_pipeline.py (corrupt envelope); here: unknown version |
| B6, B7 | test_pipeline.py::test_injected_fault_* |
| B9 | test_gate.py (duplicates, reorder), test_stateful.py |
| B11 | test_pipeline.py::test_killing_any_rank_*; here: exit_rank drill |
| B12, B14 | test_pipeline.py (keepalives, SIGTERM) |
| B13 | test_codec.py (mutations, random bytes), test_fuzz.py |

Every figure "injection -> every rank exited" is measured from the drill's own
``drill fired`` log line (wall clock) to the moment the last process was reaped.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest
import torch
from dist_helpers import run_ranks
from wire_samples import infer_envelope as sample_envelope

from ppstage.config import PPStageConfig
from ppstage.distributed.topology import ProcessGroups, build_groups, role_for
from ppstage.distributed.transport import FrameWriter, Transport, byte_view, make_spec, preamble_capacity
from ppstage.distributed.transport._tensors import frame_limit_bytes
from ppstage.errors import ChannelDead
from ppstage.model.reference import StreamScript, run_reference
from ppstage.observability.report import check_digests
from ppstage.stages.launcher import start_pipeline
from protocol import (
    InferEnvelope,
    MetadataError,
    NoopEnvelope,
    TensorSpecError,
    decode_frame,
    encode_frame,
)

QUICK = {
    "runtime.pg_timeout_s": 10.0,
    "runtime.stage_idle_deadline_s": 4.0,
    "runtime.keepalive_interval_s": 0.3,
    "runtime.drain_deadline_s": 8.0,
    "runtime.result_deadline_min_s": 4.0,
    "liveness.phase_deadline_min_s": 2.0,
    "liveness.warmup_deadline_s": 12.0,
}


def drill(kind: str, rank: int, chunk: int = 0, ms: float = 0.0) -> dict:
    return {"kind": kind, "rank": rank, "chunk": chunk, "ms": ms}


def config(*drills: dict, stages: int = 2, tp: int = 1, mode: str = "r1", **overrides) -> PPStageConfig:
    return PPStageConfig().with_overrides(
        {
            "topology.stages": stages,
            "topology.tp": tp,
            "recompute.mode": mode,
            "faults.drill": list(drills),
            **QUICK,
            **overrides,
        }
    )


class Run:
    """A finished pipeline: exit codes, rank 0's summary, logs, and the measured figures."""

    def __init__(self, pipe, codes, exited_wall: float, config: PPStageConfig, chunks: int, script) -> None:
        self.pipe, self.codes, self.config = pipe, codes, config
        self.result = pipe.summary() or {}
        self.exited_wall = exited_wall
        self.chunks, self.script = chunks, script

    def log(self, rank: int) -> str:
        return (self.pipe.out_dir / f"rank{rank}.log").read_text()

    @property
    def error(self) -> str:
        return self.result.get("error") or ""

    def fired_wall(self) -> float:
        """When the drill fired (its rank's ``drill fired`` line)."""
        for r in range(len(self.codes)):
            m = re.search(r"drill fired.*?t_wall=([0-9.]+)", self.log(r))
            if m:
                return float(m.group(1))
        raise AssertionError("no drill fired")

    def seconds_to_exit(self) -> float:
        return self.exited_wall - self.fired_wall()

    def emitted_match_reference(self) -> int:
        """Every emitted chunk is bitwise the reference's (no stale, no wrong frame); returns how many."""
        # Tensor parallel sums partial outputs in another order: equal within 1e-4, not bitwise.
        atol = 1e-4 if self.config.topology.tp > 1 else 0.0
        ref = run_reference(self.config, self.chunks, self.script)
        check = check_digests(self.result["events"], ref, latents=self.pipe.latents, atol=atol)
        assert not check.mismatched, check
        emitted = [e["chunk_index"] for e in self.result["events"] if e["outcome"] == "emitted"]
        assert emitted == sorted(emitted)  # in order
        return check.compared

    def tails(self) -> list[str]:
        return [self.pipe.log_tail(r, 15) for r in range(len(self.codes))]


def run(tmp_path, cfg: PPStageConfig, *, chunks: int = 8, cuts=(), timeout: float = 60.0, **kw) -> Run:
    args = ["--quiet"] + [a for k in cuts for a in ("--cut-at", str(k))]
    pipe = start_pipeline(cfg, tmp_path / "run", chunks=chunks, launch_args=args, **kw)
    try:
        codes = pipe.wait(timeout, grace_s=20.0)
    finally:
        pipe.kill()
    return Run(pipe, codes, time.time(), cfg, chunks, StreamScript(cut_at=tuple(cuts)))


def all_failed(r: Run) -> None:
    assert all(c not in (0, None) for c in r.codes), (r.codes, r.tails())  # none hung, none "succeeded"


def report_figure(name: str, r: Run) -> None:
    print(f"\nFIGURE {name}: injection -> every rank exited {r.seconds_to_exit():.2f} s")


# -- B1: a drill on one rank only ------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_b1_a_drill_on_one_rank_only_stops_every_rank_at_parity_naming_faults_drill(tmp_path):
    plain = config()
    drilled = config(drill("stall_decode", 0, 3))
    r = run(tmp_path, plain, config_overrides={0: drilled}, timeout=40.0)
    assert r.codes == [2, 2, 2], r.tails()
    for rank in range(3):
        assert "faults.drill" in r.log(rank), r.log(rank)[-1500:]


# -- B2: a skipped generator call --------------------------------------------------------------


@pytest.mark.timeout(60)
def test_b2_a_skipped_generator_call_is_a_call_count_mismatch_at_the_stage(tmp_path):
    r = run(tmp_path, config(drill("skip_generator_call", 1, 2)))
    all_failed(r)
    assert "CallCountMismatch" in r.error and "stage 1 (rank 1)" in r.error, r.error
    assert "chunk ended after 3 generator calls, planned 4" in r.error
    assert 0 <= r.emitted_match_reference() <= 2
    report_figure("B2 skip_generator_call", r)


# -- B3: recompute without its context, forced onto the wire ---------------------------------------


@pytest.mark.timeout(60)
def test_b3_missing_context_on_the_wire_is_refused_by_the_leader_before_any_mesh_collective(tmp_path):
    r = run(tmp_path, config(drill("drop_context_override", 0, 2), stages=1, tp=2, mode="r0a"))
    all_failed(r)
    assert "InvariantViolation" in r.error and "context_frames_override is missing" in r.error, r.error
    assert "stage 1 (rank 1)" in r.error
    assert "terminal action from leader" in r.log(2)  # the follower was told, not left waiting
    assert 0 <= r.emitted_match_reference() <= 2
    report_figure("B3 drop_context_override", r)


# -- B5: an unknown protocol version at a leader ---------------------------------------------------


@pytest.mark.timeout(60)
def test_b5_unknown_version_envelope_ends_the_mesh_and_rank0_gets_the_leaders_error(tmp_path):
    r = run(tmp_path, config(drill("unknown_version_envelope", 0, 2), stages=1, tp=2))
    all_failed(r)
    assert "UnsupportedVersion" in r.error and "version 99" in r.error, r.error
    assert "terminal action from leader" in r.log(2)
    assert 0 <= r.emitted_match_reference() <= 2
    report_figure("B5 unknown_version_envelope", r)


# -- B8: a late result after a hard cut -------------------------------------------------------------


@pytest.mark.timeout(90)
def test_b8_a_result_delayed_past_a_hard_cut_is_dropped_and_the_new_epoch_streams(tmp_path):
    cfg = config(drill("delay_result", 2, 5, ms=1500), **{"runtime.result_deadline_min_s": 8.0})
    r = run(tmp_path, cfg, chunks=10, cuts=(6,))
    assert r.codes == [0, 0, 0], r.tails()
    outcome = {e["chunk_index"]: e["outcome"] for e in r.result["events"]}
    assert outcome[5] in ("stale_epoch", "flushed"), outcome  # never decoded or emitted
    assert r.result["gate"].get("dropped_stale_epoch", 0) + r.result["summary"]["dropped"].get("flushed", 0) >= 1
    assert all(outcome[k] == "emitted" for k in range(6, 10)), outcome
    r.emitted_match_reference()


# -- B10: a collective on the wrong group ---------------------------------------------------------------


@pytest.mark.timeout(60)
def test_b10_a_collective_on_another_stages_group_is_refused_before_it_is_issued(tmp_path):
    r = run(tmp_path, config(drill("wrong_group_collective", 1, 2)))
    all_failed(r)
    assert "WrongGroup" in r.error and "refused all_reduce on the stage 2 mesh from rank 1" in r.error, r.error
    assert 0 <= r.emitted_match_reference() <= 2
    report_figure("B10 wrong_group_collective", r)


# -- B11: a rank exits mid-stream ---------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_b11_a_stage_leader_exiting_mid_stream_ends_every_rank_within_the_window(tmp_path):
    r = run(tmp_path, config(drill("exit_rank", 1, 3)))
    all_failed(r)
    assert r.codes[1] == 1
    assert "ChannelDead" in r.error or "stopped making progress" in r.error, r.error
    assert r.seconds_to_exit() < 15.0
    assert r.emitted_match_reference() <= 3
    report_figure("B11 exit_rank", r)


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


# -- B18: a field of the wrong type is refused by the sender ---------------------------------------


@pytest.mark.timeout(60)
def test_b18_a_float_in_an_int_field_is_refused_by_rank0s_preflight_never_by_the_receiver(tmp_path):
    r = run(tmp_path, config(drill("wrong_type_field", 0, 2)))
    all_failed(r)
    assert "MetadataError" in r.error and "current_start_frame" in r.error, r.error
    assert "Expected `int`, got `float`" in r.error
    for rank in (1, 2):  # the stages heard rank 0's reason; no receiver decode failed
        assert "current_start_frame" in r.log(rank) and "FramingError" not in r.log(rank)
    assert 0 <= r.emitted_match_reference() <= 2
    report_figure("B18 wrong_type_field", r)


# -- B19: a payload that disagrees with its spec --------------------------------------------------------


@pytest.mark.timeout(60)
def test_b19_a_payload_shorter_than_its_spec_is_refused_by_the_sender_naming_the_call(tmp_path):
    r = run(tmp_path, config(drill("payload_length_lie", 0, 2)))
    all_failed(r)
    assert "TensorSpecError" in r.error and "tensor 'latents_in'" in r.error and "chunk_index=2" in r.error, r.error
    assert 0 <= r.emitted_match_reference() <= 2


# -- B18 / B19 at the wire boundary: pure, and through a real Transport ---------------------------------


WRONG_TYPES = [
    ("float for int", dict(current_start_frame=21.0), "Expected `int`, got `float`"),
    ("int for bool", dict(do_kv_recompute=1), "Expected `bool`, got `int`"),
    ("str for float", dict(kv_cache_attention_bias="1.0"), "Expected `float`, got `str`"),
    ("tensor for int", dict(base_seed=torch.tensor(3)), "not serialisable"),
]


@pytest.mark.parametrize("label, fields, words", WRONG_TYPES, ids=[w[0] for w in WRONG_TYPES])
def test_b18_the_encoder_refuses_a_field_of_the_wrong_type_before_any_header(label, fields, words):
    msg = msgspec.structs.replace(sample_envelope(), **fields)
    with pytest.raises(MetadataError, match=words) as info:
        encode_frame(msg)
    assert info.value.call_id == msg.call_id  # names the call


def test_b18_what_the_encoder_accepts_the_receivers_decoder_accepts():
    msg = sample_envelope()
    head, meta = encode_frame(msg)
    assert decode_frame(head + meta) == msg


def _lone(fatals: list) -> Transport:
    cfg = PPStageConfig().with_overrides({"topology.stages": 1})
    groups = ProcessGroups(rank=0, world=None, link_groups={(0, 1): object()})
    return Transport(cfg, role_for(cfg, 0), groups, loop=asyncio.get_running_loop(),
                     geometry=cfg.wire_geometry(), on_fatal=fatals.append)


def _sample_tensors(msg: InferEnvelope) -> list[torch.Tensor]:
    return [torch.zeros(s.shape, dtype=getattr(torch, s.dtype)) for s in msg.tensors]


@pytest.mark.timeout(20)
@pytest.mark.parametrize("label, fields, words", WRONG_TYPES, ids=[w[0] for w in WRONG_TYPES])
async def test_b18_the_transport_preflight_refuses_wrong_types_and_queues_nothing(label, fields, words):
    fatals: list = []
    t = _lone(fatals)
    msg = sample_envelope(recompute=False)
    with pytest.raises(MetadataError, match=words):
        await t.send(1, msgspec.structs.replace(msg, **fields), _sample_tensors(msg))
    assert t._outbox.empty() and not fatals
    t.close()


@pytest.mark.timeout(20)
@pytest.mark.parametrize("delta", [-1, +1], ids=["shorter", "longer"])
async def test_b19_a_payload_shorter_or_longer_than_its_spec_is_refused_naming_the_call(delta):
    fatals: list = []
    t = _lone(fatals)
    msg = sample_envelope(recompute=False)
    tensors = _sample_tensors(msg)
    lat = tensors[0]
    tensors[0] = torch.zeros((lat.shape[0] + delta, *lat.shape[1:]))
    with pytest.raises(TensorSpecError, match="tensor 'latents_in'") as info:
        await t.send(1, msg, tensors)
    assert (info.value.call_id, info.value.chunk_index) == (msg.call_id, msg.chunk_index)
    assert t._outbox.empty() and not fatals
    t.close()


@pytest.mark.timeout(20)
async def test_every_send_settles_when_close_races_it():
    # close() from another thread while sends are being queued: each await ends,
    # either sent (here: failed on the dummy link, ChannelDead) or refused.
    import threading

    fatals: list = []
    t = _lone(fatals)
    sends = [asyncio.ensure_future(t.send(1, NoopEnvelope(call_id=i, chunk_index=0, cache_epoch=0)))
             for i in range(1, 200)]
    threading.Thread(target=t.close).start()
    outcomes = await asyncio.wait_for(asyncio.gather(*sends, return_exceptions=True), 10)
    assert all(o is None or isinstance(o, ChannelDead) for o in outcomes), outcomes[:3]


def test_frame_limit_follows_the_geometry_and_admits_every_legitimate_frame():
    g = PPStageConfig().wire_geometry()
    limit = frame_limit_bytes(g)
    envelope = sum(s.nbytes for s in sample_envelope(recompute=True).tensors)
    assert envelope < limit < 1 << 24
    assert frame_limit_bytes(None) >= 1 << 30


# -- B19 across three real processes: mixed dtypes of equal size; a frame over the limit -------------


def _tiny_cfg() -> PPStageConfig:
    return PPStageConfig().with_overrides({"topology.stages": 2, "runtime.pg_timeout_s": 5.0})


def _mixed_envelopes():
    """Envelopes whose three tensors have equal byte sizes (32 B) and different dtypes/shapes."""
    out = []
    for i in range(12):
        latents = torch.arange(8, dtype=torch.float32).reshape(1, 1, 2, 4) + i
        cond = torch.full((1, 8), float(-i)) if i % 2 else torch.full((2, 4), float(i))  # 32 B, two shapes
        steps = torch.tensor([1000 - i, 750, 500, 250], dtype=torch.int64)  # 32 B of int64
        tensors = [latents, cond, steps]
        names = ["latents_in", "conditioning_embeds", "denoising_step_list"]
        msg = msgspec.structs.replace(
            sample_envelope(recompute=False), call_id=i + 1, chunk_index=i + 1, num_frames=1, latent_channels=1,
            height=2, width=4, tensors=tuple(make_spec(n, x) for n, x in zip(names, tensors)),
        )
        out.append((msg, tensors))
    return out


def _mixed_dtype_worker(ctx):
    cfg = _tiny_cfg()
    ctx.init(cfg)
    role, groups = role_for(cfg, ctx.rank), build_groups(cfg, ctx.rank)

    async def main():
        fatals: list = []
        t = Transport(cfg, role, groups, loop=asyncio.get_running_loop(), geometry=None, on_fatal=fatals.append)
        frames = _mixed_envelopes()
        if ctx.rank == 0:
            for msg, tensors in frames:
                await t.send(1, msg, tensors)
            await asyncio.sleep(1.0)
            return {"fatals": [repr(f) for f in fatals]}
        inbox = t.open_inbound(ctx.rank - 1)
        seen = []
        for msg, tensors in frames:
            item = await asyncio.wait_for(inbox.get(), 20)
            got = [item.tensors[s.name] for s in item.msg.tensors]
            seen.append(item.error is None and all(
                g.dtype == x.dtype and g.shape == x.shape and torch.equal(byte_view(g), byte_view(x))
                for g, x in zip(got, tensors)))
            if ctx.rank == 1:  # forward what was received, as a stage leader does
                await t.send(2, item.msg, got)
        await asyncio.sleep(1.0)
        return {"ok": seen, "fatals": [repr(f) for f in fatals]}

    return asyncio.run(main())


@pytest.mark.timeout(60)
def test_b19_mixed_dtypes_of_equal_size_cross_three_ranks_bitwise_with_their_own_dtype():
    outcomes = run_ranks("test_breakit:_mixed_dtype_worker", 3)
    assert outcomes[0].result == {"fatals": []}
    for o in outcomes[1:]:
        assert o.result == {"ok": [True] * 12, "fatals": []}, o.output


def _oversize_worker(ctx):
    import torch.distributed as dist

    cfg = _tiny_cfg()
    ctx.init(cfg)
    role, groups = role_for(cfg, ctx.rank), build_groups(cfg, ctx.rank)
    if ctx.rank == 2:
        return {}

    async def main():
        fatals: list = []
        t = Transport(cfg, role, groups, loop=asyncio.get_running_loop(), geometry=cfg.wire_geometry(),
                      on_fatal=fatals.append)
        if ctx.rank == 0:
            # A raw sender: a spec announcing 256 MiB (within the codec's own bounds).
            msg = sample_envelope(recompute=False)
            big = msgspec.structs.replace(msg.tensors[0], shape=(1 << 24, 4), nbytes=1 << 28)
            head, meta = encode_frame(msgspec.structs.replace(msg, tensors=(big, *msg.tensors[1:])))
            # The frame's preamble (header + metadata) goes out as the transport's own
            # writer frames it; the 256 MiB it announces never follow.
            writer = FrameWriter(torch.device("cpu"), preamble_capacity("gloo"), exact=False)
            writer.send(head, meta, (), lambda buf: dist.send(buf, dst=1, group=groups.link(0, 1)))
            await asyncio.sleep(2.0)
            return {}
        import resource

        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t.open_inbound(0)
        t0 = time.monotonic()
        while not fatals and time.monotonic() - t0 < 10:
            await asyncio.sleep(0.01)
        grew_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        return {"fatals": [f"{type(f).__name__}: {f}" for f in fatals], "grew_kib": grew_kib}

    return asyncio.run(main())


@pytest.mark.timeout(60)
def test_b19_a_frame_over_the_geometrys_limit_is_refused_before_any_allocation():
    receiver = run_ranks("test_breakit:_oversize_worker", 3)[1].result
    assert len(receiver["fatals"]) == 1, receiver
    assert receiver["fatals"][0].startswith("FramingError") and "refused before allocation" in receiver["fatals"][0]
    assert receiver["grew_kib"] < 64 * 1024  # nowhere near the 256 MiB announced
