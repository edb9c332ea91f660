"""Cross-field invariants of protocol.validate: each one accepted and rejected."""

from __future__ import annotations

import math

import pytest
from wire_samples import (
    CHUNK,
    FRAME,
    GEOMETRY,
    chunk_result,
    error_result,
    first_chunk_envelope,
    infer_envelope,
    infer_tensors,
    latent_hop,
    replace,
    sample_messages,
    spec,
    stage_hop,
    stage_report,
)

from protocol import (
    ErrorEnvelope,
    InvariantViolation,
    NoopEnvelope,
    ParityHello,
    ShutdownEnvelope,
    WireGeometry,
    validate,
)


def rejected(msg, match: str, geometry: WireGeometry | None = GEOMETRY) -> InvariantViolation:
    with pytest.raises(InvariantViolation, match=match) as info:
        validate(msg, geometry)
    assert (info.value.call_id, info.value.chunk_index, info.value.cache_epoch) == (
        msg.call_id,
        msg.chunk_index,
        msg.cache_epoch,
    )
    return info.value


@pytest.mark.parametrize("geometry", [None, GEOMETRY], ids=["no-geometry", "geometry"])
@pytest.mark.parametrize("msg", sample_messages(), ids=lambda m: type(m).__name__)
def test_valid_samples_are_accepted(msg, geometry):
    validate(msg, geometry)


@pytest.mark.parametrize("field", ["call_id", "chunk_index", "cache_epoch"])
@pytest.mark.parametrize("msg", sample_messages(), ids=lambda m: type(m).__name__)
def test_negative_ids_are_rejected_on_every_message(msg, field):
    rejected(replace(msg, **{field: -1}), "non-negative")


# -- INFER: generator call count -------------------------------------------------


@pytest.mark.parametrize(
    "recompute, steps, calls, ok",
    [
        (True, 4, 5, True),
        (False, 4, 4, True),
        (True, 1, 2, True),
        (False, 1, 1, True),
        (True, 4, 4, False),
        (False, 4, 5, False),
        (True, 2, 2, False),
        (False, 2, 0, False),
    ],
)
def test_expected_calls_equal_recompute_plus_denoise_steps(recompute, steps, calls, ok):
    kw = dict(num_denoise_steps=steps, expected_generator_calls=calls)
    ctx = (15, 19, 20) if recompute else ()
    msg = infer_envelope(recompute=recompute, tensors=infer_tensors(steps=steps, context=len(ctx)), **kw)
    if ok:
        validate(msg, GEOMETRY)
    else:
        rejected(msg, "expected_generator_calls")


def test_zero_denoise_steps_are_rejected():
    msg = infer_envelope(
        recompute=False, num_denoise_steps=0, expected_generator_calls=0, tensors=infer_tensors(steps=0)
    )
    rejected(msg, "num_denoise_steps")


# -- INFER: context_frames_override present iff do_kv_recompute --------------------


def test_recompute_without_context_tensor_is_rejected():
    rejected(infer_envelope(tensors=infer_tensors()), "context_frames_override is missing")


def test_context_tensor_without_recompute_is_rejected():
    rejected(infer_envelope(recompute=False, tensors=infer_tensors(context=3)), "without do_kv_recompute")


def test_context_indices_without_recompute_are_rejected():
    rejected(infer_envelope(recompute=False, context_frame_indices=(1, 2)), "context_frame_indices present")


@pytest.mark.parametrize(
    "names",
    [
        ("conditioning_embeds", "latents_in", "denoising_step_list", "context_frames_override"),
        ("latents_in", "conditioning_embeds", "context_frames_override"),
        ("latents_in", "conditioning_embeds", "denoising_step_list", "context_frames_override", "extra"),
    ],
    ids=["reordered", "missing step list", "extra tensor"],
)
def test_infer_tensor_list_must_be_exactly_the_required_order(names):
    by_name = {s.name: s for s in infer_tensors(context=3)}
    tensors = tuple(by_name.get(n, spec(n, (1,))) for n in names)
    rejected(infer_envelope(tensors=tensors), "differ from the required")


# -- INFER: recompute context ------------------------------------------------------


def _with_context(ctx: tuple[int, ...], **kw):
    tensors = infer_tensors() + (spec("context_frames_override", (len(ctx), *FRAME)),)
    return infer_envelope(context_frame_indices=ctx, tensors=tensors, **kw)


@pytest.mark.parametrize(
    "ctx, match",
    [
        ((), "at least one context frame"),
        ((19, 15, 20), "strictly increasing"),
        ((15, 15, 20), "strictly increasing"),
        ((-1, 19, 20), "before current_start_frame"),
        ((15, 19, 21), "before current_start_frame"),
        ((15, 19, 25), "before current_start_frame"),
        ((12, 15, 19, 20), "exceed the window"),
    ],
)
def test_bad_context_frame_indices_are_rejected(ctx, match):
    rejected(_with_context(ctx), match)


def test_context_frames_within_the_window_are_accepted():
    validate(_with_context((20,)), GEOMETRY)
    validate(_with_context((0, 20)), GEOMETRY)
    # Without geometry the window size is unknown, so only the ordering is checked.
    validate(_with_context((12, 15, 19, 20)), None)


def test_context_tensor_shape_must_match_the_indices():
    tensors = infer_tensors(context=2)  # 2 frames for 3 indices
    rejected(infer_envelope(tensors=tensors), "context_frames_override")


# -- INFER: mode / anchor consistency -----------------------------------------------


@pytest.mark.parametrize(
    "mode, anchor, ok",
    [
        ("r1", "none", True),
        ("r0a", "decoded", True),
        ("r0", "latent", True),
        ("r1", "decoded", False),
        ("r0a", "latent", False),
        ("r0a", "none", False),
        ("r0", "decoded", False),
        ("r0", "none", False),
    ],
)
def test_anchor_mode_follows_the_recompute_mode(mode, anchor, ok):
    msg = infer_envelope(recompute=False, recompute_mode=mode, anchor_mode=anchor)
    if ok:
        validate(msg, GEOMETRY)
    else:
        rejected(msg, "requires anchor_mode")


def test_r1_never_recomputes():
    rejected(infer_envelope(recompute_mode="r1", anchor_mode="none"), "r1 never recomputes")


def test_r0_recomputes_from_a_latent_anchor():
    validate(infer_envelope(recompute_mode="r0", anchor_mode="latent"), GEOMETRY)


# -- INFER: hard cut and reset bits ---------------------------------------------------


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(init_cache=True, reset_kv_cache=False), "must reset both"),
        (dict(init_cache=True, reset_crossattn_cache=False), "must reset both"),
        (dict(init_cache=False, reset_kv_cache=True, reset_crossattn_cache=False), "only by a hard cut"),
        (dict(current_start_frame=3), "starts at frame 0"),
    ],
)
def test_hard_cut_bits_must_be_consistent(fields, match):
    rejected(replace(first_chunk_envelope(), **fields), match)


def test_first_chunk_of_an_epoch_never_recomputes():
    msg = replace(first_chunk_envelope(), do_kv_recompute=True, expected_generator_calls=5)
    rejected(msg, "nothing to recompute")


def test_prompt_update_resets_only_the_cross_attention_cache():
    validate(infer_envelope(reset_crossattn_cache=True), GEOMETRY)


def test_negative_start_frame_is_rejected():
    rejected(infer_envelope(recompute=False, current_start_frame=-3), "non-negative")


@pytest.mark.parametrize("bias", [0.0, -1.0, math.nan, math.inf, -math.inf])
def test_attention_bias_must_be_positive_and_finite(bias):
    rejected(infer_envelope(kv_cache_attention_bias=bias), "kv_cache_attention_bias")


@pytest.mark.parametrize("bias", [1e-6, 0.5, 1.0, 3.0])
def test_positive_attention_bias_is_accepted(bias):
    validate(infer_envelope(kv_cache_attention_bias=bias), GEOMETRY)


# -- INFER: shapes and dtypes -----------------------------------------------------------


@pytest.mark.parametrize("field", ["height", "width", "num_frames", "latent_channels"])
def test_non_positive_latent_geometry_is_rejected(field):
    rejected(infer_envelope(**{field: 0}), "positive", geometry=None)


@pytest.mark.parametrize(
    "field, value", [("height", 16), ("width", 4), ("num_frames", 2), ("latent_channels", 16)]
)
def test_declared_geometry_must_match_the_receivers_config(field, value):
    rejected(infer_envelope(**{field: value}), "differs from this stage's config")


def test_declared_geometry_is_only_self_checked_without_a_config():
    # Changing the declared geometry then fails on the tensor shapes it implies.
    rejected(infer_envelope(height=16), "latents_in", geometry=None)


def _swap(index: int, new):
    tensors = list(infer_tensors(context=3))
    tensors[index] = new
    return infer_envelope(tensors=tuple(tensors))


@pytest.mark.parametrize(
    "index, new, match",
    [
        (0, spec("latents_in", (2, *FRAME)), "latents_in"),
        (0, spec("latents_in", CHUNK, "float16"), "dtype float16"),
        (1, spec("conditioning_embeds", (8, 16)), "conditioning_embeds"),
        (1, spec("conditioning_embeds", (8, 32), "bfloat16"), "dtype bfloat16"),
        (2, spec("denoising_step_list", (3,), "int64"), "denoising_step_list"),
        (2, spec("denoising_step_list", (4,), "int32"), "dtype int32"),
        (3, spec("context_frames_override", (3, 4, 8, 4)), "context_frames_override"),
        (3, spec("context_frames_override", (3, *FRAME), "float16"), "dtype float16"),
    ],
)
def test_tensor_shapes_and_dtypes_follow_the_envelope(index, new, match):
    rejected(_swap(index, new), match)


def test_conditioning_must_be_2d_float32_without_geometry():
    rejected(_swap(1, spec("conditioning_embeds", (8, 32, 1))), "2-D float32", geometry=None)
    rejected(_swap(1, spec("conditioning_embeds", (8, 32), "float16")), "2-D float32", geometry=None)
    validate(_swap(1, spec("conditioning_embeds", (5, 7))), None)


# -- non-INFER actions ---------------------------------------------------------------


@pytest.mark.parametrize(
    "msg",
    [
        NoopEnvelope(call_id=1, chunk_index=0, cache_epoch=0),
        ShutdownEnvelope(call_id=1, chunk_index=0, cache_epoch=0),
        ErrorEnvelope(call_id=1, chunk_index=0, cache_epoch=0, reason="x"),
        ParityHello(call_id=0, chunk_index=0, cache_epoch=0, rank=0, settings={}),
    ],
    ids=lambda m: type(m).__name__,
)
def test_control_messages_carry_no_tensors(msg):
    validate(msg, GEOMETRY)
    rejected(replace(msg, tensors=(spec("x", (1,)),)), "no tensors")


def test_hello_rank_must_be_non_negative():
    rejected(ParityHello(call_id=0, chunk_index=0, cache_epoch=0, rank=-1, settings={}), "rank")


# -- results --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "msg, match",
    [
        (chunk_result(error="boom"), "ok exactly when"),
        (error_result(error=None), "ok exactly when"),
        (error_result(tensors=(spec("latents_out", CHUNK),)), "no tensors"),
        (chunk_result(observed_generator_calls=0), "report its generator calls"),
        (chunk_result(stages=()), "every stage's report"),
        (chunk_result(output_digest=None), "output digest"),
        (chunk_result(tensors=()), "exactly one tensor"),
        (chunk_result(tensors=(spec("latents", CHUNK),)), "exactly one tensor"),
        (chunk_result(tensors=(spec("latents_out", CHUNK),) * 2), "exactly one tensor"),
        (chunk_result(tensors=(spec("latents_out", (2, *FRAME)),)), "shape"),
        (chunk_result(tensors=(spec("latents_out", CHUNK, "float16"),)), "dtype"),
        (chunk_result(stages=(stage_report(1, 5), stage_report(2, 4))), "stage 2 observed 4"),
    ],
    ids=[
        "ok with error",
        "error without reason",
        "error with tensor",
        "no calls",
        "no stage reports",
        "no output digest",
        "no tensor",
        "wrong tensor name",
        "two tensors",
        "wrong shape",
        "wrong dtype",
        "stage call count",
    ],
)
def test_result_invariants(msg, match):
    rejected(msg, match)


def test_result_shape_without_geometry_needs_4d_float32():
    validate(chunk_result(tensors=(spec("latents_out", (1, 2, 3, 4)),)), None)
    rejected(chunk_result(tensors=(spec("latents_out", (3, 4, 64)),)), "4-D float32", geometry=None)
    rejected(chunk_result(tensors=(spec("latents_out", CHUNK, "int32"),)), "4-D float32", geometry=None)


def test_error_result_needs_nothing_else():
    validate(error_result(observed_generator_calls=0), GEOMETRY)


# -- inter-stage hops --------------------------------------------------------------------


@pytest.mark.parametrize(
    "msg, match",
    [
        (stage_hop(call_kind="recompute", step=0), "step -1"),
        (stage_hop(call_kind="denoise", step=-1), "step index >= 0"),
        (stage_hop(tensors=()), "exactly one tensor"),
        (stage_hop(tensors=(spec("latents", (48, 64)),)), "exactly one tensor, 'hidden'"),
        (latent_hop(tensors=(spec("hidden", CHUNK),)), "exactly one tensor, 'latents'"),
        (stage_hop(tensors=(spec("hidden", (48, 64), "float16"),)), "dtype float16"),
        (stage_hop(tensors=(spec("hidden", (48, 32)),)), "does not fit"),
        (stage_hop(tensors=(spec("hidden", (40, 64)),)), "does not fit"),
        (stage_hop(tensors=(spec("hidden", (48, 64, 1)),)), "does not fit"),
        (latent_hop(tensors=(spec("latents", (2, *FRAME)),)), "shape"),
        (latent_hop(call_kind="recompute", step=-1), "never hands a latent back"),
    ],
    ids=[
        "recompute step",
        "denoise step",
        "no tensor",
        "hidden hop tensor name",
        "latent hop tensor name",
        "hidden dtype",
        "hidden dim",
        "partial frame",
        "hidden rank",
        "latent shape",
        "recompute latent",
    ],
)
def test_hop_invariants(msg, match):
    rejected(msg, match)


def test_recompute_hop_carries_hidden_states_at_step_minus_one():
    validate(stage_hop(call_kind="recompute", step=-1), GEOMETRY)
    # A recompute over 3 context frames + nothing else: any whole number of frames fits.
    validate(stage_hop(call_kind="recompute", step=-1, tensors=(spec("hidden", (16 * 6, 64)),)), GEOMETRY)


def test_recompute_never_hands_a_latent_back_even_without_geometry():
    rejected(latent_hop(call_kind="recompute", step=-1), "never hands a latent back", geometry=None)
