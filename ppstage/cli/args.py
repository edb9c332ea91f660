"""Argument types shared by the subcommands of the ``ppstage`` console script.

A bad flag value is an argparse usage error (one line, exit status 2), caught
while parsing, before any command runs.
"""

import argparse
from typing import Callable


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
        if not (value >= minimum if inclusive else value > minimum) or value != value or value == float("inf"):
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
non_negative_int = int_at_least(0)  # chunk indices (--cut-at)
positive_float = float_above(0.0)  # durations (--timeout)
non_negative_float = float_above(0.0, inclusive=True)  # simulated costs
prompt_at = keyed("TEXT", text)  # --prompt-at K:TEXT
pause_at = keyed("SECONDS", non_negative_float)  # --pause-at K:SECONDS


def port_number(value: str) -> int:
    """An argparse type: a TCP port, 0..65535 (0: the OS picks one)."""
    port = non_negative_int(value)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is at most 65535, got {port}")
    return port
