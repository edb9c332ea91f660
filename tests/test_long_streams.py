"""Long streams end to end (SPEC section 13): real ``ppstage launch`` processes over gloo.

A positional table small enough to run out several times in a short run: with
``on_position_overflow = "rebase"`` every chunk is emitted in one epoch and is
bitwise equal to the reference pipeline, which plans and applies the same
re-bases. Rank 0 compares every stage's lifecycle state digest (it covers the
position offset and the position of every cached frame) with its own shadow of
the plan for every chunk and fails the run on the first difference, so a run
that exits 0 had every rank in the plan's state across each re-base.
With ``"cut"`` the forced cuts lose nothing either: the chunks planned before a
forced cut are emitted.
"""

from __future__ import annotations

import re

import pytest

from ppstage.config import PPStageConfig
from ppstage.model.reference import StreamScript, run_reference
from ppstage.observability.report import check_digests
from ppstage.stages.launcher import start_pipeline

pytestmark = pytest.mark.timeout(180)

SCRIPT = StreamScript(prompt="a red fox", prompt_at={7: "a grey wolf"})
LAUNCH_ARGS = ["--prompt", "a red fox", "--prompt-at", "7:a grey wolf", "--quiet"]


def config_for(stages: int, mode: str, table: int, **overrides) -> PPStageConfig:
    return PPStageConfig().with_overrides(
        {
            "topology.stages": stages,
            "recompute.mode": mode,
            "model.rope_max_frames": table,
            "runtime.pg_timeout_s": 20.0,
            "runtime.stage_idle_deadline_s": 5.0,
            "runtime.keepalive_interval_s": 0.5,
            **overrides,
        }
    )


def run(tmp_path, config: PPStageConfig, chunks: int):
    pipe = start_pipeline(config, tmp_path / "run", chunks=chunks, launch_args=LAUNCH_ARGS)
    try:
        codes = pipe.wait(120.0)
    finally:
        pipe.kill()
    assert codes == [0] * config.topology.world_size, [pipe.log_tail(r) for r in range(len(codes))]
    return pipe


@pytest.mark.parametrize(
    "stages, mode, table, chunks",
    [(3, "r0a", 12, 14), (2, "r1", 9, 14)],
    ids=["K3-r0a", "K2-r1"],
)
def test_rebasing_stream_emits_every_chunk_in_one_epoch_bitwise_equal_to_the_reference(
    tmp_path, stages, mode, table, chunks
):
    config = config_for(stages, mode, table)
    pipe = run(tmp_path, config, chunks)
    reference = run_reference(config, chunks, SCRIPT)
    rebases = [r.chunk_index for r in reference if r.rebased]
    assert len(rebases) >= 5, rebases

    result = pipe.summary()
    events = result["events"]
    assert [e["outcome"] for e in events] == ["emitted"] * chunks
    assert {e["cache_epoch"] for e in events} == {0}
    check = check_digests(events, reference)
    assert check.ok and check.compared == chunks and not check.dropped_by_cut, check
    # Rank 0 planned exactly these re-bases (its log), and the stages' digests matched its plan
    # for every chunk (else the run fails with StateDivergence, checked by the exit codes).
    logged = [int(m) for m in re.findall(r"re-base .*?chunk_index=(\d+)", (pipe.out_dir / "rank0.log").read_text())]
    assert logged == rebases
    assert "StateDivergence" not in (pipe.out_dir / "rank0.log").read_text()


def test_forced_cuts_emit_the_chunks_planned_before_them(tmp_path):
    # Decode is the bottleneck, so results of the old epoch are still in flight or queued
    # for decode when the forced cut is planned: they must be emitted, not flushed.
    config = config_for(2, "r1", 9, **{"cache.on_position_overflow": "cut", "runtime.simulated_decode_ms": 40.0})
    chunks = 10
    pipe = run(tmp_path, config, chunks)
    reference = run_reference(config, chunks, SCRIPT)
    assert sum(r.cache_epoch != q.cache_epoch for r, q in zip(reference[1:], reference)) >= 2  # forced cuts
    events = pipe.summary()["events"]
    assert [e["outcome"] for e in events] == ["emitted"] * chunks
    check = check_digests(events, reference)
    assert check.ok and check.compared == chunks and not check.dropped_by_cut, check
