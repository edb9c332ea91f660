"""``LeaderCalls``: a stage leader's model work of a chunk, run on its worker thread.

Begin the chunk (the leader's own lifecycle check, then the envelope into the
mesh), each generator call (its hop into the mesh first), end the chunk (the
mesh digest check) and the stage's report of it. Both step schedules run
these: the loop path (``loop_steps.py``) one worker job at a time, the fused
path (``fused.py``) inside its one job per chunk. ``begin``, ``call``, ``end``
and ``wrong_group_collective`` run the model or issue mesh collectives, so they
run only on the worker thread; ``report`` reads the model's state digest, on
whichever side ran ``end`` (the loop path calls it on the loop, after that job).
"""

from __future__ import annotations

import time

import torch

from protocol import InferEnvelope, StageReport

from ppstage.digests import tensor_digest
from ppstage.faults.drills import RankDrills
from ppstage.model.backend import GeneratorBackend
from ppstage.model.scheduler import FlowMatchScheduler
from ppstage.observability.recorder import MessageRecorder
from ppstage.distributed.topology import MeshComm, Role
from ppstage.distributed.transport import Inbound, Mailbox
from ppstage.stages.envelopes import hop
from ppstage.stages.mesh import MeshRelay


class LeaderCalls:
    """The leader's model and mesh relay; the one object that drives them (on the worker thread)."""

    def __init__(
        self,
        role: Role,
        model: GeneratorBackend,
        relay: MeshRelay,
        recorder: MessageRecorder,
        *,
        call_cost_s: float,
        device: torch.device | str,
    ) -> None:
        self.role = role
        self.model = model
        self.relay = relay
        self._recorder = recorder
        self._first = role.is_first_stage
        self._call_cost_s = call_cost_s
        self._device = device

    def begin(self, env: InferEnvelope, ordered: list[torch.Tensor]) -> None:
        # The leader's own lifecycle check runs first: a plan it must refuse (an
        # illegal transition) is refused before any mesh collective is entered.
        cond = ordered[[s.name for s in env.tensors].index("conditioning_embeds")]
        self.model.begin_chunk(env, cond)
        self.relay.publish(env, ordered)

    def call(self, env: InferEnvelope, kind: str, step: int, timestep: float, x: torch.Tensor) -> torch.Tensor:
        if self.relay.active:
            target = "latent" if self._first else "hidden"
            self.relay.publish(hop(env, call_kind=kind, step=step, target=target, tensor=x), [x])
        y = self.model.run_call(kind, timestep, x)  # type: ignore[arg-type]
        if self._call_cost_s:
            time.sleep(self._call_cost_s)  # simulated generator cost (config.runtime)
        return y

    def end(self, env: InferEnvelope, last_output: torch.Tensor):
        state = self.model.end_chunk()
        self._recorder.chunk(env, self.role.stage, state, self.model.state_digest(), tensor_digest(last_output))
        if self.relay.active:
            self.relay.check_digests(self.model.state_digest(), tensor_digest(last_output), env.id)
        return state

    def report(self, state, t0: float) -> StageReport:
        """This stage's report of the chunk that began at ``t0`` (``perf_counter``), from its end state."""
        return StageReport(
            stage=self.role.stage,
            current_start_frame=state.current_start_frame,
            global_end_index=state.global_end_index,
            local_end_index=state.local_end_index,
            state_digest=self.model.state_digest(),
            observed_generator_calls=state.calls_made,
            duration_s=time.perf_counter() - t0,
        )

    def wrong_group_collective(self) -> None:
        """B10 drill: a collective on another stage's mesh (refused before it is issued)."""
        other = self.role.stage % self.role.num_stages + 1  # another stage's mesh
        if other == self.role.stage:
            other = 0  # a single stage: rank 0's side, which no stage may join
        MeshComm(self.role, self.relay.comm.groups, stage=other).all_reduce(torch.zeros(1, device=self._device))


class StepSchedule:
    """What both step schedules are given of their leader: its place in the chain, its model
    work, drills and scheduler, and its inbound mailboxes (``LoopSteps``, ``FusedChunkJob``).

    ``upstream``: the previous stage's hops (rank 0's envelopes for stage 1);
    ``handback``: the last stage's re-noised latents back to stage 1 (None unless K > 1
    and this is stage 1).
    """

    def __init__(
        self,
        role: Role,
        calls: LeaderCalls,
        drills: RankDrills,
        scheduler: FlowMatchScheduler,
        upstream: Mailbox[Inbound],
        handback: Mailbox[Inbound] | None,
    ) -> None:
        self.role = role
        self.calls = calls
        self.drills = drills
        self.scheduler = scheduler
        self.first = role.is_first_stage
        self.last = role.is_last_stage
        assert role.next_rank is not None
        self.next_rank = role.next_rank  # rank 0 for the last stage (results)
        self.upstream = upstream
        self.handback = handback
