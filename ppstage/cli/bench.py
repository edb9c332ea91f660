"""``ppstage bench``: micro-benchmarks that print figures and ratios (never gate CI)."""

from __future__ import annotations

import argparse

from ppstage.cli.args import positive_int

HELP = "run a micro-benchmark: `ppstage bench protocol` times the checked wire round trip"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", choices=("protocol",), help="what to measure")
    p.add_argument("--iterations", type=positive_int, default=20_000, help="round trips per repeat")
    p.add_argument("--repeats", type=positive_int, default=7, help="repeats; the median is reported")


def run(args: argparse.Namespace) -> int:
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
