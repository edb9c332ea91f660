"""``Mailbox``: one inbound link's frames, FIFO, read by the loop or by a worker thread.

Why not an ``asyncio.Queue``: a hop that only the stage's worker thread needs
(hidden states in, the model call, hidden states out) would otherwise go
receiver thread -> loop -> worker thread, two wake-ups on the critical path of
every hop, plus the loop's own work per frame. Measured on the K = 2 embedded
pipeline (2 CPU cores, ``docs/performance.md``, "Where a hop's time went"):
receiver -> loop -> worker took 200 to 280 us of a ~950 us hop. With a mailbox
the receiver thread appends and wakes whichever consumer is waiting: the loop
(``await get()``, one ``call_soon_threadsafe``) or a worker thread
(``take(timeout)``, one condition notify), and wakes nobody when nobody waits.

One consumer at a time, by program order: a stage leader either awaits
``get()`` on its loop or has handed the read to its single worker thread, never
both at once. The FIFO is the link's frame order (SPEC section 5): the same
single queue serves both consumers, so nothing is reordered or lost between
them.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class MailboxInterrupted(Exception):
    """``take`` was ended by ``interrupt`` (the actor is aborting or a link failed)."""


class Mailbox(Generic[T]):
    """An unbounded FIFO filled by one receiver thread.

    Unbounded on purpose, as before: the receiver thread must never wait on
    the consumer (flow control is the pipeline's ``D_in`` / ``D_out`` credit).

    Parameters
    ----------
    loop:
        The event loop whose coroutines call ``get``.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: deque[T] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._waiter: asyncio.Future | None = None  # the loop's pending ``get``
        self._interrupted = False

    # -- the receiver thread ------------------------------------------------------
    def put(self, item: T) -> bool:
        """Append ``item`` and wake the waiting consumer; False once the loop is closed."""
        with self._cond:
            self._items.append(item)
            waiter, self._waiter = self._waiter, None
            self._cond.notify()
        if waiter is None:
            return True
        try:
            self._loop.call_soon_threadsafe(_wake, waiter)
        except RuntimeError:  # the loop is closed: the process is exiting
            return False
        return True

    # -- consumers ----------------------------------------------------------------
    async def get(self) -> T:
        """The next frame, on the loop. Cancelling it loses nothing (the frame stays queued)."""
        while True:
            with self._cond:
                if self._items:
                    return self._items.popleft()
                waiter = self._waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                with self._cond:
                    if self._waiter is waiter:
                        self._waiter = None

    def take(self, timeout_s: float) -> T | None:
        """The next frame, blocking the calling (worker) thread up to ``timeout_s`` seconds.

        Returns None when nothing arrived in time. Raises ``MailboxInterrupted``
        once ``interrupt`` was called (at once if it already was).
        """
        with self._cond:
            if not self._items and not self._interrupted:
                self._cond.wait_for(lambda: self._items or self._interrupted, max(timeout_s, 0.0))
            if self._interrupted:
                raise MailboxInterrupted("the mailbox was interrupted")
            return self._items.popleft() if self._items else None

    def interrupt(self) -> None:
        """End a blocked ``take`` now and every later one (sticky): the actor is ending."""
        with self._cond:
            self._interrupted = True
            self._cond.notify_all()

    def qsize(self) -> int:
        """Frames received and not yet read."""
        with self._cond:
            return len(self._items)

    def empty(self) -> bool:
        return self.qsize() == 0


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():  # the get was cancelled meanwhile; its frame stays queued
        waiter.set_result(None)
