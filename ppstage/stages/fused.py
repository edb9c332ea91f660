"""``FusedChunkJob``: a leader's whole chunk as ONE worker-thread job (``runtime.fused_steps``).

The envelope's mesh broadcast, the recompute call and every denoise step run
in the stage's worker thread, each step taking its input hop from the link's
``Mailbox`` and queueing its output hop to the sender thread itself
(``OutputGate``), so no hop passes through the loop on its way through this
stage (docs/performance.md, "Fused steps"). The frames, checks and drills are
the loop path's (``loop_steps.py``), in the same order on every link.

The job owns no deadline: it writes the phase it is in into a ``JobProgress``
and returns each timed phase's seconds; the leader's loop watches the one and
feeds the other to its deadlines (``StageLeader._fused_chunk``).
"""

from __future__ import annotations

import threading
import time
from typing import Callable, NamedTuple

import torch

from protocol import ChunkId, InferEnvelope, StageReport

from ppstage.digests import tensor_digest
from ppstage.errors import PPStageError
from ppstage.faults.drills import RankDrills, stall
from ppstage.model.scheduler import RECOMPUTE_TIMESTEP, FlowMatchScheduler, denoise_step, step_noise
from ppstage.distributed.topology import Role
from ppstage.distributed.transport import Inbound, Mailbox, MailboxInterrupted, Transport
from ppstage.stages.calls import LeaderCalls, StepSchedule
from ppstage.stages.envelopes import check_hop, hop, ok_result
from ppstage.stages.worker import JobProgress

# A fused step's own wait for its hop ends first and names the silent peer; the
# loop's watch of the same wait fires only if the worker is stuck elsewhere.
HOP_WAIT_GRACE_S = 1.0
# The loop looks at a fused job's progress this many times per (shortest) phase deadline.
WATCH_TICKS_PER_DEADLINE = 4


class StepLimits(NamedTuple):
    call_s: float  # the generator call's phase deadline
    mesh_s: float  # the end of chunk's mesh digest check


class OutputGate:
    """A fused job's output frames, shut by the loop when the stage is ending.

    ``queue`` (worker thread) checks and queues under the lock that ``close``
    (the loop, to relay an ERROR or after a fatal link) takes to shut the gate:
    once closed, no frame of a job can follow that ERROR on any link. No future
    per frame: a send that fails reaches the loop as the fatal link.
    """

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        self._ending = threading.Event()
        self._lock = threading.Lock()

    def queue(self, dst: int, msg, tensors: list[torch.Tensor]) -> None:
        """Worker thread: queue an output frame, unless the stage is ending."""
        with self._lock:
            if self._ending.is_set():
                raise MailboxInterrupted("the stage is ending: the output is not sent")
            self._transport.enqueue(dst, msg, tensors)

    def close(self) -> None:
        """The loop: no frame is queued after this returns."""
        with self._lock:  # held by a worker only for one preflight and queue put
            self._ending.set()


class FusedChunkJob(StepSchedule):
    """One per leader; ``run`` is one chunk's job, on the worker thread.

    What it reads of the leader comes in explicitly: the model work
    (``LeaderCalls``), the inbound mailboxes, the output gate and the leader's
    hop-wait limit and its error (``wait_limit``, ``wait_expired``: the idle,
    warm-up and drain deadlines stay the loop's).
    """

    def __init__(
        self,
        role: Role,
        calls: LeaderCalls,
        drills: RankDrills,
        scheduler: FlowMatchScheduler,
        *,
        upstream: Mailbox[Inbound],
        handback: Mailbox[Inbound] | None,
        outputs: OutputGate,
        wait_limit: Callable[[ChunkId | None], float],
        wait_expired: Callable[[int | None, str, float, ChunkId | None], PPStageError],
    ) -> None:
        super().__init__(role, calls, drills, scheduler, upstream, handback)
        self._outputs = outputs
        self._wait_limit = wait_limit
        self._wait_expired = wait_expired

    def _step_source(self, i: int) -> tuple[Mailbox[Inbound], int | None, str] | None:
        """Where step ``i``'s input comes from: a mailbox, its source rank and hop target; None if local."""
        if not self.first:
            return self.upstream, self.role.prev_rank, "hidden"
        if i == 0 or self.handback is None:
            return None  # step 0: the envelope's latents; K == 1: our own re-noised latent
        return self.handback, self.role.handback_src, "latent"

    def _input_phase(self, env: InferEnvelope, kind: str, i: int, source, limits: StepLimits) -> tuple:
        """The phase the ``kind`` call of step ``i`` starts in, with its limit, for ``JobProgress``."""
        if source is None:
            return "generator call", limits.call_s, f"generator call ({kind} step {i})"
        # The worker's own wait ends first and names the silent peer (``HOP_WAIT_GRACE_S``).
        return "hop wait", self._wait_limit(env.id) + HOP_WAIT_GRACE_S, f"the {kind} hop of step {i}", source[1]

    def _take_hop(self, env: InferEnvelope, source, kind: str, step: int) -> Inbound:
        """The next frame of ``source``'s mailbox, checked to be this hop."""
        mailbox, src, target = source
        wait_s = self._wait_limit(env.id)
        item = mailbox.take(wait_s)
        if item is None:
            raise self._wait_expired(src, f"the {kind} hop of step {step}", wait_s, env.id)
        check_hop(item, env, kind, step, target)
        return item

    def run(
        self,
        env: InferEnvelope,
        tensors: dict[str, torch.Tensor],
        ordered: list[torch.Tensor],
        steps: list[int],
        x_t: torch.Tensor,
        limits: StepLimits,
        progress: JobProgress,
        t0: float,
    ) -> list[tuple[str, float]]:
        """Worker thread: the chunk (``LoopSteps.run``'s body, drills included).

        Returns ``(phase, seconds)`` of every timed phase for the deadlines'
        history. Raises what ``LoopSteps.run`` would: the frame's
        ``ProtocolError``, ``UnexpectedMessage``, ``UpstreamFailed``,
        ``IllegalTransition`` and friends from the lifecycle, ``PhaseStalled`` /
        ``WatchdogExpired`` for a hop that does not come in time;
        ``MailboxInterrupted`` once the loop has interrupted it.
        """
        calls = self.calls
        timings: list[tuple[str, float]] = []
        b0 = time.monotonic()
        calls.begin(env, ordered)
        timings.append(("mesh collective", time.monotonic() - b0))
        if self.drills.fires("wrong_group_collective", env.chunk_index):
            calls.wrong_group_collective()  # B10: refused before it is issued
        if env.do_kv_recompute:
            if self.first:
                x = tensors["context_frames_override"]
            else:
                source = (self.upstream, self.role.prev_rank, "hidden")
                progress.enter(*self._input_phase(env, "recompute", -1, source, limits))
                x = self._take_hop(env, source, "recompute", -1).tensors["hidden"]
            progress.enter("generator call", limits.call_s, "generator call (recompute)")
            c0 = time.monotonic()
            y = calls.call(env, "recompute", -1, RECOMPUTE_TIMESTEP, x)
            timings.append(("generator call", time.monotonic() - c0))
            if not self.last:
                progress.enter("output", None, "the output of the recompute call")
                msg = hop(env, call_kind="recompute", step=-1, target="hidden", tensor=y)
                self._outputs.queue(self.next_rank, msg, [y])
        n = len(steps)
        upstream_reports: tuple[StageReport, ...] = ()
        # The last stage's re-noise of each step depends only on the plan: drawn now,
        # while the first hop is still on its way, not between a call and its hop.
        noises = [step_noise(env, i, tuple(x_t.shape), device=x_t.device) for i in range(n - 1)] if self.last else []
        for i in range(n):
            final = i == n - 1
            source = self._step_source(i)
            progress.enter(*self._input_phase(env, "denoise", i, source, limits))
            if source is None:
                x = x_t
            else:
                item = self._take_hop(env, source, "denoise", i)
                x = item.tensors["hidden" if source[2] == "hidden" else "latents"]
                if not self.first:
                    upstream_reports = item.msg.stages
            progress.enter("generator call", limits.call_s, f"generator call (denoise step {i})")
            c0 = time.monotonic()
            if i == 1 and self.drills.fires("skip_generator_call", env.chunk_index):
                pass  # B2: step 1's call is skipped; step 0's output stands in for it (same shape)
            else:
                y = calls.call(env, "denoise", i, float(steps[i]), x)
            call_s, end_s = time.monotonic() - c0, None
            report: tuple[StageReport, ...] = ()
            if final and self.drills.fires("extra_generator_call", env.chunk_index):
                calls.call(env, "denoise", i, float(steps[i]), x)  # B2: one call too many
            drill = self.drills.fires("stall_generator_call", env.chunk_index) if final else None
            if drill is not None:  # a stuck kernel: only the loop's watch of this phase can end it
                progress.enter("generator call", limits.call_s, f"generator call (denoise step {i})")
                stall(drill)
            if final:
                progress.enter("mesh collective", limits.mesh_s, "end of chunk (mesh digest check)")
                e0 = time.monotonic()
                state = calls.end(env, y)
                end_s = time.monotonic() - e0
                report = (calls.report(state, t0),)
            timings.append(("generator call", call_s))
            if end_s is not None:
                timings.append(("mesh collective", end_s))
            # Queueing the output cannot hang (preflight, then a queue put); the
            # only wait here is a B8 drill's deliberate delay, which no deadline covers.
            progress.enter("output", None, f"the output of denoise step {i}")
            if not self.last:
                msg = hop(env, call_kind="denoise", step=i, target="hidden", tensor=y,
                          stages=upstream_reports + report)
                self._outputs.queue(self.next_rank, msg, [y])
                continue
            x0, x_next = denoise_step(self.scheduler, env, steps, i, x_t, y, noise=noises[i] if not final else None)
            if final:
                result = ok_result(env, x0, tensor_digest(x0), upstream_reports + report)
                delay = self.drills.fires("delay_result", env.chunk_index)
                if delay is not None:  # B8: a late result (rank 0 may cut meanwhile)
                    time.sleep(delay.seconds)
                self._outputs.queue(0, result, [x0])
                continue
            assert x_next is not None
            x_t = x_next
            if self.role.handback_dst is not None:
                msg = hop(env, call_kind="denoise", step=i + 1, target="latent", tensor=x_next)
                self._outputs.queue(self.role.handback_dst, msg, [x_next])
        return timings
