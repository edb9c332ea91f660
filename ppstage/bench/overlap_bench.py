"""``ppstage bench overlap``: how close the period gets to the slower stage, over a sweep.

Each case is a local pipeline (K generator stages, gloo) on the embedded model
with simulated stage costs: stage 0 sleeps ``decode_ms`` per chunk in its
decode worker (scaled by the frames it decodes), the generator sleeps a cost
per call spread so that a chunk's calls add up to the case's generator target
(the real compute, about 10 ms per chunk here, comes on top). Cases:

* ``stage0``: stage 0 is the bottleneck (decode = D, generator = D / 2);
* ``generator``: the generator is (decode = D / 2, generator = D);
* ``balanced``: both about D.

Every (mode, case, D_in = D_out) runs with the normal schedule, and in the
same invocation two baselines: **sequential** (a chunk is planned only once the
previous one was emitted: no overlap at all) and, for R0a, **decode-first**
(``anchor_first_decode = false``: every frame of chunk k is decoded before
chunk k+1's anchor can be built).

The R0a dependency binds only when a chunk's anchor comes from the chunk just
before it, as in the system this project comes from (the anchor is decoded
frame ``start - decoded_buffer_frames``): so the sweep runs with
``decoded_buffer_frames = chunk_frames`` (3) unless told otherwise. With the
default 6, the anchor comes from two chunks back and R0a overlaps like R1.

Per case: median period, median stage-0 time (build + decode) and generator
time, period / max(stage), period / sum, OverlapScore, queue maxima, rank 0's
loop CPU as % of the period. Target (issue 11), R0a anchor-first:
period <= max(stage 0, generator) + anchor-decode time + 10 %.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any, Callable

import msgspec

from ppstage.bench.runs import run_once
from ppstage.bench.targets import Target, all_met
from ppstage.config import PPStageConfig

CASES = ("stage0", "generator", "balanced")
MODES = ("r1", "r0a", "r0")


class OverlapSweep(msgspec.Struct, frozen=True, kw_only=True):
    modes: tuple[str, ...] = ("r1", "r0a")
    cases: tuple[str, ...] = ("balanced",)
    depths: tuple[int, ...] = (2,)
    chunks: int = 16
    decode_ms: float = 40.0
    generator_ms: float | None = None  # None: the same as decode_ms
    stages: int = 2
    decoded_buffer_frames: int = 3
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.chunks < 8:
            raise ValueError(f"--chunks must be >= 8 (2 of them warm-up), got {self.chunks}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "OverlapSweep":
        full = getattr(args, "full", False)
        return cls(
            modes=tuple(args.modes or (MODES if full else ("r1", "r0a"))),
            cases=tuple(args.cases or (CASES if full else ("balanced",))),
            depths=tuple(args.depths or ((1, 2, 3) if full else (2,))),
            chunks=args.chunks or 16,
            decode_ms=args.simulate_decode_ms,
            generator_ms=args.simulate_call_ms,
            stages=args.stages or 2,
            timeout_s=args.timeout,
        )


class CaseResult(msgspec.Struct, frozen=True, kw_only=True):
    mode: str
    case: str
    depth: int
    schedule: str  # overlapped | anchor-first | decode-first | sequential
    period_ms: float
    s0_ms: float
    s1_ms: float
    overlap_score: float
    max_in_flight: int
    max_decode_queue: int
    loop_cpu_pct: float
    anchor_decode_ms: float  # the simulated cost of decoding one frame

    @property
    def per_max(self) -> float:
        return self.period_ms / max(self.s0_ms, self.s1_ms, 1e-9)

    @property
    def per_sum(self) -> float:
        return self.period_ms / max(self.s0_ms + self.s1_ms, 1e-9)

    @property
    def r0a_target_ms(self) -> float:
        """max(stage 0, generator) + anchor-decode time, + 10 %."""
        return 1.1 * (max(self.s0_ms, self.s1_ms) + self.anchor_decode_ms)


class OverlapBenchResult(msgspec.Struct, frozen=True, kw_only=True):
    sweep: OverlapSweep
    cases: tuple[CaseResult, ...]
    skipped: tuple[str, ...] = ()

    def targets(self) -> tuple[Target, ...]:
        """One per R0a anchor-first case, beside its decode-first baseline (none without R0a)."""
        out: list[Target] = []
        for c in self.cases:
            if c.schedule != "anchor-first":
                continue
            base = next(
                (b for b in self.cases if b.schedule == "decode-first" and (b.case, b.depth) == (c.case, c.depth)),
                None,
            )
            out.append(Target(
                claim=f"target r0a {c.case} D={c.depth}: period {c.period_ms:.1f} <= {c.r0a_target_ms:.1f} ms "
                      "(max stage + anchor decode + 10 %)",
                met=c.period_ms <= c.r0a_target_ms,
                note=f"; decode-first {base.period_ms:.1f} ms ({base.period_ms / c.period_ms:.2f}x)" if base else "",
            ))
        return tuple(out)

    @property
    def passed(self) -> bool:
        return all_met(self.targets())


def _costs(case: str, sweep: OverlapSweep) -> tuple[float, float]:
    d = sweep.decode_ms
    g = sweep.generator_ms if sweep.generator_ms is not None else d
    return {"stage0": (d, g / 2), "generator": (d / 2, g), "balanced": (d, g)}[case]


def _config(sweep: OverlapSweep, mode: str, case: str, depth: int, **runtime: Any) -> PPStageConfig:
    decode_ms, gen_ms = _costs(case, sweep)
    base = PPStageConfig()
    calls = len(base.denoise.step_list) + (0 if mode == "r1" else 1)
    return base.with_overrides(
        {
            "topology.stages": sweep.stages,
            "recompute.mode": mode,
            "recompute.decoded_buffer_frames": sweep.decoded_buffer_frames,
            "runtime.d_in": depth,
            "runtime.d_out": depth,
            "runtime.simulated_decode_ms": decode_ms,
            "runtime.simulated_call_ms": gen_ms / calls,
            **{f"runtime.{k}": v for k, v in runtime.items()},
        }
    )


def _r0_report(config: PPStageConfig, workdir: Path) -> str | None:
    """A passing R0-vs-R0a quality report for this config (the R0 gate), or None."""
    from ppstage.model.quality import run_quality, write_report

    report = run_quality(config, chunks=6)
    if not report.passed:
        return None
    path = workdir / "r0_quality.json"
    write_report(path, report)
    return str(path)


def run_overlap_bench(
    sweep: OverlapSweep, *, progress: Callable[[CaseResult], None] | None = None
) -> OverlapBenchResult:
    """Run every case of ``sweep``; ``progress`` gets each row as its case ends."""
    workdir = Path(tempfile.mkdtemp(prefix="ppstage-overlap-"))
    out: list[CaseResult] = []
    skipped: list[str] = []
    for mode in sweep.modes:
        for case in sweep.cases:
            schedules = [(d, "anchor-first" if mode == "r0a" else "overlapped", {}) for d in sweep.depths]
            if mode == "r0a":
                schedules += [(d, "decode-first", {"anchor_first_decode": False}) for d in sweep.depths]
            schedules.append((sweep.depths[0], "sequential", {"sequential_schedule": True}))
            for depth, schedule, runtime in schedules:
                cfg = _config(sweep, mode, case, depth, **runtime)
                if mode == "r0":
                    report = _r0_report(cfg, workdir)
                    if report is None:
                        skipped.append(f"r0/{case}: the R0 quality report did not pass, R0 not run")
                        break
                    cfg = cfg.with_overrides({"recompute.r0_quality_report": report})
                s = run_once(cfg, sweep.chunks, timeout_s=sweep.timeout_s)["summary"]
                row = CaseResult(
                    mode=mode, case=case, depth=depth, schedule=schedule,
                    period_ms=s["median_period_ms"], s0_ms=s["median_s0_ms"], s1_ms=s["median_s1_ms"],
                    overlap_score=s["overlap_score"], max_in_flight=s["max_in_flight"],
                    max_decode_queue=s["max_decode_queue"], loop_cpu_pct=s.get("loop_cpu_pct_of_period", 0.0),
                    anchor_decode_ms=cfg.runtime.simulated_decode_ms / cfg.cache.chunk_frames,
                )
                out.append(row)
                if progress is not None:
                    progress(row)
    return OverlapBenchResult(sweep=sweep, cases=tuple(out), skipped=tuple(skipped))


_HEAD = (
    f"{'mode':<4} {'case':<9} {'D':>1} {'schedule':<12} {'period':>7} {'stage0':>7} {'gen':>7} "
    f"{'p/max':>6} {'p/sum':>6} {'Overlap':>7} {'inflt':>5} {'decq':>4} {'loop%':>5}"
)


def format_row(c: CaseResult) -> str:
    return (
        f"{c.mode:<4} {c.case:<9} {c.depth:>1} {c.schedule:<12} {c.period_ms:7.1f} {c.s0_ms:7.1f} {c.s1_ms:7.1f} "
        f"{c.per_max:6.2f} {c.per_sum:6.2f} {c.overlap_score:7.2f} {c.max_in_flight:>5} {c.max_decode_queue:>4} "
        f"{c.loop_cpu_pct:5.1f}"
    )


def format_heading(sw: OverlapSweep) -> str:
    """What the sweep runs, and the column header of its rows."""
    return "\n".join([
        f"overlap: K={sw.stages}, {sw.chunks} chunks per case, decode {sw.decode_ms:g} ms, generator target "
        f"{sw.generator_ms if sw.generator_ms is not None else sw.decode_ms:g} ms (+ real compute), "
        f"decoded_buffer_frames={sw.decoded_buffer_frames}; times are medians in ms",
        "",
        _HEAD,
    ])


def format_verdicts(r: OverlapBenchResult) -> str:
    """What follows the rows: the R0a targets and the cases skipped."""
    targets = r.targets()
    lines = ["", *(t.line() for t in targets)] if targets else []
    lines += [f"skipped: {s}" for s in r.skipped]
    return "\n".join(lines)


def format_report(r: OverlapBenchResult) -> str:
    """The whole report at once (the CLI prints the heading first and each row as its case ends)."""
    verdicts = format_verdicts(r)
    return "\n".join([format_heading(r.sweep), *(format_row(c) for c in r.cases), *([verdicts] if verdicts else [])])


def write_png(r: OverlapBenchResult, path: str) -> str:
    """A bar chart of the median period per case, with max(stage) and the sum as marks."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no PNG: matplotlib is not installed (pip install 'ppstage[bench]')"
    labels = [f"{c.mode} {c.case}\nD={c.depth} {c.schedule}" for c in r.cases]
    xs = range(len(r.cases))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(r.cases)), 4.5))
    ax.bar(xs, [c.period_ms for c in r.cases], color="#4c72b0", label="median period")
    ax.scatter(xs, [max(c.s0_ms, c.s1_ms) for c in r.cases], color="black", marker="_", s=400, label="max(stage)")
    ax.scatter(xs, [c.s0_ms + c.s1_ms for c in r.cases], color="#c44e52", marker="_", s=400, label="stage 0 + generator")
    ax.set_xticks(list(xs), labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("ms")
    ax.set_title("ppstage bench overlap: period per case")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"wrote {path}"
