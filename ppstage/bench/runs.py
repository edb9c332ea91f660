"""Running one local pipeline for a benchmark and reading back rank 0's summary."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from ppstage.config import PPStageConfig
from ppstage.errors import PPStageError

# Short deadlines so a broken run fails in seconds; generous enough for a busy machine.
BENCH_RUNTIME = {
    "runtime.pg_timeout_s": 60.0,
    "runtime.stage_idle_deadline_s": 20.0,
    "runtime.keepalive_interval_s": 1.0,
    "runtime.drain_deadline_s": 30.0,
}


class BenchRunFailed(PPStageError):
    """A bench's pipeline run exited non-zero or left no summary (the message has each failed rank's log tail).

    A ``PPStageError``: the CLI reports it as one typed line and exits 1.
    """


def run_once(config: PPStageConfig, chunks: int, *, timeout_s: float, out_dir: str | None = None) -> dict[str, Any]:
    """Run ``config`` for ``chunks`` chunks (every rank reaped); return rank 0's summary dict."""
    from ppstage.stages.launcher import start_pipeline

    out = Path(out_dir or tempfile.mkdtemp(prefix="ppstage-bench-"))
    pipe = start_pipeline(config.with_overrides(BENCH_RUNTIME), out, chunks=chunks, launch_args=["--quiet"])
    try:
        codes = pipe.wait(timeout_s)
    finally:
        pipe.kill()
    result = pipe.summary()
    if pipe.timed_out:
        raise BenchRunFailed(
            f"pipeline run of {chunks} chunk(s) timed out after {timeout_s:g} s (--timeout); every rank was "
            f"killed, logs in {out}"
        )
    if any(c != 0 for c in codes) or result is None:
        tails = "\n".join(f"--- rank {r} (exit {c}) ---\n{pipe.log_tail(r, 8)}" for r, c in enumerate(codes) if c != 0)
        raise BenchRunFailed(f"pipeline run failed, exit codes {codes}, logs in {out}\n{tails}")
    return result
