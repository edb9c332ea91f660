"""``ppstage log``: read message logs (``inspect``), export a timeline (``trace``, ``plot``)."""

from __future__ import annotations

import argparse
import sys

HELP = "inspect message logs (`log inspect LOG...`), export a Perfetto trace (`log trace`) or a timeline PNG (`log plot`)"

EXIT_DAMAGED = 2
EXIT_USAGE = 2  # a flag refused before anything is read (the CLI's usage status)


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="log_command", required=True)
    i = sub.add_parser("inspect", help="a table per log file; exit 2 if a file is damaged")
    i.add_argument("logs", nargs="+", metavar="LOG", help="rank<r>.ppslog files or directories holding them")
    t = sub.add_parser("trace", help="Chrome / Perfetto trace JSON: a track per rank and phase, flow arrows for messages")
    t.add_argument("logs", nargs="+", metavar="LOG")
    t.add_argument("-o", "--out", required=True, help="trace.json to write (open in ui.perfetto.dev)")
    pl = sub.add_parser("plot", help="every stage's per-chunk phases over time, as a PNG (needs matplotlib)")
    pl.add_argument("logs", nargs="+", metavar="LOG")
    pl.add_argument("-o", "--out", required=True, help="timeline.png to write")


def run(args: argparse.Namespace) -> int:
    from ppstage.replay.errors import ReplayError
    from ppstage.replay.runlog import RunLogs

    if args.log_command == "plot" and not args.out.lower().endswith(".png"):
        # Refused before reading anything: matplotlib would pick a format from the
        # suffix (a traceback for ".txt", a silent "x.png" for a name without one).
        print(f"ppstage log plot: -o {args.out}: the timeline is a PNG; give a file name ending in .png",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        run_logs = RunLogs.load(args.logs)
    except (ReplayError, OSError) as exc:
        print(f"ppstage log {args.log_command}: {exc}", file=sys.stderr)
        return EXIT_DAMAGED
    try:
        if args.log_command == "inspect":
            return _inspect(run_logs)
        if args.log_command == "trace":
            from ppstage.replay.timeline import write_trace

            n = write_trace(run_logs, args.out)
            print(f"wrote {args.out}: {n} trace events from {len(run_logs.logs)} log(s)")
        else:
            from ppstage.replay.timeline import write_plot

            write_plot(run_logs, args.out)
            print(f"wrote {args.out}")
    except (ReplayError, OSError) as exc:
        print(f"ppstage log {args.log_command}: {exc}", file=sys.stderr)
        return 1
    _report_damage(run_logs, args.log_command)
    return EXIT_DAMAGED if run_logs.damaged else 0


def _report_damage(run_logs, command: str) -> None:
    """One located line per damaged log: what was read stands, the rest is named."""
    for lg in run_logs.damaged:
        print(f"ppstage log {command}: {type(lg.error).__name__}: {lg.error} "
              f"({lg.error.record} records before it are readable)", file=sys.stderr)


def _inspect(run_logs) -> int:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from ppstage.cli.output import is_terminal

    # On a terminal: boxed tables; piped: plain "key  value" lines (README's promise for every table).
    console = Console(highlight=False, width=140) if is_terminal() else None
    for lg in run_logs.logs:
        s = lg.summary()
        table = Table(title=Text(str(s["file"])), show_header=False, title_justify="left")
        table.add_column("field", style="bold")
        table.add_column("value", overflow="fold")
        for key in ("rank", "role", "stage", "records", "tensors", "epochs", "chunks", "first", "last"):
            table.add_row(*_plain(key, str(s[key])))
        table.add_row(*_plain("duration", f"{s['duration_s']:.3f} s"))
        table.add_row(*_plain("actions", ", ".join(f"{k} {v}" for k, v in s["actions"].items()) or "-"))  # type: ignore[union-attr]
        table.add_row(*_plain("drops", ", ".join(f"{k} {v}" for k, v in s["drops"].items()) or "none"))  # type: ignore[union-attr]
        for f in s["failures"]:  # type: ignore[union-attr]
            table.add_row(*_plain("failure", str(f)))
        table.add_row(*_plain("status", str(s["status"])))
        if console is not None:
            console.print(table)
        else:
            print(s["file"])
            for key, value in zip(table.columns[0].cells, table.columns[1].cells):
                print(f"  {str(key):<9} {value}")
    _report_damage(run_logs, "inspect")
    return EXIT_DAMAGED if run_logs.damaged else 0


def _plain(*cells: object) -> list:
    """Table cells as plain text: log contents (paths, gloo errors) are never rich markup."""
    from rich.text import Text

    return [Text(str(c)) for c in cells]
