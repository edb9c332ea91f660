"""SIGTERM / SIGINT from a process's first moment to its exit (SPEC section 7: the same path as a drain).

Python's defaults do not fit a rank, nor the ``demo`` process that launches ranks:

- a ``KeyboardInterrupt`` raised inside an import is swallowed by some libraries
  (importing torch does, measured: the stop then vanishes) or ends as a traceback;
- SIGTERM's default kills the process without a word (exit -15, the peers then
  see a dead channel and fail);
- a rank blocked in its rendezvous or parity handshake (a C call) runs no Python
  handler until that call returns, which may be ``runtime.startup_timeout_s`` later.

So ``StopRequest.install()``, called first, only records the signal. Whoever can
stop in order takes it over with ``hand_over``: a rank's actor (rank 0 plans no
further chunk, drains and sends SHUTDOWN; a leader waits for that SHUTDOWN),
``ppstage demo`` (forwards it to its ranks). A signal that came earlier is handed
over at once, so a stop during start-up becomes a drained stop as soon as the
ranks have met. ``watch_startup`` bounds that wait: the C-level handler writes the
signal number to a wakeup pipe even while the main thread is blocked, and a
watcher thread gives start-up ``grace_s`` more before ``on_expired`` ends the
process with one line (a rendezvous waiting for a rank that never comes).
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """The stop signal of this process: recorded until someone can act on it."""

    def __init__(self) -> None:
        self.signal_name: str | None = None  # the first stop signal received, e.g. "SIGINT"
        self._handler: Callable[[], None] | None = None
        self._started = threading.Event()  # set by ``hand_over``: start-up is over
        self._previous: dict[int, object] = {}

    @classmethod
    def install(cls) -> "StopRequest":
        """Record SIGTERM and SIGINT from now on (main thread only, as ``signal.signal``)."""
        stop = cls()
        stop._previous = {s: signal.signal(s, stop._on_signal) for s in STOP_SIGNALS}
        # ``spawn_blocked`` starts ranks with these signals blocked (the mask is
        # inherited across exec): one sent before this point waited, pending; now it is delivered.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        return stop

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def hand_over(self, handler: Callable[[], None]) -> None:
        """From now on a stop signal calls ``handler``; one received before calls it now.

        ``handler`` must be idempotent: a signal arriving during this call may
        reach it twice (once from the handler, once from here).
        """
        self._handler = handler
        self._started.set()
        if self.signal_name is not None:
            handler()

    def restore(self) -> None:
        """Put back the handlers that were there before ``install``."""
        for s, previous in self._previous.items():
            signal.signal(s, previous)  # type: ignore[arg-type]

    @classmethod
    @contextmanager
    def installed(cls) -> Iterator["StopRequest"]:
        """``install`` for the span of a ``with`` block (a CLI command), then ``restore``."""
        stop = cls.install()
        try:
            yield stop
        finally:
            stop.restore()

    def watch_startup(self, grace_s: float, on_expired: Callable[[str], None]) -> None:
        """Call ``on_expired(signal_name)`` (from a thread) if start-up goes on ``grace_s`` after a stop signal.

        Start-up ends with ``hand_over``. Main thread only (``signal.set_wakeup_fd``).
        The wakeup fd is this process's until an event loop installs its own
        signal handlers, which happens after ``hand_over``.
        """
        r, w = os.pipe()
        os.set_blocking(w, False)
        signal.set_wakeup_fd(w)
        recorded = self.signal_name

        def watch() -> None:
            name = recorded
            # The wakeup fd gets a byte for every signal with a Python handler, the
            # flight recorder's SIGUSR1 (dump, go on) and SIGHUP included: only a
            # stop signal starts the grace period.
            while name is None:
                byte = os.read(r, 1)  # written by the C-level handler, even mid-rendezvous
                if not byte:
                    return
                if byte[0] in STOP_SIGNALS:
                    name = self.signal_name or _name(byte[0])
            if not self._started.wait(grace_s):
                on_expired(name)

        threading.Thread(target=watch, name="stop-during-start-up", daemon=True).start()

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self.signal_name is None:
            self.signal_name = _name(signum)
        if self._handler is not None:
            self._handler()


@contextmanager
def spawn_blocked() -> Iterator[None]:
    """Processes spawned inside start with SIGTERM / SIGINT blocked, until their ``StopRequest.install``.

    A child's first moments (the interpreter, its imports) have no handler yet: a
    stop sent then would kill it (SIGTERM's default) or raise where nothing can
    catch it. Blocked, it stays pending and is delivered once the handler exists.
    This process's own stop signals wait, likewise, until the block ends.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
