"""``ppstage config``: print a complete TOML config (defaults plus the given overrides), or every key's docs."""

from __future__ import annotations

import argparse
import sys

from ppstage.cli.args import config_from_args, positive_int

HELP = ("print a complete TOML config, e.g. `ppstage config --stages 4 > pipeline.toml` for ppstage launch; "
        "--keys lists every key with its type, default and meaning")
# Flags that override the config's key when given.
CONFIG_FLAGS = {"stages": "topology.stages", "tp": "topology.tp", "mode": "recompute.mode",
                "backend": "topology.backend"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stages", type=positive_int, default=None)
    p.add_argument("--tp", type=positive_int, default=None)
    p.add_argument("--mode", choices=("r1", "r0a", "r0"), default=None)
    p.add_argument("--backend", choices=("gloo", "nccl"), default=None)
    p.add_argument("--config", default=None, help="start from this TOML file instead of the defaults")
    p.add_argument("--keys", action="store_true",
                   help="list every key of the schema with its type, default and meaning (no TOML)")


def run(args: argparse.Namespace) -> int:
    if args.keys:
        return _keys()
    cfg = config_from_args(args, CONFIG_FLAGS)  # a ConfigError ends at the CLI boundary (exit 2)
    from ppstage.model.loader import load_backend

    load_backend(cfg)  # print only a config every rank can run
    sys.stdout.write(cfg.to_toml())
    return 0


COLUMNS = ("key", "type", "default", "meaning")


def _keys() -> int:
    from ppstage.cli.output import console, is_terminal, table
    from ppstage.config import key_docs

    rows = [(d.key, d.type, d.default, d.meaning) for d in key_docs()]
    if is_terminal():
        console().print(table("config keys (ppstage/config/_docs.py)", COLUMNS, rows))
        return 0
    # Plain: one line per key, columns padded to their widest cell, the meaning last (it holds spaces).
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS[:-1])]
    for row in [COLUMNS, *rows]:
        print("  ".join(f"{v:<{w}}" for v, w in zip(row, widths)), " ", row[-1], sep="")
    return 0
