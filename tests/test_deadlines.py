"""Liveness deadlines from injected durations (``ppstage/stages/deadlines.py``): no clock, no sleep.

The first warm chunk comes before any steady duration is known: its deadline
stands on the cold chunk's durations (``factor x median``, at most the warm-up
deadline, at least the floor) until the first steady durations replace them.
"""

from __future__ import annotations

import pytest

from ppstage.stages.deadlines import PhaseDeadline, ResultDeadline


def phase(**kw) -> PhaseDeadline:
    return PhaseDeadline("generator call", **{"minimum_s": 3.0, "factor": 10.0, "warmup_s": 60.0, **kw})


def test_a_phase_with_no_history_gets_the_floor_and_a_cold_one_the_warmup_deadline():
    d = phase()
    assert d.deadline_s() == 3.0
    assert d.deadline_s(cold=True) == 60.0


def test_the_first_warm_chunk_after_a_slow_cold_one_gets_factor_times_the_cold_duration():
    # The reported case: a 3 s call per step; chunk 1 is warm and had 3.0 s (the floor).
    d = phase()
    for _ in range(4):
        d.observe(3.05, cold=True)
    assert d.deadline_s() == pytest.approx(30.5)
    assert d.deadline_s(cold=True) == 60.0


@pytest.mark.parametrize(
    "cold, expected",
    [
        ([0.01], 3.0),  # a fast cold phase: never below the floor
        ([2.0], 20.0),
        ([1.0, 2.0, 9.0], 20.0),  # the median, not the slowest
        ([59.0], 60.0),  # capped at the warm-up deadline: a warm chunk never gets more than a cold one
    ],
)
def test_the_cold_fallback_is_factor_times_the_median_between_floor_and_warmup(cold, expected):
    d = phase()
    for s in cold:
        d.observe(s, cold=True)
    assert d.deadline_s() == pytest.approx(expected)


def test_the_first_steady_durations_replace_the_cold_fallback():
    d = phase(minimum_s=1.0)
    d.observe(5.0, cold=True)
    assert d.deadline_s() == pytest.approx(50.0)
    d.observe(0.2)
    assert d.deadline_s() == pytest.approx(2.0)
    d.observe(5.0, cold=True)  # a later cold chunk (new step list) never loosens the steady deadline
    assert d.deadline_s() == pytest.approx(2.0)
    assert d.deadline_s(cold=True) == 60.0


def test_the_steady_deadline_follows_the_median_of_the_last_window():
    d = phase(minimum_s=0.1, window=3)
    for s in (9.0, 9.0, 9.0, 0.5, 0.5):
        d.observe(s)
    assert d.deadline_s() == pytest.approx(5.0)  # window [9.0, 0.5, 0.5]


def test_the_result_deadline_falls_back_on_the_cold_chunks_owed_time():
    d = ResultDeadline(minimum_s=5.0, factor=10.0, warmup_s=65.0)
    assert d.deadline_s() == 5.0 and d.deadline_s(cold=True) == 65.0
    d.observe(3.2, cold=True)  # chunk 0 was owed 3.2 s
    assert d.deadline_s() == pytest.approx(32.0)
    d.observe(100.0, cold=True)  # capped at the warm-up deadline
    assert d.deadline_s() == pytest.approx(65.0)
    d.observe(0.4)  # the first steady period replaces it
    assert d.deadline_s() == 5.0


def test_a_result_deadline_without_a_warmup_deadline_has_no_cold_fallback():
    d = ResultDeadline(minimum_s=5.0, factor=10.0)
    d.observe(3.2, cold=True)
    assert d.deadline_s() == 5.0


def test_a_digest_check_stuck_behind_a_hung_write_ends_naming_rank_0():
    """The check thread also writes ``--latents-out`` files: one stuck on a dead filesystem must
    not hang the receipt waiting for a digest (the watchdog's owed-result check does not look
    then). A real executor whose one thread is blocked; the result deadline's floor bounds it."""
    import asyncio
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import pytest
    import torch

    from protocol import ChunkId
    from ppstage.errors import PhaseStalled
    from ppstage.stages.deadlines import ResultDeadline
    from ppstage.stages.receipt import ResultReceipt

    receipt = ResultReceipt.__new__(ResultReceipt)  # only what the digest path reads
    receipt.deadline = ResultDeadline(minimum_s=0.3, factor=10.0)
    receipt._cold = set()
    receipt._checker = ThreadPoolExecutor(1)
    stuck = threading.Event()
    receipt._checker.submit(stuck.wait)  # a write that never returns

    class Msg:
        id = ChunkId(4, 4, 0)

    try:
        with pytest.raises(PhaseStalled, match=r"rank 0 digest check of a result exceeded 0.3 s") as info:
            asyncio.run(receipt._digest_off_loop(torch.zeros(8), Msg()))
        assert info.value.chunk == ChunkId(4, 4, 0)
    finally:
        stuck.set()
        receipt._checker.shutdown(wait=True)
