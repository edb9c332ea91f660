"""``Stage0Actor``: rank 0, the control plane (SPEC section 2, phases A and C).

planner -> envelope -> in-flight credit (``D_in``) -> send; receive -> epoch
gate -> decode queue (``D_out``) -> decode in a worker thread -> output sink.

Overlap: the producer sends the envelope of chunk k+1 as soon as credit and
the plan's inputs allow, independently of chunk k's decode; only an R0a
steady-state recompute waits, and only for the one decoded anchor it needs.
A hard cut moves the gate's epoch when its plan is registered: after a
requested cut, results of the old epoch still in flight are received (framing)
and dropped by epoch, and old-epoch entries still in the decode queue are
flushed, never emitted. A cut the planner forced (policy ``cut``) keeps them:
they are emitted in plan order. A re-base changes no epoch: it is only logged.

Rank 0 also keeps a shadow ``CacheLifecycle`` fed the same plans in the same
order as the stages: every stage's reported state digest must equal it.

The event loop only orchestrates (plan, gate, credit, log, hand-offs). Model
work and bulk bytes run in three worker threads: *build* (text encoder, the
R0a anchor's VAE encode, tensor digests of the envelope), *decode* (VAE
decode and the output sink) and *check* (the result's output digest, latents
files). R0a anchor-first (``runtime.anchor_first_decode``): the decode worker
decodes the frame a coming chunk's anchor needs, lets the producer build and
send that chunk, then decodes the rest; the output is bytewise the same.
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
import torch

from protocol import (
    ChunkId,
    ChunkResult,
    DigestMismatch,
    ErrorEnvelope,
    NoopEnvelope,
    ProtocolError,
    ShutdownEnvelope,
    action_of,
)

from ppstage.config import PPStageConfig
from ppstage.errors import (
    GateError,
    PhaseStalled,
    PPStageError,
    StateDivergence,
    UnexpectedMessage,
    UpstreamFailed,
    WatchdogExpired,
)
from ppstage.faults.drills import RankDrills, stall
from ppstage.faults.inject import exit_if_drilled, rank0_envelope_drill
from ppstage.core.gate import EpochGate
from ppstage.core.lifecycle import CacheLifecycle
from ppstage.observability.logs import ids_of
from ppstage.digests import tensor_digest
from ppstage.core.plan import ChunkPlan
from ppstage.core.planner import Intent, Planner
from ppstage.model.reference import StreamScript
from ppstage.model.stream_inputs import StaleInputs, StreamInputs
from ppstage.distributed.devices import HostStage
from ppstage.distributed.topology import Role
from ppstage.distributed.transport import Transport
from ppstage.stages.envelopes import infer_envelope
from ppstage.observability.metrics import ChunkEvents, ChunkLedger, RunSummary, summarize
from ppstage.stages.outcomes import OutcomeLog
from ppstage.stages.deadlines import PhaseDeadline, ResultDeadline, Running, WarmupTracker

log = structlog.get_logger("ppstage.stage0")

WATCHDOG_TICK_S = 0.25  # how often an owed result's and a running phase's deadlines are re-checked
INLINE_DIGEST_BYTES = 256 << 10  # larger results are hashed in the check worker, off the loop
ERROR_LINGER_S = 0.3  # after sending ERROR: time for the stages to read it before our links close

Sink = Callable[[ChunkPlan, torch.Tensor], None]


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
        self.sink = sink
        self.progress = progress
        self.latents_dir = latents_dir
        self.pause_before = pause_before or {}
        self.drills = RankDrills(config.faults, role.rank)
        self.recorder = transport.recorder
        self.planner = Planner(config)
        self.gate = EpochGate()
        self.stream = StreamInputs(config)
        self.shadow = CacheLifecycle(config.cache_geometry())
        # One JSON line per chunk once its outcome is final (what the demo's
        # digest check reads): the in-memory ledger keeps only a recent ring.
        self._stream = OutcomeLog(chunk_stream) if chunk_stream is not None else None
        self.ledger = ChunkLedger(on_final=self._record_final)
        self.expected_digest: dict[int, str] = {}
        self.plans: dict[int, ChunkPlan] = {}
        self.leader1 = role.leader_of(1)
        self.results = transport.open_inbound(role.leader_of(role.num_stages))
        rt = config.runtime
        lv = config.liveness
        # A cold chunk's result may take the warm-up deadline plus the steady floor:
        # the stage that is warming up (or stuck) names itself first.
        self.deadline = ResultDeadline(
            minimum_s=rt.result_deadline_min_s, factor=rt.result_deadline_factor,
            warmup_s=lv.warmup_deadline_s + rt.result_deadline_min_s,
        )
        self._phase_deadlines = {
            name: PhaseDeadline(name, minimum_s=lv.phase_deadline_min_s, factor=lv.phase_deadline_factor,
                                warmup_s=lv.warmup_deadline_s)
            for name in ("decode", "sink")
        }
        self._warmup = WarmupTracker()
        self._cold: set[int] = set()  # chunk indices planned cold, until their result arrives
        self._cold_decode: set[int] = set()  # ... and until their decode and sink are done
        self._running: Running | None = None  # rank 0's decode or sink in progress
        self._decode_q: asyncio.Queue[tuple[ChunkPlan, torch.Tensor]] = asyncio.Queue(maxsize=rt.d_out)
        self._decoder = ThreadPoolExecutor(1, thread_name_prefix="stage0-decode")
        self._builder = ThreadPoolExecutor(1, thread_name_prefix="stage0-build")
        self._checker = ThreadPoolExecutor(1, thread_name_prefix="stage0-check")
        self._anchor_first = rt.anchor_first_decode and config.recompute.mode == "r0a"
        self._pending: ChunkPlan | None = None  # planned, not sent yet
        self._host = HostStage(transport.device)
        self._progress = asyncio.Event()
        self._stopping = False
        self._plan_pending = False
        self._last_send = time.monotonic()
        self._decoding = False
        self._last_result_t: float | None = None
        self._owed_since = time.monotonic()
        self.max_in_flight = 0
        self.max_decode_queue = 0
        self.flushed = 0
        self._log = log.bind(rank=0, stage=0)

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
            "decode_queue": self._decode_q.qsize(),
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
            asyncio.ensure_future(self._receive()),
            asyncio.ensure_future(self._decode()),
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
            for pool in (self._decoder, self._builder, self._checker):
                pool.shutdown(wait=False, cancel_futures=True)
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
                self._cold.add(plan.chunk_index)
                self._cold_decode.add(plan.chunk_index)
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
            if not self.gate.in_flight():
                self._owed_since = time.monotonic()  # a result is owed from now on
            self._expect(plan)
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
        return not self.gate.in_flight() and self._decode_q.empty() and not self._decoding

    def _inputs_ready(self, plan: ChunkPlan) -> bool:
        # A plan of a new epoch needs nothing from the old one; otherwise the
        # stream must hold the latents (and, R0a, the decoded anchor) it needs.
        return plan.cache_epoch > self.stream.cache_epoch or self.stream.anchor_ready(plan)

    def _expect(self, plan: ChunkPlan) -> None:
        """Register the plan with the gate and advance the shadow lifecycle."""
        self.gate.expect(plan)
        self.plans[plan.call_id] = plan
        self.shadow.begin_chunk(plan)
        for i in range(plan.expected_generator_calls):
            self.shadow.record_call("recompute" if plan.do_kv_recompute and i == 0 else "denoise")
        self.shadow.end_chunk()
        self.expected_digest[plan.call_id] = self.shadow.digest()
        self.recorder.plan(plan, self.expected_digest[plan.call_id])

    # -- phase C: gate, decode, emit -----------------------------------------------
    async def _receive(self) -> None:
        while True:
            item = await self._next_result()
            msg = item.msg
            if item.error is not None:
                raise item.error
            if isinstance(msg, ErrorEnvelope):
                raise UpstreamFailed(f"pipeline reported: {msg.reason}", chunk=msg.id)
            if not isinstance(msg, ChunkResult):
                raise UnexpectedMessage(f"unexpected {action_of(msg)} on the result link", chunk=msg.id)
            latents = item.tensors.get("latents_out")
            if latents is not None:
                latents = self._host.to_host(latents)  # rank 0's decode path works on the host
            verdict = self.gate.admit(msg)
            self.recorder.gate(msg, verdict.reason)
            ev = self.ledger.get(msg.chunk_index)
            cold = msg.chunk_index in self._cold
            self._cold.discard(msg.chunk_index)
            if not verdict.accepted:
                self._cold_decode.discard(msg.chunk_index)
                self._log.info("result dropped", reason=verdict.reason, **ids_of(msg))
                self.plans.pop(msg.call_id, None)  # a stale plan is never accepted later
                self.expected_digest.pop(msg.call_id, None)
                if ev is not None and ev.outcome == "in_flight":
                    self.ledger.finish(ev, verdict.reason)
                self._progress.set()
                continue
            assert latents is not None  # the gate refuses an ok result without it
            checked = next((s.digest for s in msg.tensors if s.name == "latents_out"), None)
            if checked is not None:
                # The receiver thread hashed these very bytes and compared them with the
                # spec's digest (a mismatch arrives as ``item.error``, raised above): no
                # second blake2b on the loop.
                digest = checked
            elif latents.numel() * latents.element_size() > INLINE_DIGEST_BYTES:
                digest = await asyncio.get_running_loop().run_in_executor(self._checker, tensor_digest, latents)
            else:  # hashing a few KiB costs less than the hand-off to a worker and back
                digest = tensor_digest(latents)
            self._check_result(msg, digest)
            plan = self.plans.pop(msg.call_id)
            self._owed_since = time.monotonic()
            now = time.perf_counter()
            if self._last_result_t is not None and not cold:
                self.deadline.observe(now - self._last_result_t)
            self._last_result_t = now
            if ev is not None:
                ev.received = now
                ev.stage_durations = tuple(s.duration_s for s in msg.stages)
                ev.output_digest = msg.output_digest
            self.stream.record_latents(plan, latents)
            if self.latents_dir is not None:  # raw float32, for tolerance checks (tp > 1)
                path = self.latents_dir / f"chunk{plan.chunk_index}.f32"
                self._checker.submit(path.write_bytes, latents.numpy().tobytes())
            self._progress.set()
            await self._decode_q.put((plan, latents))
            if ev is not None:
                ev.queued = time.perf_counter()
            self.max_decode_queue = max(self.max_decode_queue, self._decode_q.qsize())

    async def _next_result(self):
        """The next inbound result (an owed result's deadline is ``_watch_phases``' job).

        A plain ``get`` of the result link's mailbox: no timer and no task per
        result on the loop (``asyncio.wait_for`` made both).
        """
        return await self.results.get()

    def _check_owed_result(self) -> None:
        """``PhaseStalled`` once a result is owed for longer than the result deadline.

        Re-checked every tick rather than armed once: a result becomes owed
        when an envelope is sent, which may happen at any moment.
        """
        deadline = self.deadline.deadline_s(cold=bool(self._cold))
        if self.gate.in_flight() and time.monotonic() - self._owed_since > deadline:
            last = self.role.leader_of(self.role.num_stages)
            raise PhaseStalled(
                f"rank 0 got no result from the pipeline (last stage leader rank {last}) within "
                f"{deadline:.1f} s with {self.gate.in_flight()} chunk(s) in flight",
                rank=last, phase="result", chunk=self.gate.oldest_owed(),
            )

    def _check_result(self, msg: ChunkResult, latents_digest: str) -> None:
        if latents_digest != msg.output_digest:
            raise DigestMismatch("latents_out does not match the output digest", chunk=msg.id)
        want = self.expected_digest.pop(msg.call_id)
        plan = self.plans[msg.call_id]
        for s in msg.stages:
            if s.state_digest != want or s.current_start_frame != plan.current_start_frame:
                raise StateDivergence(
                    f"stage {s.stage} reports lifecycle state {s.state_digest[:8]} at start frame "
                    f"{s.current_start_frame}; rank 0's plan gives {want[:8]} at {plan.current_start_frame}",
                    chunk=msg.id,
                )
        if len(msg.stages) != self.role.num_stages:
            raise GateError(f"{len(msg.stages)} stage reports, expected {self.role.num_stages}", chunk=msg.id)

    async def _decode(self) -> None:
        while True:
            plan, latents = await self._decode_q.get()
            try:
                await self._decode_and_emit(plan, latents)
            finally:
                self._cold_decode.discard(plan.chunk_index)

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
                    self._progress.set()
                    waited = time.perf_counter()
                    await self._wait(lambda: self._pending is None or not self._inputs_ready(self._pending))
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
        self._progress.set()

    def _record_final(self, ev: ChunkEvents) -> None:
        if self._stream is None:
            return
        line = {
            "chunk_index": ev.chunk_index, "call_id": ev.call_id, "cache_epoch": ev.cache_epoch,
            "outcome": ev.outcome, "output_digest": ev.output_digest, "emitted": ev.emitted,
        }
        self._stream.write(line)  # written and flushed in the log's own thread, in order

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
        """Run ``fn`` in the decode thread as phase ``name``, watched by ``_watch_phases``."""
        cold = plan.chunk_index in self._cold_decode
        deadline = self._phase_deadlines[name]
        t0 = time.monotonic()
        self._running = Running(name, plan.chunk_index, t0, deadline.deadline_s(cold=cold))
        try:
            out = await asyncio.get_running_loop().run_in_executor(self._decoder, fn, *args)
        finally:
            self._running = None
        deadline.observe(time.monotonic() - t0, cold=cold)
        return out

    async def _watch_phases(self) -> None:
        """Fail, naming rank 0's phase and chunk, when a decode or sink exceeds its deadline,
        or naming the last stage when a result is owed for too long."""
        while True:
            await asyncio.sleep(WATCHDOG_TICK_S)
            self._check_owed_result()
            running = self._running
            if running is not None and running.overdue(time.monotonic()):
                ev = self.ledger.get(running.chunk_index)
                raise PhaseStalled(
                    f"rank 0 {running.phase} of chunk {running.chunk_index} exceeded "
                    f"{running.deadline_s:.1f} s",
                    rank=0, phase=running.phase, chunk=None if ev is None else ChunkId.of(ev),
                )

    def _flush(self, ev: ChunkEvents) -> None:
        self.ledger.finish(ev, "flushed")
        self.recorder.gate(ev, "flushed")
        self.flushed += 1
        self._progress.set()
        self._log.info("decode flushed by hard cut", **ids_of(ev))

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
                f"{self._decode_q.qsize()} awaiting decode",
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

