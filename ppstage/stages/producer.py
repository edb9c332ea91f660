"""``ChunkProducer``: rank 0's phase A (SPEC section 2): plan -> envelope -> credit -> send.

The producer sends the envelope of chunk k+1 as soon as in-flight credit
(``runtime.d_in``) and the plan's inputs allow, independently of chunk k's
decode; only an R0a steady-state recompute waits, and only for the one decoded
anchor it needs. A hard cut moves the gate's epoch when its plan is registered
(``ResultReceipt.expect``, just before the send); a re-base changes no epoch:
it is only logged.

The model work of a chunk (text encoder, the R0a anchor's VAE encode, tensor
digests of the envelope) runs in the *build* worker thread, owned here. So
does the link to stage 1 while streaming: keepalive NOOPs go out only when no
envelope did for ``runtime.keepalive_interval_s`` and none is being planned.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Awaitable, Callable

from protocol import NoopEnvelope

from ppstage.config import PPStageConfig
from ppstage.faults.drills import RankDrills
from ppstage.faults.inject import exit_if_drilled, rank0_envelope_drill
from ppstage.observability.logs import ids_of
from ppstage.core.plan import ChunkPlan
from ppstage.core.planner import Planner
from ppstage.model.reference import StreamScript
from ppstage.model.stream_inputs import StreamInputs
from ppstage.distributed.transport import Transport
from ppstage.observability.metrics import ChunkLedger
from ppstage.stages.envelopes import infer_envelope
from ppstage.stages.deadlines import WarmupTracker
from ppstage.stages.decode_path import DecodePath
from ppstage.stages.receipt import ResultReceipt
from ppstage.stages.worker import StageWorker


class ChunkProducer:
    """Plans, builds and sends every chunk of the stream, and the keepalives between them.

    ``stopping`` and ``idle`` are the actor's (SIGTERM; nothing owed or
    decoding); ``wake`` and ``wait`` its progress signal.
    """

    def __init__(
        self,
        config: PPStageConfig,
        transport: Transport,
        leader1: int,
        *,
        planner: Planner,
        script: StreamScript,
        chunks: int | None,
        pause_before: dict[int, float],
        stream: StreamInputs,
        ledger: ChunkLedger,
        drills: RankDrills,
        receipt: ResultReceipt,
        decode: DecodePath,
        log,
        wake: Callable[[], None],
        wait: Callable[[Callable[[], bool]], Awaitable[None]],
        stopping: Callable[[], bool],
        idle: Callable[[], bool],
    ) -> None:
        self.config = config
        self.transport = transport
        self.leader1 = leader1
        self.planner = planner
        self.script = script
        self.chunks = chunks
        self.pause_before = pause_before
        self.stream = stream
        self.ledger = ledger
        self.drills = drills
        self.recorder = transport.recorder
        self.gate = receipt.gate
        self.receipt = receipt
        self.decode = decode
        self._log = log
        self._wake = wake
        self._wait = wait
        self._stopping = stopping
        self._idle = idle
        self._warmup = WarmupTracker()
        # A dedicated thread, awaited with one call_soon_threadsafe per job: the loop's
        # cost of a hand-off is 5 us against 14 us for run_in_executor (measured, uvloop).
        self._builder = StageWorker("stage0-build")
        self._pending: ChunkPlan | None = None  # planned, not sent yet
        self._plan_pending = False
        self._last_send = time.monotonic()
        self.max_in_flight = 0

    def settled(self) -> bool:
        """Nothing this producer could send now: an anchor-first decode may go on with the rest."""
        return self._pending is None or not self._inputs_ready(self._pending)

    def shutdown(self) -> None:
        self._builder.shutdown(cancel_pending=True)

    async def run(self) -> None:
        d_in = self.config.runtime.d_in
        # chunks=None: a service's stream, planned until SIGTERM / shutdown.
        for k in itertools.count() if self.chunks is None else range(self.chunks):
            if self._stopping():
                break
            if k in self.pause_before:  # an idle stream: only keepalives flow
                await asyncio.sleep(self.pause_before[k])
            for intent in self.script.intents_at(k):
                self.planner.submit(intent)
            await self._wait(lambda: self.gate.in_flight() < d_in or self._stopping())
            if self.config.runtime.sequential_schedule:  # the benchmarks' no-overlap baseline
                await self._wait(lambda: self._idle() or self._stopping())
            if self._stopping():
                break
            self._plan_pending = True
            plan = self.planner.next_chunk()
            self._pending = plan
            if self._warmup.enter((plan.denoising_step_list, plan.num_frames)):
                self.receipt.mark_cold(plan.chunk_index)
                self.decode.mark_cold(plan.chunk_index)
            if plan.init_cache and k > 0:
                self._log.info("hard cut", forced=plan.forced_cut, **ids_of(plan))
            elif plan.rebased:
                self._log.info("re-base", position_offset=plan.position_offset, **ids_of(plan))
            await self._wait(lambda: self._inputs_ready(plan))
            exit_if_drilled(self.drills, plan.chunk_index, 0)
            ev = self.ledger.open(plan.chunk_index, plan.call_id, plan.cache_epoch)
            ev.build_start = time.perf_counter()
            build_ns = time.monotonic_ns()
            env, tensors = await self._builder.run(self._build, plan)
            rewrite = None
            if self.drills:
                env, tensors, rewrite = rank0_envelope_drill(self.drills, env, tensors)
            ev.build_end = time.perf_counter()
            self.recorder.span("build", build_ns, plan)
            self.receipt.expect(plan)
            await self.transport.send(self.leader1, env, tensors, drill_frame=rewrite)
            ev.sent = time.perf_counter()
            self._last_send = time.monotonic()
            self._plan_pending = False
            self._pending = None
            self._wake()  # an anchor-first decode may go on with the rest
            self.max_in_flight = max(self.max_in_flight, self.gate.in_flight())
            self._log.debug("envelope sent", dst=self.leader1, **ids_of(plan))

    async def keepalive(self) -> None:
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

    def _build(self, plan: ChunkPlan):
        """Phase A's model work (build worker): inputs, then the envelope with its digests."""
        return infer_envelope(plan, self.stream.chunk_inputs(plan))

    def _inputs_ready(self, plan: ChunkPlan) -> bool:
        # A plan of a new epoch needs nothing from the old one; otherwise the
        # stream must hold the latents (and, R0a, the decoded anchor) it needs.
        return plan.cache_epoch > self.stream.cache_epoch or self.stream.anchor_ready(plan)
