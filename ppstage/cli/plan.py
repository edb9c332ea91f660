"""``ppstage plan``: run the planner over a scripted stream and print the plan table."""

from __future__ import annotations

import argparse

from ppstage.cli.args import non_negative_int, positive_int

HELP = "print the lifecycle plan of a scripted stream (no model, no processes)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chunks", type=positive_int, default=8)
    p.add_argument("--mode", choices=("r1", "r0a", "r0"), default="r0a")
    p.add_argument("--cut-at", type=non_negative_int, action="append", default=[], metavar="K")
    p.add_argument("--prompt", default="a red fox running through snow")
    p.add_argument("--prompt-at", action="append", default=[], metavar="K:TEXT")
    p.add_argument("--config", default=None, help="TOML config file")


def parse_prompt_at(values: list[str]) -> dict[int, str]:
    out: dict[int, str] = {}
    for v in values:
        k, sep, text = v.partition(":")
        if not sep or not k.isdigit() or not text:
            raise SystemExit(f"--prompt-at expects K:TEXT, got {v!r}")
        out[int(k)] = text
    return out


def run(args: argparse.Namespace) -> int:
    from ppstage.config import PPStageConfig
    from ppstage.core.planner import HardCut, Planner, PromptUpdate, StreamStart

    cfg = PPStageConfig.from_toml(args.config) if args.config else PPStageConfig()
    cfg = cfg.with_overrides({"recompute.mode": args.mode})
    prompts = parse_prompt_at(args.prompt_at)
    planner = Planner(cfg)
    planner.submit(StreamStart(args.prompt))
    cols = "chunk call epoch start init xattn recompute calls context source offset"
    print(" ".join(f"{c:>8}" for c in cols.split()))
    for k in range(args.chunks):
        if k in args.cut_at:
            planner.submit(HardCut())
        if k in prompts:
            planner.submit(PromptUpdate(prompts[k]))
        p = planner.next_chunk()
        row = (
            p.chunk_index,
            p.call_id,
            p.cache_epoch,
            p.current_start_frame,
            int(p.init_cache),
            int(p.reset_crossattn_cache),
            int(p.do_kv_recompute),
            p.expected_generator_calls,
            ",".join(map(str, p.context_frame_indices)) or "-",
            p.context_source,
            f"{p.position_offset}{'*' if p.rebased else ''}",  # * = re-based at this boundary
        )
        print(" ".join(f"{v!s:>8}" for v in row))
    return 0
