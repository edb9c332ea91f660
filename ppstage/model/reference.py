"""The single-process reference pipeline (R1 / R0a / R0), no torch.distributed.

Per chunk: stage-0 inputs -> ``begin_chunk`` -> optional recompute call ->
N denoise calls with the scheduler -> ``end_chunk`` -> record latents ->
decode. Re-bases and forced cuts come from the same ``Planner`` and are
applied by the same ``GeneratorStage`` as in the distributed runtime, so a
distributed run stays bitwise equal to this one across them. ``run_reference`` is what the distributed demo calls to obtain the
digests its output must match, so it stays importable and fast.

Device: the generator runs on ``device``, which must be the generator ranks'
device (``ppstage.distributed.devices.reference_device``) for a bitwise check:
CPU and GPU kernels round differently, so a CPU reference does not match a
CUDA run to the bit. Stage 0 stays on the host, as on rank 0 (which copies each
result there), and its inputs are moved to ``device`` as the transport moves an
envelope; ``latents_out`` and pixels come back on the host.
"""

from __future__ import annotations

import statistics
import struct
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import msgspec
import torch
from torch import Tensor

from ppstage.config import PPStageConfig
from ppstage.errors import StateDivergence
from ppstage.digests import tensor_digest
from ppstage.model.scheduler import RECOMPUTE_TIMESTEP, FlowMatchScheduler, denoise_chunk
from ppstage.model.loader import build_generator
from ppstage.core.plan import ChunkPlan
from ppstage.core.planner import (
    AttentionBiasChange,
    HardCut,
    Intent,
    Planner,
    PromptUpdate,
    StreamStart,
)
from ppstage.model.stream_inputs import ChunkInputs, StreamInputs

DEFAULT_PROMPT = "a red fox running through snow"


class StreamScript(msgspec.Struct, frozen=True, kw_only=True):
    """Intents at chunk boundaries: ``cut_at`` / ``prompt_at`` / ``bias_at`` chunk k."""

    prompt: str = DEFAULT_PROMPT
    cut_at: tuple[int, ...] = ()
    prompt_at: dict[int, str] = msgspec.field(default_factory=dict)
    bias_at: dict[int, float] = msgspec.field(default_factory=dict)

    def intents_at(self, k: int) -> list[Intent]:
        out: list[Intent] = [StreamStart(self.prompt)] if k == 0 else []
        if k in self.cut_at and k > 0:
            out.append(HardCut())
        if k in self.prompt_at:
            out.append(PromptUpdate(self.prompt_at[k]))
        if k in self.bias_at:
            out.append(AttentionBiasChange(self.bias_at[k]))
        return out


@dataclass(frozen=True)
class ChunkRecord:
    chunk_index: int
    cache_epoch: int
    call_id: int
    current_start_frame: int
    do_kv_recompute: bool
    context_source: str
    generator_calls: int
    output_digest: str
    state_digest: str
    model_ms: float
    latents_out: Tensor  # [F, C, H, W] float32
    pixels: Tensor  # [F, 3, H, W] uint8
    position_offset: int = 0  # rotary position of frame f is f - position_offset
    rebased: bool = False  # a re-base happened at this chunk's boundary

    def summary(self) -> dict[str, object]:
        """The record without tensors (JSON-ready)."""
        return {k: v for k, v in self.__dict__.items() if not isinstance(v, Tensor)}


class ReferencePipeline:
    """Stage 0 + the generator in one process.

    ``layer_ranges`` splits the generator into a chain of ``GeneratorStage``s run
    one after another (default: one stage over all layers); the output is
    bitwise identical either way. ``device`` (default CPU) is where the
    generator and the scheduler run: the device of the runs it is compared
    with (see the module docstring); stage 0 stays on the host.
    """

    def __init__(
        self,
        config: PPStageConfig,
        *,
        layer_ranges: Sequence[tuple[int, int]] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.config = config
        self.device = torch.device(device if device is not None else "cpu")
        self.stream = StreamInputs(config)
        self.scheduler = FlowMatchScheduler.from_config(config)
        ranges = layer_ranges or [(0, config.model.layers)]
        self.stages = [build_generator(config, r, device=self.device) for r in ranges]
        if not self.stages[0].is_first or not self.stages[-1].is_last:
            raise ValueError(f"layer ranges {ranges} must cover the model end to end")

    def run_chunk(self, plan: ChunkPlan) -> ChunkRecord:
        inputs = self.stream.chunk_inputs(plan)
        t0 = time.perf_counter()
        latents_out = self.generate(plan, inputs)
        model_ms = (time.perf_counter() - t0) * 1e3
        digests = {s.state_digest() for s in self.stages}
        if len(digests) != 1:
            raise StateDivergence(
                "stages of one pipeline disagree on the lifecycle state", chunk=plan.id
            )
        self.stream.record_latents(plan, latents_out)
        pixels = self.stream.decode(plan, latents_out)
        return ChunkRecord(
            chunk_index=plan.chunk_index,
            cache_epoch=plan.cache_epoch,
            call_id=plan.call_id,
            current_start_frame=plan.current_start_frame,
            do_kv_recompute=plan.do_kv_recompute,
            context_source=plan.context_source,
            generator_calls=self.stages[0].lifecycle.state.calls_made,
            output_digest=tensor_digest(latents_out),
            state_digest=digests.pop(),
            model_ms=model_ms,
            latents_out=latents_out,
            pixels=pixels,
            position_offset=plan.position_offset,
            rebased=plan.rebased,
        )

    def generate(self, plan: ChunkPlan, inputs: ChunkInputs) -> Tensor:
        """Phase B of one chunk: every generator call, in the planned order.

        ``inputs`` may be on any device: they are moved to ``self.device`` first.
        Returns ``latents_out`` ``[F, C, H, W]`` float32 on the host.
        """
        dev = self.device
        for s in self.stages:
            s.begin_chunk(plan, inputs.conditioning.to(dev))
        if plan.do_kv_recompute:
            if inputs.context_frames is None:
                raise ValueError("recompute planned without context frames")
            self._call("recompute", RECOMPUTE_TIMESTEP, inputs.context_frames.to(dev))
        steps = inputs.step_list.tolist()
        call = partial(self._call, "denoise")
        out = denoise_chunk(call, self.scheduler, plan, steps, inputs.latents_in.to(dev))
        for s in self.stages:
            s.end_chunk()
        return out.cpu()

    def _call(self, kind: str, timestep: float, x: Tensor) -> Tensor:
        for s in self.stages:
            x = s.run_call(kind, timestep, x)  # type: ignore[arg-type]
        return x


def run_reference(
    config: PPStageConfig,
    chunks: int,
    script: StreamScript | None = None,
    *,
    device: torch.device | str | None = None,
) -> list[ChunkRecord]:
    """Plan ``chunks`` chunks of the scripted stream and run them through the reference.

    ``device`` is where the generator runs (default CPU): the generator ranks' device
    when the records are compared with a distributed run (the module docstring says why).
    """
    script = script if script is not None else StreamScript()
    planner = Planner(config)
    pipeline = ReferencePipeline(config, device=device)
    records = []
    for k in range(chunks):
        for intent in script.intents_at(k):
            planner.submit(intent)
        records.append(pipeline.run_chunk(planner.next_chunk()))
    return records


def median_model_ms(records: Sequence[ChunkRecord]) -> float:
    return statistics.median(r.model_ms for r in records) if records else 0.0


# -- contact sheet (PNG without Pillow) --------------------------------------
def contact_sheet(records: Sequence[ChunkRecord], pad: int = 2) -> Tensor:
    """One row per chunk, one column per frame: ``[H, W, 3]`` uint8."""
    if not records:
        raise ValueError("no chunks to draw")
    f, _, h, w = records[0].pixels.shape
    sheet = torch.full((len(records) * (h + pad) + pad, f * (w + pad) + pad, 3), 255, dtype=torch.uint8)
    for r, rec in enumerate(records):
        for c in range(rec.pixels.shape[0]):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            sheet[y : y + h, x : x + w] = rec.pixels[c].permute(1, 2, 0)
    return sheet


def write_png(path: str | Path, rgb: Tensor) -> None:
    """Write ``[H, W, 3]`` uint8 as an 8-bit RGB PNG (zlib + struct only)."""
    h, w, c = rgb.shape
    if c != 3 or rgb.dtype != torch.uint8:
        raise ValueError("write_png expects [H, W, 3] uint8")
    rows = rgb.contiguous().numpy().reshape(h, w * 3)
    raw = b"".join(b"\x00" + rows[i].tobytes() for i in range(h))  # filter type 0 per row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    png = b"\x89PNG\r\n\x1a\n"
    png += chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9))
    png += chunk(b"IEND", b"")
    Path(path).write_bytes(png)
