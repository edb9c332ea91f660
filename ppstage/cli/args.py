"""Argument types shared by the subcommands of the ``ppstage`` console script, and flags as config overrides.

A bad flag value is an argparse usage error (one line, exit status 2), caught
while parsing, before any command runs.
"""

import argparse
import math
from collections.abc import Mapping
from typing import Any, Callable


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum``, or a clear usage error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def float_above(minimum: float, *, inclusive: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number > ``minimum`` (>= with ``inclusive``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):  # float() takes inf and nan; neither is a duration nor a cost
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if not (value >= minimum if inclusive else value > minimum):
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {minimum:g}, got {text}")
        return value

    return parse


def keyed(name: str, value_type: Callable[[str], object]) -> Callable[[str], str]:
    """An argparse type for ``K:VALUE`` flags (chunk index, colon, value); returns the text unchanged."""

    def parse(arg: str) -> str:
        k, sep, rest = arg.partition(":")
        if not sep or not k.isdigit() or not rest:
            raise argparse.ArgumentTypeError(f"expected K:{name}, got {arg!r}")
        try:
            value_type(rest)
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(f"expected K:{name}, got {arg!r}") from None
        return arg

    return parse


def text(value: str) -> str:
    """An argparse type: text that is not blank (a prompt)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be blank")
    return value


positive_int = int_at_least(1)  # counts (--chunks)
non_negative_int = int_at_least(0)  # indices (--from-epoch)
positive_float = float_above(0.0)  # durations (--timeout)
non_negative_float = float_above(0.0, inclusive=True)  # simulated costs
prompt_at = keyed("TEXT", text)  # --prompt-at K:TEXT
pause_at = keyed("SECONDS", non_negative_float)  # --pause-at K:SECONDS


def cut_chunk(text: str) -> int:
    """An argparse type: the chunk a ``--cut-at`` cuts before, >= 1; chunk 0 is refused by name.

    Chunk 0 always starts a fresh cache: a cut there would be accepted and do nothing.
    """
    if text.strip().lstrip("+-").isdigit() and int(text) == 0:
        raise argparse.ArgumentTypeError("chunk 0 always starts with a fresh cache, a cut there does nothing; "
                                         "cut at K >= 1")
    return positive_int(text)


def port_number(value: str) -> int:
    """An argparse type: a TCP port, 0..65535 (0: the OS picks one)."""
    port = non_negative_int(value)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is at most 65535, got {port}")
    return port


def config_from_args(args: argparse.Namespace, flags: Mapping[str, str]) -> Any:
    """The command's ``PPStageConfig``: ``--config`` (else the defaults) with each flag of ``flags`` that was given.

    Parameters
    ----------
    args
        The parsed flags; ``args.config`` is a TOML path or None.
    flags
        ``args`` attribute -> config key (``{"stages": "topology.stages"}``). A flag
        left at None was not given and keeps the config's value: a flag's default
        must be None, or it would override every ``--config``.

    Raises
    ------
    ConfigError
        The file is missing or invalid, or a given flag makes it invalid (the
        message then starts with the flag).
    """
    from ppstage.config import ConfigError, PPStageConfig

    cfg = PPStageConfig.from_toml(args.config) if args.config else PPStageConfig()
    given = {name: key for name, key in flags.items() if getattr(args, name) is not None}
    try:
        return cfg.with_overrides({key: getattr(args, name) for name, key in given.items()})
    except ConfigError as exc:
        # Name the flag, not only the key a user never typed.
        named = [f"--{name.replace('_', '-')}" for name, key in given.items() if key in str(exc)]
        if not named:
            raise
        raise ConfigError(f"{', '.join(named)}: {exc}") from exc
