"""One rank's process: bootstrap, parity handshake, groups, then its actor.

Order on every rank (SPEC section 7): init the default process group ->
parity handshake (the first collective) -> ``build_groups`` (one site, one
order) -> transport -> the rank's actor. Exit codes: 0 after an orderly
SHUTDOWN, 1 for any pipeline failure (typed, logged with its chunk identity),
2 for a parity failure. The process ends with ``os._exit``: transport threads
blocked in a backend receive cannot be interrupted, and there are no exit
barriers to wait on.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
from pathlib import Path

import msgspec
import structlog

from protocol import ProtocolError

from ppstage.observability import logs
from ppstage.config import PPStageConfig
from ppstage.errors import ParityError
from ppstage.model.reference import StreamScript

EXIT_FAILED, EXIT_PARITY = 1, 2  # 0 after an orderly SHUTDOWN
FATAL_GRACE_S = 5.0  # time an actor gets to report and stop after its channel failed


class RankOptions(msgspec.Struct, frozen=True, kw_only=True):
    """What one rank needs besides the parity-checked config."""

    rank: int
    world_size: int
    master_addr: str | None = "127.0.0.1"
    master_port: int = 29500
    chunks: int = 12
    script: StreamScript = msgspec.field(default_factory=StreamScript)
    summary_out: str | None = None
    latents_out: str | None = None
    pause_before: dict[int, float] = msgspec.field(default_factory=dict)
    json_logs: bool = False
    log_level: str = "info"
    progress: bool = True


def run_rank(config: PPStageConfig, opts: RankOptions) -> int:
    """Run this rank to completion and return its exit code (does not exit)."""
    import torch

    from ppstage.distributed.parity import parity_handshake
    from ppstage.distributed.topology import build_groups, role_for
    from ppstage.distributed.transport import init_process_group

    torch.set_num_threads(1)
    role = role_for(config, opts.rank)
    logs.configure(rank=opts.rank, stage=role.stage, json=opts.json_logs, level=opts.log_level)
    log = structlog.get_logger("ppstage.stages.process")
    _watch_launcher(log, opts.rank)
    init_process_group(config, opts.rank, opts.world_size, opts.master_addr, opts.master_port)
    try:
        parity_handshake(config, role, None, {})
    except ParityError as exc:
        log.error("parity handshake failed", report=str(exc))
        print(f"rank {opts.rank}: {exc}", file=sys.stderr)
        return EXIT_PARITY
    groups = build_groups(config, opts.rank)
    log.info("started", world_size=opts.world_size, layers=role.layer_range, tp_rank=role.tp_rank)

    if role.stage > 0 and not role.is_leader:
        return _run_follower(config, role, groups, log)

    import uvloop

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(_run_actor(config, role, groups, opts, log))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


async def _run_actor(config, role, groups, opts: RankOptions, log) -> int:
    from ppstage.stages.leader import StageLeader
    from ppstage.stages.stage0 import Stage0Actor
    from ppstage.distributed.topology import MeshComm
    from ppstage.distributed.transport import Transport

    loop = asyncio.get_running_loop()
    fatal: asyncio.Future = loop.create_future()

    def on_fatal(exc: ProtocolError) -> None:
        log.error("channel failed", reason=str(exc), error=type(exc).__name__)
        if not fatal.done():
            fatal.set_result(exc)
            # The actor normally ends itself on ``fatal``; if it is stuck (a hung
            # kernel in the worker thread), the process still ends, loudly.
            loop.call_later(FATAL_GRACE_S, _hard_exit, log, exc)

    ending: list[bool] = []
    abort_actor: list = []  # the leader's ``abort``, once it exists

    def on_terminal(msg) -> None:
        # Said on arrival, even if the actor is mid-chunk: every rank's log names
        # the cause (SPEC section 7), not only the wait that fails after it.
        if getattr(msg, "reason", None) is not None:
            log.error("terminal action arrived", origin=msg.origin_rank, reason=msg.reason)
            for abort in abort_actor:
                abort(msg)
        # The actor handles SHUTDOWN / ERROR itself within moments; this timer only
        # fires if it cannot (stuck in the worker), so that the process still ends.
        if not ending:
            ending.append(True)
            reason = f"{type(msg).__name__} received but the actor did not stop"
            loop.call_later(FATAL_GRACE_S, _hard_exit, log, ProtocolError(reason))

    transport = Transport(
        config, role, groups, loop=loop, geometry=config.wire_geometry(),
        on_fatal=on_fatal, on_terminal=on_terminal,
    )
    if role.stage == 0:
        progress = _print_progress if opts.progress else None
        latents_dir = Path(opts.latents_out) if opts.latents_out else None
        if latents_dir is not None:
            latents_dir.mkdir(parents=True, exist_ok=True)
        actor = Stage0Actor(
            config, role, transport, opts.script, opts.chunks, fatal,
            progress=progress, latents_dir=latents_dir, pause_before=opts.pause_before,
        )
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, actor.on_sigterm)
        outcome = await actor.run()
        if opts.summary_out:
            payload = {
                "exit_code": outcome.exit_code,
                "error": outcome.error,
                "summary": outcome.summary,
                "events": outcome.events,
                "config_digest": config.digest(),
                "gate": actor.gate.statistics(),
            }
            Path(opts.summary_out).write_bytes(msgspec.json.encode(payload))
        if outcome.exit_code == 0:
            log.info("stream complete", **(actor.gate.statistics()))
        return outcome.exit_code
    leader = StageLeader(config, role, transport, MeshComm(role, groups), fatal)
    abort_actor.append(leader.abort)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, leader.on_sigterm)
    return await leader.run()


LAUNCHER_POLL_S = 0.5


def _watch_launcher(log, rank: int) -> None:
    """B17: when the process that launched this rank dies, exit too.

    Only under a launcher that owns the rank: torchrun's agent (it sets
    ``TORCHELASTIC_RUN_ID``) or ``ppstage demo`` / the test launcher (they set
    ``PPSTAGE_LAUNCHER_PID``). Nobody else would tell us: an orphaned rank keeps
    its links open and, on a node of its own, could stream on forever. The other
    ranks then follow through their dead channels and watchdogs. A rank started
    by hand (say under ``nohup``) is not watched: its parent is just a shell.
    """
    parent = os.getppid()
    if os.environ.get("PPSTAGE_LAUNCHER_PID") != str(parent) and "TORCHELASTIC_RUN_ID" not in os.environ:
        return

    def watch() -> None:
        while True:
            time.sleep(LAUNCHER_POLL_S)
            if os.getppid() != parent:
                log.error(f"rank {rank}: its launcher (pid {parent}) died; exiting", phase="launcher")
                exit_process(EXIT_FAILED)

    threading.Thread(target=watch, name="ppstage-launcher-watch", daemon=True).start()


def _hard_exit(log, exc: ProtocolError) -> None:
    log.error("actor did not stop in time; exiting", reason=str(exc))
    exit_process(EXIT_FAILED)


def _run_follower(config, role, groups, log) -> int:
    """Non-leader mesh rank: the worker thread follows broadcasts; this thread watches it."""
    from ppstage.stages.leader import MeshFollower
    from ppstage.distributed.topology import MeshComm

    follower = MeshFollower(config, role, MeshComm(role, groups))
    result: list[int] = []
    term = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: term.set())
    signal.signal(signal.SIGINT, lambda *_: term.set())
    worker = threading.Thread(target=lambda: result.append(follower.run_blocking()), daemon=True)
    worker.start()
    deadline = config.runtime.stage_idle_deadline_s
    drain_by = None
    while worker.is_alive():
        worker.join(0.2)
        if term.is_set() and drain_by is None:
            drain_by = time.monotonic() + config.runtime.drain_deadline_s
        if drain_by is not None and time.monotonic() > drain_by:
            log.error("sigterm: no SHUTDOWN from the leader within the drain deadline")
            return EXIT_FAILED
        limit = max(deadline, config.liveness.warmup_deadline_s) if follower.cold else deadline
        if time.monotonic() - follower.last_activity > limit:
            leader = role.leader_of(role.stage)
            log.error(f"rank {leader} stopped making progress: rank {role.rank} (stage {role.stage} mesh) "
                      f"got no broadcast from its leader for {limit:.1f} s", deadline_s=limit, phase="mesh collective")
            return EXIT_FAILED
    return result[0] if result else EXIT_FAILED


def _print_progress(ev) -> None:
    digest = (ev.output_digest or "")[:12]
    print(
        f"chunk {ev.chunk_index:4d}  epoch {ev.cache_epoch}  emitted  digest {digest}  "
        f"stage0 {1e3 * ev.s0:6.1f} ms  generator {1e3 * ev.s1:6.1f} ms",
        flush=True,
    )


def exit_process(code: int) -> None:
    """End the process now (see the module docstring for why not ``sys.exit``)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
