"""Live progress of a local run: rank 0's chunk stream (``chunks.jsonl``) as a rich bar.

The demo's parent process tails the stream rank 0 appends to (one JSON line
per finished chunk) and shows chunks done, frames/s, the median period of
the recent chunks and the drops. Constant memory: totals plus a window of
recent periods.
"""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path
from statistics import median

PERIOD_WINDOW = 64  # recent periods behind the median shown


class StreamStats:
    """Running figures over a chunk stream, fed line by line (pure)."""

    def __init__(self, frames_per_chunk: int) -> None:
        self.frames_per_chunk = frames_per_chunk
        self.emitted = 0
        self.dropped = 0
        self._first: float | None = None
        self._last: float | None = None
        self._periods: deque[float] = deque(maxlen=PERIOD_WINDOW)

    def add(self, record: dict) -> None:
        if record.get("outcome") != "emitted":
            self.dropped += 1
            return
        t = float(record["emitted"])
        if self._last is not None:
            self._periods.append(t - self._last)
        if self._first is None:
            self._first = t
        self._last = t
        self.emitted += 1

    @property
    def frames_per_s(self) -> float:
        if self._first is None or self._last is None or self._last <= self._first:
            return 0.0
        return self.frames_per_chunk * (self.emitted - 1) / (self._last - self._first)

    @property
    def median_period_ms(self) -> float | None:
        return 1e3 * median(self._periods) if self._periods else None  # None before the second chunk

    def describe(self) -> str:
        period = self.median_period_ms
        shown = "   n/a" if period is None else f"{period:6.1f} ms"
        rate = f"{self.frames_per_s:6.1f}" if self.frames_per_s > 0 else "   n/a"  # a rate needs two chunks
        return f"{rate} frames/s  median period {shown}  dropped {self.dropped}"


class StreamTail:
    """Reads the lines appended to a file since the last call (whole lines only)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""

    def new_records(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return []
        self._offset += len(data)
        data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out


class LiveProgress:
    """A rich progress bar over ``chunks`` chunks, updated from rank 0's chunk stream."""

    def __init__(self, stream: Path, chunks: int, frames_per_chunk: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.tail = StreamTail(stream)
        self.stats = StreamStats(frames_per_chunk)
        self.progress = Progress(
            TextColumn("chunks"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(), transient=False,
        )
        self.task = self.progress.add_task("demo", total=chunks, stats=self.stats.describe())

    def __enter__(self) -> "LiveProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.tick()
        self.progress.stop()

    def tick(self) -> None:
        records = self.tail.new_records()
        if not records:
            return
        for r in records:
            self.stats.add(r)
        self.progress.update(
            self.task, completed=self.stats.emitted + self.stats.dropped, stats=self.stats.describe()
        )
