"""Living under a supervisor (torchrun's elastic agent, ``ppstage serve``, ``ppstage demo``).

Two facts a rank needs about whoever started it:

- ``restart_generation()``: torchrun's restart count (``TORCHELASTIC_RESTART_COUNT``,
  0 for a first start and outside torchrun). It is part of the parity digest and
  of every log line, so that the ranks of one generation only ever talk to each
  other and logs of successive generations stay ordered. Every generation starts
  its stream with a hard cut; epochs count from 0 again, so the stream's identity
  is the pair ``(restart_generation, cache_epoch)``.
- ``watch_launcher(log)``: a daemon thread that ends the process when its launcher
  dies. A worker whose torchrun agent was killed would otherwise keep streaming
  with nobody to restart the job (the agent is the only one that restarts
  workers, and its death does not signal them). The watch compares
  ``os.getppid()`` with the parent seen at start every ``LAUNCHER_POLL_S``: once the
  launcher is gone the process is re-parented (to init or a subreaper), the
  parent id changes, and the rank exits 1 within ``LAUNCHER_WINDOW_S``. The other
  ranks then see a dead channel and follow within their own watchdog window.
  Exiting non-zero (not a graceful drain) is deliberate: a drain would end the
  other nodes' workers with 0 and their agents would report success.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import structlog

LAUNCHER_POLL_S = 0.25
LAUNCHER_WINDOW_S = 1.0  # documented bound: poll interval + time to log and exit
EXIT_LAUNCHER_GONE = 1


def restart_generation() -> int:
    """torchrun's restart count of this worker group (0 outside torchrun)."""
    try:
        return max(0, int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))
    except ValueError:
        return 0


def watch_launcher(log, *, poll_s: float = LAUNCHER_POLL_S) -> threading.Thread | None:
    """Start the launcher watch (see the module docstring); None when there is nothing to watch.

    Nothing is watched when the parent is already init (pid 1): the process was
    started detached, or in a container as its entry point, where the container
    runtime is the supervisor.
    """
    parent = os.getppid()
    if parent <= 1:
        return None
    # Only under a launcher that owns the rank: torchrun's agent (it sets
    # TORCHELASTIC_RUN_ID) or ppstage's own launcher (it sets PPSTAGE_LAUNCHER_PID).
    # A rank started by hand (say under nohup) has a shell for a parent: not watched.
    if os.environ.get("PPSTAGE_LAUNCHER_PID") != str(parent) and "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    # A new thread starts with an empty context: carry rank, stage and generation over.
    log = log.bind(**structlog.contextvars.get_contextvars())

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            now = os.getppid()
            if now != parent:
                log.error(f"launcher gone: its launcher (pid {parent}) died; exiting", phase="launcher",
                          launcher_pid=parent, new_parent=now)
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(EXIT_LAUNCHER_GONE)

    thread = threading.Thread(target=watch, name="launcher-watch", daemon=True)
    thread.start()
    return thread
