"""Relaying wire messages from a stage leader into its tensor-parallel mesh.

The leader has already received and fully validated a message before it
publishes it here (SPEC section 5: validate before any mesh collective), so
followers never see a message the leader would refuse. A frame is broadcast
as header -> metadata -> tensors in spec order, the same layout as the P2P
framing; followers size every receive from the checked header and specs.

Every call here is a collective on the stage's mesh group and must be issued
from the stage's one worker thread (one owner per group, so the collective
order is the same on every mesh rank).
"""

from __future__ import annotations

import time

import structlog
import torch

from protocol import (
    HEADER_SIZE,
    ChunkId,
    MAX_META_BYTES,
    WireMessage,
    action_of,
    decode_metadata,
    encode_frame,
    parse_header,
)

from ppstage.errors import StateDivergence
from ppstage.distributed.topology import MeshComm
from ppstage.distributed.transport import prepare_tensors, rebuild
from ppstage.observability.recorder import current as current_recorder


class MeshRelay:
    """Leader: ``publish``; followers: ``receive``. Buffers are created once."""

    def __init__(
        self, comm: MeshComm, leader_rank: int, *, extra_collective: bool = False, device: torch.device | str = "cpu"
    ) -> None:
        self.comm = comm
        self.device = torch.device(device)  # the mesh backend's: cuda on NCCL
        self.leader_rank = leader_rank
        # runtime.debug_extra_collective: one more all_reduce per chunk. It changes
        # the collective count, which is why the parity handshake compares it.
        self.extra_collective = extra_collective
        self._log = structlog.get_logger("ppstage.mesh").bind(
            rank=comm.role.rank, stage=comm.stage, group=f"mesh{comm.stage}"
        )
        self._header = torch.empty(HEADER_SIZE, dtype=torch.uint8, device=self.device)
        self._meta = torch.empty(MAX_META_BYTES, dtype=torch.uint8, device=self.device)
        self._digest = torch.empty(32, dtype=torch.uint8, device=self.device)
        self.recorder = current_recorder()  # message log + flight recorder of this process
        self._group_name = f"mesh{comm.stage}"

    @property
    def active(self) -> bool:
        return self.comm.size > 1

    def publish(self, msg: WireMessage, tensors: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> None:
        if not self.active:
            return
        chunk = msg.id
        _, flats = prepare_tensors(msg.tensors, tensors, self.device, fill_digests=False, chunk=chunk)
        head, meta = encode_frame(msg)
        t_ns = time.monotonic_ns()
        self._header.copy_(torch.frombuffer(bytearray(head), dtype=torch.uint8))
        self.comm.broadcast(self._header, self.leader_rank)
        view = self._meta[: len(meta)]
        view.copy_(torch.frombuffer(bytearray(meta), dtype=torch.uint8))
        self.comm.broadcast(view, self.leader_rank)
        for flat in flats:
            self.comm.broadcast(flat, self.leader_rank)
        self._log.debug("mesh.published", action=action_of(msg), **chunk.fields())
        self.recorder.message("publish", -1, self._group_name, msg, flats, header=head, meta=meta, t_ns=t_ns)

    def receive(self) -> tuple[WireMessage, dict[str, torch.Tensor]]:
        self.comm.broadcast(self._header, self.leader_rank)
        head = bytes(self._header.cpu().numpy())
        header = parse_header(head)
        view = self._meta[: header.meta_len]
        self.comm.broadcast(view, self.leader_rank)
        meta = bytes(view.cpu().numpy())  # the buffers live on the mesh's device (cuda on NCCL)
        msg = decode_metadata(header, head, meta)
        tensors: dict[str, torch.Tensor] = {}
        flats = []
        for spec in msg.tensors:
            flat = torch.empty(spec.nbytes, dtype=torch.uint8, device=self.device)
            self.comm.broadcast(flat, self.leader_rank)
            tensors[spec.name] = rebuild(spec, flat)
            flats.append(flat)
        self.recorder.message("recv", self.leader_rank, self._group_name, msg, flats, header=head, meta=meta)
        return msg, tensors

    def check_digests(self, state_digest: str, output_digest: str, chunk: ChunkId) -> None:
        """Every mesh rank compares (lifecycle state, last call's output) with the others'.

        Two 16-byte digests in one all_gather: the state must be identical, and
        so must the output, bitwise (every rank holds the same all-reduced sums).
        """
        if not self.active:
            return
        raw = bytes.fromhex(state_digest) + bytes.fromhex(output_digest)
        self._digest.copy_(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
        gathered = [bytes(t.cpu().numpy()) for t in self.comm.all_gather(self._digest)]
        if self.extra_collective:
            self.comm.all_reduce(torch.zeros(1, device=self.device))
        ranks = self.comm.role.ranks_of(self.comm.stage)
        for what, part in (("lifecycle states", slice(0, 16)), ("call outputs", slice(16, 32))):
            values = [g[part].hex() for g in gathered]
            if len(set(values)) != 1:
                detail = ", ".join(f"rank {r}: {v[:8]}" for r, v in zip(ranks, values))
                raise StateDivergence(f"mesh ranks hold different {what} ({detail})", chunk=chunk)
