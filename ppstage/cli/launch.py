"""``ppstage launch``: run one rank's role (under torchrun, or started by ``ppstage demo``)."""

from __future__ import annotations

import argparse
import os

from ppstage.cli.args import cut_chunk, pause_at, positive_int, prompt_at, text
from ppstage.cli.plan import script_from_args  # one definition, shared by demo, launch, plan, reference

HELP = "run this process's rank of the pipeline (reads RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)"
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="TOML config file (identical on every rank)")
    p.add_argument("--chunks", type=positive_int, default=12, help="chunks rank 0 plans before shutting down")
    p.add_argument("--prompt", type=text, default=None)
    p.add_argument("--cut-at", type=cut_chunk, action="append", default=[], metavar="K")
    p.add_argument("--prompt-at", type=prompt_at, action="append", default=[], metavar="K:TEXT")
    p.add_argument("--script", default=None, metavar="JSON",
                   help="a StreamScript as JSON (cuts, prompts, biases by chunk); replaces the flags above")
    p.add_argument("--summary-out", default=None, help="rank 0 writes its run summary (JSON) here")
    p.add_argument("--latents-out", default=None, help="rank 0 writes each emitted chunk's latents_out here")
    p.add_argument("--chunks-out", default=None,
                   help="rank 0 appends one JSON line per chunk here once its outcome is final")
    p.add_argument("--pause-at", type=pause_at, action="append", default=[], metavar="K:SECONDS",
                   help="rank 0 idles this long before planning chunk K (keepalives only)")
    p.add_argument("--json-logs", action="store_true")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="debug logs every commitment point (send, receive, mesh publish)")
    p.add_argument("--quiet", action="store_true", help="no per-chunk progress lines")
    p.add_argument("--record", default=None, metavar="DIR",
                   help="write this rank's message log to DIR/rank<r>.ppslog (docs/replay.md)")
    p.add_argument("--flight-dir", default=None, metavar="DIR",
                   help="where a failing rank writes its flight recorder (default: the record dir, else .)")


def _pauses(values: list[str]) -> dict[int, float]:
    """``--pause-at`` values (checked by the argparse type) as ``{chunk: seconds}``."""
    return {int(k): float(secs) for k, _, secs in (v.partition(":") for v in values)}


def torchrun_rank() -> tuple[int, int]:
    """``(RANK, WORLD_SIZE)`` from the torchrun environment, or a ``ConfigError`` naming what is missing."""
    from ppstage.config import ConfigError

    missing = [v for v in TORCHRUN_ENV if not os.environ.get(v)]
    if missing:
        raise ConfigError(f"not started by torchrun (or ppstage demo): {', '.join(missing)} not set")
    try:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except ValueError:
        raise ConfigError("RANK and WORLD_SIZE must be integers") from None


def check_world_size(config, world: int) -> None:
    """Refuse a ``WORLD_SIZE`` other than the config's ``1 + stages * tp``, before any process group.

    A world of the wrong size can never finish its rendezvous (a missing rank) or
    its groups (a rank too many): without this check every rank would wait out
    ``runtime.startup_timeout_s``. Ranks whose configs differ in some other way
    but agree on the world size still meet and are named by the parity handshake.
    """
    from ppstage.config import ConfigError

    t = config.topology
    if world != t.world_size:
        raise ConfigError(
            f"WORLD_SIZE {world} (torchrun --nproc-per-node x --nnodes) differs from the config's "
            f"1 + stages x tp = 1 + {t.stages} x {t.tp} = {t.world_size}"
        )


def run(args: argparse.Namespace) -> int:
    from ppstage.stages.stop import StopRequest

    # First of all: a SIGINT / SIGTERM from now on is recorded, never lost in an
    # import nor a traceback; the rank's actor acts on it once the ranks have met.
    stop = StopRequest.install()
    from ppstage.config import PPStageConfig

    # Every check here runs before any collective, so a bad config or
    # environment ends every rank the same way (exit 2, one line, no hang).
    config = PPStageConfig.from_toml(args.config)  # before importing torch: a bad file fails fast
    script = script_from_args(args)  # a bad --cut-at / --prompt-at too, even outside torchrun
    from ppstage.model.loader import load_backend
    from ppstage.model.quality import check_quality_report, check_rebase_quality_report
    from ppstage.stages.process import RankOptions, exit_process, run_rank

    load_backend(config)  # an unknown [model] backend fails here, not in the first collective
    rank, world = torchrun_rank()
    check_world_size(config, world)
    from ppstage.distributed.devices import local_rank, require_device

    require_device(config, local_rank(rank))  # CUDA asked for where there is none: one line, exit 2
    if config.recompute.mode == "r0":
        # The R0 rollout gate (the report path must exist on every node).
        check_quality_report(config)
    check_rebase_quality_report(config, chunks=args.chunks)  # re-bases that pin sinks, likewise
    opts = RankOptions(
        rank=rank,
        world_size=world,
        master_addr=None,  # env:// (MASTER_ADDR / MASTER_PORT), as torchrun sets them
        chunks=args.chunks,
        script=script,
        summary_out=args.summary_out,
        latents_out=args.latents_out,
        chunks_out=args.chunks_out,
        pause_before=_pauses(args.pause_at),
        json_logs=args.json_logs,
        log_level=args.log_level,
        progress=not args.quiet,
        record_dir=args.record,
        flight_dir=args.flight_dir,
    )
    exit_process(run_rank(config, opts, stop))
    return 0  # not reached
