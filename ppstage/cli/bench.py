"""``ppstage bench``: micro-benchmarks that print figures and ratios (never gate CI)."""

from __future__ import annotations

import argparse

HELP = ("run a micro-benchmark: `ppstage bench protocol` times the checked wire round trip; "
        "`ppstage bench record` the cost of message logs")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", choices=("protocol", "record"), help="what to measure")
    p.add_argument("--chunks", type=int, default=12, help="record: chunks per pipeline run")
    p.add_argument("--rounds", type=int, default=2, help="record: pipeline runs each way (alternating)")
    p.add_argument("--iterations", type=int, default=20_000, help="round trips per repeat")
    p.add_argument("--repeats", type=int, default=7, help="repeats; the median is reported")


def run(args: argparse.Namespace) -> int:
    if args.target == "record":
        from ppstage.bench.record_bench import run_record_bench

        if args.chunks < 3 or args.rounds < 1:
            raise SystemExit("--chunks must be >= 3 and --rounds >= 1")
        print(run_record_bench(chunks=args.chunks, rounds=args.rounds))
        return 0
    from ppstage.bench.protocol_bench import format_report, run_protocol_bench

    if args.iterations < 1 or args.repeats < 1:
        raise SystemExit("--iterations and --repeats must be >= 1")
    print(format_report(run_protocol_bench(args.iterations, args.repeats)))
    return 0
