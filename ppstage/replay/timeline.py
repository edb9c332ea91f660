"""Timelines from message logs: a Chrome / Perfetto trace and a matplotlib PNG.

Clocks: every rank stamps records with its own monotonic clock, which means
nothing on another host. Ranks are aligned by message pairs instead: a
receive never precedes its send, so for each directed link ``a -> b`` with
sends at ``s_i`` (a's clock) and receives at ``r_i`` (b's clock),
``offset_b - offset_a >= max_i(s_i - r_i)``, and the reverse link bounds it
from above. ``align_clocks`` picks, rank by rank outwards from rank 0, the
offset nearest to zero inside those bounds: logs of one host (one clock)
keep offset 0; logs of several hosts move just enough that no message
arrives before it left.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from protocol.msglog import MessageRecord

from ppstage.replay.errors import ReplayError
from ppstage.replay.runlog import RankLog, RunLogs

MSG_TID = 0
PHASE_TIDS = {"build": 1, "decode": 2, "chunk": 3}


def message_pairs(run: RunLogs) -> list[tuple[int, MessageRecord, int, MessageRecord]]:
    """``(src rank, send, dst rank, receive)`` for every message both of whose ends were logged.

    Links are FIFO (one thread per direction on each side), so the n-th send
    of ``a`` to ``b`` on a group is the n-th receive of ``b`` from ``a`` on it.
    A mesh publish pairs with each follower's n-th receive from its leader.
    """
    logs = run.by_rank()
    sends: dict[tuple[int, int, str], list[MessageRecord]] = defaultdict(list)
    publishes: dict[tuple[int, str], list[MessageRecord]] = defaultdict(list)
    for rank, lg in logs.items():
        for m in lg.messages:
            if m.direction == "send" and m.error is None:
                sends[(rank, m.peer, m.group)].append(m)
            elif m.direction == "publish":
                publishes[(rank, m.group)].append(m)
    pairs = []
    for rank, lg in logs.items():
        seen: dict[tuple[int, str], int] = defaultdict(int)
        for m in lg.messages:
            if m.direction != "recv":
                continue
            n = seen[(m.peer, m.group)]
            seen[(m.peer, m.group)] += 1
            if m.group.startswith("mesh"):
                src_list = publishes.get((m.peer, m.group), [])
            else:
                src_list = sends.get((m.peer, rank, m.group), [])
            if n < len(src_list) and src_list[n].call_id == m.call_id and src_list[n].action == m.action:
                pairs.append((m.peer, src_list[n], rank, m))
    return pairs


def align_clocks(run: RunLogs) -> dict[int, int]:
    """Per-rank offset (ns) to add to its timestamps so that no receive precedes its send."""
    lower: dict[tuple[int, int], int] = {}  # (a, b) -> max(send - recv): off_b - off_a >= it
    for a, send, b, recv in message_pairs(run):
        gap = send.t_ns - recv.t_ns
        lower[(a, b)] = max(lower.get((a, b), gap), gap)
    ranks = sorted(run.by_rank())
    if not ranks:
        return {}
    offsets = {ranks[0]: 0}
    # Assign ranks one by one, each against every rank assigned before it, so
    # that no pair's constraint is checked against only one neighbour.
    while len(offsets) < len(ranks):
        best = None
        for b in ranks:
            if b in offsets:
                continue
            lows = [offsets[a] + lower[(a, b)] for a in offsets if (a, b) in lower]
            highs = [offsets[a] - lower[(b, a)] for a in offsets if (b, a) in lower]
            if lows or highs:
                best = (b, max(lows, default=None), min(highs, default=None))
                break
        if best is None:  # ranks that exchanged nothing with the others keep their own clock
            for r in ranks:
                offsets.setdefault(r, 0)
            break
        b, lo, hi = best
        if lo is not None and hi is not None and lo > hi:
            offsets[b] = (lo + hi) // 2  # inconsistent (clock drift over the run): split the difference
        else:
            offsets[b] = min(max(0, lo if lo is not None else 0), hi if hi is not None else 1 << 62)
    return offsets


def _label(lg: RankLog) -> str:
    h = lg.header
    flight = " flight" if h is not None and h.flight else ""
    return f"rank {lg.rank} ({lg.role}, stage {h.stage if h else '?'}){flight}"


def trace_events(run: RunLogs) -> list[dict]:
    """Trace Event Format events: a process per rank, a thread (track) per phase, flows for messages."""
    logs = run.by_rank()
    if not logs:
        raise ReplayError("no readable log header: nothing to draw")
    offsets = align_clocks(run)
    origin = min(
        (t + offsets[r] for r, lg in logs.items() for t in _times(lg)), default=0
    )

    def us(rank: int, t_ns: int) -> float:
        return (t_ns + offsets[rank] - origin) / 1e3

    events: list[dict] = []
    for rank, lg in sorted(logs.items()):
        events.append({"name": "process_name", "ph": "M", "pid": rank, "args": {"name": _label(lg)}})
        events.append({"name": "process_sort_index", "ph": "M", "pid": rank, "args": {"sort_index": rank}})
        for name, tid in [("messages", MSG_TID), *PHASE_TIDS.items()]:
            events.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": tid, "args": {"name": name}})
        for s in lg.spans:
            events.append({
                "name": f"{s.name} c{s.chunk_index}", "cat": s.name, "ph": "X", "pid": rank,
                "tid": PHASE_TIDS.get(s.name, 4), "ts": us(rank, s.start_ns),
                "dur": max((s.end_ns - s.start_ns) / 1e3, 1.0),
                "args": {"call_id": s.call_id, "chunk_index": s.chunk_index, "cache_epoch": s.cache_epoch},
            })
        for m in lg.messages:
            events.append({
                "name": f"{m.direction} {m.action} c{m.chunk_index}", "cat": "msg", "ph": "X", "pid": rank,
                "tid": MSG_TID, "ts": us(rank, m.t_ns), "dur": 1.0,
                "args": {"peer": m.peer, "group": m.group, "call_id": m.call_id,
                         "chunk_index": m.chunk_index, "cache_epoch": m.cache_epoch,
                         **({"error": m.error} if m.error else {})},
            })
        for e in lg.events:
            events.append({"name": e.name, "cat": "event", "ph": "i", "s": "p", "pid": rank, "tid": MSG_TID,
                           "ts": us(rank, e.t_ns), "args": {"detail": e.detail}})
    for i, (a, send, b, recv) in enumerate(message_pairs(run)):
        name = f"{send.action} c{send.chunk_index}"
        events.append({"name": name, "cat": "msg", "ph": "s", "id": i, "pid": a, "tid": MSG_TID, "ts": us(a, send.t_ns)})
        events.append({"name": name, "cat": "msg", "ph": "f", "bp": "e", "id": i, "pid": b, "tid": MSG_TID,
                       "ts": us(b, recv.t_ns)})
    return events


def _times(lg: RankLog) -> list[int]:
    out = [m.t_ns for m in lg.messages] + [s.start_ns for s in lg.spans] + [e.t_ns for e in lg.events]
    return out or ([lg.header.t0_ns] if lg.header is not None else [])


def write_trace(run: RunLogs, out: str | Path) -> int:
    events = trace_events(run)
    Path(out).write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
    return len(events)


def write_plot(run: RunLogs, out: str | Path) -> None:
    """Every rank's per-chunk phases as bars over (aligned) time, one row per rank and phase."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ReplayError("`ppstage log plot` needs matplotlib: pip install 'ppstage[plot]'") from None
    logs = run.by_rank()
    offsets = align_clocks(run)
    origin = min((t + offsets[r] for r, lg in logs.items() for t in _times(lg)), default=0)
    rows: list[tuple[str, list[tuple[float, float, int]]]] = []
    for rank, lg in sorted(logs.items()):
        by_phase: dict[str, list[tuple[float, float, int]]] = defaultdict(list)
        for s in lg.spans:
            start = (s.start_ns + offsets[rank] - origin) / 1e6
            by_phase[s.name].append((start, (s.end_ns - s.start_ns) / 1e6, s.chunk_index))
        for phase in sorted(by_phase, key=lambda p: PHASE_TIDS.get(p, 9)):
            rows.append((f"rank {rank} {phase}", by_phase[phase]))
    if not rows:
        raise ReplayError("the logs hold no phase spans to draw")
    fig, ax = plt.subplots(figsize=(12, 0.5 * len(rows) + 1.5))
    cmap = plt.get_cmap("tab10")
    for y, (_, bars) in enumerate(rows):
        ax.broken_barh([(s, d) for s, d, _ in bars], (y - 0.4, 0.8),
                       facecolors=[cmap(k % 10) for _, _, k in bars], edgecolor="black", linewidth=0.3)
        for s, d, k in bars:
            ax.text(s + d / 2, y, str(k), ha="center", va="center", fontsize=6)
    ax.set_yticks(range(len(rows)), [name for name, _ in rows])
    ax.invert_yaxis()
    ax.set_xlabel("time (ms, ranks aligned by message pairs)")
    ax.set_title("per-chunk phases by rank (colour and label: chunk index)")
    fig.tight_layout()
    fig.savefig(out, dpi=120, format="png")
    plt.close(fig)
