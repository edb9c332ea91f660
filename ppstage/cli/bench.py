"""``ppstage bench``: micro-benchmarks that print figures and ratios (never gate CI)."""

from __future__ import annotations

import argparse

from ppstage.cli.args import positive_int

HELP = ("run a benchmark: `ppstage bench protocol` times the checked wire round trip; "
        "`ppstage bench service` the period with and without viewers and rank 0's memory; "
        "`ppstage bench record` the cost of message logs")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", choices=("protocol", "service", "record"), help="what to measure")
    p.add_argument("--iterations", type=positive_int, default=20_000, help="round trips per repeat")
    p.add_argument("--repeats", type=positive_int, default=7, help="repeats; the median is reported")
    p.add_argument("--seconds", type=float, default=8.0, help="service: seconds per measured phase")
    p.add_argument("--viewers", type=positive_int, default=50, help="service: concurrent WebSocket viewers")
    p.add_argument("--chunks", type=positive_int, default=12, help="record: chunks per pipeline run (>= 3)")
    p.add_argument("--rounds", type=positive_int, default=2, help="record: pipeline runs each way (alternating)")


def run(args: argparse.Namespace) -> int:
    if args.target == "record":
        from ppstage.bench.record_bench import run_record_bench
        from ppstage.config import ConfigError

        if args.chunks < 3:
            raise ConfigError("--chunks: the record bench needs >= 3 chunks per run")
        print(run_record_bench(chunks=args.chunks, rounds=args.rounds))
        return 0
    if args.target == "service":
        from ppstage.bench.service_bench import format_report as service_report
        from ppstage.bench.service_bench import run_service_bench

        print(service_report(run_service_bench(seconds=args.seconds, viewers=args.viewers)))
        return 0
    from ppstage.bench import protocol_bench as pb
    from ppstage.cli.output import console, is_terminal, key_values

    result = pb.run_protocol_bench(args.iterations, args.repeats)
    if not is_terminal():
        print(pb.format_report(result))
        return 0
    out = console()
    out.print(pb.report_heading(result))
    out.print(key_values(None, pb.report_rows(result)))
    out.print(pb.report_verdict(result))
    return 0
