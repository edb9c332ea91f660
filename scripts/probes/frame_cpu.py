"""Probe: CPU per step of framing one hop, both ends, in one process (no wire).

Each step is timed with ``time.thread_time()`` (CPU, not wall time) over many
frames; the "wire" is an in-memory copy, reported on its own. Also times
``prepare_tensors`` for an envelope's four tensors. cProfile is no substitute:
its per-call overhead inflates exactly these many-small-call functions.
Run: ``.venv/bin/python scripts/probes/frame_cpu.py [NBYTES]``
(docs/performance.md, "Tried later on 2026-12-03").
"""

from __future__ import annotations

import sys
import time

import torch

from ppstage.distributed.transport import FrameReader, FrameWriter, make_spec, preamble_capacity, prepare_tensors, rebuild
from ppstage.stages.envelopes import hop
from protocol import ChunkId, decode_metadata, encode_frame, parse_header, validate

FRAMES = 3000
WARMUP = 200


class _Ids:
    def __init__(self, i: int) -> None:
        self.id = ChunkId(i, i, 0)


def main() -> None:
    torch.set_num_threads(1)
    nbytes = int(sys.argv[1]) if len(sys.argv) > 1 else 64 << 10
    cpu = torch.device("cpu")
    capacity = preamble_capacity("gloo")
    writer, reader = FrameWriter(cpu, capacity, exact=False), FrameReader(cpu, capacity)
    tensor = torch.full((max(1, nbytes // 256), 64), 1.0)
    wire: list[torch.Tensor] = []
    cpu_s = dict.fromkeys(("build hop", "validate", "prepare_tensors", "encode_frame", "FrameWriter.send",
                           "receive preamble", "parse + decode", "receive tensors", "validate (recv)", "rebuild",
                           "in-memory wire"), 0.0)

    def send(buf: torch.Tensor) -> None:
        t = time.thread_time()
        wire.append(buf.clone())
        cpu_s["in-memory wire"] += time.thread_time() - t

    def recv(buf: torch.Tensor) -> None:
        t = time.thread_time()
        src = wire.pop(0)
        buf[: src.numel()].copy_(src)
        cpu_s["in-memory wire"] += time.thread_time() - t

    for i in range(FRAMES + WARMUP):
        if i == WARMUP:
            cpu_s = dict.fromkeys(cpu_s, 0.0)
        marks = [time.thread_time()]
        msg = hop(_Ids(i), call_kind="denoise", step=0, target="hidden", tensor=tensor)  # type: ignore[arg-type]
        marks.append(time.thread_time())
        validate(msg, None)
        marks.append(time.thread_time())
        _, payload = prepare_tensors(msg.tensors, [tensor], cpu, fill_digests=False, chunk=None)
        marks.append(time.thread_time())
        head, meta = encode_frame(msg)
        marks.append(time.thread_time())
        writer.send(head, meta, payload, send)
        marks.append(time.thread_time())
        h = reader.receive_preamble(recv)
        marks.append(time.thread_time())
        header = parse_header(h)
        got = decode_metadata(header, h, reader.receive_meta(header.meta_len, recv))
        marks.append(time.thread_time())
        flats = reader.receive_tensors(h, header.meta_len, got.tensors, recv, lambda spec: None)
        marks.append(time.thread_time())
        validate(got, None)
        marks.append(time.thread_time())
        out = [rebuild(s, f) for s, f in zip(got.tensors, flats)]
        marks.append(time.thread_time())
        for name, a, b in zip(cpu_s, marks, marks[1:]):
            cpu_s[name] += b - a
        del out, flats
    wire_us = cpu_s.pop("in-memory wire") / FRAMES * 1e6
    print(f"one hop of {nbytes} bytes, CPU per frame (us, {FRAMES} frames; the in-memory wire's "
          f"{wire_us:.1f} us is included in FrameWriter.send and the receive steps):")
    for name, s in cpu_s.items():
        print(f"  {name:<18} {s / FRAMES * 1e6:6.1f}")
    ts = [torch.randn(3, 4, 8, 8), torch.randn(1, 16, 32), torch.tensor([1000, 750, 500]), torch.randn(3, 4, 8, 8)]
    specs = [make_spec(f"t{i}", t) for i, t in enumerate(ts)]
    t0 = time.thread_time()
    for _ in range(20_000):
        prepare_tensors(specs, ts, cpu, fill_digests=False, chunk=None)
    print(f"prepare_tensors, an envelope's 4 tensors: {(time.thread_time() - t0) / 20_000 * 1e6:.1f} us")


if __name__ == "__main__":
    main()
