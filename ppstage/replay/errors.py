"""Typed errors of the replay tools (not wire errors: the log bytes have their own, ``protocol.msglog.LogError``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocol import ChunkId

from ppstage.errors import PPStageError

if TYPE_CHECKING:
    from ppstage.config import Drill


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


class ReplayRunFailed(ReplayError):
    """``replay --pipeline``: the fresh pipeline started and then failed or ran past ``--timeout``.

    Not unusable logs: the CLI exits 1 for it, as for any run that started and failed.
    """


class DrillsRecorded(ReplayError):
    """``replay --pipeline`` of a run recorded with fault drills: a re-run would fire them again.

    ``drills`` are the recorded config's ``[[faults.drill]]`` entries; the message
    names each one and the ``--without-drills`` way out.
    """

    def __init__(self, message: str, *, drills: "tuple[Drill, ...]") -> None:
        super().__init__(message)
        self.drills = drills
