"""Rank 0's per-chunk bookkeeping stays bounded, and the chunk stream keeps every chunk for the check."""

from __future__ import annotations

from ppstage.cli.progress import StreamStats, StreamTail
from ppstage.observability.metrics import ChunkLedger, summarize


def run_ledger(chunks: int, capacity: int) -> tuple[ChunkLedger, list]:
    finals: list = []
    ledger = ChunkLedger(capacity, on_final=finals.append)
    for k in range(chunks):
        ev = ledger.open(k, call_id=k, cache_epoch=0)
        ev.emitted = 0.1 * k
        ev.build_start, ev.build_end = 0.0, 0.001
        ev.stage_durations = (0.002,)
        ledger.finish(ev, "emitted" if k % 10 else "stale_epoch")
    return ledger, finals


def test_a_long_run_keeps_only_the_ring_but_counts_every_chunk():
    ledger, finals = run_ledger(10_000, capacity=16)
    assert len(ledger.recent()) == 16
    assert [e.chunk_index for e in ledger.recent()] == list(range(10_000 - 16, 10_000))
    assert [e.chunk_index for e in finals] == list(range(10_000))  # every chunk reached the stream
    s = summarize(ledger.recent(), totals=ledger.totals, frames_per_chunk=3, max_in_flight=2,
                  max_decode_queue=1, dropped={}, wall_s=1.0)
    assert s.chunks_planned == 10_000 and s.chunks_emitted == 9_000
    first, last = 0.1, 0.1 * 9_999  # chunk 0 was dropped, chunk 1 is the first emitted
    assert abs(s.frames_per_s - 3 * 8_999 / (last - first)) < 1e-6


def test_a_chunk_still_in_flight_is_never_evicted():
    ledger = ChunkLedger(2)
    stuck = ledger.open(0, call_id=0, cache_epoch=0)
    for k in range(1, 6):
        ledger.finish(ledger.open(k, call_id=k, cache_epoch=0), "emitted")
    assert ledger.get(0) is stuck and ledger.unfinished() == [stuck]
    ledger.finish(stuck, "emitted")
    ledger.open(6, call_id=6, cache_epoch=0)
    assert ledger.get(0) is None and len(ledger.recent()) == 2


def test_summary_of_a_short_run_is_unchanged_by_the_totals():
    ledger, _ = run_ledger(12, capacity=1024)
    kw = dict(frames_per_chunk=3, max_in_flight=2, max_decode_queue=1, dropped={}, wall_s=1.0)
    assert summarize(ledger.recent(), totals=ledger.totals, **kw) == summarize(ledger.recent(), **kw)


def test_the_progress_reader_takes_whole_lines_only(tmp_path):
    path = tmp_path / "chunks.jsonl"
    tail, stats = StreamTail(path), StreamStats(frames_per_chunk=3)
    assert tail.new_records() == []  # no file yet
    path.write_text('{"chunk_index": 0, "outcome": "emitted", "emitted": 1.0}\n{"chunk_index": 1, "outc')
    records = tail.new_records()
    assert [r["chunk_index"] for r in records] == [0]
    with path.open("a") as f:
        f.write('ome": "emitted", "emitted": 1.5}\n{"chunk_index": 2, "outcome": "flushed", "emitted": 0.0}\n')
    records += tail.new_records()
    assert [r["chunk_index"] for r in records] == [0, 1, 2]
    for r in records:
        stats.add(r)
    assert (stats.emitted, stats.dropped) == (2, 1)
    assert stats.frames_per_s == 3 / 0.5 and stats.median_period_ms == 500.0


def _summary(chunks: int):
    ledger, _ = run_ledger(chunks, capacity=1024)
    return summarize(ledger.recent(), totals=ledger.totals, frames_per_chunk=3, max_in_flight=1,
                     max_decode_queue=1, dropped={}, wall_s=1.0)


def test_a_run_with_fewer_than_two_emitted_chunks_has_no_period_and_prints_n_a():
    import msgspec

    from ppstage.observability.report import format_summary

    for chunks in (1, 2):  # chunk 0 is dropped (run_ledger): 0, then 1 emitted chunk
        s = _summary(chunks)
        assert s.median_period_ms is None and s.loop_cpu_pct_of_period is None
        text = format_summary(msgspec.to_builtins(s), None, stages=2, tp=1, mode="r0a")
        assert "median period                       n/a" in text
        assert "frames/s                            n/a" in text  # a rate needs two emitted chunks, not 0.0
        assert "period / slower stage               n/a" in text and "0.0 ms" not in text.split("median stage")[0]


def test_a_run_whose_only_periods_are_warm_up_still_reports_them():
    s = _summary(4)  # 3 emitted chunks, 2 periods, both inside the 2-period warm-up
    assert abs(s.median_period_ms - 100.0) < 1e-6


def test_the_live_progress_has_no_period_before_the_second_chunk():
    stats = StreamStats(frames_per_chunk=3)
    stats.add({"chunk_index": 0, "outcome": "emitted", "emitted": 1.0})
    assert stats.median_period_ms is None and "median period    n/a" in stats.describe()
    assert stats.describe().startswith("   n/a frames/s")


def test_a_run_stopped_before_any_chunk_says_nothing_was_checked_not_all_match():
    import msgspec

    from ppstage.observability.report import DigestCheck, format_summary

    s = msgspec.to_builtins(_summary(1))  # chunk 0 dropped: no chunk emitted
    text = format_summary(s, DigestCheck(0, 0, [], [], []), stages=2, tp=1, mode="r0a")
    assert "no chunk to check" in text and "ALL MATCH" not in text
    assert "OverlapScore                        n/a" in text
    lost = format_summary(s, DigestCheck(0, 0, [], [], [0]), stages=2, tp=1, mode="r0a")
    assert "MISMATCH" in lost and "lost [0]" in lost  # a lost chunk is never hidden as 'nothing to check'
