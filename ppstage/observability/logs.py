"""structlog set-up: one JSON or console line per event, context bound per rank.

Every commitment point (send, receive, mesh broadcast, accept, drop) logs
``call_id, chunk_index, cache_epoch, stage, rank, group`` (SPEC section 9).
"""

from __future__ import annotations

import logging
import sys

import structlog

from protocol import ChunkId


def configure(*, rank: int, stage: int, json: bool = False, level: str = "info") -> None:
    """Configure structlog for this process (call once, at start-up)."""
    renderer = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=False, pad_event_to=0)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(rank=rank, stage=stage)


def ids_of(obj: object) -> dict[str, int]:
    """The identity fields every commitment-point log line carries: ``ChunkId.of(obj)``'s.

    ``obj`` is a ``ChunkId`` or anything that carries one (a wire message, a
    ``ChunkPlan``, a lifecycle window). Use as ``log.info("sent", **ids_of(msg))``.
    """
    return ChunkId.of(obj).fields()
