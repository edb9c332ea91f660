"""What the break-it tests share: quick deadlines, drills in the config, and a finished run's figures.

``tests/test_breakit.py`` (the drill matrix, wire boundaries) and
``tests/test_breakit_liveness.py`` (stalls, deadlines, the end of a stream, a dead
launcher) run real ``ppstage launch`` processes through ``run``.
"""

from __future__ import annotations

import re
import time

from ppstage.config import PPStageConfig
from ppstage.model.reference import StreamScript, run_reference
from ppstage.observability.report import check_digests
from ppstage.stages.launcher import start_pipeline

QUICK = {
    "runtime.pg_timeout_s": 10.0,
    "runtime.stage_idle_deadline_s": 4.0,
    "runtime.keepalive_interval_s": 0.3,
    "runtime.drain_deadline_s": 8.0,
    "runtime.result_deadline_min_s": 4.0,
    "liveness.phase_deadline_min_s": 2.0,
    "liveness.warmup_deadline_s": 12.0,
}


def drill(kind: str, rank: int, chunk: int = 0, ms: float = 0.0) -> dict:
    return {"kind": kind, "rank": rank, "chunk": chunk, "ms": ms}


def config(*drills: dict, stages: int = 2, tp: int = 1, mode: str = "r1", **overrides) -> PPStageConfig:
    return PPStageConfig().with_overrides(
        {
            "topology.stages": stages,
            "topology.tp": tp,
            "recompute.mode": mode,
            "faults.drill": list(drills),
            **QUICK,
            **overrides,
        }
    )


class Run:
    """A finished pipeline: exit codes, rank 0's summary, logs, and the measured figures."""

    def __init__(self, pipe, codes, exited_wall: float, config: PPStageConfig, chunks: int, script) -> None:
        self.pipe, self.codes, self.config = pipe, codes, config
        self.result = pipe.summary() or {}
        self.exited_wall = exited_wall
        self.chunks, self.script = chunks, script

    def log(self, rank: int) -> str:
        return (self.pipe.out_dir / f"rank{rank}.log").read_text()

    @property
    def error(self) -> str:
        return self.result.get("error") or ""

    def fired_wall(self) -> float:
        """When the drill fired (its rank's ``drill fired`` line)."""
        for r in range(len(self.codes)):
            m = re.search(r"drill fired.*?t_wall=([0-9.]+)", self.log(r))
            if m:
                return float(m.group(1))
        raise AssertionError("no drill fired")

    def seconds_to_exit(self) -> float:
        return self.exited_wall - self.fired_wall()

    def emitted_match_reference(self) -> int:
        """Every emitted chunk is bitwise the reference's (no stale, no wrong frame); returns how many."""
        # Tensor parallel sums partial outputs in another order: equal within 1e-4, not bitwise.
        atol = 1e-4 if self.config.topology.tp > 1 else 0.0
        ref = run_reference(self.config, self.chunks, self.script)
        check = check_digests(self.result["events"], ref, latents=self.pipe.latents, atol=atol)
        assert not check.mismatched, check
        emitted = [e["chunk_index"] for e in self.result["events"] if e["outcome"] == "emitted"]
        assert emitted == sorted(emitted)  # in order
        return check.compared

    def tails(self) -> list[str]:
        return [self.pipe.log_tail(r, 15) for r in range(len(self.codes))]


def run(tmp_path, cfg: PPStageConfig, *, chunks: int = 8, cuts=(), timeout: float = 60.0, **kw) -> Run:
    args = ["--quiet"] + [a for k in cuts for a in ("--cut-at", str(k))]
    pipe = start_pipeline(cfg, tmp_path / "run", chunks=chunks, launch_args=args, **kw)
    try:
        codes = pipe.wait(timeout, grace_s=20.0)
    finally:
        pipe.kill()
    return Run(pipe, codes, time.time(), cfg, chunks, StreamScript(cut_at=tuple(cuts)))


def all_failed(r: Run) -> None:
    assert all(c not in (0, None) for c in r.codes), (r.codes, r.tails())  # none hung, none "succeeded"


def report_figure(name: str, r: Run) -> None:
    print(f"\nFIGURE {name}: injection -> every rank exited {r.seconds_to_exit():.2f} s")
