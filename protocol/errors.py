"""Typed errors raised at the wire boundary.

Every error carries the ``ChunkId`` of the message it concerns when that
identity is known, so a log line or an error result can always name the
chunk that went wrong. Runtime errors (lifecycle, planner, gate, channels,
watchdogs) are not wire errors: they derive from ``ppstage.errors.PPStageError``.
"""

from __future__ import annotations

from .identity import ChunkId


class ChunkError(Exception):
    """Base of every typed ppstage error: a reason and, where known, the chunk it concerns.

    Two roots derive from it: ``ProtocolError`` (bytes and metadata on the wire)
    and ``ppstage.errors.PPStageError`` (everything else the runtime refuses).

    Parameters
    ----------
    message : str
        What went wrong, as one line (kept as ``reason``).
    chunk : ChunkId, optional
        The identity of the message or call concerned, when known; ``str()``
        appends it, once: a reason that already ends with it (a remote stage's
        error text, wrapped by the rank that received it) is not given it again.
    """

    def __init__(self, message: str, *, chunk: ChunkId | None = None) -> None:
        super().__init__(message)
        self.reason = message
        self.chunk = chunk

    @property
    def call_id(self) -> int | None:
        return None if self.chunk is None else self.chunk.call_id

    @property
    def chunk_index(self) -> int | None:
        return None if self.chunk is None else self.chunk.chunk_index

    @property
    def cache_epoch(self) -> int | None:
        return None if self.chunk is None else self.chunk.cache_epoch

    def __str__(self) -> str:
        if self.chunk is None:
            return self.reason
        suffix = f" ({self.chunk})"
        return self.reason if self.reason.endswith(suffix) else self.reason + suffix


class ProtocolError(ChunkError):
    """Base of every error about a message's bytes, framing or invariants on the wire."""


class FramingError(ProtocolError):
    """The fixed header is malformed: bad magic, length, count or checksum."""


class UnsupportedVersion(ProtocolError):
    """The peer speaks a protocol major version this build does not."""


class UnknownAction(ProtocolError):
    """The header or metadata names an action tag this build does not know."""


class MetadataError(ProtocolError):
    """The metadata bytes do not decode into a known wire type."""


class TensorSpecError(ProtocolError):
    """A tensor spec is inconsistent: dtype not allowed, bytes != shape x itemsize."""


class InvariantViolation(ProtocolError):
    """A cross-field invariant of a message does not hold (see ``validate``)."""


class DigestMismatch(ProtocolError):
    """Received bytes do not match the digest their sender declared."""
