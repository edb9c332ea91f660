"""Typed errors of the runtime. All carry the chunk identity they concern."""

from __future__ import annotations

from protocol import ProtocolError


class IllegalTransition(ProtocolError):
    """A plan asks the cache lifecycle for a transition SPEC section 3 does not allow."""


class CallCountMismatch(ProtocolError):
    """A stage ran (or reported) a different number of generator calls than planned."""


class GateError(ProtocolError):
    """A result that is not merely stale: the pipeline's contract is broken."""


class FutureResult(GateError):
    """A result from an epoch or call that rank 0 has not planned yet."""


class OutOfOrderResult(GateError):
    """A result of the current epoch arrived before an earlier outstanding one."""


class RemoteStageError(GateError):
    """A stage reported an error result for the chunk."""


class MissingTensor(GateError):
    """An ok result lacks the tensor it must carry."""


class StateDivergence(ProtocolError):
    """Two ranks that must hold identical lifecycle state report different digests."""


class ParityError(ProtocolError):
    """Ranks resolved different settings at start-up."""


class ChannelDead(ProtocolError):
    """A point-to-point channel failed, timed out or was half-framed: it is unusable."""


class WatchdogExpired(ProtocolError):
    """No message or result arrived within the liveness deadline."""


class PhaseStalled(WatchdogExpired):
    """A named phase on a named rank (decode, sink, generator call, hop wait,
    mesh collective, drain) exceeded its deadline: that rank stopped making progress."""

    def __init__(self, message: str, *, rank: int, phase: str, **ids: int | None) -> None:
        super().__init__(message, **ids)
        self.rank = rank
        self.phase = phase
