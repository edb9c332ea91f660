"""``ResultReceipt``: rank 0's phase C up to the decode queue (SPEC section 2).

receive -> epoch gate -> checks against the shadow lifecycle -> decode path.

Every plan is registered here before its envelope is sent (``expect``): the
epoch gate learns the result is owed, and a shadow ``CacheLifecycle`` is fed
the same plans in the same order as the stages, so every stage's reported
state digest must equal it. After a requested cut, results of the old epoch
still in flight are received (framing) and dropped by epoch; a cut the planner
forced (policy ``cut``) keeps them: they are emitted in plan order.

Bulk bytes stay off the loop: a large result is hashed, and latents files are
written, in the *check* worker thread. An owed result's deadline
(``ResultDeadline``) is checked by the actor's watchdog tick (``check_owed``):
no timer and no task per result.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import torch

from protocol import ChunkResult, DigestMismatch, ErrorEnvelope, action_of

from ppstage.config import PPStageConfig
from ppstage.errors import GateError, PhaseStalled, StateDivergence, UnexpectedMessage, UpstreamFailed
from ppstage.core.gate import EpochGate
from ppstage.core.lifecycle import CacheLifecycle
from ppstage.observability.logs import ids_of
from ppstage.digests import tensor_digest
from ppstage.core.plan import ChunkPlan
from ppstage.model.stream_inputs import StreamInputs
from ppstage.distributed.devices import HostStage
from ppstage.distributed.topology import Role
from ppstage.distributed.transport import Transport
from ppstage.observability.metrics import ChunkLedger
from ppstage.stages.decode_path import DecodePath
from ppstage.stages.deadlines import ResultDeadline

INLINE_DIGEST_BYTES = 256 << 10  # larger results are hashed in the check worker, off the loop


class ResultReceipt:
    """Writes the epoch gate; owns the shadow lifecycle, the plans owed and the result deadline.

    ``wake`` sets the actor's progress signal (a result received or dropped).
    """

    def __init__(
        self,
        config: PPStageConfig,
        role: Role,
        transport: Transport,
        *,
        gate: EpochGate,
        stream: StreamInputs,
        ledger: ChunkLedger,
        decode: DecodePath,
        log,
        wake: Callable[[], None],
        latents_dir: Path | None = None,
    ) -> None:
        rt = config.runtime
        lv = config.liveness
        self.role = role
        self.stream = stream
        self.ledger = ledger
        self.decode = decode
        self.recorder = transport.recorder
        self.latents_dir = latents_dir
        self.gate = gate  # its only writer: ``expect`` and ``admit`` happen here
        self.shadow = CacheLifecycle(config.cache_geometry())
        self.expected_digest: dict[int, str] = {}
        self.plans: dict[int, ChunkPlan] = {}
        self.results = transport.open_inbound(role.leader_of(role.num_stages))
        # A cold chunk's result may take the warm-up deadline plus the steady floor:
        # the stage that is warming up (or stuck) names itself first.
        self.deadline = ResultDeadline(
            minimum_s=rt.result_deadline_min_s, factor=rt.result_deadline_factor,
            warmup_s=lv.warmup_deadline_s + rt.result_deadline_min_s,
        )
        self._log = log
        self._wake = wake
        self._cold: set[int] = set()  # chunk indices planned cold, until their result arrives
        self._host = HostStage(transport.device)
        self._checker = ThreadPoolExecutor(1, thread_name_prefix="stage0-check")
        self._last_result_t: float | None = None
        self._owed_since = time.monotonic()
        self._awaiting = False  # True only while ``_next_result`` waits on the result link

    def mark_cold(self, chunk_index: int) -> None:
        """The chunk was planned cold: while its result is owed, the warm-up deadline holds."""
        self._cold.add(chunk_index)

    def expect(self, plan: ChunkPlan) -> None:
        """Register the plan with the gate and advance the shadow lifecycle (before its send)."""
        if not self.gate.in_flight():
            self._owed_since = time.monotonic()  # a result is owed from now on
        self.gate.expect(plan)
        self.plans[plan.call_id] = plan
        self.shadow.begin_chunk(plan)
        for i in range(plan.expected_generator_calls):
            self.shadow.record_call("recompute" if plan.do_kv_recompute and i == 0 else "denoise")
        self.shadow.end_chunk()
        self.expected_digest[plan.call_id] = self.shadow.digest()
        self.recorder.plan(plan, self.expected_digest[plan.call_id])

    def shutdown(self) -> None:
        self._checker.shutdown(wait=False, cancel_futures=True)

    async def run(self) -> None:
        """The receiver task: gate, check and hand on every result of the last stage."""
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
                self.decode.forget_cold(msg.chunk_index)
                self._log.info("result dropped", reason=verdict.reason, **ids_of(msg))
                self.plans.pop(msg.call_id, None)  # a stale plan is never accepted later
                self.expected_digest.pop(msg.call_id, None)
                if ev is not None and ev.outcome == "in_flight":
                    self.ledger.finish(ev, verdict.reason)
                self._wake()
                continue
            assert latents is not None  # the gate refuses an ok result without it
            checked = next((s.digest for s in msg.tensors if s.name == "latents_out"), None)
            if checked is not None:
                # The receiver thread hashed these very bytes and compared them with the
                # spec's digest (a mismatch arrives as ``item.error``, raised above): no
                # second blake2b on the loop.
                digest = checked
            elif latents.numel() * latents.element_size() > INLINE_DIGEST_BYTES:
                digest = await self._digest_off_loop(latents, msg)
            else:  # hashing a few KiB costs less than the hand-off to a worker and back
                digest = tensor_digest(latents)
            self._check_result(msg, digest)
            plan = self.plans.pop(msg.call_id)
            owed_s = time.monotonic() - self._owed_since
            self._owed_since = time.monotonic()
            now = time.perf_counter()
            if cold:  # stands in for a period until the first steady one (the next warm chunk's)
                self.deadline.observe(owed_s, cold=True)
            elif self._last_result_t is not None:
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
            self._wake()
            await self.decode.put(plan, latents, ev)

    async def _digest_off_loop(self, latents: torch.Tensor, msg: ChunkResult) -> str:
        """The digest of a large result without a spec digest, in the check thread.

        Bounded by the result deadline: that thread also writes ``--latents-out``
        files, and a write stuck on a dead filesystem must end the run naming
        rank 0, not hang it (``check_owed`` does not look while no result link
        is awaited). A rare path (ppstage's own results carry their digest), so
        its timer and task cost the loop nothing per chunk.
        """
        limit = self.deadline.deadline_s(cold=bool(self._cold))
        future = asyncio.get_running_loop().run_in_executor(self._checker, tensor_digest, latents)
        try:
            return await asyncio.wait_for(future, limit)
        except asyncio.TimeoutError:
            raise PhaseStalled(
                f"rank 0 digest check of a result exceeded {limit:.1f} s (its check thread is stuck)",
                rank=0, phase="check", chunk=msg.id,
            ) from None

    async def _next_result(self):
        """The next inbound result (an owed result's deadline is ``check_owed``'s job).

        A plain ``get`` of the result link's mailbox: no timer and no task per
        result on the loop (``asyncio.wait_for`` made both).
        """
        self._awaiting = True
        try:
            return await self.results.get()
        finally:
            self._awaiting = False

    def check_owed(self) -> None:
        """``PhaseStalled`` once a result is owed for longer than the result deadline.

        Re-checked every tick rather than armed once: a result becomes owed
        when an envelope is sent, which may happen at any moment. Only while
        this receipt waits on an empty result link: while it is held up by a
        full decode queue (``D_out``), results may sit unread in the mailbox,
        and the pipeline is not the one that is late.
        """
        if not self._awaiting:
            return
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
