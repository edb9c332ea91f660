"""Typed errors raised at the wire boundary.

Every error carries the identity of the message it concerns (``call_id``,
``chunk_index``, ``cache_epoch``) when that identity is known, so a log line
or an error result can always name the chunk that went wrong.
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base of every error about a message's bytes, framing or invariants."""

    def __init__(
        self,
        message: str,
        *,
        call_id: int | None = None,
        chunk_index: int | None = None,
        cache_epoch: int | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = message
        self.call_id = call_id
        self.chunk_index = chunk_index
        self.cache_epoch = cache_epoch

    def __str__(self) -> str:
        ids = [
            f"{k}={v}"
            for k, v in (
                ("call_id", self.call_id),
                ("chunk_index", self.chunk_index),
                ("cache_epoch", self.cache_epoch),
            )
            if v is not None
        ]
        return f"{self.reason} ({', '.join(ids)})" if ids else self.reason


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
