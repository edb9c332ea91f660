"""``ppstage demo``: the main job: a local pipeline on the embedded model, checked against the reference."""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile

from ppstage.cli.args import non_negative_int, positive_int

TP_TOLERANCE = 1e-4
HELP = "run a local pipeline (rank 0 + generator stages, gloo) and check every chunk against the reference"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stages", type=int, default=2, help="generator stages K")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree M inside each stage")
    p.add_argument("--chunks", type=positive_int, default=12)
    p.add_argument("--mode", choices=("r1", "r0a", "r0"), default=None, help="recompute mode (default: config's, r0a)")
    p.add_argument("--prompt", default=None)
    p.add_argument("--cut-at", type=non_negative_int, action="append", default=[], metavar="K")
    p.add_argument("--prompt-at", action="append", default=[], metavar="K:TEXT")
    p.add_argument("--config", default=None, help="TOML config file")
    p.add_argument("--simulate-decode-ms", type=float, default=None, help="added stage-0 cost per decode")
    p.add_argument("--simulate-call-ms", type=float, default=None, help="added cost per generator call")
    p.add_argument("--r0-quality-report", default=None, help="passing `ppstage quality` report (required for r0)")
    p.add_argument("--out", default=None, help="directory for logs and the summary (default: a temp dir)")
    p.add_argument("--no-check", action="store_true", help="skip the reference comparison")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="rank log level (debug: every commitment point); logs go to OUT/rank<r>.log")
    p.add_argument("--record", default=None, metavar="DIR",
                   help="every rank writes its message log to DIR/rank<r>.ppslog (docs/replay.md)")
    p.add_argument("--timeout", type=float, default=600.0, help="give up (and kill every rank) after this")


def run(args: argparse.Namespace) -> int:
    from ppstage.config import ConfigError, PPStageConfig
    from ppstage.observability.report import check_digests, format_summary
    from ppstage.stages.launcher import start_pipeline
    from ppstage.model.quality import QualityError, check_quality_report
    from ppstage.model.reference import run_reference
    from ppstage.cli.launch import script_from_args

    try:
        cfg = PPStageConfig.from_toml(args.config) if args.config else PPStageConfig()
        overrides: dict[str, object] = {"topology.stages": args.stages, "topology.tp": args.tp}
        if args.mode:
            overrides["recompute.mode"] = args.mode
        if args.r0_quality_report:
            overrides["recompute.r0_quality_report"] = args.r0_quality_report
        if args.simulate_decode_ms is not None:
            overrides["runtime.simulated_decode_ms"] = args.simulate_decode_ms
        if args.simulate_call_ms is not None:
            overrides["runtime.simulated_call_ms"] = args.simulate_call_ms
        cfg = cfg.with_overrides(overrides)
        if cfg.recompute.mode == "r0":
            check_quality_report(cfg)  # the R0 rollout gate
    except (ConfigError, QualityError) as exc:
        print(f"ppstage demo: {exc}", file=sys.stderr)
        return 2
    script = script_from_args(args)
    out = args.out or tempfile.mkdtemp(prefix="ppstage-demo-")
    t = cfg.topology
    print(f"ppstage demo: rank 0 + {t.stages} stage(s) x tp {t.tp} = {t.world_size} processes, "
          f"mode {cfg.recompute.mode}, {args.chunks} chunks, logs in {out}", flush=True)
    launch_args = ["--prompt", script.prompt, "--log-level", args.log_level]
    for k in args.cut_at:
        launch_args += ["--cut-at", str(k)]
    for v in args.prompt_at:
        launch_args += ["--prompt-at", v]
    if args.record:
        launch_args += ["--record", args.record]
    pipe = start_pipeline(cfg, out, chunks=args.chunks, launch_args=launch_args, passthrough_stdout=True)
    previous = {s: signal.signal(s, lambda *_: pipe.signal_rank0(signal.SIGTERM)) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        codes = pipe.wait(args.timeout)
    finally:
        pipe.kill()
        for s, h in previous.items():
            signal.signal(s, h)
    result = pipe.summary()
    if any(c != 0 for c in codes) or result is None:
        print(f"\nppstage demo: FAILED, exit codes by rank {codes}", file=sys.stderr)
        if result and result.get("error"):
            print(f"  rank 0: {result['error']}", file=sys.stderr)
        flights = sorted(str(f) for f in pipe.out_dir.glob("rank*.flight.ppslog"))
        if flights:  # each failing rank's last records (`ppstage log inspect` reads them)
            print(f"  flight records: {' '.join(flights)}", file=sys.stderr)
        for r, c in enumerate(codes):
            if c != 0:
                print(f"--- rank {r} (exit {c}) log tail ---\n{pipe.log_tail(r)}", file=sys.stderr)
        return 1
    check = None
    # Tensor parallel sums partial outputs in another order: equal within 1e-4, not bitwise.
    tol = 0.0 if t.tp == 1 else TP_TOLERANCE
    if not args.no_check:
        records = run_reference(cfg, args.chunks, script)
        check = check_digests(result["events"], records, latents=pipe.latents, atol=tol)
    print("\nsummary")
    print(format_summary(result["summary"], check, stages=t.stages, tp=t.tp, mode=cfg.recompute.mode, tol=tol))
    return 0 if check is None or check.ok else 1
