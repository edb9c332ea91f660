"""``DecodePath``: rank 0's phase C after the epoch gate (SPEC section 2).

decode queue (``D_out``) -> decode in a worker thread -> output sink.

Results the gate accepted wait in the decode queue; one *decode* worker thread
runs the VAE decode and the output sink, each as a phase (``decode``,
``sink``) with its own deadline, which the actor's watchdog tick checks
(``check_phase``): a hung kernel ends the run naming rank 0's phase and chunk.
A hard cut moves the gate's epoch when its plan is registered: old-epoch
entries still in the decode queue (or made stale while being decoded) are
flushed, never emitted.

R0a anchor-first (``runtime.anchor_first_decode``): the decode worker decodes
the frame a coming chunk's anchor needs, lets the producer build and send that
chunk, then decodes the rest; the output is bytewise the same.

This object owns the queue, the worker, the phase in progress and the
decode's cold set; the actor hands it accepted results in plan order (``put``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable

import torch

from protocol import ChunkId

from ppstage.config import PPStageConfig
from ppstage.errors import PhaseStalled
from ppstage.faults.drills import RankDrills, stall
from ppstage.core.gate import EpochGate
from ppstage.observability.logs import ids_of
from ppstage.core.plan import ChunkPlan
from ppstage.model.stream_inputs import StaleInputs, StreamInputs
from ppstage.observability.metrics import ChunkEvents, ChunkLedger
from ppstage.observability.recorder import MessageRecorder
from ppstage.stages.deadlines import PhaseDeadline, Running
from ppstage.stages.worker import StageWorker

Sink = Callable[[ChunkPlan, torch.Tensor], None]


class DecodePath:
    """Decode, sink and emit accepted results in order, in one worker thread.

    ``wake`` and ``wait`` are the actor's progress signal (set it; await a
    condition). ``producer_settled`` is true when the producer has nothing it
    could send yet (no chunk planned and unsent, or that chunk still lacks its
    inputs): an anchor-first decode waits for it before decoding the rest.
    """

    def __init__(
        self,
        config: PPStageConfig,
        *,
        gate: EpochGate,
        stream: StreamInputs,
        ledger: ChunkLedger,
        recorder: MessageRecorder,
        drills: RankDrills,
        log,
        wake: Callable[[], None],
        wait: Callable[[Callable[[], bool]], Awaitable[None]],
        producer_settled: Callable[[], bool],
        sink: Sink | None = None,
        progress: Callable[[ChunkEvents], None] | None = None,
    ) -> None:
        rt = config.runtime
        lv = config.liveness
        self.config = config
        self.gate = gate
        self.stream = stream
        self.ledger = ledger
        self.recorder = recorder
        self.drills = drills
        self.sink = sink
        self.progress = progress
        self._log = log
        self._wake = wake
        self._wait = wait
        self._producer_settled = producer_settled
        self._phase_deadlines = {
            name: PhaseDeadline(name, minimum_s=lv.phase_deadline_min_s, factor=lv.phase_deadline_factor,
                                warmup_s=lv.warmup_deadline_s)
            for name in ("decode", "sink")
        }
        self._cold: set[int] = set()  # chunk indices planned cold, until their decode and sink are done
        self._running: Running | None = None  # rank 0's decode or sink in progress
        self._queue: asyncio.Queue[tuple[ChunkPlan, torch.Tensor]] = asyncio.Queue(maxsize=rt.d_out)
        self._decoder = StageWorker("stage0-decode")  # one thread, one hand-off per job (see producer.py)
        self._anchor_first = rt.anchor_first_decode and config.recompute.mode == "r0a"
        self._decoding = False
        self.max_queue = 0
        self.flushed = 0

    # -- the actor's side ------------------------------------------------------------
    def mark_cold(self, chunk_index: int) -> None:
        """The chunk was planned cold: its decode and sink get the warm-up deadline."""
        self._cold.add(chunk_index)

    def forget_cold(self, chunk_index: int) -> None:
        """The chunk's result was dropped: it will never be decoded."""
        self._cold.discard(chunk_index)

    async def put(self, plan: ChunkPlan, latents: torch.Tensor, ev: ChunkEvents | None) -> None:
        """Queue an accepted result for decode (waits while ``D_out`` is full)."""
        await self._queue.put((plan, latents))
        if ev is not None:
            ev.queued = time.perf_counter()
        self.max_queue = max(self.max_queue, self._queue.qsize())

    def qsize(self) -> int:
        return self._queue.qsize()

    def idle(self) -> bool:
        """Nothing queued and nothing being decoded or sunk."""
        return self._queue.empty() and not self._decoding

    def check_phase(self) -> None:
        """``PhaseStalled`` naming rank 0's phase and chunk once a decode or sink is overdue."""
        running = self._running
        if running is not None and running.overdue(time.monotonic()):
            ev = self.ledger.get(running.chunk_index)
            raise PhaseStalled(
                f"rank 0 {running.phase} of chunk {running.chunk_index} exceeded "
                f"{running.deadline_s:.1f} s",
                rank=0, phase=running.phase, chunk=None if ev is None else ChunkId.of(ev),
            )

    def shutdown(self) -> None:
        self._decoder.shutdown(cancel_pending=True)

    async def run(self) -> None:
        """The decode task: take each queued result in order, decode, sink and emit it."""
        while True:
            plan, latents = await self._queue.get()
            try:
                await self._decode_and_emit(plan, latents)
            finally:
                self._cold.discard(plan.chunk_index)

    # -- one chunk -------------------------------------------------------------------
    async def _decode_and_emit(self, plan: ChunkPlan, latents: torch.Tensor) -> None:
        ev = self.ledger.get(plan.chunk_index)
        assert ev is not None  # in flight: the ledger keeps it
        if self.gate.is_stale(plan.cache_epoch):
            self._flush(ev)
            return
        self._decoding = True  # until emitted: the drain waits for decode and sink
        try:
            ev.decode_start = time.perf_counter()
            decode_ns = time.monotonic_ns()
            try:
                first = self.stream.anchor_offsets(plan) if self._anchor_first else ()
                parts = [None]
                if first:
                    parts[0] = await self._phase("decode", plan, self._decode_part, plan, latents, first)
                    # The producer can build the chunk that needs this anchor now; let
                    # it send before the rest of this chunk takes the decode worker.
                    self._wake()
                    waited = time.perf_counter()
                    await self._wait(self._producer_settled)
                    ev.decode_wait = time.perf_counter() - waited
                rest = tuple(i for i in range(latents.shape[0]) if i not in first)
                pixels = await self._phase("decode", plan, self._decode_rest, plan, latents, first, rest, parts)
            except StaleInputs:
                pixels = None
            ev.decode_end = time.perf_counter()
            self.recorder.span("decode", decode_ns, plan)
            if pixels is None:
                self._flush(ev)
                return
            if self.sink is not None:  # in the decode thread, under its own deadline
                await self._phase("sink", plan, self.sink, plan, pixels)
        finally:
            self._decoding = False
        ev.emitted = time.perf_counter()
        self.ledger.finish(ev, "emitted")
        self.recorder.gate(plan, "emitted")
        self.recorder.flush()
        self._log.debug("chunk emitted", **ids_of(plan))
        if self.progress is not None:
            self.progress(ev)
        self._wake()

    def _decode_part(self, plan: ChunkPlan, latents: torch.Tensor, offsets: tuple[int, ...]) -> torch.Tensor | None:
        """Decode worker: the frames at ``offsets``; the simulated cost scales with their count."""
        if not offsets:
            return None
        pixels = self.stream.decode_frames(plan, latents, offsets)
        cost_s = self.config.runtime.simulated_decode_ms / 1e3 * len(offsets) / latents.shape[0]
        if cost_s:
            time.sleep(cost_s)  # simulated stage-0 cost (config.runtime.simulated_decode_ms)
        drill = self.drills.fires("stall_decode", plan.chunk_index)
        if drill is not None:
            stall(drill)  # a hung VAE kernel: only the decode deadline can end this
        return pixels

    def _decode_rest(self, plan: ChunkPlan, latents: torch.Tensor, first, rest, parts) -> torch.Tensor | None:
        """Decode worker: the frames not decoded yet, then the chunk's pixels in frame order
        (one hand-off for both); None when a cut made the chunk stale meanwhile."""
        parts = [*parts, self._decode_part(plan, latents, rest)]
        if self.gate.is_stale(plan.cache_epoch):
            return None
        parts = [(o, p) for o, p in zip((first, rest), parts) if p is not None]
        if len(parts) == 1:
            return parts[0][1]
        pixels = torch.empty((sum(len(o) for o, _ in parts), *parts[0][1].shape[1:]), dtype=parts[0][1].dtype)
        for o, p in parts:
            pixels[list(o)] = p
        return pixels

    async def _phase(self, name: str, plan: ChunkPlan, fn: Callable, *args):
        """Run ``fn`` in the decode thread as phase ``name``, watched by ``check_phase``."""
        cold = plan.chunk_index in self._cold
        deadline = self._phase_deadlines[name]
        t0 = time.monotonic()
        self._running = Running(name, plan.chunk_index, t0, deadline.deadline_s(cold=cold))
        try:
            out = await self._decoder.run(fn, *args)
        finally:
            self._running = None
        deadline.observe(time.monotonic() - t0, cold=cold)
        return out

    def _flush(self, ev: ChunkEvents) -> None:
        self.ledger.finish(ev, "flushed")
        self.recorder.gate(ev, "flushed")
        self.flushed += 1
        self._wake()
        self._log.info("decode flushed by hard cut", **ids_of(ev))
