"""``Stage0Actor``: rank 0, the control plane (SPEC section 2, phases A and C).

planner -> envelope -> in-flight credit (``D_in``) -> send; receive -> epoch
gate -> decode queue (``D_out``) -> decode in a worker thread -> output sink.

This module is phase A (the producer) and the run's orchestration: its tasks,
keepalives, the watchdog tick, the drain and the shutdown. Phase C lives in
two objects the actor owns: ``ResultReceipt`` (``receipt.py``: receive, epoch
gate, checks against the shadow lifecycle) and ``DecodePath``
(``decode_path.py``: decode queue, decode worker, output sink, anchor-first).

Overlap: the producer sends the envelope of chunk k+1 as soon as credit and
the plan's inputs allow, independently of chunk k's decode; only an R0a
steady-state recompute waits, and only for the one decoded anchor it needs.
A hard cut moves the gate's epoch when its plan is registered (before its
envelope is sent); what happens to old-epoch results is phase C's (see
``receipt.py`` and ``decode_path.py``). A re-base changes no epoch: it is only
logged.

The event loop only orchestrates (plan, gate, credit, log, hand-offs). Model
work and bulk bytes run in three worker threads: *build* (text encoder, the
R0a anchor's VAE encode, tensor digests of the envelope; owned here),
*decode* (VAE decode and the output sink; ``DecodePath``) and *check* (the
result's output digest, latents files; ``ResultReceipt``). All three share
one progress signal (``_progress``, owned here): whoever changes what another
waits on sets it.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import structlog

from protocol import ErrorEnvelope, NoopEnvelope, ProtocolError, ShutdownEnvelope

from ppstage.config import PPStageConfig
from ppstage.errors import PPStageError, WatchdogExpired
from ppstage.faults.drills import RankDrills
from ppstage.faults.inject import exit_if_drilled, rank0_envelope_drill
from ppstage.core.gate import EpochGate
from ppstage.observability.logs import ids_of
from ppstage.core.plan import ChunkPlan
from ppstage.core.planner import Intent, Planner
from ppstage.model.reference import StreamScript
from ppstage.model.stream_inputs import StreamInputs
from ppstage.distributed.topology import Role
from ppstage.distributed.transport import Transport
from ppstage.stages.envelopes import infer_envelope
from ppstage.observability.metrics import ChunkEvents, ChunkLedger, RunSummary, summarize
from ppstage.stages.outcomes import OutcomeLog
from ppstage.stages.deadlines import WarmupTracker
from ppstage.stages.decode_path import DecodePath, Sink
from ppstage.stages.receipt import INLINE_DIGEST_BYTES, ResultReceipt

log = structlog.get_logger("ppstage.stage0")

WATCHDOG_TICK_S = 0.25  # how often an owed result's and a running phase's deadlines are re-checked
ERROR_LINGER_S = 0.3  # after sending ERROR: time for the stages to read it before our links close

# Re-exported: their home moved with phase C (``receipt.py``, ``decode_path.py``).
__all__ = [
    "ERROR_LINGER_S", "INLINE_DIGEST_BYTES", "Sink", "Stage0Actor", "Stage0Outcome", "WATCHDOG_TICK_S",
]


@dataclass
class Stage0Outcome:
    exit_code: int
    summary: RunSummary | None
    events: list[ChunkEvents] = field(default_factory=list)
    error: str | None = None


class Stage0Actor:
    def __init__(
        self,
        config: PPStageConfig,
        role: Role,
        transport: Transport,
        script: StreamScript,
        chunks: int | None,
        fatal: asyncio.Future,
        *,
        sink: Sink | None = None,
        progress: Callable[[ChunkEvents], None] | None = None,
        latents_dir: Path | None = None,
        chunk_stream: Path | None = None,
        pause_before: dict[int, float] | None = None,
    ) -> None:
        self.config = config
        self.role = role
        self.transport = transport
        self.script = script
        self.chunks = chunks
        self.fatal = fatal
        self.pause_before = pause_before or {}
        self.drills = RankDrills(config.faults, role.rank)
        self.recorder = transport.recorder
        self.planner = Planner(config)
        self.stream = StreamInputs(config)
        # One JSON line per chunk once its outcome is final (what the demo's
        # digest check reads): the in-memory ledger keeps only a recent ring.
        self._stream = OutcomeLog(chunk_stream) if chunk_stream is not None else None
        self.ledger = ChunkLedger(on_final=self._record_final)
        self.leader1 = role.leader_of(1)
        self._log = log.bind(rank=0, stage=0)
        self._progress = asyncio.Event()
        # The gate belongs to the receipt (the only writer); the producer and the
        # decode path read it. The actor hands results from one to the other.
        gate = EpochGate()
        self._decode_path = DecodePath(
            config, gate=gate, stream=self.stream, ledger=self.ledger, recorder=self.recorder,
            drills=self.drills, log=self._log, wake=self._progress.set, wait=self._wait,
            producer_settled=self._producer_settled, sink=sink, progress=progress,
        )
        self._receipt = ResultReceipt(
            config, role, transport, gate=gate, stream=self.stream, ledger=self.ledger,
            decode=self._decode_path, log=self._log, wake=self._progress.set, latents_dir=latents_dir,
        )
        self.gate = gate
        self._warmup = WarmupTracker()
        self._builder = ThreadPoolExecutor(1, thread_name_prefix="stage0-build")
        self._pending: ChunkPlan | None = None  # planned, not sent yet
        self._stopping = False
        self._plan_pending = False
        self._last_send = time.monotonic()
        self.max_in_flight = 0

    @property
    def max_decode_queue(self) -> int:
        return self._decode_path.max_queue

    @property
    def flushed(self) -> int:
        return self._decode_path.flushed

    def submit(self, intent: Intent) -> None:
        """Queue an intent (hard cut, prompt, bias, steps) for the next chunk boundary.

        The entry point for a live control surface (the service to come); the
        scripted stream uses it too. Raises ``PlannerError`` for a bad intent.
        """
        self.planner.submit(intent)

    def statistics(self) -> dict[str, object]:
        """Live figures of the control plane (queues, epoch, drops) for the service's status."""
        return {
            "cache_epoch": self.gate.epoch,
            "in_flight": self.gate.in_flight(),
            "decode_queue": self._decode_path.qsize(),
            "max_in_flight": self.max_in_flight,
            "max_decode_queue": self.max_decode_queue,
            "dropped": {**dict(self.gate.dropped), "flushed": self.flushed},
            "stopping": self._stopping,
        }

    def on_sigterm(self) -> None:
        if not self._stopping:
            self._log.info("sigterm: stop planning, drain, shut down")
            self._stopping = True
            self._progress.set()

    # -- main ----------------------------------------------------------------
    async def run(self) -> Stage0Outcome:
        """Stream ``chunks`` chunks through the pipeline, then drain and shut it down.

        Runs on the event loop that owns the transport: the producer (plan,
        build inputs, send within ``runtime.d_in`` credit), the receiver
        (epoch gate, checks against the shadow lifecycle), the decoder (a
        worker thread, ``runtime.d_out`` queue) and keepalives run as tasks.
        After the last chunk (or ``on_sigterm``) it drains every owed result
        and decode within ``runtime.drain_deadline_s`` and sends ``SHUTDOWN``.

        Returns
        -------
        Stage0Outcome
            ``exit_code`` 0 after an orderly shutdown, 1 after any failure;
            ``summary`` (fps, periods in seconds, drops by reason), the
            per-chunk ``events`` and, on failure, ``error`` as
            ``"TypeName: message (call_id=.., chunk_index=.., cache_epoch=..)"``.

        Notes
        -----
        Never raises: every ``ProtocolError``, ``PPStageError`` (watchdog, gate,
        digest, channel) or unexpected exception ends the run with exit code
        1, after an ``ERROR`` was sent down the chain (best effort, 2 s).
        """
        t_start = time.perf_counter()
        cpu_start = time.thread_time()  # this thread is the loop: its CPU is the control plane
        tasks = [
            asyncio.ensure_future(self._receipt.run()),
            asyncio.ensure_future(self._decode_path.run()),
            asyncio.ensure_future(self._keepalive()),
            asyncio.ensure_future(self._watch_phases()),
        ]
        producer = asyncio.ensure_future(self._produce())
        try:
            await self._until(producer, tasks)
            await self._drain(tasks)
            chunk = self.planner.control_ids()
            await self.transport.send(self.leader1, ShutdownEnvelope(**chunk.fields()), [])
            self._log.info("shutdown sent", **chunk.fields())
            code, error = 0, None
        except (ProtocolError, PPStageError) as exc:
            code, error = 1, f"{type(exc).__name__}: {exc}"
            self._log.error("pipeline failed", reason=error)
            self.recorder.event("failure", error)
            await self._send_error(error, [producer, *tasks])
        except Exception as exc:  # a bug or a torch error: still end the chain loudly
            code, error = 1, f"{type(exc).__name__}: {exc}"
            self._log.exception("stage 0 failed")
            self.recorder.event("failure", error)
            await self._send_error(error, [producer, *tasks])
        finally:
            for t in [producer, *tasks]:
                t.cancel()
            self._decode_path.shutdown()
            self._builder.shutdown(wait=False, cancel_futures=True)
            self._receipt.shutdown()
        loop_cpu_s = time.thread_time() - cpu_start
        for ev in self.ledger.unfinished():  # a failed run: the stream names what was lost
            self._record_final(ev)
        if self._stream is not None:
            self._stream.close()
        events = self.ledger.recent()
        summary = summarize(
            events,
            totals=self.ledger.totals,
            frames_per_chunk=self.config.cache.chunk_frames,
            max_in_flight=self.max_in_flight,
            max_decode_queue=self.max_decode_queue,
            dropped={**dict(self.gate.dropped), "flushed": self.flushed},
            wall_s=time.perf_counter() - t_start,
            loop_cpu_s=loop_cpu_s,
        )
        return Stage0Outcome(code, summary, events, error)

    async def _until(self, main: asyncio.Future, helpers: list[asyncio.Future]) -> None:
        """Await ``main``; a helper task or the transport failing first raises its error."""
        watch = {main, self.fatal, *helpers}
        done, _ = await asyncio.wait(watch, return_when=asyncio.FIRST_COMPLETED)
        for d in done:
            if d is not main and (d is self.fatal or d.exception() is not None):
                raise d.result() if d is self.fatal else d.exception()  # type: ignore[misc]
        main.result()

    # -- phase A: plan, build, send ------------------------------------------------
    async def _produce(self) -> None:
        d_in = self.config.runtime.d_in
        loop = asyncio.get_running_loop()
        # chunks=None: a service's stream, planned until SIGTERM / shutdown.
        for k in itertools.count() if self.chunks is None else range(self.chunks):
            if self._stopping:
                break
            if k in self.pause_before:  # an idle stream: only keepalives flow
                await asyncio.sleep(self.pause_before[k])
            for intent in self.script.intents_at(k):
                self.submit(intent)
            await self._wait(lambda: self.gate.in_flight() < d_in or self._stopping)
            if self.config.runtime.sequential_schedule:  # the benchmarks' no-overlap baseline
                await self._wait(lambda: self._idle() or self._stopping)
            if self._stopping:
                break
            self._plan_pending = True
            plan = self.planner.next_chunk()
            self._pending = plan
            if self._warmup.enter((plan.denoising_step_list, plan.num_frames)):
                self._receipt.mark_cold(plan.chunk_index)
                self._decode_path.mark_cold(plan.chunk_index)
            if plan.init_cache and k > 0:
                self._log.info("hard cut", forced=plan.forced_cut, **ids_of(plan))
            elif plan.rebased:
                self._log.info("re-base", position_offset=plan.position_offset, **ids_of(plan))
            await self._wait(lambda: self._inputs_ready(plan))
            exit_if_drilled(self.drills, plan.chunk_index, 0)
            ev = self.ledger.open(plan.chunk_index, plan.call_id, plan.cache_epoch)
            ev.build_start = time.perf_counter()
            build_ns = time.monotonic_ns()
            env, tensors = await loop.run_in_executor(self._builder, self._build, plan)
            rewrite = None
            if self.drills:
                env, tensors, rewrite = rank0_envelope_drill(self.drills, env, tensors)
            ev.build_end = time.perf_counter()
            self.recorder.span("build", build_ns, plan)
            self._receipt.expect(plan)
            await self.transport.send(self.leader1, env, tensors, drill_frame=rewrite)
            ev.sent = time.perf_counter()
            self._last_send = time.monotonic()
            self._plan_pending = False
            self._pending = None
            self._progress.set()  # an anchor-first decode may go on with the rest
            self.max_in_flight = max(self.max_in_flight, self.gate.in_flight())
            self._log.debug("envelope sent", dst=self.leader1, **ids_of(plan))

    def _build(self, plan: ChunkPlan):
        """Phase A's model work (build worker): inputs, then the envelope with its digests."""
        return infer_envelope(plan, self.stream.chunk_inputs(plan))

    def _idle(self) -> bool:
        return not self.gate.in_flight() and self._decode_path.idle()

    def _inputs_ready(self, plan: ChunkPlan) -> bool:
        # A plan of a new epoch needs nothing from the old one; otherwise the
        # stream must hold the latents (and, R0a, the decoded anchor) it needs.
        return plan.cache_epoch > self.stream.cache_epoch or self.stream.anchor_ready(plan)

    def _producer_settled(self) -> bool:
        """Nothing the producer could send now: an anchor-first decode may go on with the rest."""
        return self._pending is None or not self._inputs_ready(self._pending)

    # -- phase C: the watchdog tick over the receipt and the decode path ----------------
    async def _watch_phases(self) -> None:
        """Fail, naming rank 0's phase and chunk, when a decode or sink exceeds its deadline,
        or naming the last stage when a result is owed for too long."""
        while True:
            await asyncio.sleep(WATCHDOG_TICK_S)
            self._receipt.check_owed()
            self._decode_path.check_phase()

    def _record_final(self, ev: ChunkEvents) -> None:
        if self._stream is None:
            return
        line = {
            "chunk_index": ev.chunk_index, "call_id": ev.call_id, "cache_epoch": ev.cache_epoch,
            "outcome": ev.outcome, "output_digest": ev.output_digest, "emitted": ev.emitted,
        }
        self._stream.write(line)  # written and flushed in the log's own thread, in order

    # -- liveness and shutdown ---------------------------------------------------
    async def _keepalive(self) -> None:
        interval = self.config.runtime.keepalive_interval_s
        while True:
            await asyncio.sleep(interval / 4)
            if self._plan_pending or time.monotonic() - self._last_send < interval:
                continue
            if self.drills.has("no_keepalives"):
                continue  # the control case of the keepalive test: the stages' watchdogs must fire
            chunk = self.planner.control_ids()
            await self.transport.send(self.leader1, NoopEnvelope(**chunk.fields()), [])
            self._last_send = time.monotonic()

    async def _drain(self, tasks: list[asyncio.Future]) -> None:
        budget = self.config.runtime.drain_deadline_s
        waiter = asyncio.ensure_future(self._wait(self._idle))
        try:
            await asyncio.wait_for(self._until(waiter, tasks), budget)
        except asyncio.TimeoutError:
            raise WatchdogExpired(
                f"drain missed its {budget:.1f}s deadline: {self.gate.in_flight()} result(s) in flight, "
                f"{self._decode_path.qsize()} awaiting decode",
                chunk=self.gate.oldest_owed(),
            ) from None

    async def _send_error(self, reason: str, tasks: list[asyncio.Future]) -> None:
        for t in tasks:  # no keepalive or envelope may follow the ERROR
            t.cancel()
        chunk = self.planner.control_ids()
        try:
            await asyncio.wait_for(
                self.transport.send(self.leader1, ErrorEnvelope(reason=reason, origin_rank=0, **chunk.fields()), []),
                timeout=2.0,
            )
            # A moment for the stages to read the reason before this rank's links
            # close under them (they would report a dead channel instead).
            await asyncio.sleep(ERROR_LINGER_S)
        except Exception as exc:  # the chain may already be gone; the cause was logged above
            self._log.warning("could not send ERROR down the chain", error=f"{type(exc).__name__}: {exc}")

    async def _wait(self, cond: Callable[[], bool]) -> None:
        while not cond():
            self._progress.clear()
            await self._progress.wait()

