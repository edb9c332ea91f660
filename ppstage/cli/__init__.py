"""The ``ppstage`` console script.

Each subcommand lives in ``ppstage/cli/<name>.py`` and exposes
``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``. Command modules
import heavy dependencies (torch, the model) inside ``run`` so ``--help``
stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("demo", "launch", "config", "plan", "reference", "quality", "bench", "soak")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ppstage", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"ppstage.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"ppstage.cli.{name}":
                continue  # command not built yet
            raise
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
