"""``StageWorker``: one dedicated thread that runs a rank's model work, awaited from its loop.

A stage's worker thread runs the model and issues every mesh collective, so the
collective order is one program order on every mesh rank. This replaces a
generic executor: one queue put and one ``call_soon_threadsafe`` per call,
with no ``concurrent.futures`` future to chain to an asyncio one, and the
thread binds the rank's CUDA device once (the current device is per thread).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from typing import Any, Callable

import torch


class StageWorker:
    def __init__(self, name: str, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._jobs: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future, asyncio.AbstractEventLoop] | None] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the worker thread; its result or exception comes back here.

        Cancelling the await does not stop ``fn`` (a thread cannot be interrupted);
        the worker just drops its result.
        """
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._jobs.put((fn, args, future, loop))
        return await future

    def shutdown(self, *, cancel_pending: bool = False) -> None:
        """Let the thread end after the jobs already queued (it is a daemon: exit ends it too).

        ``cancel_pending``: drop the jobs not started yet and cancel their futures
        (on their loop), as ``ThreadPoolExecutor.shutdown(cancel_futures=True)`` does.
        """
        if cancel_pending:
            while True:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is not None:  # wake whoever still awaits it, with a cancellation
                    _, _, future, loop = job
                    try:
                        loop.call_soon_threadsafe(future.cancel)
                    except RuntimeError:  # the loop is closed: nobody awaits any more
                        pass
        self._jobs.put(None)

    def _serve(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, args, future, loop = job
            if future.done():  # its awaiting task was cancelled before it started: never run it
                continue
            try:
                result, error = fn(*args), None
            except BaseException as exc:  # handed to the awaiting task, which decides
                result, error = None, exc
            try:
                loop.call_soon_threadsafe(_settle, future, result, error)
            except RuntimeError:  # the loop is closed: the process is exiting
                return


class JobProgress:
    """Which phase a worker job is in, since when and for how long it may last.

    Written by the worker thread (``enter``), read by the loop that watches the
    job's deadlines; ``current`` is replaced as one tuple, so a reader always
    sees one consistent phase ``(phase, since_monotonic_s, limit_s, what, peer)``
    (``limit_s`` None: a phase without a deadline; ``peer``: the rank a wait
    is for, else None).
    """

    __slots__ = ("current",)

    def __init__(self, phase: str, limit_s: float | None, what: str, peer: int | None = None) -> None:
        self.current = (phase, time.monotonic(), limit_s, what, peer)

    def enter(self, phase: str, limit_s: float | None, what: str, peer: int | None = None) -> None:
        self.current = (phase, time.monotonic(), limit_s, what, peer)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # the awaiting task was cancelled
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)
