"""``ppstage soak``: a long random stream through a local pipeline, with a verdict (a benchmark, not a test)."""

from __future__ import annotations

import argparse
import tempfile

from ppstage.cli.args import config_from_args, non_negative_float, non_negative_int, positive_float, positive_int

HELP = ("soak a local pipeline: random cuts, prompt and bias changes and delays for N chunks; "
        "reports stale and out-of-order emissions, drops, queue depths and per-rank RSS growth")
# Flags that override the config's key when given (default None: the config's value).
CONFIG_FLAGS = {"stages": "topology.stages", "tp": "topology.tp", "mode": "recompute.mode"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chunks", type=positive_int, default=2000)
    p.add_argument("--seed", type=int, default=0, help="seed of the random stream")
    p.add_argument("--stages", type=positive_int, default=None, help="generator stages (default: config's, 2)")
    p.add_argument("--tp", type=positive_int, default=None, help="tensor-parallel degree (default: config's, 1)")
    p.add_argument("--mode", choices=("r1", "r0a"), default=None, help="recompute mode (default: config's)")
    p.add_argument("--config", default=None, help="TOML config file")
    p.add_argument("--warmup-chunks", type=non_negative_int, default=None, help="RSS baseline after this many (default N/10, >= 20)")
    p.add_argument("--max-delay-ms", type=non_negative_float, default=5.0, help="longest random idle delay before a chunk")
    p.add_argument("--check", action="store_true", help="also compare every emitted chunk with the reference")
    p.add_argument("--out", default=None, help="directory for logs and the summary (default: a temp dir)")
    p.add_argument("--timeout", type=positive_float, default=3600.0)


def run(args: argparse.Namespace) -> int:
    from ppstage.config import ConfigError

    # A bad config raises ConfigError: one line and exit 2 at the CLI boundary.
    cfg = config_from_args(args, CONFIG_FLAGS)
    warmup = args.warmup_chunks if args.warmup_chunks is not None else min(max(20, args.chunks // 10), args.chunks // 2)
    if not 0 < warmup < args.chunks:
        # RSS growth is measured from the end of the warm-up: it must end inside the run.
        raise ConfigError(f"--warmup-chunks: {warmup} leaves no measured chunks in a run of {args.chunks}; "
                          "use more --chunks (>= 2) or fewer warm-up chunks")
    from ppstage.bench.soak import format_report, run_soak
    from ppstage.model.loader import load_backend

    load_backend(cfg)  # an unknown [model] backend is refused before any rank starts
    out = args.out or tempfile.mkdtemp(prefix="ppstage-soak-")
    print(f"ppstage soak: {args.chunks} chunks, seed {args.seed}, mode {cfg.recompute.mode}, "
          f"{cfg.topology.world_size} processes, logs in {out}", flush=True)
    report = run_soak(
        cfg, args.chunks, out, seed=args.seed, warmup_chunks=warmup, check=args.check,
        timeout_s=args.timeout, max_pause_ms=args.max_delay_ms,
        progress=lambda n: print(f"  {n} chunks emitted", flush=True),
    )
    print(format_report(report))
    return 0 if report.passed else 1
