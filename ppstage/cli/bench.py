"""``ppstage bench TARGET``: micro-benchmarks that print figures and ratios (never gate CI).

Each bench is its own sub-parser, built from one table (``FLAGS``): a flag
lists the benches that take it, with each one's default and meaning. A flag of
another bench (``bench transport --chunks 5``) is refused with the benches that
take it, where one parser shared by every bench parsed it and ignored it.

Exit status: 0 when the bench ran, whichever targets it missed (a missed target
is a figure, not an error: the docs and scripts/gpu_check.sh run every bench and
read the report); with ``--strict``, 1 when one was missed. A flag or size a
bench refuses is a usage error (2), in one line.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Callable, NamedTuple

from ppstage.cli import EXIT_FAILED
from ppstage.cli.args import non_negative_float, positive_float, positive_int

BENCHES = {
    "protocol": "the checked wire round trip vs a pickle baseline",
    "transport": "a hop vs raw send/recv of the same bytes",
    "pipeline": "generator time per chunk for K = 1, 2, 3 stages, as a ratio to K = 1",
    "overlap": "the period over a sweep of stage costs, with its baselines",
    "service": "the period with and without viewers (checks no target)",
    "record": "the cost of message logs per chunk",
}
HELP = f"run a benchmark ({', '.join(BENCHES)}): figures, ratios and targets met or missed"
EXIT_STATUS = ("Exit status: 0 when the bench ran, even if a target was missed (the report says PASS or FAIL); "
               "1 with --strict when a target was missed; 2 for a flag or size the bench refuses.")


_UNITS = {"": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


def _size(text: str) -> int:
    """A byte count: a plain integer or a binary multiple (``4KiB``, ``1MiB``, ``1.5KiB``).

    ``kB`` / ``KB`` / ``MB`` are refused rather than guessed: the report's MB/s are
    10^6 bytes, so a size in "KB" could mean 1000 or 1024.
    """
    t = text.strip()
    num = t.rstrip("KMGkmgiIbB")
    unit = t[len(num):].lower()
    if unit not in _UNITS:
        raise argparse.ArgumentTypeError(
            f"not a size: {text!r} (a byte count or KiB / MiB / GiB, e.g. 4KiB, 1MiB, 65536)"
        )
    try:
        value = float(num) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4KiB, 1MiB, 65536)") from None
    if value != int(value) or not 1 <= value:
        raise argparse.ArgumentTypeError(f"a size must be a whole number of bytes >= 1, got {text!r}")
    return int(value)


class Use(NamedTuple):
    """How one bench takes a flag."""

    default: Any
    help: str
    options: Mapping[str, Any] = MappingProxyType({})  # add_argument keywords of this bench only (over the flag's own)


class Flag(NamedTuple):
    name: str
    options: Mapping[str, Any]  # add_argument keywords of every bench that takes the flag
    uses: Mapping[str, Use]  # bench -> its use; a bench not listed refuses the flag


_TIMEOUT = Use(300.0, "give up on one pipeline run after this many seconds (default 300)")
_STRICT = Use(False, "exit 1 when a target is missed (default: exit 0 whenever the bench ran)")
_COUNT = {"type": positive_int, "metavar": "N"}

FLAGS: tuple[Flag, ...] = (
    Flag("--iterations", _COUNT, {"protocol": Use(20_000, "round trips per repeat (default 20000)")}),
    Flag("--repeats", _COUNT, {"protocol": Use(7, "repeats; the best is reported (default 7)")}),
    Flag("--sizes", {"type": _size, "nargs": "+", "metavar": "SIZE"},
         {"transport": Use(None, "message sizes, e.g. 4KiB 1MiB 65536 (default 4KiB 64KiB 1MiB 16MiB)")}),
    Flag("--rounds", _COUNT, {
        "transport": Use(5, "alternating rounds per size; the best is reported (default 5)"),
        "pipeline": Use(1, "alternating rounds of every K; the median is reported (default 1)"),
        "record": Use(2, "pipeline runs each way, alternating (default 2)"),
    }),
    Flag("--chunks", _COUNT, {
        "pipeline": Use(24, "chunks per run, >= 6 (default 24)"),
        "overlap": Use(16, "chunks per case, >= 8 (default 16)"),
        "record": Use(12, "chunks per run, >= 3 (default 12)"),
    }),
    Flag("--stages", {"type": positive_int, "metavar": "K"}, {
        "pipeline": Use([1, 2, 3], "generator stage counts to compare (default 1 2 3)", {"nargs": "+"}),
        "overlap": Use(2, "generator stages (default 2)"),
    }),
    Flag("--simulate-decode-ms", {"type": non_negative_float, "metavar": "MS"},
         {"overlap": Use(40.0, "stage-0 decode cost per chunk (default 40)")}),
    Flag("--simulate-call-ms", {"type": non_negative_float, "metavar": "MS"},
         {"overlap": Use(None, "generator cost per chunk, spread over its calls (default: matched to decode)")}),
    Flag("--modes", {"nargs": "+", "choices": ("r1", "r0a", "r0")},
         {"overlap": Use(None, "recompute modes (default r1 r0a; all with --full)")}),
    Flag("--depths", {"type": positive_int, "nargs": "+", "metavar": "D"},
         {"overlap": Use(None, "D_in = D_out values (default 2; 1 2 3 with --full)")}),
    Flag("--cases", {"nargs": "+", "choices": ("stage0", "generator", "balanced")},
         {"overlap": Use(None, "which stage is the bottleneck (default balanced; all three with --full)")}),
    Flag("--full", {"action": "store_true"}, {"overlap": Use(False, "the whole sweep: every mode, case and D in 1 2 3")}),
    Flag("--png", {"metavar": "FILE"}, {"overlap": Use(None, "write a PNG of the period per case (needs matplotlib)")}),
    Flag("--timeout", {"type": positive_float, "metavar": "SECONDS"}, {"pipeline": _TIMEOUT, "overlap": _TIMEOUT}),
    Flag("--seconds", {"type": positive_float, "metavar": "SECONDS"},
         {"service": Use(8.0, "seconds per measured phase (default 8)")}),
    Flag("--viewers", _COUNT, {"service": Use(50, "concurrent WebSocket viewers (default 50)")}),
    # The service bench checks no target: --strict there would promise a check it never makes.
    Flag("--strict", {"action": "store_true"}, {b: _STRICT for b in BENCHES if b != "service"}),
)
TAKEN_BY: dict[str, tuple[str, ...]] = {f.name: tuple(f.uses) for f in FLAGS}


class BenchParser(argparse.ArgumentParser):
    """One bench's parser: refuses any flag it does not take, in one line."""

    def __init__(self, *args: Any, bench: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bench = bench

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        # The sub-parser of `ppstage bench` hands what it does not know back to the
        # top parser, which would name neither the bench nor the benches that take it.
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(refusal(self.bench, extras))
        return namespace, extras

    def error(self, message: str):  # type: ignore[override]
        # One line: the usage of a bench with a dozen flags wraps over many.
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def refusal(bench: str, extras: list[str]) -> str:
    """Why ``bench`` refuses the words it did not parse: a flag of other benches names them."""
    for word in extras:
        name = word.partition("=")[0]
        if name in TAKEN_BY:
            others = TAKEN_BY[name]
            return f"{name} is not a flag of bench {bench}; it is taken by bench {', '.join(others)}"
    return f"unrecognized arguments: {' '.join(extras)}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = f"{EXIT_STATUS} `ppstage bench TARGET --help` lists the flags of one bench."
    sub = p.add_subparsers(dest="target", required=True, metavar="TARGET", parser_class=BenchParser)
    for bench, what in BENCHES.items():
        strict = bench in TAKEN_BY["--strict"]
        bp = sub.add_parser(bench, help=what, description=f"ppstage bench {bench}: {what}.", bench=bench,
                            epilog=EXIT_STATUS if strict else "Exit status: 0 when the bench ran; 2 for a flag or "
                                                              "size the bench refuses.")
        for flag in FLAGS:
            use = flag.uses.get(bench)
            if use is not None:
                bp.add_argument(flag.name, **{**flag.options, **use.options}, default=use.default, help=use.help)


def exit_status(targets_met: bool, *, strict: bool) -> int:
    """A bench that ran exits 0 whatever its figures; with ``--strict`` a missed target exits 1."""
    return EXIT_FAILED if strict and not targets_met else 0


def run(args: argparse.Namespace) -> int:
    from ppstage.config import ConfigError

    try:
        met = _RUNNERS[args.target](args)
    except ValueError as exc:  # a bench refusing its sizes (too few chunks, ...): a user error
        raise ConfigError(f"{args.target}: {exc}") from exc
    # getattr: a bench without targets (service) takes no --strict.
    return exit_status(met, strict=getattr(args, "strict", False))


# Each runner prints its report and returns whether every target it checked was met.


def _protocol(args: argparse.Namespace) -> bool:
    from ppstage.bench import protocol_bench as pb
    from ppstage.cli.output import console, is_terminal, key_values

    result = pb.run_protocol_bench(args.iterations, args.repeats)
    if not is_terminal():
        print(pb.format_report(result))
        return result.passed
    out = console()
    out.print(pb.report_heading(result))
    out.print(key_values(None, pb.report_rows(result)))
    out.print(pb.report_verdict(result))
    return result.passed


def _transport(args: argparse.Namespace) -> bool:
    from ppstage.bench.transport_bench import DEFAULT_SIZES, format_report, run_transport_bench

    result = run_transport_bench(tuple(args.sizes or DEFAULT_SIZES), rounds=args.rounds)
    print(format_report(result), flush=True)
    return result.passed


def _pipeline(args: argparse.Namespace) -> bool:
    from ppstage.bench.pipeline_bench import format_report, run_pipeline_bench

    result = run_pipeline_bench(stages=tuple(args.stages), chunks=args.chunks, rounds=args.rounds,
                                timeout_s=args.timeout)
    print(format_report(result), flush=True)
    return result.passed


def _overlap(args: argparse.Namespace) -> bool:
    from ppstage.bench import overlap_bench as ob

    sweep = ob.OverlapSweep.from_args(args)  # refuses its sizes before anything is printed
    if args.png:  # refused now, not after a sweep of minutes
        _check_png_path(args.png)
    # The heading first, then each row as its case ends (a full sweep takes minutes),
    # then only the verdicts: the rows are not printed a second time.
    print(ob.format_heading(sweep), flush=True)
    result = ob.run_overlap_bench(sweep, progress=lambda row: print(ob.format_row(row), flush=True))
    verdicts = ob.format_verdicts(result)
    if verdicts:
        print(verdicts, flush=True)
    if args.png:
        print(ob.write_png(result, args.png))
    return result.passed


def _check_png_path(path: str) -> None:
    """``ValueError`` unless a PNG can be written at ``path`` (matplotlib present, a writable folder)."""
    import importlib.util
    import os

    if importlib.util.find_spec("matplotlib") is None:
        raise ValueError("--png needs matplotlib: pip install -e '.[bench]'")
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"--png {path}: is a folder, not a file name")
    if not os.path.isdir(folder):
        raise ValueError(f"--png {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"--png {path}: folder {folder} is not writable")


def _service(args: argparse.Namespace) -> bool:
    from ppstage.bench.service_bench import format_report, run_service_bench

    print(format_report(run_service_bench(seconds=args.seconds, viewers=args.viewers)))
    return True  # figures only: no target to miss


def _record(args: argparse.Namespace) -> bool:
    from ppstage.bench.record_bench import format_report, run_record_bench

    result = run_record_bench(chunks=args.chunks, rounds=args.rounds)
    print(format_report(result))
    return result.passed


_RUNNERS: dict[str, Callable[[argparse.Namespace], bool]] = {
    "protocol": _protocol, "transport": _transport, "pipeline": _pipeline,
    "overlap": _overlap, "service": _service, "record": _record,
}
