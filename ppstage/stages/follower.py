"""``MeshFollower``: a non-leader rank of a stage mesh (tensor parallel, ``topology.tp > 1``).

It owns its shard of the stage's heads and MLP and their caches, and follows
the leader's mesh broadcasts in its worker thread (``MeshRelay.receive``):
an envelope begins a chunk, each hop is one generator call, the chunk's last
call ends it and the state and output digests are compared across the mesh.
It never talks P2P; the leader (``ppstage.stages.leader``) does.
"""

from __future__ import annotations

import time

import structlog
import torch

from protocol import ErrorEnvelope, InferEnvelope, ProtocolError, ShutdownEnvelope, StageHop

from ppstage.config import PPStageConfig
from ppstage.digests import tensor_digest
from ppstage.errors import PPStageError, UnexpectedMessage
from ppstage.faults.drills import RankDrills, out_of_band_reset
from ppstage.faults.inject import exit_if_drilled
from ppstage.model.scheduler import RECOMPUTE_TIMESTEP
from ppstage.distributed.topology import MeshComm, Role
from ppstage.observability.logs import ids_of
from ppstage.stages.deadlines import WarmupTracker
from ppstage.stages.leader import build_stage_model
from ppstage.stages.mesh import MeshRelay

log = structlog.get_logger("ppstage.stage")


class MeshFollower:
    """A non-leader mesh rank: follows the leader's broadcasts in its worker thread."""

    def __init__(
        self, config: PPStageConfig, role: Role, comm: MeshComm, *, device: torch.device | str = "cpu"
    ) -> None:
        self.config = config
        self.role = role
        self.model = build_stage_model(config, role, comm, device)
        self.relay = MeshRelay(
            comm, role.leader_of(role.stage), extra_collective=config.runtime.debug_extra_collective,
            device=device,
        )
        self.drills = RankDrills(config.faults, role.rank)
        self._warmup = WarmupTracker()
        self.cold = True  # read by the watchdog thread: a cold chunk gets the warm-up deadline
        self.last_activity = time.monotonic()
        self._log = log.bind(rank=role.rank, stage=role.stage, group=f"mesh{role.stage}")

    def run_blocking(self) -> int:
        env: InferEnvelope | None = None
        steps: list[int] = []
        try:
            while True:
                msg, tensors = self.relay.receive()
                self.last_activity = time.monotonic()
                if isinstance(msg, InferEnvelope):
                    env = msg
                    steps = [int(t) for t in tensors["denoising_step_list"].tolist()]
                    exit_if_drilled(self.drills, env.chunk_index, self.role.rank)
                    self.cold = self._warmup.enter((env.num_frames, env.height, env.width, tuple(steps)))
                    self.model.begin_chunk(env, tensors["conditioning_embeds"])
                elif isinstance(msg, StageHop):
                    if env is None or (msg.cache_epoch, msg.call_id) != (env.cache_epoch, env.call_id):
                        raise UnexpectedMessage("mesh hop without its envelope", chunk=msg.id)
                    t = RECOMPUTE_TIMESTEP if msg.call_kind == "recompute" else float(steps[msg.step])
                    y = self.model.run_call(msg.call_kind, t, next(iter(tensors.values())))
                    if self.model.lifecycle.state.calls_made == env.expected_generator_calls:
                        state = self.model.end_chunk()
                        self.relay.recorder.chunk(env, self.role.stage, state, self.model.state_digest(), tensor_digest(y))
                        self.relay.check_digests(self.model.state_digest(), tensor_digest(y), env.id)
                        if self.drills.fires("reset_cache_one_rank", env.chunk_index):
                            out_of_band_reset(self.model)  # B6
                elif isinstance(msg, ShutdownEnvelope):
                    self._log.info("shutdown", **ids_of(msg))
                    return 0
                elif isinstance(msg, ErrorEnvelope):
                    self._log.error("terminal action from leader", reason=msg.reason, **ids_of(msg))
                    return 1
        except (ProtocolError, PPStageError) as exc:
            self._log.error("mesh follower failed", reason=str(exc), error=type(exc).__name__)
            self.relay.recorder.event("failure", f"{type(exc).__name__}: {exc}")
            return 1
        except Exception as exc:  # a collective failing because a mesh peer died
            self._log.error("mesh follower failed", reason=str(exc).splitlines()[0], error=type(exc).__name__)
            return 1
