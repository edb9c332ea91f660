"""Constant memory over a long, re-basing stream (SPEC section 13), in one process.

Runs ``chunks`` chunks of rank 0's and the generator's per-chunk structures
together: the ``Planner`` (and its own lifecycle), the ``EpochGate`` (every plan
expected, every result admitted), and the ``ReferencePipeline`` (stream
inputs, every ``GeneratorStage``, its caches, rotary table and lifecycle), with
a positional table small enough to re-base every few chunks. Records are not
kept. Reports the process's resident set size (``VmRSS`` from
``/proc/self/status``) after a warm-up and at the end, and the sizes of the
bounded structures, so growth is measured, not assumed::

    .venv/bin/python -m ppstage.bench.long_stream --chunks 5000 --table 12

Rank 0's per-chunk event bookkeeping of the distributed runtime
(``observability/metrics.py``) is not part of this run.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import msgspec
import torch

from protocol import ChunkResult, StageReport, TensorSpec

from ppstage.config import PPStageConfig
from ppstage.core.gate import EpochGate
from ppstage.core.planner import Planner, PromptUpdate, StreamStart
from ppstage.model.reference import ReferencePipeline


class LongStreamReport(msgspec.Struct, frozen=True, kw_only=True):
    chunks: int
    warmup_chunks: int
    rebases: int
    epochs: int
    rss_warm_kib: int
    rss_end_kib: int
    growth_pct: float
    sizes: dict[str, int]
    seconds: float


def rss_kib() -> int:
    """Resident set size of this process (KiB), from ``/proc/self/status``."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def _result(plan) -> ChunkResult:
    calls = plan.expected_generator_calls
    report = StageReport(stage=1, current_start_frame=plan.current_start_frame, global_end_index=0,
                         local_end_index=0, state_digest="0" * 32, observed_generator_calls=calls, duration_s=0.0)
    spec = TensorSpec(name="latents_out", dtype="float32", shape=(1,), nbytes=4)
    return ChunkResult(call_id=plan.call_id, chunk_index=plan.chunk_index, cache_epoch=plan.cache_epoch,
                       ok=True, observed_generator_calls=calls, stages=(report,), output_digest="0" * 32,
                       tensors=(spec,))


def run_long_stream(config: PPStageConfig, chunks: int, *, warmup: int = 500, prompt_every: int = 97) -> LongStreamReport:
    planner = Planner(config)
    gate = EpochGate()
    pipeline = ReferencePipeline(config)
    planner.submit(StreamStart("a red fox"))
    rebases = 0
    epochs = set()
    rss_warm = 0
    t0 = time.perf_counter()
    for k in range(chunks):
        if k and k % prompt_every == 0:  # prompt updates keep conditioning changing
            planner.submit(PromptUpdate(f"a fox, scene {k // prompt_every}"))
        plan = planner.next_chunk()
        gate.expect(plan)
        pipeline.run_chunk(plan)  # the record (tensors included) is dropped here
        if not gate.admit(_result(plan)).accepted:
            raise RuntimeError(f"chunk {k} was not accepted")
        rebases += plan.rebased
        epochs.add(plan.cache_epoch)
        if k + 1 == warmup:
            gc.collect()
            rss_warm = rss_kib()
    gc.collect()
    rss_end = rss_kib()
    stage = pipeline.stages[0]
    sizes = {
        "gate.outstanding": gate.in_flight(),
        "gate.dropped_keys": len(gate.dropped),
        "planner.pending": len(planner._pending),
        "planner.slot_positions": len(planner._cache.state.slot_positions),
        "stream.latent_frames": len(pipeline.stream.latent_frames()),
        "stream.decoded_frames": len(pipeline.stream.decoded_frame_buffer),
        "stage.modulation_cache": len(stage._mods),
        "stage.slot_positions": len(stage.lifecycle.state.slot_positions),
    }
    return LongStreamReport(
        chunks=chunks,
        warmup_chunks=warmup,
        rebases=rebases,
        epochs=len(epochs),
        rss_warm_kib=rss_warm,
        rss_end_kib=rss_end,
        growth_pct=round(100.0 * (rss_end - rss_warm) / rss_warm, 2) if rss_warm else float("nan"),
        sizes=sizes,
        seconds=round(time.perf_counter() - t0, 1),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chunks", type=int, default=5000)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--table", type=int, default=12, help="model.rope_max_frames")
    p.add_argument("--mode", choices=("r1", "r0a", "r0"), default="r0a")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if not 0 < args.warmup < args.chunks:
        p.error("need 0 < --warmup < --chunks")
    torch.set_num_threads(args.threads)
    cfg = PPStageConfig().with_overrides({"model.rope_max_frames": args.table, "recompute.mode": args.mode})
    report = run_long_stream(cfg, args.chunks, warmup=args.warmup)
    print(msgspec.json.format(msgspec.json.encode(report)).decode())
    print(f"RSS {report.rss_warm_kib} KiB after {report.warmup_chunks} chunks -> {report.rss_end_kib} KiB after "
          f"{report.chunks} ({report.growth_pct:+.2f} %), {report.rebases} re-bases, {report.epochs} epoch(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
