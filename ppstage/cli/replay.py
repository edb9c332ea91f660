"""``ppstage replay``: re-run recorded message logs and say where they first went wrong."""

from __future__ import annotations

import argparse
import sys

from ppstage.cli.args import non_negative_int, positive_float

HELP = ("replay message logs: --verify (default) against the reference or a fresh pipeline, "
        "--bisect a divergence, --inject duplicate|delay|reorder|stale into the epoch gate")

EXIT_MISMATCH, EXIT_UNUSABLE = 1, 2
EXIT_FAILED = 1  # a --pipeline re-run that started and failed (or timed out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("logs", nargs="+", metavar="LOG", help="the run's rank<r>.ppslog files, or their directory")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--verify", action="store_true", help="compare every digest with a replay (the default)")
    what.add_argument("--bisect", action="store_true", help="name the first chunk and rank whose state departs")
    what.add_argument("--inject", choices=("duplicate", "delay", "reorder", "stale"),
                      help="re-feed rank 0's result stream into the epoch gate with this perturbation")
    p.add_argument("--from-epoch", type=non_negative_int, default=None, metavar="E",
                   help="start at epoch E's init_cache chunk (default: the first epoch boundary)")
    p.add_argument("--pipeline", action="store_true",
                   help="verify with a fresh local gloo pipeline instead of the reference")
    p.add_argument("--without-drills", action="store_true",
                   help="--pipeline: re-run a run recorded with fault drills without them "
                        "(refused otherwise, exit 2)")
    p.add_argument("--timeout", type=positive_float, default=300.0, help="--pipeline: give up after this many seconds")


def run(args: argparse.Namespace) -> int:
    from protocol.msglog import LogError

    from ppstage.replay.errors import ReplayError, ReplayMismatch, ReplayRunFailed
    from ppstage.replay.runlog import RunLogs

    try:
        run_logs = RunLogs.load(args.logs)
        for lg in run_logs.damaged:  # replay what is readable; say what is not
            print(f"warning: {lg.error} ({lg.error.record} records before it are readable and replayed)",
                  file=sys.stderr)
        if args.pipeline and (args.inject or args.bisect):
            raise ReplayError(f"--pipeline verifies only: --{'inject' if args.inject else 'bisect'} replays "
                              "against the reference (drop --pipeline)")
        if args.inject:
            if args.from_epoch is not None:
                raise ReplayError("--inject re-feeds rank 0's whole result stream: --from-epoch does not apply")
            return _inject(run_logs, args.inject)
        if args.bisect:
            return _bisect(run_logs, args.from_epoch)
        if args.without_drills and not args.pipeline:
            raise ReplayError("--without-drills needs --pipeline: the reference replay never runs drills")
        return _verify(run_logs, args.from_epoch, args.pipeline, args.timeout, args.without_drills)
    except ReplayMismatch as exc:
        print(f"\nMISMATCH at chunk {exc.chunk_index} (epoch {exc.cache_epoch}), {exc.where}, field "
              f"{exc.field}: recorded {exc.recorded}, replay gives {exc.replayed}", file=sys.stderr)
        return EXIT_MISMATCH
    except ReplayRunFailed as exc:  # the re-run started and failed: not unusable logs
        print(f"ppstage replay: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (ReplayError, LogError, OSError) as exc:
        print(f"ppstage replay: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE


def _table(checks, title: str):
    from rich import box
    from rich.table import Table

    from ppstage.cli.output import is_terminal

    # Piped: no box and no wrapping, so the lines stay greppable (README: plain when not a terminal).
    table = Table(title=title, title_justify="left", box=box.SQUARE if is_terminal() else None)
    for col in ("chunk", "epoch", "call", "compared", "result"):
        table.add_column(col, justify="right" if col != "result" else "left")
    for c in checks:
        result = c.result if c.ok else "DEPARTS: " + ", ".join(f"{d.where} {d.field}" for d in c.departures[:3])
        table.add_row(*_plain(str(c.chunk_index), str(c.cache_epoch), str(c.call_id), str(len(c.compared)), result))
    return table


def _verify(run_logs, from_epoch: int | None, pipeline: bool, timeout: float, without_drills: bool = False) -> int:
    from rich.console import Console
    from rich.progress import Progress

    from ppstage.replay.errors import ReplayMismatch
    from ppstage.replay.verify import replay

    from ppstage.cli.output import is_terminal

    console = Console(highlight=False, stderr=False, width=None if is_terminal() else 200)
    if pipeline:
        from ppstage.replay.pipeline import describe_drills, replay_pipeline

        drills = run_logs.config().faults.drill
        if without_drills and drills:
            console.print(f"replaying the stream without its fault drills: {describe_drills(drills)}")
        console.print("replaying through a fresh local gloo pipeline ...")
        report = replay_pipeline(run_logs, from_epoch=from_epoch, timeout_s=timeout, without_drills=without_drills)
        console.print(_table(report.checks, "replay --pipeline: recorded vs re-run"))
        what = f"{len(report.checks)} chunk(s) from epoch {report.start_epoch}"
        return _verdict(console, run_logs, f"ALL MATCH: {what}", f"{what} match")
    from ppstage.replay.verify import start_index

    plans = run_logs.stage0.plans()
    total = len(plans) - start_index(plans, from_epoch) if plans else None
    seen = []
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("replaying chunks", total=total)

        def step(check) -> None:
            seen.append(check)
            bar.advance(task)

        try:
            report = replay(run_logs, from_epoch=from_epoch, progress=step)
        except ReplayMismatch:
            bar.stop()
            console.print(_table(seen, "replay --verify against the reference (stopped at the first mismatch)"))
            raise
    console.print(_table(report.checks, "replay --verify against the reference"))
    if not report.bitwise:
        console.print("note: tp > 1: outputs differ from the reference within 1e-4 (summation order), so "
                      "outputs and recompute context were not compared; use --pipeline for a bitwise replay")
    n = sum(len(c.compared) for c in report.checks)
    what = f"{len(report.checks)} chunk(s) from epoch {report.start_epoch} (call {report.start_call}), {n} values compared"
    return _verdict(console, run_logs, f"ALL MATCH: {what}", f"{what}, all match")


def _verdict(console, run_logs, whole: str, partial: str) -> int:
    """Print ``whole`` (exit 0) only when every log was read whole; else ``INCOMPLETE: partial ...``.

    A damaged log's chunks after the damage were never compared: everything that
    was matched, but the replay is incomplete, which is not a pass (exit 2, as
    ``ppstage log inspect`` gives the same logs).
    """
    if not run_logs.damaged:
        console.print(whole)
        return 0
    names = ", ".join(f"{lg.path} (from record {lg.error.record})" for lg in run_logs.damaged)
    console.print(f"INCOMPLETE: {partial}, but damaged logs were read only in part: {names}; "
                  "what they recorded after the damage was not compared", soft_wrap=True)  # one greppable line
    return EXIT_UNUSABLE


def _bisect(run_logs, from_epoch: int | None) -> int:
    from rich.console import Console

    from ppstage.replay.verify import bisect

    console = Console(highlight=False)
    report = bisect(run_logs, from_epoch=from_epoch)
    console.print(_table(report.checks, "replay --bisect against the reference"))
    found = report.first_departure()
    if found is None:
        n = len(report.checks)
        return _verdict(console, run_logs,
                        f"no divergence: every recorded state and output digest matches the reference ({n} chunks)",
                        f"no divergence in {n} chunk(s)")
    check, cause = found
    state = [d for d in check.departures if d.field == "state_digest" and d.where.startswith("rank")]
    agree = sorted({w for c in [check] for w in _ranks_compared(run_logs, check)} - {d.where for d in state})
    console.print(f"first divergence: chunk {check.chunk_index} (epoch {check.cache_epoch}, call {check.call_id})")
    console.print(f"  departs:  {cause.where}: {cause.field} recorded {cause.recorded[:16]}, "
                  f"reference {cause.replayed[:16]}")
    for d in check.departures:
        if d is not cause:
            console.print(f"  also:     {d.where}: {d.field}")
    if agree:
        console.print(f"  agree:    {', '.join(agree)}")
    return EXIT_MISMATCH


def _ranks_compared(run_logs, check) -> list[str]:
    out = ["rank 0 (shadow lifecycle)"]
    for lg in run_logs.by_rank().values():
        for c in lg.chunks:
            if c.call_id == check.call_id:
                out.append(f"rank {lg.rank} (stage {c.stage})")
                break
    return out


def _inject(run_logs, mode: str) -> int:
    from ppstage.replay.inject import inject

    rep = inject(run_logs.stage0, mode)
    print(f"recorded stream: {len(rep.baseline)} result(s) accepted, drops {dict(rep.baseline_drops) or 'none'} "
          f"(re-fed into a fresh EpochGate: same verdicts as the log)")
    print(f"injected: {mode}")
    for d in rep.drops:
        print(f"  dropped  call {d.call_id} chunk {d.chunk_index} epoch {d.cache_epoch}: {d.reason}")
    if rep.error is not None:
        print(f"  refused: {type(rep.error).__name__}: {rep.error}")
        print("the gate raised a typed error: a reordered result is a protocol error, never emitted")
        return 0 if mode == "reorder" else EXIT_MISMATCH
    counts = ", ".join(f"{k} {v}" for k, v in sorted(rep.drop_counts.items())) or "none"
    print(f"drops caused by the injection: {counts}")
    if rep.overtaken:
        print(f"overtaken by a hard cut (dropped by epoch, never emitted): calls {rep.overtaken}")
    if rep.unchanged:
        print(f"emitted stream unchanged: calls {rep.emitted}")
        return 0 if mode != "reorder" else EXIT_MISMATCH
    print(f"EMITTED STREAM CHANGED: recorded {rep.baseline}, perturbed {rep.emitted}")
    return EXIT_MISMATCH


def _plain(*cells: object) -> list:
    """Table cells as plain text: log contents (paths, gloo errors) are never rich markup."""
    from rich.text import Text

    return [Text(str(c)) for c in cells]
