"""``ppstage bench``: micro-benchmarks that print figures and ratios (never gate CI)."""

from __future__ import annotations

import argparse

HELP = "run a micro-benchmark: `ppstage bench protocol` times the checked wire round trip"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", choices=("protocol",), help="what to measure")
    p.add_argument("--iterations", type=int, default=20_000, help="round trips per repeat")
    p.add_argument("--repeats", type=int, default=7, help="repeats; the median is reported")


def run(args: argparse.Namespace) -> int:
    from ppstage.bench.protocol_bench import format_report, run_protocol_bench

    if args.iterations < 1 or args.repeats < 1:
        raise SystemExit("--iterations and --repeats must be >= 1")
    print(format_report(run_protocol_bench(args.iterations, args.repeats)))
    return 0
