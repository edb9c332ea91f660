"""Reading a run's message logs back: one ``RankLog`` per file, ``RunLogs`` for the set.

Everything here is derived from the records alone (``protocol.msglog``); a
damaged file keeps its readable part and carries the located ``LogError``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import msgspec

from protocol import ChunkResult, InferEnvelope, decode_frame
from protocol.msglog import (
    ChunkRecord,
    EventRecord,
    GateRecord,
    LogError,
    LogHeader,
    MessageRecord,
    PlanRecord,
    SpanRecord,
    read_log,
)

from ppstage.config import PPStageConfig
from ppstage.core.plan import ChunkPlan
from ppstage.replay.errors import ReplayError

NON_DROPS = frozenset({"accepted", "emitted"})


@dataclass
class RankLog:
    """The readable records of one log file."""

    path: str
    header: LogHeader | None
    records: list
    error: LogError | None
    size: int = 0

    @property
    def rank(self) -> int:
        return self.header.rank if self.header is not None else -1

    @property
    def role(self) -> str:
        return self.header.role if self.header is not None else "?"

    @property
    def complete(self) -> bool:
        return self.error is None

    def of(self, kind: type) -> list:
        return [r for r in self.records if isinstance(r, kind)]

    @property
    def messages(self) -> list[MessageRecord]:
        return self.of(MessageRecord)

    @property
    def chunks(self) -> list[ChunkRecord]:
        return self.of(ChunkRecord)

    @property
    def gates(self) -> list[GateRecord]:
        return self.of(GateRecord)

    @property
    def spans(self) -> list[SpanRecord]:
        return self.of(SpanRecord)

    @property
    def events(self) -> list[EventRecord]:
        return self.of(EventRecord)

    def plans(self) -> list[ChunkPlan]:
        return [msgspec.msgpack.decode(r.plan, type=ChunkPlan) for r in self.of(PlanRecord)]

    def plan_records(self) -> list[PlanRecord]:
        return self.of(PlanRecord)

    def config(self) -> PPStageConfig:
        if self.header is None or not self.header.config_json:
            raise ReplayError(f"{self.path}: the log carries no config")
        return msgspec.json.decode(self.header.config_json, type=PPStageConfig)

    def decoded(self, direction: str, action: str | None = None) -> list[tuple[MessageRecord, object]]:
        """``(record, message)`` for every message of ``direction`` (and ``action``), decoded from its frame."""
        out = []
        for r in self.messages:
            if r.direction == direction and (action is None or r.action == action):
                out.append((r, decode_frame(r.header + r.meta)))
        return out

    def envelopes(self) -> dict[int, tuple[MessageRecord, InferEnvelope]]:
        """Rank 0's sent INFER envelopes by ``call_id``."""
        return {m.call_id: (r, m) for r, m in self.decoded("send", "INFER")}  # type: ignore[misc]

    def results(self) -> dict[int, ChunkResult]:
        """Rank 0's received results by ``call_id`` (the first of duplicates)."""
        out: dict[int, ChunkResult] = {}
        for _, m in self.decoded("recv", "RESULT"):
            out.setdefault(m.call_id, m)  # type: ignore[union-attr]
        return out

    # -- what `log inspect` prints ---------------------------------------------------
    def summary(self) -> dict[str, object]:
        ids = [r for r in self.records if hasattr(r, "chunk_index") and hasattr(r, "cache_epoch")]
        times = [t for r in self.records for t in (getattr(r, "t_ns", None), getattr(r, "end_ns", None)) if t]
        actions = Counter(f"{r.direction} {r.action}" for r in self.messages)
        drops = Counter(g.verdict for g in self.gates if g.verdict not in NON_DROPS)
        chunks = sorted({r.chunk_index for r in ids if not (isinstance(r, MessageRecord) and r.action in ("NOOP", "SHUTDOWN", "ERROR"))})
        first = ids[0] if ids else None
        last = ids[-1] if ids else None
        h = self.header
        return {
            "file": self.path,
            "rank": self.rank,
            "role": self.role + (" (flight)" if h is not None and h.flight else ""),
            "stage": h.stage if h else "?",
            "records": len(self.records) + (1 if h else 0),
            "tensors": h.tensors if h else "?",
            "epochs": sorted({r.cache_epoch for r in ids}),
            "chunks": f"{chunks[0]}..{chunks[-1]} ({len(chunks)})" if chunks else "-",
            "actions": dict(sorted(actions.items())),
            "drops": dict(sorted(drops.items())),
            "first": _ids(first),
            "last": _ids(last),
            "duration_s": (max(times) - min(times)) / 1e9 if times else 0.0,
            "failures": [f"{e.name}: {e.detail}" for e in self.events if e.name in ("failure", "channel_failed", "flight_dump")],
            "status": "complete" if self.complete else f"DAMAGED: {self.error}",
        }


def _ids(r) -> str:
    if r is None:
        return "-"
    return f"call {r.call_id} chunk {r.chunk_index} epoch {r.cache_epoch}"


def load_log(path: str | Path) -> RankLog:
    c = read_log(path)
    return RankLog(str(path), c.header, c.records, c.error, c.size)


@dataclass
class RunLogs:
    """The logs of one run, by rank (one file per rank; flight dumps too)."""

    logs: list[RankLog] = field(default_factory=list)

    @classmethod
    def load(cls, paths: Iterable[str | Path]) -> "RunLogs":
        files: list[Path] = []
        for p in paths:
            p = Path(p)
            files.extend(sorted(p.glob("rank*.ppslog")) if p.is_dir() else [p])
        if not files:
            raise ReplayError("no log files given (DIR/rank<r>.ppslog or files)")
        run = cls([load_log(f) for f in files])
        run.check_one_run()
        return run

    def check_one_run(self) -> None:
        """Refuse logs that are not of one run (``ReplayError`` naming the odd file).

        A directory may hold a previous run's ``rank<r>.ppslog`` for ranks the
        new run does not have, and a command line may name two runs: replaying
        them together would blame a rank for another run's state. One run's logs
        share the config digest, the world size and the restart generation, name
        each rank at most once (flight dumps aside), and started within the
        config's start-up timeout of each other.
        """
        logs = [lg for lg in self.logs if lg.header is not None]
        if not logs:
            return
        first = next((lg for lg in logs if lg.role == "stage0" and not lg.header.flight), logs[0])
        h0 = first.header
        seen: dict[int, str] = {}
        for lg in logs:
            h = lg.header
            for name, mine, theirs in (
                ("config digest", h.config_digest, h0.config_digest),
                ("world size", h.world_size, h0.world_size),
                ("restart generation", h.restart_generation, h0.restart_generation),
            ):
                if mine != theirs:
                    raise ReplayError(
                        f"{lg.path} is not of the same run as {first.path}: its {name} is {mine}, not {theirs}"
                    )
            if not 0 <= h.rank < h0.world_size:
                raise ReplayError(f"{lg.path}: rank {h.rank} is outside a {h0.world_size}-rank run")
            if not h.flight:
                if h.rank in seen:
                    raise ReplayError(f"{lg.path} and {seen[h.rank]} are both rank {h.rank}'s log: two runs?")
                seen[h.rank] = lg.path
        starts = [lg.header.start_unix_s for lg in logs if not lg.header.flight]
        if starts:
            try:
                window = first.config().runtime.startup_timeout_s
            except (ReplayError, msgspec.ValidationError, msgspec.DecodeError):
                window = 600.0  # a log without a readable config: the default start-up timeout
            if max(starts) - min(starts) > window:
                raise ReplayError(
                    f"the logs started {max(starts) - min(starts):.0f} s apart, more than the start-up timeout "
                    f"({window:.0f} s): they are not of one run"
                )

    def by_rank(self) -> dict[int, RankLog]:
        out: dict[int, RankLog] = {}
        for lg in self.logs:
            if lg.header is not None and lg.rank not in out:
                out[lg.rank] = lg
        return out

    @property
    def stage0(self) -> RankLog:
        for lg in self.logs:
            if lg.role == "stage0":
                return lg
        raise ReplayError("replay needs rank 0's log (role stage0): it holds the plans and results")

    def config(self) -> PPStageConfig:
        return self.stage0.config()

    @property
    def damaged(self) -> list[RankLog]:
        return [lg for lg in self.logs if not lg.complete]
