"""``ppstage bench``: micro-benchmarks that print figures and ratios (never gate CI)."""

from __future__ import annotations

import argparse

from ppstage.cli.args import non_negative_float, positive_float, positive_int

HELP = (
    "run a benchmark: `protocol` (checked wire round trip), `transport` (a hop vs raw send/recv), "
    "`pipeline` (generator time per chunk for K = 1, 2, 3), `overlap` (period over a sweep of stage costs), "
    "`service` (the period with and without viewers), `record` (the cost of message logs)"
)


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    mult = units.get(t[-1:], 1)
    try:
        value = int(float(t[:-1] if mult > 1 else t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4KiB, 1MiB, 65536)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"a size must be >= 1 byte, got {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", choices=("protocol", "transport", "pipeline", "overlap", "service", "record"),
                   help="what to measure")
    g = p.add_argument_group("protocol")
    g.add_argument("--iterations", type=positive_int, default=20_000, help="round trips per repeat")
    g.add_argument("--repeats", type=positive_int, default=7, help="repeats; the best is reported")
    g = p.add_argument_group("transport")
    g.add_argument("--sizes", type=_size, nargs="+", default=None, help="message sizes (default 4KiB 64KiB 1MiB 16MiB)")
    g.add_argument("--rounds", type=positive_int, default=None,
                   help="alternating rounds (transport: per size, best reported, default 5; pipeline: of K = 1, 2, 3, "
                        "median, default 1; record: pipeline runs each way, default 2)")
    g = p.add_argument_group("pipeline, overlap and record")
    g.add_argument("--chunks", type=positive_int, default=None,
                   help="chunks per run (default: pipeline 24, overlap 16, record 12)")
    g.add_argument("--stages", type=positive_int, nargs="+", default=None, help="K values (pipeline: default 1 2 3)")
    g.add_argument("--simulate-decode-ms", type=non_negative_float, default=40.0,
                   help="overlap: stage-0 decode cost per chunk")
    g.add_argument("--simulate-call-ms", type=non_negative_float, default=None,
                   help="overlap: generator cost per chunk spread over its calls (default: matched to decode)")
    g.add_argument("--modes", nargs="+", choices=("r1", "r0a", "r0"), default=None, help="overlap: modes (default r1 r0a; all with --full)")
    g.add_argument("--depths", type=positive_int, nargs="+", default=None, help="overlap: D_in = D_out values (default 2)")
    g.add_argument("--cases", nargs="+", choices=("stage0", "generator", "balanced"), default=None,
                   help="overlap: which stage is the bottleneck (default balanced; all three with --full)")
    g.add_argument("--full", action="store_true", help="overlap: the whole sweep (every mode, case and D in 1 2 3)")
    g.add_argument("--png", default=None, help="overlap: write a PNG of the period per case (needs matplotlib)")
    g.add_argument("--timeout", type=positive_float, default=300.0, help="give up on one pipeline run after this")
    g = p.add_argument_group("service")
    g.add_argument("--seconds", type=positive_float, default=8.0, help="service: seconds per measured phase")
    g.add_argument("--viewers", type=positive_int, default=50, help="service: concurrent WebSocket viewers")


def run(args: argparse.Namespace) -> int:
    from ppstage.config import ConfigError

    try:
        return _run(args)
    except ValueError as exc:  # a bench refusing its sizes (too few chunks, ...): a user error
        raise ConfigError(f"{args.target}: {exc}") from exc


def _run(args: argparse.Namespace) -> int:
    if args.target == "protocol":
        return _protocol(args)
    if args.target == "record":
        from ppstage.bench.record_bench import run_record_bench
        from ppstage.config import ConfigError

        chunks = args.chunks or 12
        if chunks < 3:
            raise ConfigError("--chunks: the record bench needs >= 3 chunks per run")
        print(run_record_bench(chunks=chunks, rounds=args.rounds or 2))
        return 0
    if args.target == "service":
        from ppstage.bench.service_bench import format_report as service_report
        from ppstage.bench.service_bench import run_service_bench

        print(service_report(run_service_bench(seconds=args.seconds, viewers=args.viewers)))
        return 0
    if args.target == "transport":
        from ppstage.bench.transport_bench import DEFAULT_SIZES, format_report, run_transport_bench

        sizes = tuple(args.sizes or DEFAULT_SIZES)
        print(format_report(run_transport_bench(sizes, rounds=args.rounds or 5)), flush=True)
        return 0
    if args.target == "pipeline":
        from ppstage.bench.pipeline_bench import format_report, run_pipeline_bench

        result = run_pipeline_bench(
            stages=tuple(args.stages or (1, 2, 3)), chunks=args.chunks or 24, rounds=args.rounds or 1,
            timeout_s=args.timeout,
        )
        print(format_report(result), flush=True)
        return 0
    from ppstage.bench.overlap_bench import OverlapSweep, format_report, run_overlap_bench, write_png

    sweep = OverlapSweep.from_args(args)
    result = run_overlap_bench(sweep, progress=lambda line: print(line, flush=True))
    print(format_report(result), flush=True)
    if args.png:
        print(write_png(result, args.png))
    return 0


def _protocol(args: argparse.Namespace) -> int:
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
