"""``replay --pipeline``: re-run a recorded stream on a fresh local gloo pipeline and compare logs.

The recorded plans are turned back into the intents that produced them (the
planner is pure, so the same intents at the same chunk boundaries give the
same plans); a fresh pipeline with the recorded config runs them with
recording on, and its logs are compared with the recorded ones chunk by
chunk: the plan itself, the output digest of every result, the state digest
of rank 0's shadow lifecycle and of every generator rank.

A run recorded with fault drills is refused (``DrillsRecorded``): the recorded
config would fire the same deliberate faults in the re-run, which then ends,
stalls or departs the way the drill made it, and proves nothing about the
runtime. ``without_drills=True`` re-runs the stream with the drills removed:
a drill that only changes timing (``delay_result``, a bounded stall) then
matches everywhere, and one that damaged state shows as the first mismatch
at the chunk where its damage first reached a digest.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import msgspec

from protocol import digest_bytes

from ppstage.config import Drill, FaultsConfig
from ppstage.core.plan import ChunkPlan
from ppstage.replay.errors import DrillsRecorded, ReplayError, ReplayMismatch, ReplayRunFailed
from ppstage.replay.runlog import RunLogs
from ppstage.replay.verify import ChunkCheck, Departure, ReplayReport, _raise, start_index


def launch_args_for(plans: list[ChunkPlan]) -> list[str]:
    """``ppstage launch`` arguments whose scripted intents re-create ``plans``.

    Raises ``ReplayError`` for a decision the scripted stream cannot express
    (an attention-bias or step-list change made through a live control surface).
    """
    if not plans or plans[0].chunk_index != 0 or not plans[0].init_cache:
        raise ReplayError("--pipeline re-runs a stream from its first chunk; rank 0's log does not start there")
    args = ["--prompt", plans[0].prompt]
    prev = plans[0]
    for p in plans[1:]:
        if p.chunk_index != prev.chunk_index + 1:
            raise ReplayError(f"chunk {prev.chunk_index + 1} is missing from rank 0's log")
        if p.init_cache and not p.forced_cut:
            args += ["--cut-at", str(p.chunk_index)]
        if p.prompt != prev.prompt:
            args += ["--prompt-at", f"{p.chunk_index}:{p.prompt}"]
        if p.kv_cache_attention_bias != prev.kv_cache_attention_bias or p.denoising_step_list != prev.denoising_step_list:
            raise ReplayError(
                f"chunk {p.chunk_index} changes the attention bias or step list, which `ppstage launch` "
                "cannot script; use the reference replay (without --pipeline)"
            )
        prev = p
    return args


def describe_drills(drills: tuple[Drill, ...]) -> str:
    """``kind (rank r, chunk c)`` for each drill, comma-separated."""
    return ", ".join(f"{d.kind} (rank {d.rank}, chunk {d.chunk})" for d in drills)


def replay_pipeline(run: RunLogs, *, from_epoch: int | None = None, timeout_s: float = 300.0,
                    work_dir: str | Path | None = None, without_drills: bool = False) -> ReplayReport:
    """Re-run ``run`` on a fresh local pipeline and compare (see the module docstring).

    Raises
    ------
    DrillsRecorded
        The recorded config carries fault drills and ``without_drills`` is False
        (raised before any process starts).
    ReplayMismatch
        At the first recorded value the re-run does not reproduce.
    ReplayError
        Logs that cannot be re-run (see ``launch_args_for``), or the re-run failed.
    """
    from ppstage.stages.launcher import start_pipeline

    s0 = run.stage0
    # Never write into the recorded run's directory (a [record] dir in its config).
    config = s0.config().with_overrides({"record.dir": None})
    drills = config.faults.drill
    if drills and not without_drills:
        raise DrillsRecorded(
            f"the run was recorded with fault drills: {describe_drills(drills)}; a fresh pipeline would fire "
            "them again and cannot match a real run. Pass --without-drills to re-run the stream without them "
            "(a drill that damaged state then shows as the first mismatch)",
            drills=drills,
        )
    if drills:
        config = msgspec.structs.replace(config, faults=FaultsConfig())
    plans = s0.plans()
    first = start_index(plans, from_epoch)
    args = launch_args_for(plans)
    out = Path(work_dir or tempfile.mkdtemp(prefix="ppstage-replay-"))
    rec_dir = out / "replayed"
    pipe = start_pipeline(
        config, out, chunks=len(plans), launch_args=[*args, "--quiet", "--record", str(rec_dir)]
    )
    try:
        codes = pipe.wait(timeout_s)
    finally:
        pipe.kill()
    if pipe.timed_out:
        raise ReplayRunFailed(
            f"the replay pipeline of {len(plans)} chunk(s) timed out after {timeout_s:g} s (--timeout); every rank "
            f"was killed, logs in {out}"
        )
    if any(c != 0 for c in codes):
        tails = "\n".join(f"--- rank {r} ---\n{pipe.log_tail(r)}" for r, c in enumerate(codes) if c != 0)
        raise ReplayRunFailed(f"the replay pipeline failed (exit codes {codes}); logs in {out}\n{tails}")
    return compare_runs(run, RunLogs.load([rec_dir]), first_call=plans[first].call_id)


def compare_runs(recorded: RunLogs, replayed: RunLogs, *, first_call: int) -> ReplayReport:
    """Chunk by chunk from ``first_call``: plans, results and every rank's state digest; raises at the first difference."""
    a0, b0 = recorded.stage0, replayed.stage0
    a_plans = {p.call_id: p for p in a0.plans()}
    b_plans = {p.call_id: p for p in b0.plans()}
    a_shadow = {r.call_id: r.state_digest for r in a0.plan_records()}
    b_shadow = {r.call_id: r.state_digest for r in b0.plan_records()}
    a_res, b_res = a0.results(), b0.results()
    a_chunks = {lg.rank: {c.call_id: c for c in lg.chunks} for lg in recorded.by_rank().values()}
    b_chunks = {lg.rank: {c.call_id: c for c in lg.chunks} for lg in replayed.by_rank().values()}
    start = a_plans[first_call]
    report = ReplayReport(first_call, start.cache_epoch)
    for call in sorted(c for c in a_plans if c >= first_call):
        plan = a_plans[call]
        check = ChunkCheck(plan.chunk_index, plan.cache_epoch, call)
        report.checks.append(check)

        def same(where: str, fld: str, x: object, y: object) -> None:
            check.compared.append(fld)
            if x != y:
                check.departures.append(Departure(where, fld, str(x), str(y)))

        same("rank 0", "plan", _plan_digest(plan), _plan_digest(b_plans.get(call)))
        same("rank 0 (shadow lifecycle)", "state_digest", a_shadow.get(call), b_shadow.get(call))
        for rank in sorted(a_chunks):
            rec = a_chunks[rank].get(call)
            if rec is not None:
                other = b_chunks.get(rank, {}).get(call)
                same(f"rank {rank} (stage {rec.stage})", "state_digest", rec.state_digest,
                     other.state_digest if other else None)
        ra, rb = a_res.get(call), b_res.get(call)
        if ra is None:
            check.result = "no result recorded"
        else:
            same("result", "output_digest", ra.output_digest, rb.output_digest if rb else None)
            check.result = "match" if check.ok else "MISMATCH"
        if check.departures:
            _raise(plan, check)
    return report


def _plan_digest(plan: ChunkPlan | None) -> str | None:
    return None if plan is None else digest_bytes(msgspec.msgpack.encode(plan))


__all__ = ["DrillsRecorded", "ReplayMismatch", "compare_runs", "describe_drills", "launch_args_for",
           "replay_pipeline"]
