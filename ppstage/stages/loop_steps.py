"""``LoopSteps``: a leader's chunk with every hop through the loop (``runtime.fused_steps = false``).

The loop awaits each input hop from its link's mailbox, runs each piece of
model work as its own worker job under that phase's deadline, and sends each
output hop itself. The fused path (``fused.py``) runs the same frames, checks
and drills, in the same order, as one worker job per chunk.

It owns no deadline and no wait: the leader's ``timed`` (a worker job under a
phase deadline), ``next`` (the next frame of a mailbox under the idle deadline)
and ``work`` (a worker job without one) come in explicitly.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

import torch

from protocol import ChunkId, InferEnvelope, StageReport

from ppstage.digests import tensor_digest
from ppstage.faults.drills import RankDrills, stall
from ppstage.model.scheduler import RECOMPUTE_TIMESTEP, FlowMatchScheduler, denoise_step
from ppstage.distributed.topology import Role
from ppstage.distributed.transport import Inbound, Mailbox, Transport
from ppstage.observability.logs import ids_of
from ppstage.stages.calls import LeaderCalls, StepSchedule
from ppstage.stages.envelopes import check_hop, hop, ok_result


class LoopSteps(StepSchedule):
    """One per leader; ``run`` is one chunk, on the loop."""

    def __init__(
        self,
        role: Role,
        calls: LeaderCalls,
        drills: RankDrills,
        scheduler: FlowMatchScheduler,
        transport: Transport,
        *,
        upstream: Mailbox[Inbound],
        handback: Mailbox[Inbound] | None,
        timed: Callable[..., Awaitable[Any]],
        next: Callable[[Mailbox[Inbound], str, int | None, ChunkId | None], Awaitable[Inbound]],
        work: Callable[..., Awaitable[Any]],
        log: Any,
    ) -> None:
        super().__init__(role, calls, drills, scheduler, upstream, handback)
        self.transport = transport
        self._timed = timed
        self._next = next
        self._work = work
        self._log = log

    async def run(self, env: InferEnvelope, tensors: dict[str, torch.Tensor],
                  ordered: list[torch.Tensor], steps: list[int], x_t: torch.Tensor, t0: float) -> None:
        """The chunk: the envelope's mesh broadcast, the recompute call if planned, the denoise steps."""
        calls = self.calls
        await self._timed("mesh collective", "mesh broadcast of the envelope", env, calls.begin, env, ordered)
        if self.drills.fires("wrong_group_collective", env.chunk_index):
            await self._work(calls.wrong_group_collective)  # B10: refused before it is issued
        if env.do_kv_recompute:
            if self.first:
                x = tensors["context_frames_override"]
            else:
                x = (await self._hop(self.upstream, env, "recompute", -1, "hidden")).tensors["hidden"]
            y = await self._timed("generator call", "generator call (recompute)", env,
                                  calls.call, env, "recompute", -1, RECOMPUTE_TIMESTEP, x)
            if not self.last:
                await self.transport.send(self.next_rank, hop(env, call_kind="recompute", step=-1, target="hidden", tensor=y), [y])
        await self._steps(env, steps, x_t, t0)

    async def _steps(self, env: InferEnvelope, steps: list[int], x_t: torch.Tensor, t0: float) -> None:
        """The denoise steps, each hop in and out through the loop."""
        calls = self.calls
        n = len(steps)
        upstream_reports: tuple[StageReport, ...] = ()
        for i, t in enumerate(steps):
            if not self.first:
                h = await self._hop(self.upstream, env, "denoise", i, "hidden")
                x = h.tensors["hidden"]
                upstream_reports = h.msg.stages
            elif i == 0 or self.handback is None:
                x = x_t  # step 0: the envelope's latents; K == 1: our own re-noised latent
            else:
                x = (await self._hop(self.handback, env, "denoise", i, "latent")).tensors["latents"]
            final = i == n - 1
            if i == 1 and self.drills.fires("skip_generator_call", env.chunk_index):
                pass  # B2: step 1's call is skipped; step 0's output stands in for it (same shape)
            else:
                y = await self._timed("generator call", f"generator call (denoise step {i})", env,
                                      calls.call, env, "denoise", i, float(t), x)
            report: tuple[StageReport, ...] = ()
            if final and self.drills.fires("extra_generator_call", env.chunk_index):
                await self._work(calls.call, env, "denoise", i, float(t), x)  # B2: one call too many
            drill = self.drills.fires("stall_generator_call", env.chunk_index) if final else None
            if drill is not None:  # a stuck kernel: only the deadlines can end this
                await self._timed("generator call", f"generator call (denoise step {i})", env, stall, drill)
            if final:
                state = await self._timed("mesh collective", "end of chunk (mesh digest check)", env,
                                          calls.end, env, y)
                report = (calls.report(state, t0),)
            if not self.last:
                msg = hop(env, call_kind="denoise", step=i, target="hidden", tensor=y,
                          stages=upstream_reports + report)
                await self.transport.send(self.next_rank, msg, [y])
                continue
            x0, x_next = denoise_step(self.scheduler, env, steps, i, x_t, y)
            if final:
                result = ok_result(env, x0, tensor_digest(x0), upstream_reports + report)
                delay = self.drills.fires("delay_result", env.chunk_index)
                if delay is not None:  # B8: a late result (rank 0 may cut meanwhile)
                    await asyncio.sleep(delay.seconds)
                await self.transport.send(0, result, [x0])
                self._log.debug("result sent", dst=0, **ids_of(env))
            else:
                assert x_next is not None
                x_t = x_next
                if self.role.handback_dst is not None:
                    msg = hop(env, call_kind="denoise", step=i + 1, target="latent", tensor=x_next)
                    await self.transport.send(self.role.handback_dst, msg, [x_next])

    async def _hop(self, queue: Mailbox[Inbound], env: InferEnvelope, kind: str, step: int, target: str) -> Inbound:
        src = self.role.prev_rank if queue is self.upstream else self.role.handback_src
        item = await self._next(queue, f"the {kind} hop of step {step}", src, env.id)
        check_hop(item, env, kind, step, target)
        return item
