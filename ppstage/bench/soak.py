"""A soak run: a long random stream through a real local pipeline, then its verdict.

The stream is generated from a seed: hard cuts, prompt updates, attention-bias
changes (a ``StreamScript`` handed to rank 0 with ``launch --script``) and idle
delays before chunks (``--pause-at``). While it runs, the launcher side reads
every rank's resident memory (``VmRSS`` in ``/proc/<pid>/status``) once the
warm-up chunks are emitted, and keeps the last reading taken while every rank
was alive. From rank 0's per-chunk events it counts:

- **stale frames emitted**: a frame of epoch e emitted after rank 0 had
  registered a plan of a newer epoch (must be 0);
- **out-of-order emissions**: emission order differs from chunk order (0);
- drops by reason, and the deepest the in-flight and decode queues got (<= D).

The verdict passes when those hold and every rank's RSS grew less than
``rss_growth_limit`` between warm-up and the end.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from ppstage.config import PPStageConfig
from ppstage.model.reference import StreamScript

PROMPTS = ("a red fox", "a grey wolf", "a snowy owl", "a brown bear", "a koi pond")


@dataclass
class SoakPlan:
    script: StreamScript
    pauses: dict[int, float]


def random_stream(chunks: int, seed: int, *, p_cut: float = 0.03, p_prompt: float = 0.05,
                  p_bias: float = 0.05, p_pause: float = 0.02, max_pause_ms: float = 5.0) -> SoakPlan:
    """A seeded random stream: cuts, prompt updates, bias changes and short idle delays."""
    rng = random.Random(seed)
    cuts, prompts, biases, pauses = [], {}, {}, {}
    for k in range(1, chunks):
        if rng.random() < p_cut:
            cuts.append(k)
        if rng.random() < p_prompt:
            prompts[k] = rng.choice(PROMPTS)
        if rng.random() < p_bias:
            biases[k] = round(rng.uniform(0.3, 1.0), 3)
        if rng.random() < p_pause:
            pauses[k] = rng.uniform(0.0, max_pause_ms) / 1e3
    script = StreamScript(prompt=PROMPTS[0], cut_at=tuple(cuts), prompt_at=prompts, bias_at=biases)
    return SoakPlan(script, pauses)


def vm_rss_kib(pid: int) -> int | None:
    """Resident memory of ``pid`` in KiB, or None once it has exited."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


@dataclass
class SoakReport:
    chunks: int
    emitted: int
    cuts: int
    prompt_updates: int
    bias_changes: int
    pauses: int
    drops: dict[str, int]
    stale_emitted: int
    out_of_order: int
    max_in_flight: int
    max_decode_queue: int
    d_in: int
    d_out: int
    rss_warm_kib: list[int | None]
    rss_end_kib: list[int | None]
    exit_codes: list[int | None]
    wall_s: float  # launch to reaped: process start-up, warm-up and shutdown included
    rss_growth_limit: float
    mismatched: list[int] = field(default_factory=list)
    error: str | None = None
    # Rank 0's rate from the first emitted chunk to the last (start-up excluded;
    # the stream's idle delays and drops included), and the frames of a chunk.
    frames_per_s: float = 0.0
    frames_per_chunk: int = 1
    warmup_chunks: int = 0  # the RSS baseline is read once this many chunks were emitted

    @property
    def chunks_per_s(self) -> float:
        return self.frames_per_s / self.frames_per_chunk

    def rss_growth(self) -> list[float | None]:
        return [None if (a is None or b is None or a == 0) else (b - a) / a
                for a, b in zip(self.rss_warm_kib, self.rss_end_kib)]

    @property
    def failures(self) -> list[str]:
        """Why the verdict is FAIL, one reason each; empty when it passes."""
        why = []
        if any(c != 0 for c in self.exit_codes):
            why.append(f"exit codes {self.exit_codes}")
        if self.stale_emitted:
            why.append(f"{self.stale_emitted} stale frame(s) emitted")
        if self.out_of_order:
            why.append(f"{self.out_of_order} out-of-order emission(s)")
        if self.mismatched:
            why.append(f"{len(self.mismatched)} chunk(s) differ from the reference")
        if self.max_in_flight > self.d_in or self.max_decode_queue > self.d_out:
            why.append("a queue exceeded its credit")
        growth = self.rss_growth()
        if any(g is None for g in growth):
            # Not a pass by default: the soak exists to check memory, and it was not measured.
            why.append(f"RSS not measured: the stream ended before a reading after {self.warmup_chunks} "
                       "warm-up chunks (run more chunks, or lower --warmup-chunks)")
        elif any(g >= self.rss_growth_limit for g in growth):  # type: ignore[operator]
            why.append(f"a rank's RSS grew {100 * self.rss_growth_limit:.0f} % or more")
        return why

    @property
    def passed(self) -> bool:
        return not self.failures


def count_stale(events: list[dict[str, Any]]) -> int:
    """Frames emitted after rank 0 registered a plan of a newer epoch (``build_end``)."""
    newest_at: list[tuple[float, int]] = sorted(
        (e["build_end"], e["cache_epoch"]) for e in events if e["build_end"]
    )
    stale = 0
    for e in events:
        if e["outcome"] != "emitted":
            continue
        if any(t < e["emitted"] and epoch > e["cache_epoch"] for t, epoch in newest_at):
            stale += 1
    return stale


def count_out_of_order(events: list[dict[str, Any]]) -> int:
    emitted = sorted((e["emitted"], e["chunk_index"]) for e in events if e["outcome"] == "emitted")
    return sum(1 for (_, a), (_, b) in zip(emitted, emitted[1:]) if b <= a)


def run_soak(config: PPStageConfig, chunks: int, out_dir: str | Path, *, seed: int = 0,
             warmup_chunks: int | None = None, rss_growth_limit: float = 0.05, check: bool = False,
             timeout_s: float = 3600.0, progress=None, **stream_kw: Any) -> SoakReport:
    """Run the soak (see the module docstring); every rank is reaped before this returns."""
    from ppstage.observability.report import check_digests
    from ppstage.stages.launcher import start_pipeline

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = random_stream(chunks, seed, **stream_kw)
    script_path = out / "stream.json"
    script_path.write_bytes(msgspec.json.encode(plan.script))
    args = ["--quiet", "--script", str(script_path)]
    for k, secs in sorted(plan.pauses.items()):
        args += ["--pause-at", f"{k}:{secs:.4f}"]
    warmup = warmup_chunks if warmup_chunks is not None else max(20, chunks // 10)
    t0 = time.monotonic()
    pipe = start_pipeline(config, out, chunks=chunks, launch_args=args)
    latents = out / "latents"
    pids = [p.pid for p in pipe.procs]
    warm: list[int | None] = [None] * len(pids)
    end: list[int | None] = [None] * len(pids)
    try:
        deadline = t0 + timeout_s
        last_count, count = -1, 0
        tick = 0
        while time.monotonic() < deadline and all(p.poll() is None for p in pipe.procs):
            readings = [vm_rss_kib(pid) for pid in pids]
            if all(r is not None for r in readings) and all(p.poll() is None for p in pipe.procs):
                end = readings  # the last reading with every rank alive
            # Listing the latents folder (one file per chunk) every tick only until the
            # warm reading; after it, every fifth tick is enough for the progress lines.
            if warm[0] is None or tick % 5 == 0:
                count = len(list(latents.glob("*.f32"))) if latents.exists() else 0
            tick += 1
            if warm[0] is None and count >= warmup and all(r is not None for r in readings):
                warm = readings
            if progress is not None and count and count // 100 != last_count // 100:
                progress(count)
            last_count = count
            # Often enough that a short stream still gets a reading after its warm-up
            # (a 30-chunk stream emits in under a second here); three /proc reads a tick.
            time.sleep(0.1)
        codes = pipe.wait(max(1.0, deadline - time.monotonic()))
    finally:
        pipe.kill()
    result = pipe.summary() or {}
    events = result.get("events", [])
    summary = result.get("summary") or {}
    mismatched: list[int] = []
    if check and events:
        from ppstage.distributed.devices import reference_device
        from ppstage.model.reference import run_reference

        records = run_reference(config, chunks, plan.script, device=reference_device(config))
        mismatched = check_digests(events, records).mismatched
    return SoakReport(
        chunks=chunks,
        emitted=summary.get("chunks_emitted", 0),
        cuts=len(plan.script.cut_at),
        prompt_updates=len(plan.script.prompt_at),
        bias_changes=len(plan.script.bias_at),
        pauses=len(plan.pauses),
        drops=dict(summary.get("dropped", {})),
        stale_emitted=count_stale(events),
        out_of_order=count_out_of_order(events),
        max_in_flight=summary.get("max_in_flight", 0),
        max_decode_queue=summary.get("max_decode_queue", 0),
        d_in=config.runtime.d_in,
        d_out=config.runtime.d_out,
        rss_warm_kib=warm,
        rss_end_kib=end,
        exit_codes=codes,
        wall_s=time.monotonic() - t0,
        rss_growth_limit=rss_growth_limit,
        mismatched=mismatched,
        error=result.get("error"),
        frames_per_s=summary.get("frames_per_s", 0.0),
        frames_per_chunk=config.cache.chunk_frames,
        warmup_chunks=warmup,
    )


def format_report(r: SoakReport) -> str:
    growth = r.rss_growth()
    rows = [
        ("chunks planned / emitted", f"{r.chunks} / {r.emitted}"),
        ("hard cuts / prompt updates / bias changes / delays",
         f"{r.cuts} / {r.prompt_updates} / {r.bias_changes} / {r.pauses}"),
        ("drops by reason", ", ".join(f"{k} {v}" for k, v in sorted(r.drops.items())) or "none"),
        ("stale frames emitted", f"{r.stale_emitted}  (must be 0)"),
        ("out-of-order emissions", f"{r.out_of_order}  (must be 0)"),
        ("max in flight / max decode queue", f"{r.max_in_flight} / {r.max_decode_queue}  (D_in {r.d_in}, D_out {r.d_out})"),
    ]
    if r.mismatched:
        rows.append(("chunks differing from the reference", str(r.mismatched)))
    for rank, (a, b, g) in enumerate(zip(r.rss_warm_kib, r.rss_end_kib, growth)):
        pct = "n/a" if g is None else f"{100 * g:+.2f} %"
        mib = ["not read" if v is None else f"{v / 1024:.1f}" for v in (a, b)]
        rows.append((f"rank {rank} RSS warm -> end", f"{mib[0]} -> {mib[1]} MiB  ({pct})"))
    rows.append(("exit codes", str(r.exit_codes)))
    # Not emitted / wall time: that spreads the processes' start-up over the stream.
    rows.append(("emission rate, first to last emitted chunk",
                 f"{r.chunks_per_s:.1f} chunks/s = {r.frames_per_s:.1f} frames/s  (start-up excluded)"))
    rows.append(("wall time, launch to exit", f"{r.wall_s:.1f} s  (start-up and shutdown included)"))
    if r.error:
        rows.append(("rank 0 error", r.error))
    rows.append(("verdict", "PASS" if r.passed else "FAIL: " + "; ".join(r.failures)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
