"""``Stage0Actor``: rank 0, the control plane (SPEC section 2, phases A and C).

planner -> envelope -> in-flight credit (``D_in``) -> send; receive -> epoch
gate -> decode queue (``D_out``) -> decode in a worker thread -> output sink.

The actor wires three parts it owns and runs each as a task on the loop that
owns the transport: ``ChunkProducer`` (``producer.py``: phase A, plan, build,
send, keepalives), ``ResultReceipt`` (``receipt.py``: receive, epoch gate,
checks against rank 0's shadow ``CacheLifecycle``) and ``DecodePath``
(``decode_path.py``: decode queue, decode worker, output sink, anchor-first).
This module keeps what spans them: the watchdog tick over an owed result and
a running decode or sink, the drain, ``SHUTDOWN`` or ``ERROR`` down the chain,
the per-chunk outcome lines and the run's summary.

The event loop only orchestrates (plan, gate, credit, log, hand-offs). Model
work and bulk bytes run in three worker threads, one per part: *build* (text
encoder, the R0a anchor's VAE encode, tensor digests of the envelope),
*decode* (VAE decode and the output sink) and *check* (the result's output
digest, latents files). The parts share one progress signal (``_progress``,
owned here): whoever changes what another waits on sets it; the epoch gate is
written only by the receipt, the others read it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import structlog

from protocol import ErrorEnvelope, ProtocolError, ShutdownEnvelope

from ppstage.config import PPStageConfig
from ppstage.errors import PPStageError, WatchdogExpired
from ppstage.faults.drills import RankDrills
from ppstage.core.gate import EpochGate
from ppstage.core.planner import Intent, Planner
from ppstage.model.reference import StreamScript
from ppstage.model.stream_inputs import StreamInputs
from ppstage.distributed.topology import Role
from ppstage.distributed.transport import Transport
from ppstage.observability.metrics import ChunkEvents, ChunkLedger, RunSummary, summarize
from ppstage.stages.outcomes import OutcomeLog
from ppstage.stages.decode_path import DecodePath, Sink
from ppstage.stages.producer import ChunkProducer
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
        self.fatal = fatal
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
        # Written only by the receipt (expect, admit); the producer and the decode path read it.
        gate = EpochGate()
        self._decode_path = DecodePath(
            config, gate=gate, stream=self.stream, ledger=self.ledger, recorder=self.recorder,
            drills=self.drills, log=self._log, wake=self._progress.set, wait=self._wait,
            producer_settled=lambda: self._producer.settled(), sink=sink, progress=progress,
        )
        self._receipt = ResultReceipt(
            config, role, transport, gate=gate, stream=self.stream, ledger=self.ledger,
            decode=self._decode_path, log=self._log, wake=self._progress.set, latents_dir=latents_dir,
        )
        self._producer = ChunkProducer(
            config, transport, self.leader1, planner=self.planner, script=script, chunks=chunks,
            pause_before=pause_before or {}, stream=self.stream, ledger=self.ledger, drills=self.drills,
            receipt=self._receipt, decode=self._decode_path, log=self._log, wake=self._progress.set,
            wait=self._wait, stopping=lambda: self._stopping, idle=self._idle,
        )
        self.gate = gate
        self._stopping = False

    @property
    def max_in_flight(self) -> int:
        return self._producer.max_in_flight

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
        After the last chunk it waits for every owed result and decode (bounded
        by the result and phase deadlines; after ``on_sigterm`` also by
        ``runtime.drain_deadline_s``) and sends ``SHUTDOWN``.

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
            asyncio.ensure_future(self._producer.keepalive()),
            asyncio.ensure_future(self._watch_phases()),
        ]
        producer = asyncio.ensure_future(self._producer.run())
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
            self._producer.shutdown()
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

    # -- idleness and the watchdog tick ----------------------------------------------
    def _idle(self) -> bool:
        return not self.gate.in_flight() and self._decode_path.idle()

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
    async def _drain(self, tasks: list[asyncio.Future]) -> None:
        """Wait until nothing is in flight and nothing awaits decode or sink.

        The end of the planned stream has no deadline of its own: the owed
        result's deadline (``check_owed``) and rank 0's decode and sink
        deadlines (``check_phase``), re-checked by the watchdog tick that runs
        among ``tasks`` while this waits, end the run naming whoever stalled.
        A stop (``on_sigterm``: SIGTERM, SIGINT, the service's shutdown) also
        bounds what is left by ``runtime.drain_deadline_s``, counted from the
        moment the drain learns of the stop (a stop during the end-of-stream
        wait starts the clock then).
        """
        until_stop = asyncio.ensure_future(self._wait(lambda: self._idle() or self._stopping))
        try:
            await self._until(until_stop, tasks)
        finally:
            until_stop.cancel()
        if self._idle():
            return
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
        finally:
            waiter.cancel()

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

