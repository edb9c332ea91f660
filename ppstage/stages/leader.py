"""``StageLeader``: a generator stage's first rank (P2P + mesh publisher; followers: ``follower.py``).

Per chunk (phase B), on every generator rank in lockstep: apply the plan's
resets, run the recompute call if planned, run the denoise calls over this
stage's layer range counting them, end the chunk and compare lifecycle state
digests across the mesh. Hidden states hop leader to leader; the last stage
does the scheduler step and hands the latent back to stage 1 for the next
step; after the last step it sends the result to rank 0.

Threads: the asyncio loop orchestrates and never blocks; the transport's
threads own P2P; ONE worker thread per rank runs the model and issues every
mesh collective (so the collective order is identical on every mesh rank).

The leader owns the actor's state and the loop's side of every chunk: the
dispatch of inbound envelopes, the deadlines, the abort and the fatal link,
the relay of control messages and ERROR. Its steps run one of two schedules
over the same model work (``calls.py``): every hop through the loop
(``loop_steps.py``, ``runtime.fused_steps = false``) or the whole chunk as one
worker job that the loop watches (``fused.py``, the default).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

import structlog
import torch

from protocol import (
    ChunkId,
    ErrorEnvelope,
    InferEnvelope,
    NoopEnvelope,
    ProtocolError,
    ShutdownEnvelope,
    action_of,
)

from ppstage.config import PPStageConfig
from ppstage.errors import (
    ChannelDead,
    PhaseStalled,
    PPStageError,
    UnexpectedMessage,
    WatchdogExpired,
)
from ppstage.faults.drills import RankDrills, out_of_band_reset
from ppstage.faults.inject import exit_if_drilled
from ppstage.observability.logs import ids_of
from ppstage.model.scheduler import FlowMatchScheduler
from ppstage.model.backend import GeneratorBackend
from ppstage.model.loader import build_generator
from ppstage.distributed.topology import MeshComm, Role
from ppstage.distributed.transport import Inbound, Mailbox, MailboxInterrupted, Transport
from ppstage.stages.calls import LeaderCalls
from ppstage.stages.envelopes import error_result
from ppstage.stages.deadlines import PhaseDeadline, WarmupTracker
from ppstage.stages.fused import HOP_WAIT_GRACE_S, WATCH_TICKS_PER_DEADLINE, FusedChunkJob, OutputGate, StepLimits
from ppstage.stages.loop_steps import LoopSteps
from ppstage.stages.mesh import MeshRelay
from ppstage.stages.worker import JobProgress, StageWorker

log = structlog.get_logger("ppstage.stage")

# After passing a terminal action on, a moment for the frames to leave before
# the process exits (os._exit does not flush a socket the backend still writes).
TERMINAL_LINGER_S = 0.2


class _Aborted(Exception):
    """An ERROR arrived while this stage was mid-chunk: relay it now."""

    def __init__(self, msg: ErrorEnvelope) -> None:
        super().__init__(msg.reason)
        self.msg = msg


def build_stage_model(
    config: PPStageConfig, role: Role, comm: MeshComm, device: torch.device | str = "cpu"
) -> GeneratorBackend:
    """This rank's layers on ``device``, the rank's (where its transport and mesh deliver tensors)."""
    assert role.layer_range is not None  # generator ranks always own layers
    reduce = comm.all_reduce if role.tp_size > 1 else None
    model = build_generator(
        config, role.layer_range, tp_rank=role.tp_rank, tp_size=role.tp_size, reduce=reduce, device=device
    )
    # SPEC section 9: the weight fingerprint of every shard, logged once at start-up.
    log.info(
        "weights built", rank=role.rank, stage=role.stage, layers=role.layer_range,
        tp_rank=role.tp_rank, fingerprint=model.weight_fingerprint(),
    )
    return model


def _retrieved(future: asyncio.Future) -> None:
    """Mark an abandoned future's exception as seen (asyncio would log it at exit)."""
    if not future.cancelled():
        future.exception()


class StageLeader:
    """The first rank of a stage mesh: talks P2P to its neighbours, validates, publishes."""

    def __init__(
        self,
        config: PPStageConfig,
        role: Role,
        transport: Transport,
        comm: MeshComm,
        fatal: asyncio.Future,
    ) -> None:
        self.config = config
        self.role = role
        self.transport = transport
        model = build_stage_model(config, role, comm, transport.device)
        relay = MeshRelay(
            comm, role.rank, extra_collective=config.runtime.debug_extra_collective, device=transport.device
        )
        # The model and the mesh relay: driven only through ``calls``, on the worker thread.
        self.calls = LeaderCalls(
            role, model, relay, transport.recorder,
            call_cost_s=config.runtime.simulated_call_ms / 1e3 / role.num_stages, device=transport.device,
        )
        self.scheduler = FlowMatchScheduler.from_config(config)
        self.fatal = fatal
        self.last = role.is_last_stage
        assert role.prev_rank is not None and role.next_rank is not None
        self.upstream = transport.open_inbound(role.prev_rank)
        self.handback = transport.open_inbound(role.handback_src) if role.handback_src is not None else None
        self.next_rank = role.next_rank  # rank 0 for the last stage (results)
        self._worker = StageWorker(f"stage{role.stage}-worker", transport.device)
        self._idle_s = config.runtime.stage_idle_deadline_s
        self._drain_by: float | None = None
        self.drills = RankDrills(config.faults, role.rank)
        lv = config.liveness
        # Named phases of this rank, each with its own history-derived deadline;
        # a cold chunk (first of the run, new step list or geometry) gets the warm-up one.
        self._deadlines = {
            name: PhaseDeadline(name, minimum_s=lv.phase_deadline_min_s, factor=lv.phase_deadline_factor,
                                warmup_s=lv.warmup_deadline_s)
            for name in ("generator call", "mesh collective")
        }
        self._warmup = WarmupTracker()
        self._cold = False
        # Set when an ERROR arrives (``abort``): a chunk in progress stops waiting
        # and the error is relayed at once, so no rank blames its own wait.
        self._aborted: asyncio.Future = asyncio.get_running_loop().create_future()
        self.recorder = transport.recorder
        self._log = log.bind(rank=role.rank, stage=role.stage, group=f"mesh{role.stage}")
        # Steps run "fused" in the worker: hop in, call, hop out (``runtime.fused_steps``).
        self._fused = config.runtime.fused_steps
        # Shut with the abort or a fatal link: a fused step still running queues nothing more.
        self._outputs = OutputGate(transport)
        # The two step schedules; what they need of the leader is passed in, the deadlines stay here.
        self._fused_job = FusedChunkJob(
            role, self.calls, self.drills, self.scheduler, upstream=self.upstream, handback=self.handback,
            outputs=self._outputs, wait_limit=self._wait_limit, wait_expired=self._wait_expired,
        )
        self._loop_steps = LoopSteps(
            role, self.calls, self.drills, self.scheduler, transport, upstream=self.upstream,
            handback=self.handback, timed=self._timed, next=self._next, work=self._work, log=self._log,
        )

    # -- lifecycle of the actor --------------------------------------------
    def abort(self, msg: ErrorEnvelope) -> None:
        """An ERROR arrived on a link (called on the loop by the transport)."""
        if not self._aborted.done():
            self._aborted.set_result(msg)
        self._interrupt()

    def on_sigterm(self) -> None:
        """Keep serving until rank 0's SHUTDOWN, but no longer than the drain deadline."""
        if self._drain_by is None:
            self._drain_by = time.monotonic() + self.config.runtime.drain_deadline_s
            self._log.info("sigterm: waiting for SHUTDOWN from rank 0")

    async def run(self) -> int:
        """Serve envelopes from upstream until ``SHUTDOWN`` or a terminal error.

        Per ``INFER``: forward it (unless last), run the chunk's generator
        calls over this stage's layers, in lockstep with the mesh, hop hidden
        states to the next leader and, on the last stage, send the result to
        rank 0. ``NOOP`` and ``SHUTDOWN`` are relayed down the chain and into
        the mesh. Every wait has a deadline (``runtime.stage_idle_deadline_s``;
        after SIGTERM at most ``runtime.drain_deadline_s``).

        Returns
        -------
        int
            The process exit code: 0 after relaying ``SHUTDOWN``, 1 after a
            terminal ``ERROR`` (received, or raised here and then published
            into the mesh and sent on, naming the chunk).

        Notes
        -----
        Never raises: a ``ProtocolError`` (an invalid message), a ``PPStageError``
        (illegal transition, call count, watchdog, dead channel, ...) or any
        other exception becomes the terminal ``ERROR`` and exit code 1.
        """
        current: Any = None
        try:
            while True:
                item = await self._next(self.upstream, "an envelope", self.role.prev_rank)
                msg = current = item.msg
                action = action_of(msg)
                self._log.debug("received", action=action, src=self.role.prev_rank, **ids_of(msg))
                if item.error is not None:
                    raise item.error
                if action == "INFER":
                    await self._chunk(msg, item.tensors)
                elif action == "NOOP":
                    await self._relay(msg)
                elif action == "SHUTDOWN":
                    await self._relay(msg)
                    self._log.info("shutdown relayed", **ids_of(msg))
                    return 0
                elif action == "ERROR":
                    return await self._relay_error(msg)
                else:
                    raise UnexpectedMessage(f"unexpected {action} while waiting for an envelope", chunk=msg.id)
        except _Aborted as aborted:
            return await self._relay_error(aborted.msg)
        except (ProtocolError, PPStageError) as exc:
            return await self._terminal(current, exc)
        except Exception as exc:  # a bug or a torch error: still end the chain loudly
            self._log.exception("stage failed")
            return await self._terminal(current, PPStageError(f"{type(exc).__name__}: {exc}"))

    # -- one chunk -----------------------------------------------------------
    async def _chunk(self, env: InferEnvelope, tensors: dict[str, torch.Tensor]) -> None:
        t0 = time.perf_counter()
        t0_ns = time.monotonic_ns()
        exit_if_drilled(self.drills, env.chunk_index, self.role.rank)
        self._cold = self._warmup.enter(
            (env.num_frames, env.height, env.width, tuple(tensors["denoising_step_list"].tolist()))
        )
        ordered = [tensors[s.name] for s in env.tensors]
        steps = [int(t) for t in tensors["denoising_step_list"].tolist()]
        x_t = tensors["latents_in"]  # on the rank's device, like the model and the scheduler step
        if self._fused:
            forwarded = None
            if not self.last:  # queued, not awaited: the mesh broadcast runs while it goes out
                forwarded = asyncio.get_running_loop().create_future()
                forwarded.add_done_callback(_retrieved)
                self.transport.enqueue(self.next_rank, env, ordered, forwarded)
            await self._fused_chunk(env, tensors, ordered, steps, x_t, t0)
            if forwarded is not None:
                await forwarded  # long since out: raises ChannelDead as an awaited send would
        else:
            if not self.last:
                await self.transport.send(self.next_rank, env, ordered)
            await self._loop_steps.run(env, tensors, ordered, steps, x_t, t0)
        self.recorder.span("chunk", t0_ns, env)
        if self.drills.fires("reset_cache_one_rank", env.chunk_index):
            await self._work(out_of_band_reset, self.calls.model)  # B6: the next chunk must report it

    # -- the fused steps: the loop's side of the worker job (fused.py) ----------
    async def _fused_chunk(self, env: InferEnvelope, tensors: dict[str, torch.Tensor],
                           ordered: list[torch.Tensor], steps: list[int], x_t: torch.Tensor, t0: float) -> None:
        """The whole chunk's model work in ONE worker job (``FusedChunkJob.run``): the mesh
        broadcast of the envelope, the recompute call and every denoise step, each
        step taking its input hop from the link's mailbox and queueing its output
        hop to the sender thread itself.

        No hop passes through the loop on its way through this stage, and the
        loop is not woken per step (measured on 2 CPU cores: ~0.8 ms per hop
        with every hop through the loop, ~0.6 ms fused; docs/performance.md,
        "Fused steps"). The loop still owns every deadline, the abort and the
        fatal link, by watching the job's ``JobProgress``; the job's frames,
        checks and drills are those of ``LoopSteps.run``, in the same order on
        every link.
        """
        limits = StepLimits(
            call_s=self._deadlines["generator call"].deadline_s(cold=self._cold),
            mesh_s=self._deadlines["mesh collective"].deadline_s(cold=self._cold),
        )
        progress = JobProgress("mesh collective", limits.mesh_s, "mesh broadcast of the envelope")
        job = asyncio.ensure_future(
            self._work(self._fused_job.run, env, tensors, ordered, steps, x_t, limits, progress, t0)
        )
        job.add_done_callback(_retrieved)  # a job abandoned by an abort: its error is not news
        tick_s = min(limits.call_s, limits.mesh_s) / WATCH_TICKS_PER_DEADLINE
        timings: list[tuple[str, float]] = await self._watch(job, progress, env, tick_s)
        for phase, seconds in timings:
            self._deadlines[phase].observe(seconds, cold=self._cold)

    async def _watch(self, job: asyncio.Future, progress: JobProgress, env: InferEnvelope, tick_s: float) -> Any:
        """Await a fused job under the deadline of whichever phase it is in (read from ``progress``).

        The worker does not wake the loop when it enters a phase (that is the
        point), so the loop looks at ``progress`` at least every ``tick_s``
        seconds (a quarter of the shortest phase deadline: a new phase is seen
        at most that late, and its deadline is then waited for exactly) and at
        the current phase's own deadline; a chunk that ends sooner costs no
        wake-up at all. Expiry raises ``PhaseStalled`` naming this rank, the
        phase and the chunk, as ``_timed`` does.
        """
        while True:
            seen = progress.current
            phase, since, limit, what, peer = seen
            left = None if limit is None else since + limit - time.monotonic()
            timeout = tick_s if left is None else max(min(left, tick_s), 0.0)
            done, _ = await asyncio.wait(
                {job, self.fatal, self._aborted}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if job in done:
                causes = {f for f in (self._aborted, self.fatal) if f.done()}
                if not isinstance(job.exception(), MailboxInterrupted) or not causes:
                    return job.result()
                done = done | causes  # interrupted: the abort or the failed link that did it is the news
            if not (self._aborted in done or self.fatal in done) and (
                progress.current is not seen or left is None or left > tick_s
            ):
                continue  # the worker moved on, or this phase has time left
            self._interrupt()
            if self._aborted in done:
                raise _Aborted(self._aborted.result())
            if self.fatal in done:
                raise self.fatal.result()
            if phase == "hop wait":  # the worker's own wait normally ends first (grace)
                raise self._wait_expired(peer, what, limit - HOP_WAIT_GRACE_S, env.id)
            raise PhaseStalled(
                f"rank {self.role.rank} (stage {self.role.stage}) {what} of chunk {env.chunk_index} "
                f"exceeded {limit:.1f} s",
                rank=self.role.rank, phase=phase, chunk=env.id,
            )

    def _interrupt(self) -> None:
        """The stage is ending: a fused job blocked on a mailbox returns, none queues more."""
        self._outputs.close()
        for mailbox in (self.upstream, self.handback):
            if mailbox is not None:
                mailbox.interrupt()

    async def _work(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self._worker.run(fn, *args)

    async def _timed(self, phase: str, what: str, env: InferEnvelope, fn: Callable[..., Any], *args: Any) -> Any:
        """``_work`` under the phase's deadline; expiry names this rank, the phase and the chunk."""
        deadline = self._deadlines[phase]
        limit = deadline.deadline_s(cold=self._cold)
        t0 = time.monotonic()
        fut = asyncio.ensure_future(self._work(fn, *args))
        done, _ = await asyncio.wait(
            {fut, self.fatal, self._aborted}, timeout=limit, return_when=asyncio.FIRST_COMPLETED
        )
        if fut in done:
            deadline.observe(time.monotonic() - t0, cold=self._cold)
            return fut.result()
        if self._aborted in done:
            raise _Aborted(self._aborted.result())
        if self.fatal in done:
            raise self.fatal.result()
        raise PhaseStalled(
            f"rank {self.role.rank} (stage {self.role.stage}) {what} of chunk {env.chunk_index} "
            f"exceeded {limit:.1f} s",
            rank=self.role.rank, phase=phase, chunk=env.id,
        )

    # -- receiving with deadlines -----------------------------------------------
    def _wait_limit(self, chunk: ChunkId | None) -> float:
        """Seconds a wait for the next frame may take: the idle deadline (the warm-up one
        for a hop of a cold chunk), capped by the drain deadline after SIGTERM."""
        deadline = self._idle_s  # hop waits of a cold chunk get the warm-up deadline
        if chunk is not None and self._cold:
            deadline = max(deadline, self.config.liveness.warmup_deadline_s)
        if self._drain_by is not None:
            deadline = min(deadline, self._drain_by - time.monotonic())
        return max(deadline, 0.0)

    def _wait_expired(self, src: int | None, what: str, deadline: float, chunk: ChunkId | None) -> PPStageError:
        """The error of a wait for ``what`` from ``src`` that got nothing for ``deadline`` seconds."""
        if self._drain_by is not None and time.monotonic() >= self._drain_by:
            return WatchdogExpired(
                "SIGTERM received and no SHUTDOWN arrived within the drain deadline", chunk=chunk
            )
        of_chunk = "" if chunk is None else f" of chunk {chunk.chunk_index}"
        return PhaseStalled(
            f"rank {src} stopped making progress: rank {self.role.rank} (stage {self.role.stage}) got "
            f"nothing from it for {deadline:.1f} s while waiting for {what}{of_chunk}",
            rank=src if src is not None else -1, phase="hop wait", chunk=chunk,
        )

    async def _next(
        self, queue: Mailbox[Inbound], what: str, src: int | None, chunk: ChunkId | None = None
    ) -> Inbound:
        deadline = self._wait_limit(chunk)
        getter = asyncio.ensure_future(queue.get())
        done, _ = await asyncio.wait({getter, self.fatal, self._aborted}, timeout=deadline,
                                     return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            return getter.result()
        getter.cancel()
        if self._aborted in done:
            raise _Aborted(self._aborted.result())
        if self.fatal in done:
            raise self.fatal.result()
        raise self._wait_expired(src, what, deadline, chunk)

    # -- relaying control messages and failing loudly ---------------------------
    async def _relay(self, msg: NoopEnvelope | ShutdownEnvelope | ErrorEnvelope) -> None:
        if not self.last:
            await self.transport.send(self.next_rank, msg, [])
        await self._work(self.calls.relay.publish, msg, [])

    async def _relay_error(self, msg: ErrorEnvelope) -> int:
        self._log.error("terminal action received", reason=msg.reason, origin=msg.origin_rank, **ids_of(msg))
        self.recorder.event("terminal_action", f"ERROR from rank {msg.origin_rank}: {msg.reason}")
        if self.calls.relay.active:  # (a stalled worker would only delay the report)
            await self._best_effort(self._work(self.calls.relay.publish, msg, []))
        if not self.last:
            await self._best_effort(self.transport.send(self.next_rank, msg, []))
        elif msg.origin_rank != 0:
            await self._best_effort(self.transport.send(0, error_result(msg.id, msg.reason), []))
        if self.role.handback_dst is not None:
            await self._best_effort(self.transport.send(self.role.handback_dst, msg, []))
        await asyncio.sleep(TERMINAL_LINGER_S)
        return 1

    async def _terminal(self, current: Any, exc: ProtocolError | PPStageError) -> int:
        """Invalid input or a broken contract: end the mesh, tell rank 0, exit non-zero."""
        # The error's own chunk, else the message being handled, else zeros (before any message).
        chunk = exc.chunk or ChunkId.find(current) or ChunkId(0, 0, 0)
        reason = f"stage {self.role.stage} (rank {self.role.rank}): {type(exc).__name__}: {exc}"
        self._log.error("stage failed", reason=reason, **chunk.fields())
        self.recorder.event("failure", reason)
        if isinstance(exc, ChannelDead):
            return 1  # the link is gone or half-framed: never send on it again
        err = ErrorEnvelope(reason=reason, origin_rank=self.role.rank, **chunk.fields())
        return await self._relay_error(err)

    async def _best_effort(self, aw) -> None:
        try:
            await asyncio.wait_for(aw, timeout=2.0)
        except Exception as exc:  # the peer may already be gone; the cause was logged before
            self._log.warning("could not pass the terminal action on", error=f"{type(exc).__name__}: {exc}")
