"""``ppstage config``: print a complete TOML config (defaults plus the given overrides)."""

from __future__ import annotations

import argparse
import sys

from ppstage.cli.args import positive_int

HELP = "print a complete TOML config, e.g. `ppstage config --stages 4 > pipeline.toml` for ppstage launch"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stages", type=positive_int, default=None)
    p.add_argument("--tp", type=positive_int, default=None)
    p.add_argument("--mode", choices=("r1", "r0a", "r0"), default=None)
    p.add_argument("--backend", choices=("gloo", "nccl"), default=None)
    p.add_argument("--config", default=None, help="start from this TOML file instead of the defaults")


def run(args: argparse.Namespace) -> int:
    from ppstage.config import PPStageConfig

    keys = {"stages": "topology.stages", "tp": "topology.tp", "mode": "recompute.mode", "backend": "topology.backend"}
    overrides = {key: getattr(args, name) for name, key in keys.items() if getattr(args, name) is not None}
    cfg = PPStageConfig.from_toml(args.config) if args.config else PPStageConfig()
    cfg = cfg.with_overrides(overrides)  # a ConfigError ends at the CLI boundary (exit 2)
    from ppstage.model.loader import load_backend

    load_backend(cfg)  # print only a config every rank can run
    sys.stdout.write(cfg.to_toml())
    return 0
