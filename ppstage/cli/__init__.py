"""The ``ppstage`` console script.

Each subcommand lives in ``ppstage/cli/<name>.py`` and exposes
``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``. Command modules
import heavy dependencies (torch, the model) inside ``run`` so ``--help``
stays fast.

``main`` is the one error boundary: a bad flag (argparse), a bad or missing
config or any typed ppstage / protocol error ends as one line on stderr and
exit status 2 (``EXIT_USAGE``), or 1 (``EXIT_FAILED``) for a run that started
and failed with a typed runtime error. A traceback means a bug.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("demo", "launch", "config", "plan", "reference", "quality", "bench", "serve", "log", "replay", "soak")
EXIT_FAILED, EXIT_USAGE = 1, 2  # argparse exits 2 on a usage error too


def _error_classes() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(user errors -> exit 2, typed runtime errors -> exit 1); light imports only."""
    from protocol import ProtocolError

    from ppstage import errors
    from ppstage.config import ConfigError

    usage: tuple[type[BaseException], ...] = (ConfigError, OSError)
    # The runtime's error roots: ``ProtocolError`` (wire) and ``PPStageError``
    # (everything else the runtime raises; ``ConfigError`` is caught above).
    runtime = (ProtocolError, errors.PPStageError)
    return usage, runtime


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser: it refuses the words it does not know itself, with its own usage.

    A plain sub-parser hands them back to the top parser, whose error prints
    ``usage: ppstage [-h] {demo,...}``, which names no flag of the command.
    Nested sub-parsers (``ppstage log inspect``) inherit the class, so the
    deepest parser that saw an unknown word names it.
    """

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")  # exits 2
        return namespace, extras


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ppstage", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)
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
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # Ctrl-C before the command took its signals over (``demo``, ``launch``:
        # ppstage.stages.stop), or in a command that does not: one line, no traceback.
        words = sys.argv[1:] if argv is None else argv
        return _fail(words[0] if words and words[0] in COMMANDS else "", "interrupted", 130)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)  # a usage error exits 2 here, with one line
    usage, runtime = _error_classes()
    try:
        return int(args._run(args) or 0)
    except usage as exc:
        return _fail(args.command, exc, EXIT_USAGE)
    except runtime as exc:
        return _fail(args.command, exc, EXIT_FAILED)


def _fail(command: str, problem: object, code: int) -> int:
    text = str(problem) if isinstance(problem, (str, OSError)) else _describe(problem)
    print(f"ppstage{' ' + command if command else ''}: {' '.join(text.split())}", file=sys.stderr)  # one line
    return code


def _describe(exc: object) -> str:
    from ppstage.config import ConfigError

    # A config error's text already says what it is; a runtime error is named by its type.
    return str(exc) if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"


if __name__ == "__main__":
    sys.exit(main())
