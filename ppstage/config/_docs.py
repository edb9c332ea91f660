"""One line of meaning per config key, next to the schema, and the table ``ppstage config --keys`` prints.

``KEY_DOCS`` is written by hand; types and defaults are read from the schema
(msgspec's ``inspect``), so they never drift. tests/test_config_docs.py checks
that every key of the schema has a line and that no line names a key the
schema lacks. A drill entry's fields are ``faults.drill.<field>``.
"""

from __future__ import annotations

from typing import Any

import msgspec
import msgspec.inspect as mi

from ppstage.config._root import PPStageConfig

KEY_DOCS: dict[str, str] = {
    # [model]
    "model.latent_channels": "channels of a latent frame",
    "model.latent_height": "latent frame height (a multiple of patch_size)",
    "model.latent_width": "latent frame width (a multiple of patch_size)",
    "model.patch_size": "latent pixels per patch side: tokens per frame = (height/patch) * (width/patch)",
    "model.dim": "hidden size of the generator (splits into heads of even size)",
    "model.heads": "attention heads (divisible by topology.tp)",
    "model.layers": "transformer blocks, split over the stages (topology.layer_ranges)",
    "model.mlp_ratio": "MLP hidden size as a multiple of dim",
    "model.text_tokens": "tokens of the prompt's conditioning",
    "model.text_dim": "width of a conditioning token",
    "model.vae_scale": "decoded pixels per latent pixel along each side",
    "model.seed": "seed of the model's weights (every tensor is a function of seed and name)",
    "model.rope_max_frames": "length of the rotary position table in frames; passing it re-bases or cuts",
    "model.backend": "'toy', an entry point of group ppstage.backends, or 'package.module:factory'",
    # [cache]
    "cache.window_frames": "KV-cache window in latent frames (>= sinks + one past frame + a chunk)",
    "cache.sink_frames": "first frames of an epoch pinned in the window (attention sinks)",
    "cache.chunk_frames": "latent frames per chunk",
    "cache.on_position_overflow": "at the end of the rotary table: 'rebase' positions down, or force a hard 'cut'",
    "cache.rebase_quality_report": "passing `ppstage quality --rebase` report, needed where a re-base changes the view",
    # [recompute]
    "recompute.mode": "rollout flag: r1 (rolling cache), r0a (anchored recompute), r0 (full recompute)",
    "recompute.cadence": "recompute every n-th chunk of an epoch (a correctness setting, not a speed knob)",
    "recompute.context_frames": "frames a recompute rebuilds the cache from (the anchor and recent frames)",
    "recompute.decoded_buffer_frames": "decoded frames rank 0 keeps; the R0a anchor is this many frames back",
    "recompute.r0_quality_report": "passing `ppstage quality` report that R0 needs to start",
    # [denoise]
    "denoise.step_list": "timesteps per chunk: integers in (0, 1000], strictly decreasing",
    "denoise.shift": "flow-matching shift of the sigma schedule",
    "denoise.base_seed": "seed of the keyed noise (with epoch, start frame and step)",
    # [topology]
    "topology.stages": "generator stages (pipeline depth)",
    "topology.tp": "tensor-parallel ranks per stage; world size = 1 + stages * tp",
    "topology.layer_ranges": "each stage's [start, end) of model.layers; unset: an even split",
    "topology.backend": "torch.distributed backend: gloo (CPU) or nccl (GPU)",
    # [runtime]
    "runtime.d_in": "chunks in flight between rank 0 and the generator",
    "runtime.d_out": "results waiting for rank 0's decode",
    "runtime.startup_timeout_s": "bound on the rendezvous and the parity handshake (ranks may start apart)",
    "runtime.pg_timeout_s": "bound on every later collective and started frame",
    "runtime.result_deadline_min_s": "floor of rank 0's per-chunk result deadline",
    "runtime.result_deadline_factor": (
        "result deadline = factor * median chunk period (at least the floor); until a steady period is "
        "known, factor * the cold chunk's owed time (at most warm-up + floor)"
    ),
    "runtime.stage_idle_deadline_s": "a stage leader waiting this long for any message fails (rank 0 sends keepalives)",
    "runtime.keepalive_interval_s": "rank 0's NOOP interval while idle (< stage_idle_deadline_s)",
    "runtime.drain_deadline_s": (
        "time a stop (SIGTERM, SIGINT, service shutdown) may take to drain before ranks are ended; "
        "the planned end of a stream waits on the result and phase deadlines only"
    ),
    "runtime.simulated_decode_ms": "extra decode cost per chunk on rank 0 (benchmarks, tests)",
    "runtime.simulated_call_ms": "extra cost per generator call (benchmarks, tests)",
    "runtime.debug_extra_collective": "one more mesh all_reduce per chunk (tp > 1; parity-checked)",
    "runtime.anchor_first_decode": "R0a: decode the next anchor's frame first, send the next envelope, then the rest",
    "runtime.fused_steps": "generator leaders run a chunk's steps in their worker, hops bypassing the loop",
    "runtime.sequential_schedule": "benchmark baseline: plan a chunk only after the previous one was emitted",
    "runtime.device": "where tensors live: auto (cpu on gloo, cuda:<local rank> on nccl), cpu or cuda",
    # [service]
    "service.host": "address `ppstage serve` binds (off loopback a token is required)",
    "service.port": "HTTP port of `ppstage serve`",
    "service.max_body_bytes": "cap on every request body",
    "service.max_viewers": "WebSocket viewers at once; more are refused with 503",
    "service.viewer_queue_frames": "frames queued per viewer; a full queue drops its oldest",
    "service.viewer_drop_limit": "frames a viewer may lose since its last send before it is disconnected",
    "service.viewer_send_timeout_s": "a send to a viewer blocked this long disconnects it",
    "service.jpeg_quality": "JPEG quality of viewer frames",
    "service.status_window_chunks": "chunks the status and its median period are computed over",
    # [record]
    "record.dir": "set: every rank writes its message log to dir/rank<r>.ppslog",
    "record.tensors": "'digest' logs tensor digests only, 'full' their bytes too",
    "record.flight_records": "recent records each rank keeps in memory and writes out when it fails",
    # [liveness]
    "liveness.phase_deadline_min_s": "floor of a phase's deadline (keep below runtime.result_deadline_min_s)",
    "liveness.phase_deadline_factor": (
        "phase deadline = factor * median of that phase's recent durations; until steady ones are known, "
        "of the cold chunk's (at most warmup_deadline_s)"
    ),
    "liveness.warmup_deadline_s": "deadline of every phase on a cold chunk (first, or after a geometry change)",
    # [[faults.drill]]
    "faults.drill": "fault drills for the break-it suite (none in production); one [[faults.drill]] each",
    "faults.drill.kind": "which fault (ppstage/faults/drills.py lists every kind and its site)",
    "faults.drill.rank": "the one rank that acts on the drill",
    "faults.drill.chunk": "chunk_index at which the drill fires (once)",
    "faults.drill.ms": "duration for kinds that take one (0 = forever for stalls)",
}


class KeyDoc(msgspec.Struct, frozen=True, kw_only=True):
    """One row of ``ppstage config --keys``."""

    key: str  # section.key (faults.drill.<field> for a drill entry's fields)
    type: str  # the schema's type with its bounds, e.g. ``int >= 1``
    default: str  # JSON text; "required" for a drill field without a default
    meaning: str


def schema_keys() -> list[str]:
    """Every key of the schema, in schema order."""
    return [key for key, _ in _fields()]


def doc_problems(docs: dict[str, str] | None = None) -> list[str]:
    """What is wrong with ``docs`` (default ``KEY_DOCS``): keys without a line, lines naming no key, empty lines."""
    docs = KEY_DOCS if docs is None else docs
    keys = schema_keys()
    problems = [f"{k}: no doc line in ppstage/config/_docs.py" for k in keys if k not in docs]
    problems += [f"{k}: documented, but the schema has no such key" for k in docs if k not in keys]
    problems += [f"{k}: the doc line must be one non-empty line" for k, v in docs.items()
                 if not v.strip() or "\n" in v]
    return problems


def key_docs() -> list[KeyDoc]:
    """Every key with its type, default and meaning; raises ``KeyError`` for a key without a doc line."""
    return [
        KeyDoc(key=key, type=type_name(f.type), default=_default(f), meaning=KEY_DOCS[key])
        for key, f in _fields()
    ]


def _fields() -> list[tuple[str, mi.Field]]:
    out: list[tuple[str, mi.Field]] = []
    root = mi.type_info(PPStageConfig)
    assert isinstance(root, mi.StructType)
    for section in root.fields:
        assert isinstance(section.type, mi.StructType)
        for f in section.type.fields:
            key = f"{section.name}.{f.name}"
            out.append((key, f))
            if isinstance(f.type, mi.VarTupleType) and isinstance(f.type.item_type, mi.StructType):
                out += [(f"{key}.{g.name}", g) for g in f.type.item_type.fields]  # [[faults.drill]]
    return out


def _default(f: mi.Field) -> str:
    if f.required:
        return "required"
    value: Any = f.default if f.default is not msgspec.NODEFAULT else f.default_factory()
    return msgspec.json.encode(value).decode()


def type_name(t: mi.Type) -> str:
    """A schema type as a reader would write it: ``int >= 1``, ``"rebase" | "cut"``, ``str | None``."""
    if isinstance(t, (mi.IntType, mi.FloatType)):
        base = "int" if isinstance(t, mi.IntType) else "float"
        bounds = [f"{op} {_num(v)}" for op, v in ((">", t.gt), (">=", t.ge), ("<", t.lt), ("<=", t.le))
                  if v is not None]
        return f"{base} {', '.join(bounds)}" if bounds else base
    if isinstance(t, mi.LiteralType):
        if len(t.values) > _LISTED_VALUES:
            return f"str: one of {len(t.values)} names"
        return " | ".join(msgspec.json.encode(v).decode() for v in t.values)
    if isinstance(t, mi.UnionType):
        return " | ".join(type_name(u) for u in t.types)
    if isinstance(t, mi.VarTupleType):
        if isinstance(t.item_type, mi.StructType):
            return "array of tables"
        return f"list of {type_name(t.item_type)}"
    if isinstance(t, mi.TupleType):
        return "[" + ", ".join(type_name(u) for u in t.item_types) + "]"
    simple = {mi.StrType: "str", mi.BoolType: "bool", mi.NoneType: "None"}
    return simple.get(type(t), type(t).__name__)


_LISTED_VALUES = 4  # a longer literal (the drill kinds) is named by count; its doc line says where they are listed


def _num(v: float) -> str:
    if v == 2**63 - 1:
        return "2**63 - 1"
    return str(int(v)) if float(v).is_integer() else str(v)
