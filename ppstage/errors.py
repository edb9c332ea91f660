"""Typed errors of the runtime, under one root: ``PPStageError``.

A runtime error is not a wire error: ``protocol.ProtocolError`` is for bytes
and metadata on the wire (framing, decoding, invariants, digests), and
``PPStageError`` for everything else the runtime refuses (config, lifecycle,
planner, gate, topology, parity, channels, watchdogs). Both derive from
``protocol.ChunkError``, so every error carries the ``ChunkId`` it concerns
(``exc.chunk``, None where no chunk is involved) and names it in ``str()``.

Errors specific to one concern live beside its code and derive from the root:
``ppstage.config.ConfigError``, ``ppstage.core.planner.PlannerError``,
``ppstage.distributed.topology.WrongGroup``, ``ppstage.model.stage.StageInputError``,
``ppstage.model.stream_inputs.StreamInputError``.
"""

from __future__ import annotations

from protocol import ChunkError, ChunkId

__all__ = [
    "CallCountMismatch",
    "ChannelDead",
    "FutureResult",
    "GateError",
    "IllegalTransition",
    "MissingTensor",
    "OutOfOrderResult",
    "PPStageError",
    "ParityError",
    "RemoteStageError",
    "StateDivergence",
    "UnexpectedMessage",
    "UpstreamFailed",
    "WatchdogExpired",
]


class PPStageError(ChunkError):
    """Base of every runtime error of ppstage (not about wire bytes: see ``ProtocolError``)."""


class IllegalTransition(PPStageError):
    """A plan asks the cache lifecycle for a transition SPEC section 3 does not allow."""


class IllegalRebase(IllegalTransition):
    """A re-base the lifecycle refuses: a negative position, not at a chunk boundary, offset moving up."""


class CallCountMismatch(PPStageError):
    """A stage ran (or reported) a different number of generator calls than planned."""


class GateError(PPStageError):
    """A result that is not merely stale: the pipeline's contract is broken."""


class FutureResult(GateError):
    """A result from an epoch or call that rank 0 has not planned yet."""


class OutOfOrderResult(GateError):
    """A result of the current epoch arrived before an earlier outstanding one."""


class RemoteStageError(GateError):
    """A stage reported an error result for the chunk."""


class MissingTensor(GateError):
    """An ok result lacks the tensor it must carry."""


class StateDivergence(PPStageError):
    """Two ranks that must hold identical lifecycle state report different digests."""


class ParityError(PPStageError):
    """Ranks resolved different settings at start-up."""


class ChannelDead(PPStageError):
    """A point-to-point channel failed, timed out or was half-framed: it is unusable."""


class WatchdogExpired(PPStageError):
    """No message or result arrived within the liveness deadline."""


class UnexpectedMessage(PPStageError):
    """A well-formed message arrived where the pipeline's message sequence allows another."""


class UpstreamFailed(PPStageError):
    """A peer ended the stream with an ``ERROR`` envelope (its reason is in the message)."""


class PhaseStalled(WatchdogExpired):
    """A named phase on a named rank (decode, sink, generator call, hop wait,
    mesh collective, drain) exceeded its deadline: that rank stopped making progress."""

    def __init__(self, message: str, *, rank: int, phase: str, chunk: ChunkId | None = None) -> None:
        super().__init__(message, chunk=chunk)
        self.rank = rank
        self.phase = phase
