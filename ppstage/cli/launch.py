"""``ppstage launch``: run one rank's role (under torchrun, or started by ``ppstage demo``)."""

from __future__ import annotations

import argparse
import os

from ppstage.cli.args import non_negative_int, positive_int

HELP = "run this process's rank of the pipeline (reads RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="TOML config file (identical on every rank)")
    p.add_argument("--chunks", type=positive_int, default=12, help="chunks rank 0 plans before shutting down")
    p.add_argument("--prompt", default=None)
    p.add_argument("--cut-at", type=non_negative_int, action="append", default=[], metavar="K")
    p.add_argument("--prompt-at", action="append", default=[], metavar="K:TEXT")
    p.add_argument("--script", default=None, metavar="JSON",
                   help="a StreamScript as JSON (cuts, prompts, biases by chunk); replaces the flags above")
    p.add_argument("--summary-out", default=None, help="rank 0 writes its run summary (JSON) here")
    p.add_argument("--latents-out", default=None, help="rank 0 writes each emitted chunk's latents_out here")
    p.add_argument("--pause-at", action="append", default=[], metavar="K:SECONDS",
                   help="rank 0 idles this long before planning chunk K (keepalives only)")
    p.add_argument("--json-logs", action="store_true")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="debug logs every commitment point (send, receive, mesh publish)")
    p.add_argument("--quiet", action="store_true", help="no per-chunk progress lines")


def script_from_args(args: argparse.Namespace):
    from ppstage.model.reference import DEFAULT_PROMPT, StreamScript
    from ppstage.cli.plan import parse_prompt_at

    if getattr(args, "script", None):  # a generated stream (``ppstage soak``)
        import msgspec
        from pathlib import Path

        return msgspec.json.decode(Path(args.script).read_bytes(), type=StreamScript)

    return StreamScript(
        prompt=args.prompt or DEFAULT_PROMPT,
        cut_at=tuple(args.cut_at),
        prompt_at=parse_prompt_at(args.prompt_at),
    )


def _pauses(values: list[str]) -> dict[int, float]:
    out: dict[int, float] = {}
    for v in values:
        k, sep, secs = v.partition(":")
        try:
            out[int(k)] = float(secs)
        except ValueError:
            raise SystemExit(f"--pause-at expects K:SECONDS, got {v!r}") from None
    return out


def run(args: argparse.Namespace) -> int:
    from ppstage.config import ConfigError, PPStageConfig
    from ppstage.model.quality import QualityError, check_quality_report
    from ppstage.stages.process import RankOptions, exit_process, run_rank

    try:
        config = PPStageConfig.from_toml(args.config)
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if config.recompute.mode == "r0":
            # The R0 rollout gate, checked by every rank before any collective so
            # that all refuse together (the report path must exist on every node).
            check_quality_report(config)
    except (ConfigError, QualityError, KeyError, ValueError) as exc:
        print(f"ppstage launch: {exc}")
        return 2
    opts = RankOptions(
        rank=rank,
        world_size=world,
        master_addr=None,  # env:// (MASTER_ADDR / MASTER_PORT), as torchrun sets them
        chunks=args.chunks,
        script=script_from_args(args),
        summary_out=args.summary_out,
        latents_out=args.latents_out,
        pause_before=_pauses(args.pause_at),
        json_logs=args.json_logs,
        log_level=args.log_level,
        progress=not args.quiet,
    )
    exit_process(run_rank(config, opts))
    return 0  # not reached
