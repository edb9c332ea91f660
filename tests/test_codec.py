"""Framing codec: round trips, every receiver check, and fuzzing (B4, B5, B13)."""

from __future__ import annotations

import struct
import zlib

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from wire_samples import chunk_result, infer_envelope, sample_messages, spec

from protocol import (
    ACTION_CODES,
    DTYPE_ITEMSIZE,
    HEADER_SIZE,
    MAGIC,
    MAX_META_BYTES,
    MAX_TENSORS,
    PROTOCOL_VERSION,
    ChunkId,
    ChunkResult,
    DigestMismatch,
    ErrorEnvelope,
    FramingError,
    InferEnvelope,
    MetadataError,
    NoopEnvelope,
    ParityHello,
    ProtocolError,
    ShutdownEnvelope,
    StageHop,
    StageReport,
    TensorSpec,
    TensorSpecError,
    UnknownAction,
    UnsupportedVersion,
    action_of,
    canonical_bytes,
    check_tensor_digest,
    decode_frame,
    decode_metadata,
    digest_bytes,
    encode_frame,
    encode_frame_bytes,
    message_digest,
    parse_header,
)

# The documented header layout (docs/protocol.md): magic, version, action code,
# tensor count, call_id, chunk_index, cache_epoch, meta_len, crc32.
HEADER = struct.Struct("<4sBBHqqqII")
SAMPLES = sample_messages()
SAMPLE_IDS = [f"{action_of(m)}-{i}" for i, m in enumerate(SAMPLES)]


def seal(
    meta: bytes,
    *,
    magic: bytes = MAGIC,
    version: int = PROTOCOL_VERSION,
    code: int = ACTION_CODES["INFER"],
    count: int = 0,
    ids: tuple[int, int, int] = (7, 7, 0),
    meta_len: int | None = None,
) -> bytes:
    """A frame with a *correct* checksum around arbitrary header fields and metadata."""
    n = len(meta) if meta_len is None else meta_len
    partial = HEADER.pack(magic, version, code, count, *ids, n, 0)[:-4]
    crc = zlib.crc32(meta, zlib.crc32(partial)) & 0xFFFFFFFF
    return partial + struct.pack("<I", crc) + meta


def seal_message(msg, **header) -> bytes:
    """Seal a message's raw msgpack (bypassing encode_frame's checks)."""
    defaults = dict(
        code=ACTION_CODES.get(action_of(msg), 1),
        count=len(msg.tensors),
        ids=(msg.call_id, msg.chunk_index, msg.cache_epoch),
    )
    defaults.update(header)
    return seal(msgspec.msgpack.encode(msg), **defaults)


def decode_error(frame: bytes) -> ProtocolError:
    """Decode a frame that must fail; fail the test on success or a foreign exception."""
    try:
        msg = decode_frame(frame)
    except ProtocolError as exc:
        return exc
    except Exception as exc:  # noqa: BLE001 - the point: nothing but ProtocolError escapes
        pytest.fail(f"decoder raised {type(exc).__name__}, not a ProtocolError: {exc}")
    pytest.fail(f"corrupted frame decoded into {msg!r}")


# -- layout and round trips ----------------------------------------------------


def test_header_layout_is_the_documented_40_bytes():
    assert HEADER_SIZE == HEADER.size == 40
    head, meta = encode_frame(infer_envelope())
    magic, version, code, count, call_id, chunk, epoch, meta_len, crc = HEADER.unpack(head)
    assert (magic, version, code, count) == (MAGIC, PROTOCOL_VERSION, ACTION_CODES["INFER"], 4)
    assert (call_id, chunk, epoch, meta_len) == (7, 7, 0, len(meta))
    assert crc == zlib.crc32(meta, zlib.crc32(head[:-4]))


@pytest.mark.parametrize("msg", SAMPLES, ids=SAMPLE_IDS)
def test_every_wire_type_round_trips(msg):
    head, meta = encode_frame(msg)
    header = parse_header(head)
    assert header.action == action_of(msg)
    assert header.tensor_count == len(msg.tensors)
    assert (header.call_id, header.chunk_index, header.cache_epoch) == (
        msg.call_id,
        msg.chunk_index,
        msg.cache_epoch,
    )
    assert decode_metadata(header, head, meta) == msg
    assert decode_frame(head + meta) == msg
    assert encode_frame_bytes(msg) == head + meta


def test_every_tag_has_an_action_code_and_a_sample():
    assert {action_of(m) for m in SAMPLES} == set(ACTION_CODES)


@pytest.mark.parametrize("msg", SAMPLES, ids=SAMPLE_IDS)
def test_canonical_bytes_are_stable(msg):
    again = decode_frame(encode_frame_bytes(msg))
    assert canonical_bytes(again) == canonical_bytes(msg)
    assert encode_frame_bytes(again) == encode_frame_bytes(msg)
    assert message_digest(again) == message_digest(msg) == digest_bytes(canonical_bytes(msg))


def test_canonical_bytes_do_not_depend_on_dict_insertion_order():
    a = ParityHello(call_id=0, chunk_index=0, cache_epoch=0, rank=1, settings={"a": "1", "b": "2"})
    b = ParityHello(call_id=0, chunk_index=0, cache_epoch=0, rank=1, settings={"b": "2", "a": "1"})
    assert canonical_bytes(a) == canonical_bytes(b)
    assert encode_frame_bytes(a) == encode_frame_bytes(b)


def test_digest_differs_when_one_field_differs():
    assert message_digest(infer_envelope()) != message_digest(infer_envelope(base_seed=43))


def test_unknown_metadata_fields_are_tolerated():
    # A newer peer may append fields; an older receiver ignores them.
    raw = msgspec.msgpack.decode(canonical_bytes(chunk_result()))
    raw["added_in_a_later_minor"] = [1, 2, 3]
    frame = seal(msgspec.msgpack.encode(raw), code=ACTION_CODES["RESULT"], count=1)
    assert decode_frame(frame) == chunk_result()


def test_missing_field_with_default_decodes_to_the_default():
    raw = msgspec.msgpack.decode(canonical_bytes(NoopEnvelope(call_id=1, chunk_index=0, cache_epoch=0)))
    del raw["tensors"]
    frame = seal(msgspec.msgpack.encode(raw), code=ACTION_CODES["NOOP"], ids=(1, 0, 0))
    assert decode_frame(frame) == NoopEnvelope(call_id=1, chunk_index=0, cache_epoch=0)


# -- header checks -------------------------------------------------------------


def _valid() -> tuple[bytes, bytes]:
    return encode_frame(infer_envelope())


def test_bad_magic_is_a_framing_error():
    head, meta = _valid()
    with pytest.raises(FramingError, match="magic"):
        parse_header(b"XXXX" + head[4:])


@pytest.mark.parametrize("version", [0, PROTOCOL_VERSION + 1, 255])
def test_unknown_header_version_is_rejected_before_anything_else(version):
    head, meta = _valid()
    bad = head[:4] + bytes([version]) + head[5:]
    with pytest.raises(UnsupportedVersion) as info:
        parse_header(bad)
    assert info.value.call_id == 7  # the error names the chunk
    assert isinstance(decode_error(bad + meta), UnsupportedVersion)


def test_metadata_version_differing_from_header_is_unsupported():
    frame = seal_message(infer_envelope(version=PROTOCOL_VERSION + 1), count=4)
    assert isinstance(decode_error(frame), UnsupportedVersion)


@pytest.mark.parametrize("code", [0, max(ACTION_CODES.values()) + 1, 255])
def test_unknown_action_code_is_rejected(code):
    head, _ = _valid()
    with pytest.raises(UnknownAction, match="action code"):
        parse_header(head[:5] + bytes([code]) + head[6:])


def test_unknown_tag_in_metadata_is_rejected():
    raw = msgspec.msgpack.decode(canonical_bytes(NoopEnvelope(call_id=1, chunk_index=0, cache_epoch=0)))
    raw["action"] = "TELEPORT"
    frame = seal(msgspec.msgpack.encode(raw), code=ACTION_CODES["NOOP"], ids=(1, 0, 0))
    assert isinstance(decode_error(frame), UnknownAction)


def test_metadata_tag_differing_from_header_action_is_a_framing_error():
    msg = NoopEnvelope(call_id=1, chunk_index=0, cache_epoch=0)
    frame = seal_message(msg, code=ACTION_CODES["SHUTDOWN"])
    err = decode_error(frame)
    assert type(err) is FramingError and "action" in str(err)


@pytest.mark.parametrize("meta_len", [0, MAX_META_BYTES + 1, 2**32 - 1])
def test_meta_len_out_of_bounds_is_rejected_before_allocation(meta_len):
    head, _ = _valid()
    bad = head[:-8] + struct.pack("<I", meta_len) + head[-4:]
    with pytest.raises(FramingError, match="metadata length"):
        parse_header(bad)


def test_tensor_count_above_limit_is_rejected_in_the_header():
    head, _ = _valid()
    bad = head[:6] + struct.pack("<H", MAX_TENSORS + 1) + head[8:]
    with pytest.raises(FramingError, match="tensor count"):
        parse_header(bad)


@pytest.mark.parametrize("size", [0, HEADER_SIZE - 1, HEADER_SIZE + 1])
def test_header_of_wrong_size_is_rejected(size):
    with pytest.raises(FramingError):
        parse_header(bytes(size))


def test_checksum_mismatch_is_detected():
    head, meta = _valid()
    flipped = meta[:10] + bytes([meta[10] ^ 0x01]) + meta[11:]
    with pytest.raises(FramingError, match="checksum"):
        decode_metadata(parse_header(head), head, flipped)


def test_metadata_shorter_than_declared_is_rejected():
    head, meta = _valid()
    with pytest.raises(FramingError, match="header says"):
        decode_metadata(parse_header(head), head, meta[:-1])


@pytest.mark.parametrize("field", [0, 1, 2])
def test_ids_in_metadata_must_equal_header_ids(field):
    msg = infer_envelope()
    ids = [msg.call_id, msg.chunk_index, msg.cache_epoch]
    ids[field] += 1
    err = decode_error(seal_message(msg, ids=tuple(ids)))
    assert type(err) is FramingError and "ids differ" in str(err)


@pytest.mark.parametrize("count", [0, 3, 5])
def test_tensor_count_must_equal_the_metadata_specs(count):
    err = decode_error(seal_message(infer_envelope(), count=count))
    assert type(err) is FramingError and "tensors" in str(err)


def test_metadata_that_is_not_msgpack_is_a_metadata_error():
    assert isinstance(decode_error(seal(b"\xc1\xc1\xc1")), MetadataError)


def test_invalid_utf8_in_metadata_is_a_metadata_error():
    # msgspec raises UnicodeDecodeError here; the codec must type it.
    assert isinstance(decode_error(seal(b"\x81\xa6action\xa2\x80\x80")), MetadataError)


def test_metadata_of_the_wrong_shape_is_a_metadata_error():
    assert isinstance(decode_error(seal(msgspec.msgpack.encode({"action": "INFER"}))), MetadataError)
    assert isinstance(decode_error(seal(msgspec.msgpack.encode([1, 2, 3]))), MetadataError)


# -- tensor specs --------------------------------------------------------------

BAD_SPECS = {
    "dtype not whitelisted": TensorSpec(name="x", dtype="float64", shape=(2,), nbytes=16),
    "dtype object": TensorSpec(name="x", dtype="object", shape=(2,), nbytes=16),
    "nbytes too small": TensorSpec(name="x", dtype="float32", shape=(2, 3), nbytes=23),
    "nbytes too large": TensorSpec(name="x", dtype="float32", shape=(2, 3), nbytes=25),
    "negative dim": TensorSpec(name="x", dtype="uint8", shape=(-2, -3), nbytes=6),
    "too many dims": TensorSpec(name="x", dtype="uint8", shape=(1,) * 9, nbytes=1),
    "over the size limit": TensorSpec(name="x", dtype="float32", shape=(2**30,), nbytes=2**32),
}


@pytest.mark.parametrize("bad", BAD_SPECS.values(), ids=BAD_SPECS.keys())
def test_bad_tensor_spec_fails_at_encode_before_any_header(bad):
    msg = chunk_result(tensors=(bad,))
    with pytest.raises(TensorSpecError) as info:
        encode_frame(msg)
    assert info.value.call_id == msg.call_id


@pytest.mark.parametrize("bad", BAD_SPECS.values(), ids=BAD_SPECS.keys())
def test_bad_tensor_spec_on_the_wire_is_rejected_by_the_receiver(bad):
    frame = seal_message(chunk_result(tensors=(bad,)))
    assert isinstance(decode_error(frame), TensorSpecError)


@pytest.mark.parametrize("dtype", sorted(DTYPE_ITEMSIZE))
def test_every_whitelisted_dtype_round_trips(dtype):
    msg = chunk_result(tensors=(spec("latents_out", (3, 4, 8, 8), dtype),))
    assert decode_frame(encode_frame_bytes(msg)) == msg


def test_tensor_digest_is_checked_against_received_bytes():
    data = bytes(range(16))
    good = spec("x", (4,), digest=digest_bytes(data))
    check_tensor_digest(good, data)
    check_tensor_digest(spec("x", (4,)), b"anything")  # no digest declared: nothing to check
    with pytest.raises(DigestMismatch) as info:
        check_tensor_digest(good, data[:-1] + b"\x00", chunk=ChunkId(3, 0, 0))
    assert info.value.chunk == ChunkId(3, 0, 0)


# -- encode-time (sender preflight) failures ----------------------------------


@pytest.mark.parametrize(
    "msg",
    [
        ParityHello(call_id=0, chunk_index=0, cache_epoch=0, rank=0, settings={"k": object()}),
        ErrorEnvelope(call_id=0, chunk_index=0, cache_epoch=0, reason=object()),
        infer_envelope(kv_cache_attention_bias=object()),
        infer_envelope(base_seed=2**64),
    ],
    ids=["object in dict", "object reason", "object float", "int beyond msgpack"],
)
def test_unserialisable_metadata_is_a_metadata_error_at_encode(msg):
    with pytest.raises(MetadataError) as info:
        encode_frame(msg)
    assert info.value.call_id == msg.call_id


def test_sender_refuses_a_foreign_protocol_version():
    with pytest.raises(UnsupportedVersion):
        encode_frame(NoopEnvelope(version=PROTOCOL_VERSION + 1, call_id=1, chunk_index=0, cache_epoch=0))


def test_sender_refuses_more_tensors_than_the_header_allows():
    msg = chunk_result(tensors=(spec("t", (1,)),) * (MAX_TENSORS + 1))
    with pytest.raises(FramingError, match="exceed"):
        encode_frame(msg)


def test_sender_refuses_metadata_above_the_size_limit():
    msg = ParityHello(call_id=0, chunk_index=0, cache_epoch=0, rank=0, settings={"k": "x" * MAX_META_BYTES})
    with pytest.raises(FramingError, match="exceeds"):
        encode_frame(msg)


def test_sender_refuses_ids_the_header_cannot_carry():
    with pytest.raises(FramingError, match="out of range"):
        encode_frame(NoopEnvelope(call_id=2**63, chunk_index=0, cache_epoch=0))


# -- exhaustive mutations of real frames ------------------------------------------


@pytest.mark.parametrize("msg", SAMPLES, ids=SAMPLE_IDS)
def test_every_truncation_of_a_frame_is_a_protocol_error(msg):
    frame = encode_frame_bytes(msg)
    for n in range(len(frame)):
        assert isinstance(decode_error(frame[:n]), FramingError)


@pytest.mark.parametrize("msg", SAMPLES, ids=SAMPLE_IDS)
def test_every_single_bit_flip_of_a_frame_is_a_protocol_error(msg):
    # crc32 detects every error burst of up to 32 bits, so no flip may decode.
    frame = bytearray(encode_frame_bytes(msg))
    for i in range(len(frame)):
        for bit in range(8):
            frame[i] ^= 1 << bit
            decode_error(bytes(frame))
            frame[i] ^= 1 << bit


@pytest.mark.parametrize("extra", [b"\x00", b"\x90", b"trailing garbage"])
def test_appended_bytes_are_a_framing_error(extra):
    assert isinstance(decode_error(encode_frame_bytes(infer_envelope()) + extra), FramingError)


@pytest.mark.parametrize("delta", [-1, 1, 1000])
def test_wrong_meta_len_is_a_framing_error_even_with_a_valid_checksum(delta):
    meta = canonical_bytes(infer_envelope())
    frame = seal(meta, count=4, meta_len=len(meta) + delta)
    assert isinstance(decode_error(frame), FramingError)


# -- hypothesis: strategies for every wire type ----------------------------------

ids = st.integers(0, 2**63 - 1)
i64 = st.integers(-(2**63), 2**63 - 1)
floats = st.floats(allow_nan=False)
names = st.text(max_size=12)


@st.composite
def tensor_specs(draw):
    dtype = draw(st.sampled_from(sorted(DTYPE_ITEMSIZE)))
    # Up to 8 dims (the limit) with a product far below MAX_TENSOR_BYTES.
    shape = tuple(draw(st.lists(st.integers(0, 64), max_size=4) | st.lists(st.integers(0, 6), max_size=8)))
    digest = draw(st.none() | st.text(alphabet="0123456789abcdef", min_size=32, max_size=32))
    return spec(draw(names), shape, dtype, digest)


specs = st.lists(tensor_specs(), max_size=MAX_TENSORS).map(tuple)
small_specs = st.lists(tensor_specs(), max_size=4).map(tuple)
top = dict(call_id=ids, chunk_index=ids, cache_epoch=ids, tensors=small_specs)
reports = st.builds(
    StageReport,
    stage=i64,
    current_start_frame=i64,
    global_end_index=i64,
    local_end_index=i64,
    state_digest=names,
    observed_generator_calls=i64,
    duration_s=floats,
)

wire_messages = st.one_of(
    st.builds(
        InferEnvelope,
        height=i64,
        width=i64,
        num_frames=i64,
        latent_channels=i64,
        current_start_frame=i64,
        init_cache=st.booleans(),
        reset_kv_cache=st.booleans(),
        reset_crossattn_cache=st.booleans(),
        do_kv_recompute=st.booleans(),
        num_denoise_steps=i64,
        expected_generator_calls=i64,
        kv_cache_attention_bias=floats,
        base_seed=i64,
        recompute_mode=st.sampled_from(["r1", "r0a", "r0"]),
        anchor_mode=st.sampled_from(["none", "decoded", "latent"]),
        context_frame_indices=st.lists(i64, max_size=6).map(tuple),
        **top,
    ),
    st.builds(NoopEnvelope, **top),
    st.builds(ShutdownEnvelope, **top),
    st.builds(ErrorEnvelope, reason=st.text(), origin_rank=i64, **top),
    st.builds(
        ChunkResult,
        ok=st.booleans(),
        error=st.none() | st.text(),
        observed_generator_calls=i64,
        stages=st.lists(reports, max_size=3).map(tuple),
        output_digest=st.none() | names,
        **top,
    ),
    st.builds(
        StageHop,
        call_kind=st.sampled_from(["recompute", "denoise"]),
        step=i64,
        target=st.sampled_from(["hidden", "latent"]),
        stages=st.lists(reports, max_size=3).map(tuple),
        **top,
    ),
    st.builds(
        ParityHello, rank=i64, settings=st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=6), **top
    ),
)

fuzz = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fuzz
@given(msg=wire_messages)
def test_any_valid_message_round_trips_and_its_bytes_are_canonical(msg):
    frame = encode_frame_bytes(msg)
    decoded = decode_frame(frame)
    assert decoded == msg
    assert encode_frame_bytes(decoded) == frame
    assert canonical_bytes(decoded) == canonical_bytes(msg)


@given(spec_list=specs)
@settings(max_examples=50, deadline=None)
def test_any_number_of_valid_specs_up_to_the_limit_round_trips(spec_list):
    msg = NoopEnvelope(call_id=1, chunk_index=0, cache_epoch=0, tensors=spec_list)
    assert decode_frame(encode_frame_bytes(msg)) == msg


@st.composite
def mutations(draw):
    """A valid frame and a mutation of it that changes its bytes."""
    frame = encode_frame_bytes(draw(wire_messages))
    kind = draw(st.sampled_from(["truncate", "xor", "append", "splice", "set_version", "set_code"]))
    if kind == "truncate":
        return frame[: draw(st.integers(0, len(frame) - 1))]
    if kind == "append":
        return frame + draw(st.binary(min_size=1, max_size=32))
    if kind == "xor":
        # Up to four distinct bytes, each xor-ed with a non-zero mask.
        out = bytearray(frame)
        positions = draw(st.lists(st.integers(0, len(frame) - 1), min_size=1, max_size=4, unique=True))
        for p in positions:
            out[p] ^= draw(st.integers(1, 255))
        return bytes(out)
    if kind == "splice":
        # Replace a slice with different bytes of a different length.
        a = draw(st.integers(0, len(frame)))
        b = draw(st.integers(a, min(len(frame), a + 16)))
        new = draw(st.binary(max_size=16).filter(lambda x: len(x) != b - a))
        return frame[:a] + new + frame[b:]
    if kind == "set_version":
        v = draw(st.integers(0, 255).filter(lambda v: v != PROTOCOL_VERSION))
        return frame[:4] + bytes([v]) + frame[5:]
    code = draw(st.integers(0, 255).filter(lambda c: c != frame[5]))
    return frame[:5] + bytes([code]) + frame[6:]


@fuzz
@given(frame=mutations())
def test_every_mutation_of_a_valid_frame_is_a_protocol_error(frame):
    # Every byte of header and metadata is covered by a bound check or by the
    # crc32, so a changed frame never decodes (a crc collision needs > 32
    # corrupted bits in a pattern hypothesis will not hit by chance: 2**-32).
    decode_error(frame)


@fuzz
@given(msg=wire_messages, data=st.data())
def test_resealed_garbage_metadata_never_escapes_as_another_exception(msg, data):
    # A valid checksum around corrupted metadata reaches the msgpack decoder
    # and the spec checks: the outcome is a message or a ProtocolError.
    meta = bytearray(canonical_bytes(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        p = data.draw(st.integers(0, len(meta) - 1))
        meta[p] = data.draw(st.integers(0, 255))
    # Mostly the true count, so the spec checks behind the decoder are reached too.
    count = data.draw(st.one_of(st.just(len(msg.tensors)), st.integers(0, MAX_TENSORS)))
    frame = seal(
        bytes(meta),
        code=ACTION_CODES[action_of(msg)],
        count=count,
        ids=(msg.call_id, msg.chunk_index, msg.cache_epoch),
    )
    try:
        decoded = decode_frame(frame)
    except ProtocolError:
        return
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"{type(exc).__name__} escaped the decoder: {exc}")
    assert encode_frame_bytes(decoded)  # whatever decodes is itself encodable


@fuzz
@given(blob=st.binary(max_size=200), prefix=st.sampled_from([b"", MAGIC, MAGIC + bytes([PROTOCOL_VERSION])]))
def test_random_bytes_are_a_protocol_error(blob, prefix):
    decode_error(prefix + blob)
