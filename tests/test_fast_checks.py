"""The hot-path shortcuts of codec and validate agree with the full checks they skip."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wire_samples import GEOMETRY, infer_envelope, replace, spec

from protocol import InvariantViolation, TensorSpec, TensorSpecError, encode_frame
from protocol.codec import check_tensor_spec
from protocol.validate import _infer_passes, _validate_in_full

_FIELDS = {
    "call_id": st.integers(-2, 3),
    "cache_epoch": st.integers(-2, 3),
    "current_start_frame": st.integers(-1, 40),
    "position_offset": st.integers(-1, 40),
    "init_cache": st.booleans(),
    "reset_kv_cache": st.booleans(),
    "reset_crossattn_cache": st.booleans(),
    "num_denoise_steps": st.integers(0, 5),
    "expected_generator_calls": st.integers(0, 6),
    "kv_cache_attention_bias": st.sampled_from([1.0, 0.5, 0.0, -1.0, math.inf, math.nan]),
    "recompute_mode": st.sampled_from(["r1", "r0a", "r0"]),
    "anchor_mode": st.sampled_from(["none", "decoded", "latent"]),
    "context_frame_indices": st.lists(st.integers(-1, 40), max_size=4).map(tuple),
    "num_frames": st.integers(0, 4),
}


@settings(max_examples=300, deadline=None)
@given(recompute=st.booleans(), fields=st.fixed_dictionaries({}, optional=_FIELDS))
def test_validate_shortcut_passes_only_what_the_full_check_passes(recompute, fields):
    msg = replace(infer_envelope(recompute=recompute), **fields)
    try:
        _validate_in_full(msg, GEOMETRY)
        full_ok = True
    except InvariantViolation:
        full_ok = False
    except Exception:  # a combination the full check cannot read: the shortcut must not pass it
        full_ok = False
    if _infer_passes(msg, GEOMETRY):
        assert full_ok


@pytest.mark.parametrize("field", [{"shape": (None, 4)}, {"shape": 5}, {"shape": ("a",)}, {"dtype": ["float32"]}])
def test_a_malformed_spec_raises_a_tensor_spec_error_not_a_type_error(field):
    bad = TensorSpec(**{"name": "latents_in", "dtype": "float32", "shape": (2,), "nbytes": 8, **field})
    with pytest.raises(TensorSpecError, match="latents_in"):
        check_tensor_spec(bad)
    msg = infer_envelope(recompute=False)
    with pytest.raises(TensorSpecError):
        encode_frame(replace(msg, tensors=(bad, *msg.tensors[1:])))


def test_a_valid_spec_seen_with_another_name_is_still_checked_by_name_free_rules():
    ok = spec("latents_in", (2, 3))
    check_tensor_spec(ok)
    with pytest.raises(TensorSpecError, match="bytes declared"):
        check_tensor_spec(replace(ok, nbytes=ok.nbytes + 1))


@pytest.mark.parametrize("recompute", [False, True])
def test_the_shortcut_passes_a_valid_envelope_so_it_is_really_taken(recompute):
    # The property above alone would hold for a shortcut that always says no.
    msg = infer_envelope(recompute=recompute)
    _validate_in_full(msg, GEOMETRY)
    assert _infer_passes(msg, GEOMETRY)
