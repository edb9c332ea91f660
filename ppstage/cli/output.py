"""Terminal output of the commands: rich tables on a terminal, plain lines otherwise.

Plain output (a pipe, a file, a test) keeps the fixed-width text scripts
parse; a terminal gets the same rows as a rich table.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any


def is_terminal() -> bool:
    """Whether stdout is an interactive terminal (rich output, live progress)."""
    return sys.stdout.isatty()


def console():
    from rich.console import Console

    return Console(highlight=False)


def table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]], *,
          right: Sequence[str] = (), caption: str | None = None):
    """A rich ``Table``: one column per name, values shown with ``str``."""
    from rich import box
    from rich.table import Table

    t = Table(title=title, caption=caption, title_justify="left", caption_justify="left", box=box.SIMPLE_HEAD,
              pad_edge=False, collapse_padding=True)
    cells = [[str(v) for v in row] for row in rows]
    for i, c in enumerate(columns):
        if i == len(columns) - 1:  # the last column (a prompt, a digest) wraps on a narrow terminal
            width = min(20, max([len(c), *(len(r[i]) for r in cells)]))
            t.add_column(c, justify="right" if c in right else "left", overflow="fold", min_width=width)
            continue
        width = max([len(c), *(len(r[i]) for r in cells)])
        t.add_column(c, justify="right" if c in right else "left", no_wrap=True, min_width=width)
    for row in cells:
        t.add_row(*row)
    return t


def key_values(title: str | None, rows: Sequence[tuple[str, str]]):
    """A two-column rich table of ``(name, value)`` rows (summaries, reports)."""
    from rich.table import Table

    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column(style="bold", no_wrap=True)
    t.add_column()
    for k, v in rows:
        t.add_row(k, v)
    return t
