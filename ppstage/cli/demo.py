"""``ppstage demo``: the main job: a local pipeline on the embedded model, checked against the reference."""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

from ppstage.cli.args import (
    config_from_args,
    cut_chunk,
    non_negative_float,
    positive_float,
    positive_int,
    prompt_at,
    text,
)

TP_TOLERANCE = 1e-4
HELP = "run a local pipeline (rank 0 + generator stages, gloo) and check every chunk against the reference"
LOG_TAIL_LINES = 12
# Flags that override the config's key when given (default None: the config's value).
CONFIG_FLAGS = {
    "stages": "topology.stages",
    "tp": "topology.tp",
    "mode": "recompute.mode",
    "r0_quality_report": "recompute.r0_quality_report",
    "simulate_decode_ms": "runtime.simulated_decode_ms",
    "simulate_call_ms": "runtime.simulated_call_ms",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stages", type=positive_int, default=None, help="generator stages K (default: config's, 2)")
    p.add_argument("--tp", type=positive_int, default=None,
                   help="tensor-parallel degree M inside each stage (default: config's, 1)")
    p.add_argument("--chunks", type=positive_int, default=12)
    p.add_argument("--mode", choices=("r1", "r0a", "r0"), default=None, help="recompute mode (default: config's, r0a)")
    p.add_argument("--prompt", type=text, default=None)
    p.add_argument("--cut-at", type=cut_chunk, action="append", default=[], metavar="K")
    p.add_argument("--prompt-at", type=prompt_at, action="append", default=[], metavar="K:TEXT")
    p.add_argument("--config", default=None, help="TOML config file")
    p.add_argument("--simulate-decode-ms", type=non_negative_float, default=None, help="added stage-0 cost per decode")
    p.add_argument("--simulate-call-ms", type=non_negative_float, default=None, help="added cost per generator call")
    p.add_argument("--r0-quality-report", default=None, help="passing `ppstage quality` report (required for r0)")
    p.add_argument("--out", default=None, help="directory for logs and the summary (default: a temp dir)")
    p.add_argument("--no-check", action="store_true", help="skip the reference comparison (writes no latents)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="rank log level (debug: every commitment point); logs go to OUT/rank<r>.log")
    p.add_argument("--record", default=None, metavar="DIR",
                   help="every rank writes its message log to DIR/rank<r>.ppslog (docs/replay.md)")
    p.add_argument("--timeout", type=positive_float, default=None, metavar="SECONDS",
                   help="stop the run (kill every rank) after this long; default: no limit")
    p.add_argument("--quiet", action="store_true", help="no per-chunk progress (lines or live bar)")


def _positions_line(records, cfg) -> str:
    """Re-bases and cuts of the checked stream (the reference plans the same boundaries)."""
    rebases = [r.chunk_index for r in records if r.rebased]
    epochs = sorted({r.cache_epoch for r in records})
    return (
        f"  {'positions':<34}  table {cfg.model.rope_max_frames} frames, "
        f"on overflow {cfg.cache.on_position_overflow}: {len(rebases)} re-base(s)"
        + (f" at chunks {rebases}" if rebases else "")
        + f", epochs {epochs[0]}..{epochs[-1]}"
    )


def run(args: argparse.Namespace) -> int:
    from ppstage.stages.stop import StopRequest

    # First of all: a Ctrl-C while torch imports must neither vanish (torch's import
    # swallows a KeyboardInterrupt) nor end as a traceback; it is acted on below.
    with StopRequest.installed() as stop:
        return _run(args, stop)


def _run(args: argparse.Namespace, stop) -> int:
    # User errors (config, backend, R0 gate) raise ConfigError: exit 2 at the CLI boundary.
    cfg = config_from_args(args, CONFIG_FLAGS)  # before torch: fast
    from ppstage.cli.launch import script_from_args
    from ppstage.cli.output import is_terminal
    from ppstage.model.loader import load_backend
    from ppstage.model.quality import check_quality_report, check_rebase_quality_report
    from ppstage.stages.launcher import start_pipeline

    load_backend(cfg)
    from ppstage.distributed.devices import require_device

    require_device(cfg, cfg.topology.world_size - 1)  # every local rank has its device, before any starts
    if cfg.recompute.mode == "r0":
        check_quality_report(cfg)  # the R0 rollout gate
    check_rebase_quality_report(cfg, chunks=args.chunks)  # re-bases that pin sinks: the same gate
    script = script_from_args(args)
    out = Path(args.out or tempfile.mkdtemp(prefix="ppstage-demo-"))
    t = cfg.topology
    live = is_terminal() and not args.quiet
    print(f"ppstage demo: rank 0 + {t.stages} stage(s) x tp {t.tp} = {t.world_size} processes, "
          f"mode {cfg.recompute.mode}, backend {cfg.model.backend}, {args.chunks} chunks, logs in {out}", flush=True)
    launch_args = ["--prompt", script.prompt, "--log-level", args.log_level]
    if live or args.quiet:
        launch_args.append("--quiet")  # rank 0's plain per-chunk lines only when not drawing a bar
    for k in args.cut_at:
        launch_args += ["--cut-at", str(k)]
    for v in args.prompt_at:
        launch_args += ["--prompt-at", v]
    if args.record:
        # Checked here, not in every rank: a bad path is one line and exit 2, before anything starts.
        Path(args.record).mkdir(parents=True, exist_ok=True)
        launch_args += ["--record", str(Path(args.record).resolve())]
    # Latents go to disk only for the tensor-parallel tolerance check; tp == 1 compares digests.
    write_latents = not args.no_check and t.tp > 1
    if stop.requested:  # nothing started yet: nothing to drain
        print(f"ppstage demo: stopped by {stop.signal_name} before any rank started", file=sys.stderr)
        return 0
    pipe = start_pipeline(cfg, out, chunks=args.chunks, launch_args=launch_args,
                          passthrough_stdout=True, write_latents=write_latents)
    stop.hand_over(pipe.stop)  # every rank drains, even one still starting up
    try:
        with _progress(live, out / "chunks.jsonl", args.chunks, cfg.cache.chunk_frames) as tick:
            codes = pipe.wait(args.timeout, on_tick=tick)
    finally:
        pipe.kill()
    result = pipe.summary()
    if pipe.timed_out or any(c != 0 for c in codes) or result is None:
        _report_failure(pipe, codes, result, args.timeout)
        return 1
    if stop.requested:
        done = len([r for r in pipe.chunk_records() if r.get("outcome") == "emitted"])
        print(f"\nppstage demo: stopped by {stop.signal_name}: drained after {done} of {args.chunks} chunk(s), "
              f"every rank exited 0", file=sys.stderr)
    return _check_and_summarize(args, cfg, script, pipe, result)


@contextlib.contextmanager
def _progress(live: bool, stream: Path, chunks: int, frames_per_chunk: int):
    if not live:
        yield None
        return
    from ppstage.cli.progress import LiveProgress

    with LiveProgress(stream, chunks, frames_per_chunk) as bar:
        yield bar.tick


def _report_failure(pipe, codes: list[int | None], result: dict | None, timeout: float | None) -> None:
    err = sys.stderr
    if pipe.timed_out:
        done = len(pipe.chunk_records())
        print(f"\nppstage demo: timed out after {timeout:g} s (--timeout) with {done} chunk(s) finished; "
              f"killed every rank", file=err)
    else:
        print(f"\nppstage demo: FAILED, exit codes by rank {codes}", file=err)
    if result and result.get("error"):
        print(f"  rank 0: {result['error']}", file=err)
    flights = sorted(str(f) for f in pipe.out_dir.glob("rank*.flight.ppslog"))
    if flights:  # each failing rank's last records (`ppstage log inspect` reads them)
        print(f"  flight records: {' '.join(flights)}", file=err)
    for r, c in enumerate(codes):
        if c != 0 or pipe.timed_out:
            state = "killed at the timeout" if c is None and pipe.timed_out else f"exit {c}"
            tail = pipe.log_tail(r, LOG_TAIL_LINES) or "(no log lines)"
            print(f"--- rank {r} ({state}) last log lines ---\n{tail}", file=err)


def _check_and_summarize(args, cfg, script, pipe, result: dict) -> int:
    from ppstage.cli.output import console, is_terminal, key_values
    from ppstage.distributed.devices import reference_device
    from ppstage.model.reference import run_reference
    from ppstage.observability.report import check_digests, format_summary, summary_rows

    t = cfg.topology
    check = None
    # Tensor parallel sums partial outputs in another order: equal within 1e-4, not bitwise.
    tol = 0.0 if t.tp == 1 else TP_TOLERANCE
    if not args.no_check:
        # A stopped run is checked over the chunks it planned, not the ones it never reached.
        planned = max((r["chunk_index"] + 1 for r in pipe.chunk_records()), default=0)
        # On the generator ranks' device: CPU and GPU results differ in the last bits.
        device = reference_device(cfg)
        records = run_reference(cfg, min(args.chunks, planned), script, device=device) if planned else []
        # Every finished chunk, from rank 0's chunk stream (its in-memory ledger keeps only a recent ring).
        check = check_digests(pipe.chunk_records(), records, latents=pipe.latents, atol=tol)
    shape = dict(stages=t.stages, tp=t.tp, mode=cfg.recompute.mode, tol=tol)
    if is_terminal():
        console().print(key_values("summary", summary_rows(result["summary"], check, **shape)))
    else:
        print("\nsummary")
        print(format_summary(result["summary"], check, **shape))
    if not args.no_check and records:
        print(_positions_line(records, cfg))
    return 0 if check is None or check.ok else 1
