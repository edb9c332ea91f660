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

from protocol import ChunkError

from ppstage.observability import logs
from ppstage.config import PPStageConfig
from ppstage.errors import ParityError, WatchdogExpired
from ppstage.model.reference import StreamScript
from ppstage.observability import recorder
from ppstage.service.options import ServiceOptions
from ppstage.stages.stop import STOP_SIGNALS, StopRequest

EXIT_FAILED, EXIT_PARITY = 1, 2  # 0 after an orderly SHUTDOWN
FATAL_GRACE_S = 5.0  # time an actor gets to report and stop after its channel failed


class RankOptions(msgspec.Struct, frozen=True, kw_only=True):
    """What one rank needs besides the parity-checked config."""

    rank: int
    world_size: int
    master_addr: str | None = "127.0.0.1"
    master_port: int = 29500
    chunks: int | None = 12  # None: plan until SIGTERM (``ppstage serve``)
    script: StreamScript = msgspec.field(default_factory=StreamScript)
    summary_out: str | None = None
    latents_out: str | None = None
    chunks_out: str | None = None
    pause_before: dict[int, float] = msgspec.field(default_factory=dict)
    json_logs: bool = False
    log_level: str = "info"
    progress: bool = True
    service: ServiceOptions | None = None  # rank 0 serves the HTTP API (``ppstage serve``)
    parity_extra: dict[str, str] = msgspec.field(default_factory=dict)
    record_dir: str | None = None  # message log: DIR/rank<r>.ppslog (overrides record.dir)
    flight_dir: str | None = None  # flight-recorder dump on failure (default: record dir, else cwd)


def run_rank(config: PPStageConfig, opts: RankOptions, stop: StopRequest | None = None) -> int:
    """Run this rank to completion and return its exit code (does not exit).

    ``stop`` holds a SIGTERM / SIGINT received since the process started
    (``ppstage launch`` installs it first); a stop during start-up is handed to
    the actor once the ranks have met, so it ends as a drained stop (exit 0).
    """
    stop = stop or StopRequest.install()
    import torch

    from ppstage.distributed.devices import local_rank, resolve_device
    from ppstage.distributed.parity import parity_handshake
    from ppstage.distributed.supervision import restart_generation, watch_launcher
    from ppstage.distributed.topology import build_groups, role_for
    from ppstage.distributed.transport import init_process_group

    torch.set_num_threads(1)
    role = role_for(config, opts.rank)
    logs.configure(rank=opts.rank, stage=role.stage, json=opts.json_logs, level=opts.log_level)
    structlog.contextvars.bind_contextvars(restart_generation=restart_generation())
    log = structlog.get_logger("ppstage.stages.process")
    watch_launcher(log)  # started before any rendezvous: a rank never outlives its launcher

    def startup_stuck(name: str) -> None:
        log.error(f"stopped by {name} during start-up, which did not finish within "
                  f"{config.runtime.drain_deadline_s:g} s (runtime.drain_deadline_s); exiting", phase="start-up")
        exit_process(EXIT_FAILED)

    # A stop signal during the rendezvous or the parity handshake (C calls that run
    # no Python handler) must not wait for runtime.startup_timeout_s.
    stop.watch_startup(config.runtime.drain_deadline_s, startup_stuck)
    device = resolve_device(config, local_rank(opts.rank))
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before the process group: NCCL binds to it
    init_process_group(config, opts.rank, opts.world_size, opts.master_addr, opts.master_port)
    try:
        parity_handshake(config, role, None, opts.parity_extra)
    except ParityError as exc:
        log.error("parity handshake failed", report=str(exc))
        print(f"rank {opts.rank}: {exc}", file=sys.stderr)
        return EXIT_PARITY
    groups = build_groups(config, opts.rank)
    _install_recorder(config, role, opts)
    log.info("started", world_size=opts.world_size, layers=role.layer_range, tp_rank=role.tp_rank)

    if role.stage > 0 and not role.is_leader:
        return _run_follower(config, role, groups, log, device, stop)

    import uvloop

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(_run_actor(config, role, groups, opts, log, device, stop))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


async def _run_actor(config, role, groups, opts: RankOptions, log, device, stop: StopRequest) -> int:
    from ppstage.stages.leader import StageLeader
    from ppstage.stages.stage0 import Stage0Actor
    from ppstage.distributed.topology import MeshComm
    from ppstage.distributed.transport import Transport

    loop = asyncio.get_running_loop()
    fatal: asyncio.Future = loop.create_future()

    def on_fatal(exc: ChunkError) -> None:
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
            loop.call_later(FATAL_GRACE_S, _hard_exit, log, WatchdogExpired(reason))

    transport = Transport(
        config, role, groups, loop=loop, device=device, geometry=config.wire_geometry(),
        on_fatal=on_fatal, on_terminal=on_terminal, recorder=recorder.current(),
    )
    if role.stage == 0:
        progress = _print_progress if opts.progress else None
        latents_dir = Path(opts.latents_out) if opts.latents_out else None
        if latents_dir is not None:
            latents_dir.mkdir(parents=True, exist_ok=True)
        service = None
        if opts.service is not None:
            from ppstage.service.host import ServiceHost

            service = ServiceHost(config, role, opts.service)
            progress = service.on_chunk
        actor = Stage0Actor(
            config, role, transport, opts.script, opts.chunks, fatal,
            sink=service.on_frames if service else None,
            progress=progress, latents_dir=latents_dir, pause_before=opts.pause_before,
            chunk_stream=Path(opts.chunks_out) if opts.chunks_out else None,
        )
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, actor.on_sigterm)
        # After the loop's handlers: a stop of the start-up makes the actor plan nothing,
        # drain and send SHUTDOWN (every rank exits 0); one from now on goes to the loop.
        stop.hand_over(actor.on_sigterm)
        if service is not None:
            try:
                await service.start(actor)
            except OSError as exc:  # port taken: the stages' idle watchdogs end them
                log.error("service cannot bind", reason=str(exc))
                return EXIT_FAILED
        try:
            outcome = await actor.run()
        finally:
            if service is not None:
                await service.stop()
        flight = recorder.current().dump_flight(outcome.error or "") if outcome.exit_code else None
        if flight is not None:
            log.error("flight recorder written", path=str(flight))
        if opts.summary_out:
            payload = {
                "exit_code": outcome.exit_code,
                "error": outcome.error,
                "summary": outcome.summary,
                "events": outcome.events,
                "config_digest": config.digest(),
                "gate": actor.gate.statistics(),
                "flight_record": str(flight) if flight is not None else None,
            }
            Path(opts.summary_out).write_bytes(msgspec.json.encode(payload))
        if outcome.exit_code == 0:
            log.info("stream complete", **(actor.gate.statistics()))
        return outcome.exit_code
    leader = StageLeader(config, role, transport, MeshComm(role, groups), fatal)
    abort_actor.append(leader.abort)
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, leader.on_sigterm)
    stop.hand_over(leader.on_sigterm)  # a start-up stop: wait for rank 0's SHUTDOWN, drain-bounded
    return await leader.run()


def _hard_exit(log, exc: ChunkError) -> None:
    log.error("actor did not stop in time; exiting", reason=str(exc))
    exit_process(EXIT_FAILED)


def _run_follower(config, role, groups, log, device, stop: StopRequest) -> int:
    """Non-leader mesh rank: the worker thread follows broadcasts; this thread watches it."""
    from ppstage.stages.follower import MeshFollower
    from ppstage.distributed.topology import MeshComm

    follower = MeshFollower(config, role, MeshComm(role, groups), device=device)
    result: list[int] = []
    term = threading.Event()
    stop.hand_over(term.set)  # a stop of the start-up, or a later one
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


def _install_recorder(config: PPStageConfig, role, opts: RankOptions) -> None:
    """This rank's message log (if recording) and flight recorder (always)."""
    kind = "stage0" if role.stage == 0 else "leader" if role.is_leader else "follower"
    recorder.install(
        recorder.MessageRecorder(
            config, rank=opts.rank, role=kind, stage=role.stage, world_size=opts.world_size,
            record_dir=opts.record_dir, flight_dir=opts.flight_dir,
        )
    )
    log = structlog.get_logger("ppstage.observability.recorder")

    def on_usr1(*_) -> None:  # a live hang: `kill -USR1 <pid>` writes the flight record, the rank goes on
        path = recorder.current().dump_flight("SIGUSR1: dump requested")
        log.warning("flight recorder written on request", path=str(path))

    def on_hup(*_) -> None:  # the controlling terminal or agent went away: record, then end loudly
        recorder.current().event("signal", "SIGHUP")
        exit_process(EXIT_FAILED)

    signal.signal(signal.SIGUSR1, on_usr1)
    signal.signal(signal.SIGHUP, on_hup)


def exit_process(code: int) -> None:
    """End the process now (see the module docstring for why not ``sys.exit``).

    The message log is flushed and closed first; a failing rank also writes
    its flight recorder (``ppstage.observability.recorder.finish``).
    """
    recorder.finish(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
