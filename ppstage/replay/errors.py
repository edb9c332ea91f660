"""Typed errors of the replay tools (not wire errors: the log bytes have their own, ``protocol.msglog.LogError``)."""

from __future__ import annotations

from protocol import ChunkId

from ppstage.errors import PPStageError


class ReplayError(PPStageError):
    """Logs that cannot be replayed: rank 0's log missing, no epoch boundary, a config absent."""


class ReplayMismatch(ReplayError):
    """A replayed value differs from the recorded one: names the chunk, the stage/rank and the field."""

    def __init__(self, message: str, *, chunk: ChunkId, where: str, field: str,
                 recorded: str, replayed: str) -> None:
        super().__init__(message, chunk=chunk)
        self.where = where
        self.field = field
        self.recorded = recorded
        self.replayed = replayed
