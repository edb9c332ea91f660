"""Cross-field invariants of every wire message.

``validate`` is called by the sender before serialising (anti-stranding: a
message that would be rejected never gets a header on the wire) and by every
receiver before it acts on a message or enters a mesh collective.
"""

from __future__ import annotations

import math

import msgspec

from .errors import InvariantViolation
from .identity import ChunkId
from .messages import (
    ANCHOR_FOR_MODE,
    ChunkResult,
    InferEnvelope,
    ParityHello,
    StageHop,
    TensorSpec,
    WireMessage,
    hop_tensor_name,
)

INFER_TENSORS = ("latents_in", "conditioning_embeds", "denoising_step_list")
CONTEXT_TENSOR = "context_frames_override"
_WANT_TENSORS = {False: INFER_TENSORS, True: (*INFER_TENSORS, CONTEXT_TENSOR)}
# (recompute_mode, anchor_mode, do_kv_recompute) triples that pass the mode checks.
_VALID_MODES = frozenset(
    (mode, anchor, recompute)
    for mode, anchor in ANCHOR_FOR_MODE.items()
    for recompute in (False, True)
    if not (recompute and mode == "r1")
)


class WireGeometry(msgspec.Struct, frozen=True, kw_only=True):
    """Shapes a receiver expects, from its own (parity-checked) config."""

    num_frames: int
    latent_channels: int
    height: int
    width: int
    text_tokens: int
    text_dim: int
    hidden_dim: int
    tokens_per_frame: int
    max_context_frames: int


def validate(msg: WireMessage, geometry: WireGeometry | None = None) -> None:
    """Raise ``InvariantViolation`` unless every cross-field invariant of ``msg`` holds.

    Called by the sender before framing and by every receiver before it acts
    on a message (docs/protocol.md lists the invariants per type). Pure and
    cheap on the passing path; the error carries ``msg``'s ``ChunkId``.

    Parameters
    ----------
    msg : WireMessage
        A decoded (or about to be encoded) message.
    geometry : WireGeometry, optional
        The receiver's own shapes (``config.wire_geometry()``): latent
        ``(num_frames, latent_channels, height, width)`` float32, conditioning
        ``(text_tokens, text_dim)`` float32, hidden ``(tokens, hidden_dim)``
        float32 with ``tokens`` a multiple of ``tokens_per_frame``, at most
        ``max_context_frames`` context frames. None checks structure only.

    Raises
    ------
    InvariantViolation
        The first invariant that does not hold, named in the message.
    """

    if type(msg) is InferEnvelope and geometry is not None and _infer_passes(msg, geometry):
        return  # the hot path: every INFER invariant in one test, no error context built
    _validate_in_full(msg, geometry)


class _GeometryTables(msgspec.Struct, frozen=True, gc=False):
    latent: tuple[int, int, int, int]  # (num_frames, latent_channels, height, width)
    latent_positive: bool  # min(latent) >= 1
    frame: tuple[int, int, int]  # (latent_channels, height, width)
    conditioning: tuple[int, int]  # (text_tokens, text_dim)
    max_context_frames: int


# The tables of the geometry seen last: a process validates against one
# geometry (its config's), so one entry suffices. Rebound as one tuple, so a
# thread reading it never sees a geometry paired with another's tables.
_TABLES: tuple[WireGeometry | None, _GeometryTables | None] = (None, None)


def _tables_of(g: WireGeometry) -> _GeometryTables:
    global _TABLES
    latent = (g.num_frames, g.latent_channels, g.height, g.width)
    tables = _GeometryTables(
        latent=latent,
        latent_positive=min(latent) >= 1,
        frame=latent[1:],
        conditioning=(g.text_tokens, g.text_dim),
        max_context_frames=g.max_context_frames,
    )
    _TABLES = (g, tables)
    return tables


def _infer_passes(m: InferEnvelope, g: WireGeometry) -> bool:
    """True when every invariant ``_validate_infer`` checks holds, False otherwise.

    Each test is one of ``_validate_infer``'s, in passing form: True implies the
    full check would pass. False (or a field of a type a test cannot read)
    only sends the message to the full check, which names what failed.
    """
    try:
        seen, t = _TABLES
        if seen is not g:
            t = _tables_of(g)
        recompute = m.do_kv_recompute
        steps = m.num_denoise_steps
        start = m.current_start_frame
        tensors = m.tensors
        if not (
            m.call_id >= 0
            and m.chunk_index >= 0
            and m.cache_epoch >= 0
            and steps >= 1
            and m.expected_generator_calls == (1 if recompute else 0) + steps
            and (m.recompute_mode, m.anchor_mode, recompute) in _VALID_MODES
            and (
                m.reset_kv_cache and m.reset_crossattn_cache and start == 0 and not recompute
                and m.position_offset == 0
                if m.init_cache
                else not m.reset_kv_cache
            )
            and 0 <= m.position_offset <= start
            and 0.0 < m.kv_cache_attention_bias < math.inf
            and (m.num_frames, m.latent_channels, m.height, m.width) == t.latent
            and t.latent_positive
            and len(tensors) == (4 if recompute else 3)
        ):
            return False
        latents, cond, step_list = tensors[0], tensors[1], tensors[2]
        if not (
            latents.name == "latents_in"
            and latents.dtype == "float32"
            and latents.shape == t.latent
            and cond.name == "conditioning_embeds"
            and cond.dtype == "float32"
            and cond.shape == t.conditioning
            and step_list.name == "denoising_step_list"
            and step_list.dtype == "int64"
            and step_list.shape == (steps,)
        ):
            return False
        ctx = m.context_frame_indices
        if not recompute:
            return not ctx
        n = len(ctx)
        if not 1 <= n <= t.max_context_frames or ctx[0] < 0 or ctx[-1] >= start:
            return False
        prev = ctx[0]
        for i in ctx[1:]:  # strictly increasing
            if not prev < i:
                return False
            prev = i
        context = tensors[3]
        fr = t.frame
        return (
            context.name == CONTEXT_TENSOR
            and context.dtype == "float32"
            and context.shape == (n, fr[0], fr[1], fr[2])
        )
    except Exception:  # a field of the wrong type: the full check words the failure
        return False


def _validate_in_full(msg: WireMessage, geometry: WireGeometry | None) -> None:
    def fail(text: str) -> None:  # the identity is built only when failing
        raise InvariantViolation(text, chunk=ChunkId.of(msg))

    if msg.call_id < 0 or msg.chunk_index < 0 or msg.cache_epoch < 0:
        fail("ids must be non-negative")
    if isinstance(msg, InferEnvelope):
        _validate_infer(msg, geometry, fail)
    elif isinstance(msg, ChunkResult):
        _validate_result(msg, geometry, fail)
    elif isinstance(msg, StageHop):
        _validate_hop(msg, geometry, fail)
    elif msg.tensors:
        fail(f"{type(msg).__name__} must carry no tensors")
    if isinstance(msg, ParityHello) and msg.rank < 0:
        fail("HELLO rank must be non-negative")


def _expect_shape(spec: TensorSpec, shape: tuple[int, ...], dtype: str, fail) -> None:
    if spec.dtype != dtype:
        fail(f"tensor {spec.name!r} has dtype {spec.dtype}, expected {dtype}")
    if spec.shape != shape and tuple(spec.shape) != shape:
        fail(f"tensor {spec.name!r} has shape {tuple(spec.shape)}, expected {shape}")


def _validate_infer(m: InferEnvelope, g: WireGeometry | None, fail) -> None:
    recompute, steps, mode = m.do_kv_recompute, m.num_denoise_steps, m.recompute_mode
    if steps < 1:
        fail("num_denoise_steps must be at least 1")
    if m.expected_generator_calls != (1 if recompute else 0) + steps:
        fail(
            f"expected_generator_calls={m.expected_generator_calls} but "
            f"(1 if do_kv_recompute else 0) + num_denoise_steps = {(1 if recompute else 0) + steps}"
        )
    if ANCHOR_FOR_MODE[mode] != m.anchor_mode:
        fail(f"mode {mode} requires anchor_mode {ANCHOR_FOR_MODE[mode]}")
    if recompute and mode == "r1":
        fail("mode r1 never recomputes")
    if m.init_cache:
        if not (m.reset_kv_cache and m.reset_crossattn_cache):
            fail("init_cache must reset both the KV and the cross-attention caches")
        if m.current_start_frame != 0:
            fail("a hard cut starts at frame 0")
        if recompute:
            fail("the first chunk of an epoch has nothing to recompute")
    elif m.reset_kv_cache:
        fail("the KV cache is reset only by a hard cut (init_cache)")
    if m.current_start_frame < 0:
        fail("current_start_frame must be non-negative")
    if not 0 <= m.position_offset <= m.current_start_frame:
        fail("position_offset must lie in [0, current_start_frame]")
    if m.init_cache and m.position_offset:
        fail("a hard cut restarts positions at offset 0")
    bias = m.kv_cache_attention_bias
    if not 0.0 < bias < math.inf:  # also false for NaN
        fail("kv_cache_attention_bias must be a positive finite float")
    geometry = (m.num_frames, m.latent_channels, m.height, m.width)
    if min(geometry) < 1:
        fail("latent geometry must be positive")
    if g is not None and geometry != (g.num_frames, g.latent_channels, g.height, g.width):
        fail("declared latent geometry differs from this stage's config")

    # The tensor list is positional: exactly the required names in this order.
    tensors = m.tensors
    names = tuple(s.name for s in tensors)
    want = _WANT_TENSORS[m.do_kv_recompute]
    if names != want:
        if m.do_kv_recompute and CONTEXT_TENSOR not in names:
            fail("do_kv_recompute is set but context_frames_override is missing")
        if not m.do_kv_recompute and CONTEXT_TENSOR in names:
            fail("context_frames_override present without do_kv_recompute")
        fail(f"tensors {list(names)} differ from the required {list(want)}")
    # Shape checks inline (the common, passing case is the hot path); the
    # helper only runs to word the failure.
    latents = tensors[0]
    if latents.dtype != "float32" or latents.shape != geometry:
        _expect_shape(latents, geometry, "float32", fail)
    cond = tensors[1]
    if g is not None:
        if cond.dtype != "float32" or cond.shape != (g.text_tokens, g.text_dim):
            _expect_shape(cond, (g.text_tokens, g.text_dim), "float32", fail)
    elif len(cond.shape) != 2 or cond.dtype != "float32":
        fail("conditioning_embeds must be a 2-D float32 tensor")
    step_list = tensors[2]
    if step_list.dtype != "int64" or step_list.shape != (steps,):
        _expect_shape(step_list, (steps,), "int64", fail)
    if m.do_kv_recompute:
        ctx = m.context_frame_indices
        n_ctx = len(ctx)
        if n_ctx < 1:
            fail("a recompute needs at least one context frame index")
        if g is not None and n_ctx > g.max_context_frames:
            fail(f"{n_ctx} context frames exceed the window's {g.max_context_frames}")
        if any(a >= b for a, b in zip(ctx, ctx[1:])):
            fail("context_frame_indices must be strictly increasing")
        if ctx[0] < 0 or ctx[-1] >= m.current_start_frame:
            fail("context frames must lie before current_start_frame")
        context = tensors[3]
        want_ctx = (n_ctx, *geometry[1:])
        if context.dtype != "float32" or context.shape != want_ctx:
            _expect_shape(context, want_ctx, "float32", fail)
    elif m.context_frame_indices:
        fail("context_frame_indices present without do_kv_recompute")


def _validate_result(m: ChunkResult, g: WireGeometry | None, fail) -> None:
    if m.ok != (m.error is None):
        fail("a result is ok exactly when it carries no error")
    if not m.ok:
        if m.tensors:
            fail("an error result carries no tensors")
        return
    if m.observed_generator_calls < 1:
        fail("an ok result must report its generator calls")
    if not m.stages:
        fail("an ok result must carry every stage's report")
    if m.output_digest is None:
        fail("an ok result must carry the output digest")
    if [s.name for s in m.tensors] != ["latents_out"]:
        fail("an ok result carries exactly one tensor, latents_out")
    spec = m.tensors[0]
    if g is not None:
        _expect_shape(spec, (g.num_frames, g.latent_channels, g.height, g.width), "float32", fail)
    elif spec.dtype != "float32" or len(spec.shape) != 4:
        fail("latents_out must be a 4-D float32 tensor")
    for s in m.stages:
        if s.observed_generator_calls != m.observed_generator_calls:
            fail(
                f"stage {s.stage} observed {s.observed_generator_calls} calls, "
                f"result says {m.observed_generator_calls}"
            )


def _validate_hop(m: StageHop, g: WireGeometry | None, fail) -> None:
    if m.call_kind == "recompute" and m.step != -1:
        fail("a recompute hop has step -1")
    if m.call_kind == "denoise" and m.step < 0:
        fail("a denoise hop has a step index >= 0")
    want = hop_tensor_name(m.target)
    if [s.name for s in m.tensors] != [want]:
        fail(f"a {m.target} hop carries exactly one tensor, {want!r}")
    spec = m.tensors[0]
    if spec.dtype != "float32":
        fail(f"hop tensor has dtype {spec.dtype}, expected float32")
    if m.target == "latent":
        if m.call_kind == "recompute":
            fail("a recompute call never hands a latent back")
        if g is not None:
            _expect_shape(spec, (g.num_frames, g.latent_channels, g.height, g.width), "float32", fail)
    if g is not None and m.target == "hidden":
        if len(spec.shape) != 2 or spec.shape[1] != g.hidden_dim or spec.shape[0] % g.tokens_per_frame:
            fail(f"hidden hop shape {tuple(spec.shape)} does not fit the model geometry")
