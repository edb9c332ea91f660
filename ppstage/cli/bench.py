"""``ppstage bench``: micro-benchmarks that print figures and ratios (never gate CI)."""

from __future__ import annotations

import argparse

HELP = ("run a benchmark: `ppstage bench protocol` times the checked wire round trip; "
        "`ppstage bench service` the period with and without viewers and rank 0's memory")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", choices=("protocol", "service"), help="what to measure")
    p.add_argument("--iterations", type=int, default=20_000, help="round trips per repeat")
    p.add_argument("--repeats", type=int, default=7, help="repeats; the median is reported")
    p.add_argument("--seconds", type=float, default=8.0, help="service: seconds per measured phase")
    p.add_argument("--viewers", type=int, default=50, help="service: concurrent WebSocket viewers")


def run(args: argparse.Namespace) -> int:
    if args.target == "service":
        from ppstage.bench.service_bench import format_report as service_report
        from ppstage.bench.service_bench import run_service_bench

        print(service_report(run_service_bench(seconds=args.seconds, viewers=args.viewers)))
        return 0
    from ppstage.bench.protocol_bench import format_report, run_protocol_bench

    if args.iterations < 1 or args.repeats < 1:
        raise SystemExit("--iterations and --repeats must be >= 1")
    print(format_report(run_protocol_bench(args.iterations, args.repeats)))
    return 0
