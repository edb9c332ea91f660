"""``ppstage bench protocol``: cost of one checked metadata round trip.

Measures, in one run, the receiver-side price of the wire contract for a
typical INFER envelope (4 tensor specs, a recompute over 3 context frames):

* **msgspec path** (what ppstage does): ``encode_frame`` -> ``parse_header`` ->
  ``decode_metadata`` -> ``validate(msg, geometry)``.
* **pickle baseline**: the same message as a plain dict, pickled behind the
  same 40-byte header with a crc32, unpickled, then the same checks written by
  hand over dicts. "The same checks" includes what msgspec's typed decode does
  in C for free: every required field present, every value of its declared
  type (an int that is not a bool, a float, a bool, a str from the allowed
  set), every tensor spec a record of the right shape; without them a peer's
  ``{"call_id": "7"}`` or a missing key would reach the invariants untyped. This is what the protocol replaced; pickle appears here
  *only* as that baseline and never on the wire (unpickling a peer's bytes is
  remote code execution).

Only metadata is measured: tensor payloads cost the same on both paths.
Times are the best of ``repeats`` runs of ``iterations`` round trips each (as
``timeit`` advises: slower runs measure interference from the shared machine,
not the code),
with the garbage collector off (as ``timeit`` does).
"""

from __future__ import annotations

import gc
import math
import pickle  # benchmark baseline only: never used on the wire or in logs
import struct
import time
import zlib
from collections.abc import Callable
from typing import Any

import msgspec

from protocol import (
    ACTION_CODES,
    ANCHOR_FOR_MODE,
    DTYPE_ITEMSIZE,
    MAGIC,
    MAX_META_BYTES,
    MAX_TENSORS,
    PROTOCOL_VERSION,
    InferEnvelope,
    TensorSpec,
    WireGeometry,
    decode_metadata,
    encode_frame,
    parse_header,
    validate,
)

TARGET_US = 20.0
TARGET_RATIO = 3.0

_HEADER = struct.Struct("<4sBBHqqqII")  # the same layout as protocol.codec's header
_INFER_TENSORS = ["latents_in", "conditioning_embeds", "denoising_step_list"]


class ProtocolBenchResult(msgspec.Struct, frozen=True, kw_only=True):
    iterations: int
    repeats: int
    encode_us: float
    decode_us: float
    validate_us: float
    msgspec_us: float
    pickle_us: float
    msgspec_meta_bytes: int
    pickle_meta_bytes: int

    @property
    def ratio(self) -> float:
        return self.pickle_us / self.msgspec_us

    @property
    def passed(self) -> bool:
        return self.msgspec_us <= TARGET_US and self.ratio >= TARGET_RATIO


def typical_geometry() -> WireGeometry:
    return WireGeometry(
        num_frames=3,
        latent_channels=4,
        height=8,
        width=8,
        text_tokens=8,
        text_dim=32,
        hidden_dim=64,
        tokens_per_frame=16,
        max_context_frames=3,
    )


def typical_envelope(g: WireGeometry | None = None) -> InferEnvelope:
    """A steady-state R0a chunk as the planner makes it: recompute over 3 context frames."""
    g = g or typical_geometry()
    frame = (g.latent_channels, g.height, g.width)

    def spec(name: str, shape: tuple[int, ...], dtype: str = "float32") -> TensorSpec:
        return TensorSpec(name=name, dtype=dtype, shape=shape, nbytes=math.prod(shape) * DTYPE_ITEMSIZE[dtype])

    return InferEnvelope(
        call_id=1041,
        chunk_index=1037,
        cache_epoch=3,
        height=g.height,
        width=g.width,
        num_frames=g.num_frames,
        latent_channels=g.latent_channels,
        current_start_frame=21,
        init_cache=False,
        reset_kv_cache=False,
        reset_crossattn_cache=False,
        do_kv_recompute=True,
        num_denoise_steps=4,
        expected_generator_calls=5,
        kv_cache_attention_bias=1.0,
        base_seed=42,
        recompute_mode="r0a",
        anchor_mode="decoded",
        context_frame_indices=(15, 19, 20),
        tensors=(
            spec("latents_in", (g.num_frames, *frame)),
            spec("conditioning_embeds", (g.text_tokens, g.text_dim)),
            spec("denoising_step_list", (4,), "int64"),
            spec("context_frames_override", (3, *frame)),
        ),
    )


# -- the msgspec path ----------------------------------------------------------------


def msgspec_round_trip(msg: InferEnvelope, g: WireGeometry) -> InferEnvelope:
    head, meta = encode_frame(msg)
    received = decode_metadata(parse_header(head), head, meta)
    validate(received, g)
    return received  # type: ignore[return-value]


# -- the pickle baseline -------------------------------------------------------------


class BaselineError(Exception):
    pass


def _as_dict(msg: InferEnvelope) -> dict[str, Any]:
    d = msgspec.to_builtins(msg)
    d["tensors"] = [dict(t) for t in d["tensors"]]
    return d


def _pickle_encode(d: dict[str, Any]) -> tuple[bytes, bytes]:
    for t in d["tensors"]:
        _check_spec(t)
    if len(d["tensors"]) > MAX_TENSORS:
        raise BaselineError("too many tensors")
    meta = pickle.dumps(d, protocol=pickle.HIGHEST_PROTOCOL)
    if len(meta) > MAX_META_BYTES:
        raise BaselineError("metadata too large")
    partial = _HEADER.pack(
        MAGIC,
        PROTOCOL_VERSION,
        ACTION_CODES[d["action"]],
        len(d["tensors"]),
        d["call_id"],
        d["chunk_index"],
        d["cache_epoch"],
        len(meta),
        0,
    )[:-4]
    crc = zlib.crc32(meta, zlib.crc32(partial)) & 0xFFFFFFFF
    return partial + struct.pack("<I", crc), meta


def _pickle_decode(head: bytes, meta: bytes) -> dict[str, Any]:
    magic, version, code, count, call_id, chunk, epoch, meta_len, crc = _HEADER.unpack(head)
    if magic != MAGIC or version != PROTOCOL_VERSION or code != ACTION_CODES["INFER"]:
        raise BaselineError("bad header")
    if count > MAX_TENSORS or not 0 < meta_len <= MAX_META_BYTES or len(meta) != meta_len:
        raise BaselineError("bad lengths")
    if zlib.crc32(meta, zlib.crc32(head[:-4])) & 0xFFFFFFFF != crc:
        raise BaselineError("checksum")
    d = pickle.loads(meta)
    _check_schema(d)
    if d["version"] != version or d["action"] != "INFER":
        raise BaselineError("version or action")
    if (d["call_id"], d["chunk_index"], d["cache_epoch"]) != (call_id, chunk, epoch):
        raise BaselineError("ids")
    if len(d["tensors"]) != count:
        raise BaselineError("tensor count")
    for t in d["tensors"]:
        _check_spec(t)
    return d


# What msgspec's decoder enforces for InferEnvelope, spelled out for a dict.
_INT, _BOOL, _FLOAT, _STR = "int", "bool", "float", "str"
_INFER_FIELDS: dict[str, Any] = {
    "version": _INT, "call_id": _INT, "chunk_index": _INT, "cache_epoch": _INT,
    "height": _INT, "width": _INT, "num_frames": _INT, "latent_channels": _INT,
    "current_start_frame": _INT, "init_cache": _BOOL, "reset_kv_cache": _BOOL,
    "reset_crossattn_cache": _BOOL, "do_kv_recompute": _BOOL, "num_denoise_steps": _INT,
    "expected_generator_calls": _INT, "kv_cache_attention_bias": _FLOAT, "base_seed": _INT,
    "recompute_mode": tuple(ANCHOR_FOR_MODE), "anchor_mode": tuple(ANCHOR_FOR_MODE.values()),
}


def _is(value: Any, kind: Any) -> bool:
    if kind == _INT:
        return type(value) is int
    if kind == _BOOL:
        return type(value) is bool
    if kind == _FLOAT:
        return type(value) in (float, int)
    if kind == _STR:
        return type(value) is str
    return type(value) is str and value in kind


def _check_schema(d: Any) -> None:
    if type(d) is not dict or d.get("action") not in ACTION_CODES:
        raise BaselineError("not a tagged message")
    for key, kind in _INFER_FIELDS.items():
        if key not in d or not _is(d[key], kind):
            raise BaselineError(f"field {key}")
    ctx = d.get("context_frame_indices", [])
    if type(ctx) not in (list, tuple) or any(type(i) is not int for i in ctx):
        raise BaselineError("context_frame_indices")
    tensors = d.get("tensors", [])
    if type(tensors) not in (list, tuple):
        raise BaselineError("tensors")
    for t in tensors:
        if type(t) is not dict or not (
            _is(t.get("name"), _STR)
            and _is(t.get("dtype"), _STR)
            and type(t.get("shape")) in (list, tuple)
            and all(type(x) is int for x in t["shape"])
            and _is(t.get("nbytes"), _INT)
            and (t.get("digest") is None or _is(t["digest"], _STR))
        ):
            raise BaselineError("tensor spec")


def _check_spec(t: dict[str, Any]) -> None:
    itemsize = DTYPE_ITEMSIZE.get(t["dtype"])
    if itemsize is None:
        raise BaselineError("dtype")
    shape = t["shape"]
    if any(x < 0 for x in shape) or len(shape) > 8:
        raise BaselineError("shape")
    if t["nbytes"] != math.prod(shape) * itemsize or t["nbytes"] > 1 << 30:
        raise BaselineError("nbytes")


def _expect(t: dict[str, Any], shape: tuple[int, ...], dtype: str) -> None:
    if t["dtype"] != dtype or tuple(t["shape"]) != shape:
        raise BaselineError(f"tensor {t['name']}")


def _check_infer(d: dict[str, Any], g: WireGeometry) -> None:
    """validate()'s INFER invariants, hand-written over a dict."""
    if d["call_id"] < 0 or d["chunk_index"] < 0 or d["cache_epoch"] < 0:
        raise BaselineError("ids")
    recompute, steps = d["do_kv_recompute"], d["num_denoise_steps"]
    if steps < 1 or d["expected_generator_calls"] != (1 if recompute else 0) + steps:
        raise BaselineError("call count")
    if ANCHOR_FOR_MODE[d["recompute_mode"]] != d["anchor_mode"] or (d["recompute_mode"] == "r1" and recompute):
        raise BaselineError("mode")
    init = d["init_cache"]
    if init and not (d["reset_kv_cache"] and d["reset_crossattn_cache"]):
        raise BaselineError("reset bits")
    if d["reset_kv_cache"] and not init:
        raise BaselineError("reset bits")
    if init and (d["current_start_frame"] != 0 or recompute):
        raise BaselineError("hard cut")
    if d["current_start_frame"] < 0:
        raise BaselineError("start frame")
    bias = d["kv_cache_attention_bias"]
    if not math.isfinite(bias) or bias <= 0:
        raise BaselineError("bias")
    if min(d["height"], d["width"], d["num_frames"], d["latent_channels"]) < 1:
        raise BaselineError("geometry")
    if (d["num_frames"], d["latent_channels"], d["height"], d["width"]) != (
        g.num_frames,
        g.latent_channels,
        g.height,
        g.width,
    ):
        raise BaselineError("geometry")
    specs = {t["name"]: t for t in d["tensors"]}
    want = _INFER_TENSORS + (["context_frames_override"] if recompute else [])
    if [t["name"] for t in d["tensors"]] != want:
        raise BaselineError("tensor list")
    frame = (d["latent_channels"], d["height"], d["width"])
    _expect(specs["latents_in"], (d["num_frames"], *frame), "float32")
    _expect(specs["conditioning_embeds"], (g.text_tokens, g.text_dim), "float32")
    _expect(specs["denoising_step_list"], (steps,), "int64")
    ctx = d["context_frame_indices"]
    if recompute:
        if not 1 <= len(ctx) <= g.max_context_frames or list(ctx) != sorted(set(ctx)):
            raise BaselineError("context indices")
        if ctx[0] < 0 or ctx[-1] >= d["current_start_frame"]:
            raise BaselineError("context indices")
        _expect(specs["context_frames_override"], (len(ctx), *frame), "float32")
    elif ctx:
        raise BaselineError("context indices")


def pickle_round_trip(d: dict[str, Any], g: WireGeometry) -> dict[str, Any]:
    head, meta = _pickle_encode(d)
    received = _pickle_decode(head, meta)
    _check_infer(received, g)
    return received


# -- measuring ---------------------------------------------------------------------------


def best_us(fn: Callable[[], object], iterations: int, repeats: int) -> float:
    """Best over ``repeats`` of the mean time of one call, in microseconds."""
    times = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(iterations):
                fn()
            times.append((time.perf_counter() - t0) / iterations * 1e6)
    finally:
        if gc_was_enabled:
            gc.enable()
    return min(times)


def paired_best_us(
    fa: Callable[[], object], fb: Callable[[], object], iterations: int, repeats: int
) -> tuple[float, float]:
    """Best times of ``fa`` and ``fb`` over alternating runs, so that a burst of
    load on this shared machine hits both paths alike and the ratio stays honest."""
    a, b = [], []
    for _ in range(repeats):
        a.append(best_us(fa, iterations, 1))
        b.append(best_us(fb, iterations, 1))
    return min(a), min(b)


def run_protocol_bench(iterations: int = 20_000, repeats: int = 7) -> ProtocolBenchResult:
    if iterations < 1 or repeats < 1:
        raise ValueError("iterations and repeats must be >= 1")
    g = typical_geometry()
    msg = typical_envelope(g)
    d = _as_dict(msg)
    # Both paths must accept the message and reproduce it, or the timing means nothing.
    if msgspec_round_trip(msg, g) != msg or pickle_round_trip(d, g) != d:
        raise RuntimeError("round trip does not reproduce the message")
    head, meta = encode_frame(msg)
    header = parse_header(head)
    received = decode_metadata(header, head, meta)
    _, pickled = _pickle_encode(d)
    warmup = max(1, iterations // 10)
    best_us(lambda: msgspec_round_trip(msg, g), warmup, 1)
    best_us(lambda: pickle_round_trip(d, g), warmup, 1)
    msgspec_us, pickle_us = paired_best_us(
        lambda: msgspec_round_trip(msg, g), lambda: pickle_round_trip(d, g), iterations, repeats
    )
    return ProtocolBenchResult(
        iterations=iterations,
        repeats=repeats,
        encode_us=best_us(lambda: encode_frame(msg), iterations, repeats),
        decode_us=best_us(lambda: decode_metadata(parse_header(head), head, meta), iterations, repeats),
        validate_us=best_us(lambda: validate(received, g), iterations, repeats),
        msgspec_us=msgspec_us,
        pickle_us=pickle_us,
        msgspec_meta_bytes=len(meta),
        pickle_meta_bytes=len(pickled),
    )


def report_rows(r: ProtocolBenchResult) -> list[tuple[str, str]]:
    """``(measure, figure)`` rows of a result (plain text or a terminal table)."""
    return [
        ("msgspec  encode_frame", f"{r.encode_us:8.2f} us"),
        ("msgspec  parse_header + decode_metadata", f"{r.decode_us:8.2f} us"),
        ("msgspec  validate(msg, geometry)", f"{r.validate_us:8.2f} us"),
        ("msgspec  round trip (a)", f"{r.msgspec_us:8.2f} us"),
        ("pickle   round trip, same checks (b)", f"{r.pickle_us:8.2f} us"),
        ("ratio    (b) / (a)", f"{r.ratio:8.2f} x"),
        ("metadata bytes  msgspec / pickle", f"{r.msgspec_meta_bytes} / {r.pickle_meta_bytes}"),
    ]


def report_heading(r: ProtocolBenchResult) -> str:
    return (
        "protocol round trip: InferEnvelope, 4 tensor specs, recompute over 3 context frames\n"
        f"(metadata only; best of {r.repeats} runs of {r.iterations} round trips)"
    )


def report_verdict(r: ProtocolBenchResult) -> str:
    return (f"target: <= {TARGET_US:g} us and >= {TARGET_RATIO:g}x faster than pickle: "
            + ("PASS" if r.passed else "FAIL"))


def format_report(r: ProtocolBenchResult) -> str:
    rows = report_rows(r)
    width = max(len(k) for k, _ in rows)
    lines = [report_heading(r), "", *(f"{k:<{width}}  {v}" for k, v in rows), "", report_verdict(r)]
    return "\n".join(lines)
