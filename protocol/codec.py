"""Framing codec: message <-> fixed header + metadata bytes (+ tensor specs).

A frame on the wire is::

    header (HEADER_SIZE bytes) | metadata (meta_len bytes) | tensor 0 | tensor 1 | ...

The header is fixed-size so a receiver can post a receive of known length
before it knows anything else. ``parse_header`` and ``decode_metadata`` run
every check a receiver needs *before* it allocates a tensor buffer: sizes are
bounded, the checksum covers header and metadata, the metadata's identity must
equal the header's, and every tensor spec is self-consistent.

This module has no torch dependency; tensor payloads are opaque bytes here.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from math import prod
from typing import NamedTuple

import msgspec

from .errors import (
    DigestMismatch,
    FramingError,
    MetadataError,
    TensorSpecError,
    UnknownAction,
    UnsupportedVersion,
)
from .messages import (
    ACTION_BY_CODE,
    ACTION_CODES,
    PROTOCOL_VERSION,
    TensorSpec,
    WireMessage,
    action_of,
)

MAGIC = b"PPS1"
# magic, version, action, tensor_count, call_id, chunk_index, cache_epoch, meta_len, checksum
_HEADER = struct.Struct("<4sBBHqqqII")
_HEADER_WO_CHECKSUM = struct.Struct("<4sBBHqqqI")  # the part the checksum covers
_CHECKSUM = struct.Struct("<I")
HEADER_SIZE = _HEADER.size
MAX_META_BYTES = 1 << 20
MAX_TENSORS = 16
MAX_TENSOR_BYTES = 1 << 30

# The dtype whitelist: wire name -> item size. Anything else is refused.
DTYPE_ITEMSIZE: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "uint8": 1,
}

# Created once: msgspec encoders/decoders are reusable and thread-safe.
# ``order="deterministic"`` makes the bytes canonical (fixed field order, sorted
# dict keys), so the same bytes serve the wire, digests, logs and replay.
_ENCODER = msgspec.msgpack.Encoder(order="deterministic")
_DECODER = msgspec.msgpack.Decoder(WireMessage)


class Header(NamedTuple):
    version: int
    action: str
    tensor_count: int
    call_id: int
    chunk_index: int
    cache_epoch: int
    meta_len: int
    checksum: int


def canonical_bytes(msg: msgspec.Struct) -> bytes:
    """The one deterministic encoding of a message, used for wire and digests."""
    return _ENCODER.encode(msg)


def digest_bytes(*parts: bytes | memoryview) -> str:
    """Hex digest (blake2b-128) over the concatenation of ``parts``."""
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(p)
    return h.hexdigest()


def message_digest(msg: msgspec.Struct) -> str:
    """Digest of a message's canonical metadata bytes."""
    return digest_bytes(canonical_bytes(msg))


def _ids(msg: WireMessage | Header) -> dict[str, int]:
    """The identity an error carries; built only when raising (the hot path skips it)."""
    return dict(call_id=msg.call_id, chunk_index=msg.chunk_index, cache_epoch=msg.cache_epoch)


def _check_specs(msg: WireMessage) -> None:
    valid = _VALID_SPECS
    for spec in msg.tensors:
        try:
            if (spec.dtype, spec.shape, spec.nbytes) in valid:
                continue  # the common case, inlined: a set lookup per spec
        except TypeError:
            pass
        try:
            check_tensor_spec(spec)
        except TensorSpecError as exc:
            raise TensorSpecError(exc.reason, **_ids(msg)) from None


def _checksum(head_wo_checksum: bytes, meta: bytes) -> int:
    return zlib.crc32(meta, zlib.crc32(head_wo_checksum)) & 0xFFFFFFFF


def encode_frame(msg: WireMessage) -> tuple[bytes, bytes]:
    """Serialise ``msg`` into ``(header, metadata)``; raises before any I/O.

    Only the message's own tensor specs are checked here; the transport checks
    the actual tensors against them before sending the header.
    """
    action = action_of(msg)
    if msg.version != PROTOCOL_VERSION:
        raise UnsupportedVersion(f"refusing to send protocol version {msg.version}", **_ids(msg))
    _check_specs(msg)
    if len(msg.tensors) > MAX_TENSORS:
        raise FramingError(f"{len(msg.tensors)} tensors exceed {MAX_TENSORS}", **_ids(msg))
    try:
        meta = _ENCODER.encode(msg)
    except (TypeError, ValueError, OverflowError) as exc:
        raise MetadataError(f"metadata not serialisable: {exc}", **_ids(msg)) from exc
    if len(meta) > MAX_META_BYTES:
        raise FramingError(f"metadata of {len(meta)} bytes exceeds {MAX_META_BYTES}", **_ids(msg))
    # The sender refuses what its receiver would refuse (B18): the receiver's
    # strict decoder rejects a float in an int field or an int in a bool field,
    # which the encoder happily writes. Decoding here costs microseconds.
    try:
        _DECODER.decode(meta)
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise MetadataError(f"metadata would be refused by the receiver: {exc}", **_ids(msg)) from exc
    try:
        partial = _HEADER_WO_CHECKSUM.pack(
            MAGIC,
            PROTOCOL_VERSION,
            ACTION_CODES[action],
            len(msg.tensors),
            msg.call_id,
            msg.chunk_index,
            msg.cache_epoch,
            len(meta),
        )
    except struct.error as exc:
        raise FramingError(f"header field out of range: {exc}", **_ids(msg)) from exc
    return partial + _CHECKSUM.pack(_checksum(partial, meta)), meta


def parse_header(buf: bytes | bytearray | memoryview) -> Header:
    """Check and unpack a fixed header. Never trusts a length before bounding it."""
    if len(buf) != HEADER_SIZE:
        raise FramingError(f"header is {len(buf)} bytes, expected {HEADER_SIZE}")
    magic, version, code, count, call_id, chunk_index, epoch, meta_len, checksum = _HEADER.unpack(
        bytes(buf)
    )
    ids = dict(call_id=call_id, chunk_index=chunk_index, cache_epoch=epoch)
    if magic != MAGIC:
        raise FramingError(f"bad magic {magic!r}", **ids)
    if version != PROTOCOL_VERSION:
        raise UnsupportedVersion(
            f"peer speaks protocol version {version}, this build speaks {PROTOCOL_VERSION}", **ids
        )
    action = ACTION_BY_CODE.get(code)
    if action is None:
        raise UnknownAction(f"unknown action code {code}", **ids)
    if count > MAX_TENSORS:
        raise FramingError(f"tensor count {count} exceeds {MAX_TENSORS}", **ids)
    if meta_len == 0 or meta_len > MAX_META_BYTES:
        raise FramingError(f"metadata length {meta_len} outside (0, {MAX_META_BYTES}]", **ids)
    return Header(version, action, count, call_id, chunk_index, epoch, meta_len, checksum)


def decode_metadata(header: Header, header_bytes: bytes, meta: bytes | memoryview) -> WireMessage:
    """Decode metadata that followed ``header``; checks checksum and identity."""
    if not isinstance(meta, bytes):
        meta = bytes(meta)
    if len(meta) != header.meta_len:
        raise FramingError(f"metadata is {len(meta)} bytes, header says {header.meta_len}", **_ids(header))
    if _checksum(header_bytes[:-4], meta) != header.checksum:
        raise FramingError("checksum mismatch over header and metadata", **_ids(header))
    try:
        msg = _DECODER.decode(meta)
    except msgspec.ValidationError as exc:
        text = str(exc)
        if "Invalid value" in text and "`$.action`" in text:
            raise UnknownAction(f"unknown message tag: {text}", **_ids(header)) from exc
        raise MetadataError(f"metadata does not match a wire type: {text}", **_ids(header)) from exc
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        # msgspec raises UnicodeDecodeError (not DecodeError) for invalid UTF-8 in a str.
        raise MetadataError(f"metadata is not valid msgpack: {exc}", **_ids(header)) from exc
    if msg.version != header.version:
        raise UnsupportedVersion(
            f"metadata version {msg.version} differs from header version {header.version}", **_ids(header)
        )
    action = action_of(msg)
    if action != header.action:
        raise FramingError(f"metadata action {action} != header action {header.action}", **_ids(header))
    if (msg.call_id, msg.chunk_index, msg.cache_epoch) != (
        header.call_id,
        header.chunk_index,
        header.cache_epoch,
    ):
        raise FramingError("metadata ids differ from header ids", **_ids(header))
    if len(msg.tensors) != header.tensor_count:
        raise FramingError(
            f"metadata lists {len(msg.tensors)} tensors, header says {header.tensor_count}", **_ids(header)
        )
    _check_specs(msg)
    return msg


def decode_frame(frame: bytes | bytearray | memoryview) -> WireMessage:
    """Decode ``header + metadata`` held in one buffer (logs, tests, fuzzing)."""
    frame = bytes(frame)
    if len(frame) < HEADER_SIZE:
        raise FramingError(f"frame of {len(frame)} bytes is shorter than a header")
    head = frame[:HEADER_SIZE]
    header = parse_header(head)
    rest = frame[HEADER_SIZE:]
    if len(rest) != header.meta_len:
        raise FramingError(
            f"frame carries {len(rest)} metadata bytes, header says {header.meta_len}",
            call_id=header.call_id,
            chunk_index=header.chunk_index,
            cache_epoch=header.cache_epoch,
        )
    return decode_metadata(header, head, rest)


def encode_frame_bytes(msg: WireMessage) -> bytes:
    """``header + metadata`` as one buffer (the inverse of ``decode_frame``)."""
    head, meta = encode_frame(msg)
    return head + meta


# Valid (dtype, shape, nbytes) triples seen before. A pipeline sends the same
# few shapes every chunk, so the check is a set lookup after the first time.
# Bounded, because the keys come from the wire: a peer cannot grow it forever.
_VALID_SPECS: set[tuple[str, tuple[int, ...], int]] = set()
_VALID_SPECS_MAX = 4096


def check_tensor_spec(spec: TensorSpec, **ids: int | None) -> None:
    """A spec must name a whitelisted dtype and a byte length equal to its shape."""
    try:
        key = (spec.dtype, spec.shape, spec.nbytes)
        if key in _VALID_SPECS:
            return
    except TypeError:  # an unhashable shape built in Python (a list): check it in full
        key = None
    itemsize = DTYPE_ITEMSIZE.get(spec.dtype)
    if itemsize is None:
        raise TensorSpecError(f"tensor {spec.name!r}: dtype {spec.dtype!r} not allowed", **ids)
    if len(spec.shape) > 8 or any(d < 0 for d in spec.shape):
        raise TensorSpecError(f"tensor {spec.name!r}: bad shape {spec.shape}", **ids)
    expected = prod(spec.shape) * itemsize
    if spec.nbytes != expected:
        raise TensorSpecError(
            f"tensor {spec.name!r}: {spec.nbytes} bytes declared, shape needs {expected}", **ids
        )
    if spec.nbytes > MAX_TENSOR_BYTES:
        raise TensorSpecError(f"tensor {spec.name!r}: {spec.nbytes} bytes exceed limit", **ids)
    if key is not None:
        if len(_VALID_SPECS) >= _VALID_SPECS_MAX:
            _VALID_SPECS.clear()
        _VALID_SPECS.add(key)


def check_tensor_digest(spec: TensorSpec, data: bytes | memoryview, **ids: int | None) -> None:
    """Compare received bytes with the digest the sender declared, if any."""
    if spec.digest is not None and digest_bytes(data) != spec.digest:
        raise DigestMismatch(f"tensor {spec.name!r}: digest mismatch", **ids)
