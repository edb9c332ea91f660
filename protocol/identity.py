"""``ChunkId``: the one identity of a chunk's call, carried by messages, errors and logs.

Every wire message, chunk plan, lifecycle window and typed error names the
call it concerns with the same three integers; this is their one type. It is
not itself a wire field (the messages keep their flat ``call_id``,
``chunk_index``, ``cache_epoch`` fields, so the wire schema is unchanged):
``ChunkId.of(msg)`` or ``msg.id`` reads it off anything that carries them.
"""

from __future__ import annotations

from typing import Any

import msgspec


class ChunkId(msgspec.Struct, frozen=True, gc=False):
    """Identity of one generator call of a chunk.

    Parameters
    ----------
    call_id : int
        Rank 0's strictly increasing id of the message or call (>= 0 on the wire).
    chunk_index : int
        Index of the chunk in the stream (>= 0 on the wire).
    cache_epoch : int
        KV-cache epoch: incremented by every hard cut (>= 0 on the wire).
    """

    call_id: int
    chunk_index: int
    cache_epoch: int

    @classmethod
    def of(cls, obj: Any) -> "ChunkId":
        """The identity of ``obj``: anything with ``call_id``, ``chunk_index``, ``cache_epoch``.

        Raises
        ------
        AttributeError
            ``obj`` lacks one of the three attributes.
        """
        return cls(obj.call_id, obj.chunk_index, obj.cache_epoch)

    @classmethod
    def find(cls, obj: Any) -> "ChunkId | None":
        """``ChunkId.of(obj)``, or None when ``obj`` carries no (integer) identity."""
        try:
            ids = (obj.call_id, obj.chunk_index, obj.cache_epoch)
        except AttributeError:
            return None
        if not all(type(i) is int for i in ids):
            return None
        return cls(*ids)

    def fields(self) -> dict[str, int]:
        """``{"call_id": ..., "chunk_index": ..., "cache_epoch": ...}``, e.g. for log binding."""
        return {"call_id": self.call_id, "chunk_index": self.chunk_index, "cache_epoch": self.cache_epoch}

    def __str__(self) -> str:
        return f"call_id={self.call_id}, chunk_index={self.chunk_index}, cache_epoch={self.cache_epoch}"
