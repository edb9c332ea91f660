"""Where drills act on messages: rank 0's envelope, and a rank's own exit.

Each function is a no-op unless the rank's ``RankDrills`` carry a drill of that
kind at that chunk. The send-side drills that must reach the receiver despite
the sender's preflight (``unknown_version_envelope``, ``drop_context_override``)
return a ``drill_frame`` rewrite for ``Transport.send``: preflight still runs
every check except ``validate``, and the rewrite edits the encoded header.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

import msgspec
import structlog

from protocol import InferEnvelope
from protocol.validate import CONTEXT_TENSOR

from ppstage.faults.drills import RankDrills

log = structlog.get_logger("ppstage.faults")

UNKNOWN_VERSION = 99
_VERSION_OFFSET = 4  # header layout: magic (4 bytes), then the version byte

FrameRewrite = Callable[[bytes], bytes]


def _unknown_version(header: bytes) -> bytes:
    return header[:_VERSION_OFFSET] + bytes([UNKNOWN_VERSION]) + header[_VERSION_OFFSET + 1:]


def _unchanged(header: bytes) -> bytes:
    return header


def rank0_envelope_drill(drills: RankDrills, env: InferEnvelope, tensors: list) -> tuple[InferEnvelope, list, FrameRewrite | None]:
    """Apply rank 0's send-side drills at ``env.chunk_index``; returns (env, tensors, rewrite)."""
    k = env.chunk_index
    rewrite: FrameRewrite | None = None
    if drills.fires("corrupt_envelope", k):
        tensors[0].add_(1.0)  # after the spec's digest was taken: the receiver must notice
    if drills.fires("perturb_start_frame", k):
        env = msgspec.structs.replace(env, current_start_frame=env.current_start_frame + 1)
    if drills.fires("wrong_type_field", k):
        # B18: a float where the schema says int; the sender's preflight must refuse it.
        env = msgspec.structs.replace(env, current_start_frame=float(env.current_start_frame))
    if drills.fires("payload_length_lie", k):
        # B19: the payload is one frame shorter than its (valid) spec says.
        tensors = [tensors[0][:-1], *tensors[1:]]
    if drills.fires("unknown_version_envelope", k):
        rewrite = _unknown_version
    if drills.fires("drop_context_override", k):
        names = [s.name for s in env.tensors]
        if CONTEXT_TENSOR in names:
            i = names.index(CONTEXT_TENSOR)
            env = msgspec.structs.replace(env, tensors=env.tensors[:i] + env.tensors[i + 1:])
            tensors = tensors[:i] + tensors[i + 1:]
            rewrite = _unchanged  # skip validate: the receiver must refuse it (B3)
        else:
            log.warning("drop_context_override: chunk plans no recompute, nothing to drop", chunk_index=k)
    return env, tensors, rewrite


def exit_if_drilled(drills: RankDrills, chunk_index: int, rank: int) -> None:
    """``exit_rank``: this process dies at ``chunk_index`` as a crashed rank would (B11)."""
    if drills.fires("exit_rank", chunk_index):
        log.error("drill exit_rank: exiting now", rank=rank, chunk_index=chunk_index)
        sys.stderr.flush()
        os._exit(1)
