"""``ppstage bench pipeline``: what splitting the generator over K stages costs, in one run.

The same embedded model (same layers, same calls, R1: no recompute, so no
stage-0 dependency) runs as local pipelines with K = 1, 2, 3 generator
stages, one after the other in one invocation (``rounds`` > 1 alternates
them). Every K > 1 runs twice per round: with fused steps (the default: a
stage's worker takes its input hop and queues its output hop itself) and with
every hop through the loop (``runtime.fused_steps = false``, the schedule
before), so the gain is a ratio measured in the same run. The figure is the median generator time per chunk (the longest stage
duration reported per chunk: envelope in to last call out) as a ratio to
K = 1; the difference is what the hops cost. Target (issue 11): K = 2 <=
1.25x K = 1 (stretch 1.1x).
"""

from __future__ import annotations

from statistics import median

import msgspec

from ppstage.bench.runs import run_once
from ppstage.bench.targets import Target, all_met
from ppstage.config import PPStageConfig

TARGET_K2 = 1.25


class StagesResult(msgspec.Struct, frozen=True, kw_only=True):
    stages: int
    hops: str  # "fused" (runtime.fused_steps) or "loop"
    generator_ms: float  # median over rounds of the per-run median
    period_ms: float
    loop_cpu_pct: float
    runs: int


class PipelineBenchResult(msgspec.Struct, frozen=True, kw_only=True):
    chunks: int
    rows: tuple[StagesResult, ...]

    def ratio(self, k: int, hops: str = "fused") -> float | None:
        base = next((r for r in self.rows if r.stages == 1), None)
        row = next((r for r in self.rows if r.stages == k and r.hops == hops), None)
        if base is None or row is None or base.generator_ms <= 0:
            return None
        return row.generator_ms / base.generator_ms

    def targets(self) -> tuple[Target, ...]:
        """K = 2 against K = 1, when this run measured both (``--stages 1 2``)."""
        k2 = self.ratio(2)
        if k2 is None:
            return ()
        return (Target(claim=f"target: K=2 <= {TARGET_K2:g}x K=1: {k2:.2f}x", met=k2 <= TARGET_K2),)

    @property
    def passed(self) -> bool:
        return all_met(self.targets())


def run_pipeline_bench(
    stages: tuple[int, ...] = (1, 2, 3), *, chunks: int = 24, rounds: int = 1, timeout_s: float = 300.0
) -> PipelineBenchResult:
    if chunks < 6:
        raise ValueError(f"--chunks must be >= 6 (2 of warm-up, then medians), got {chunks}")
    if rounds < 1 or not stages or min(stages) < 1:
        raise ValueError(f"--rounds and every --stages value must be >= 1, got rounds {rounds}, stages {stages}")
    base = PPStageConfig().with_overrides({"recompute.mode": "r1"})
    variants = [(k, "fused") for k in stages] + [(k, "loop") for k in stages if k > 1]
    seen: dict[tuple[int, str], list[dict]] = {v: [] for v in variants}
    for _ in range(rounds):
        for k, hops in variants:
            cfg = base.with_overrides({"topology.stages": k, "runtime.fused_steps": hops == "fused"})
            seen[(k, hops)].append(run_once(cfg, chunks, timeout_s=timeout_s)["summary"])
    rows = tuple(
        StagesResult(
            stages=k,
            hops=hops,
            generator_ms=median(s["median_s1_ms"] for s in runs),
            period_ms=median(s["median_period_ms"] for s in runs),
            loop_cpu_pct=median(s.get("loop_cpu_pct_of_period", 0.0) for s in runs),
            runs=len(runs),
        )
        for (k, hops), runs in sorted(seen.items(), key=lambda kv: (kv[0][1] != "fused", kv[0][0]))
    )
    return PipelineBenchResult(chunks=chunks, rows=rows)


def format_report(r: PipelineBenchResult) -> str:
    lines = [
        f"pipeline: embedded model, R1, same layers and calls, {r.chunks} chunks per run, gloo, local processes",
        "hops: fused = a stage's worker takes and sends its hops itself (runtime.fused_steps, the default); "
        "loop = every hop through the event loop (before)",
        "x K=1: generator ms / that of K=1 (fused); generator ms = the slowest stage's median time per chunk",
        "",
        f"{'K':>3}  {'hops':>5}  {'generator ms/chunk':>18}  {'x K=1':>6}  {'period ms':>9}  {'rank-0 loop CPU % of period':>27}",
    ]
    for row in r.rows:
        ratio = r.ratio(row.stages, row.hops)
        lines.append(
            f"{row.stages:>3}  {row.hops:>5}  {row.generator_ms:18.1f}  {(f'{ratio:.2f}' if ratio else 'n/a'):>6}  "
            f"{row.period_ms:9.1f}  {row.loop_cpu_pct:27.1f}"
        )
    targets = r.targets()
    if targets:
        lines += ["", *(t.line() for t in targets)]
    for k in sorted({row.stages for row in r.rows if row.hops == "loop"}):
        fused = next(x for x in r.rows if x.stages == k and x.hops == "fused")
        loop = next(x for x in r.rows if x.stages == k and x.hops == "loop")
        lines.append(f"K={k}: fused steps take {fused.generator_ms / loop.generator_ms:.2f}x the generator time "
                     f"of loop hops, in the same run")
    return "\n".join(lines)
