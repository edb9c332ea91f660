"""``Mailbox``: one link's frames, FIFO, for the loop (``get``) or one worker thread (``take``)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from ppstage.distributed.transport import Mailbox, MailboxInterrupted


def test_frames_come_out_in_arrival_order_whichever_consumer_reads():
    async def main():
        box: Mailbox[int] = Mailbox(asyncio.get_running_loop())
        for i in range(6):
            box.put(i)
        got = [await box.get(), box.take(0.0), await box.get()]
        got += await asyncio.to_thread(lambda: [box.take(1.0), box.take(1.0)])
        got.append(await box.get())
        assert box.qsize() == 0 and box.empty()
        return got

    assert asyncio.run(main()) == [0, 1, 2, 3, 4, 5]


def test_a_waiting_get_is_woken_by_a_put_from_another_thread():
    async def main():
        box: Mailbox[str] = Mailbox(asyncio.get_running_loop())
        threading.Timer(0.05, box.put, args=("frame",)).start()
        return await asyncio.wait_for(box.get(), 10)

    assert asyncio.run(main()) == "frame"


def test_a_cancelled_get_loses_nothing():
    async def main():
        box: Mailbox[str] = Mailbox(asyncio.get_running_loop())
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(box.get(), 0.05)  # cancelled while waiting
        box.put("late")  # the cancelled waiter is woken (a no-op); the frame stays queued
        await asyncio.sleep(0)
        return box.qsize(), await asyncio.wait_for(box.get(), 10)

    assert asyncio.run(main()) == (1, "late")


def test_take_waits_for_a_put_and_returns_none_when_nothing_comes_in_time():
    loop = asyncio.new_event_loop()
    try:
        box: Mailbox[int] = Mailbox(loop)
        t0 = time.monotonic()
        assert box.take(0.1) is None
        assert time.monotonic() - t0 >= 0.09
        threading.Timer(0.05, box.put, args=(7,)).start()
        assert box.take(10.0) == 7
    finally:
        loop.close()


def test_interrupt_ends_a_blocked_take_at_once_and_every_later_one():
    loop = asyncio.new_event_loop()
    try:
        box: Mailbox[int] = Mailbox(loop)
        raised: list[BaseException] = []

        def consumer() -> None:
            try:
                box.take(60.0)
            except MailboxInterrupted as exc:
                raised.append(exc)

        t = threading.Thread(target=consumer)
        t.start()
        time.sleep(0.05)
        box.interrupt()
        t.join(10.0)
        assert not t.is_alive() and len(raised) == 1
        box.put(1)
        with pytest.raises(MailboxInterrupted):
            box.take(0.0)  # sticky: the actor is ending
    finally:
        loop.close()


def test_put_for_a_waiter_whose_loop_closed_returns_false_and_keeps_the_frame():
    loop = asyncio.new_event_loop()
    box: Mailbox[int] = Mailbox(loop)
    getter = loop.create_task(box.get())
    loop.run_until_complete(asyncio.sleep(0.01))  # the getter now waits: a loop waiter is registered
    assert not getter.done()
    loop.close()  # the process is exiting: nobody can be woken any more
    assert box.put(3) is False
    assert box.qsize() == 1
    getter._log_destroy_pending = False  # the pending task is this test's point


def test_put_with_nobody_waiting_wakes_nobody():
    loop = asyncio.new_event_loop()
    box: Mailbox[int] = Mailbox(loop)
    loop.close()  # a put that needed the loop would now fail
    assert box.put(1) is True and box.take(0.0) == 1


def test_a_worker_shut_down_with_cancel_pending_cancels_the_jobs_it_drops_and_never_runs_them():
    from ppstage.stages.worker import StageWorker

    ran: list[str] = []

    async def main():
        worker = StageWorker("test-worker")
        gate = threading.Event()
        blocker = asyncio.ensure_future(worker.run(gate.wait, 10.0))  # occupies the thread
        await asyncio.sleep(0.05)
        dropped = asyncio.ensure_future(worker.run(ran.append, "dropped"))
        await asyncio.sleep(0.05)
        worker.shutdown(cancel_pending=True)
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(dropped, 10)  # woken, not left waiting forever
        await asyncio.wait_for(blocker, 10)

    asyncio.run(main())
    assert ran == []
