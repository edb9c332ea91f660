"""``OutcomeLog``: rank 0's one JSON line per chunk once its outcome is final, written off the loop.

The demo's digest check, its live progress and a killed run's report read this
file while the run goes on, so every line is flushed as soon as it is written.
The write and the flush are a system call each (about 100 us on this machine's
loaded disk, measured with py-spy / cProfile on rank 0's loop, issue 11): they
run in this object's own thread, in order, never on the event loop, which only
encodes the line (about 1 us) and queues it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec
import structlog

_log = structlog.get_logger("ppstage.stages.outcomes")
_ENCODER = msgspec.json.Encoder()


class OutcomeLog:
    """Append-only JSON lines at ``path``; one writer thread; ``close`` drains every line first.

    Raises ``OSError`` from the constructor when ``path`` cannot be opened. A
    write failing later (disk full) is logged once, with the count of lines
    lost, at ``close``; it never ends the run (the stream goes on, the file is
    a report of it).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "ab")
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="stage0-outcomes")
        self._failed: list[str] = []

    def write(self, record: dict[str, Any]) -> None:
        """Queue one line (called on the loop; returns at once)."""
        self._writer.submit(self._append, _ENCODER.encode(record) + b"\n")

    def close(self) -> None:
        """Write every queued line, then close the file (call once, at the end of the run)."""
        self._writer.shutdown(wait=True)
        self._file.close()
        if self._failed:
            _log.error("chunk outcome lines lost", path=str(self.path), lost=len(self._failed), error=self._failed[0])

    def _append(self, line: bytes) -> None:
        try:
            self._file.write(line)
            self._file.flush()  # a reader (the demo's progress, a killed run's report) sees it now
        except (OSError, ValueError) as exc:  # ValueError: the file was closed under us
            self._failed.append(f"{type(exc).__name__}: {exc}")
