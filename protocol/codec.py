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
    ProtocolError,
    TensorSpecError,
    UnknownAction,
    UnsupportedVersion,
)
from .identity import ChunkId
from .messages import (
    ACTION_BY_CODE,
    ACTION_CODES,
    PROTOCOL_VERSION,
    WIRE_TYPES,
    TensorSpec,
    WireMessage,
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
# One decoder per action, chosen by the header's (already checked) action code:
# the metadata is decoded straight into the type the header announced.
_TYPE_OF: dict[str, type] = {t.__struct_config__.tag: t for t in WIRE_TYPES}  # type: ignore[attr-defined]
_DECODERS: dict[str, msgspec.msgpack.Decoder] = {a: msgspec.msgpack.Decoder(t) for a, t in _TYPE_OF.items()}
# What encode_frame needs per type, in one lookup: the header code and the
# decoder the receiver will use for it.
_SEND_PLAN: dict[type, tuple[int, msgspec.msgpack.Decoder]] = {
    t: (ACTION_CODES[a], _DECODERS[a]) for a, t in _TYPE_OF.items()
}


class _TagOnly(msgspec.Struct):
    """Reads only the tag of metadata that failed to decode as the header's type."""

    action: object = None


_TAG_DECODER = msgspec.msgpack.Decoder(_TagOnly)


_new_header = tuple.__new__


class Header(NamedTuple):
    version: int
    action: str
    tensor_count: int
    call_id: int
    chunk_index: int
    cache_epoch: int
    meta_len: int
    checksum: int

    @property
    def id(self) -> ChunkId:
        """The identity the header declares (the metadata must repeat it)."""
        return ChunkId(self.call_id, self.chunk_index, self.cache_epoch)


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


def _check_specs(msg: WireMessage) -> None:
    tensors = msg.tensors
    try:
        if _VALID_RECORDS.issuperset(tensors):  # the common case: every spec seen whole before, one C call
            return
        valid = _VALID_SPECS
        for spec in tensors:
            if (spec.dtype, spec.shape, spec.nbytes) not in valid:  # a set lookup per spec
                _check_spec_in(msg, spec)
        # All valid. Digest-free specs are remembered whole (a spec with a
        # digest is new every chunk and would only churn the set).
        if len(_VALID_RECORDS) >= _VALID_SPECS_MAX:
            _VALID_RECORDS.clear()
        _VALID_RECORDS.update(s for s in tensors if s.digest is None)
    except TypeError:  # unhashable (a shape built in Python as a list): check every spec in full
        for spec in tensors:
            _check_spec_in(msg, spec)


def _check_spec_in(msg: WireMessage, spec: TensorSpec) -> None:
    try:
        check_tensor_spec(spec)
    except TensorSpecError as exc:
        raise TensorSpecError(exc.reason, chunk=ChunkId.of(msg)) from None


def encode_frame(msg: WireMessage) -> tuple[bytes, bytes]:
    """Serialise ``msg`` into ``(header, metadata)``; raises before any I/O.

    Only the message's own tensor specs are checked here; the transport checks
    the actual tensors against them before sending the header.

    Parameters
    ----------
    msg : WireMessage
        Any wire message of this build's ``PROTOCOL_VERSION``, with at most
        ``MAX_TENSORS`` tensor specs (dtype whitelisted, ``nbytes`` equal to
        ``prod(shape) * itemsize``, at most 1 GiB each).

    Returns
    -------
    header : bytes
        ``HEADER_SIZE`` (40) bytes: magic, version, action code, tensor count,
        the three ids (int64, little-endian), metadata length, CRC32 over
        header and metadata.
    metadata : bytes
        Canonical msgpack of ``msg`` (deterministic: the same message gives
        the same bytes), at most ``MAX_META_BYTES`` (1 MiB).

    Raises
    ------
    UnsupportedVersion
        ``msg.version`` is not ``PROTOCOL_VERSION``.
    TensorSpecError
        A tensor spec is inconsistent.
    FramingError
        Too many tensors, metadata too long, or an id outside int64.
    MetadataError
        A field cannot be serialised.
    """
    plan = _SEND_PLAN.get(type(msg))
    if plan is None:
        raise MetadataError(f"{type(msg).__name__} is not a wire message")
    code, receiver_decoder = plan
    if msg.version != PROTOCOL_VERSION:
        raise UnsupportedVersion(f"refusing to send protocol version {msg.version}", chunk=ChunkId.of(msg))
    _check_specs(msg)
    if len(msg.tensors) > MAX_TENSORS:
        raise FramingError(f"{len(msg.tensors)} tensors exceed {MAX_TENSORS}", chunk=ChunkId.of(msg))
    try:
        meta = _ENCODER.encode(msg)
    except (TypeError, ValueError, OverflowError) as exc:
        raise MetadataError(f"metadata not serialisable: {exc}", chunk=ChunkId.of(msg)) from exc
    if len(meta) > MAX_META_BYTES:
        raise FramingError(f"metadata of {len(meta)} bytes exceeds {MAX_META_BYTES}", chunk=ChunkId.of(msg))
    # The sender refuses what its receiver would refuse (B18): the receiver's
    # strict decoder rejects a float in an int field or an int in a bool field,
    # which the encoder happily writes. Decoding here (with the decoder the
    # receiver picks for this action) costs microseconds.
    try:
        receiver_decoder.decode(meta)
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise MetadataError(f"metadata would be refused by the receiver: {exc}", chunk=ChunkId.of(msg)) from exc
    try:
        partial = _HEADER_WO_CHECKSUM.pack(
            MAGIC,
            PROTOCOL_VERSION,
            code,
            len(msg.tensors),
            msg.call_id,
            msg.chunk_index,
            msg.cache_epoch,
            len(meta),
        )
    except struct.error as exc:
        raise FramingError(f"header field out of range: {exc}", chunk=ChunkId.of(msg)) from exc
    # One crc32 call over the concatenation: cheaper than two chained calls.
    return partial + _CHECKSUM.pack(zlib.crc32(partial + meta)), meta


def parse_header(buf: bytes | bytearray | memoryview) -> Header:
    """Check and unpack a fixed header. Never trusts a length before bounding it.

    Parameters
    ----------
    buf : bytes-like
        Exactly ``HEADER_SIZE`` (40) bytes, as received.

    Returns
    -------
    Header
        The unpacked fields; ``meta_len`` is in ``(0, MAX_META_BYTES]`` and
        ``tensor_count`` at most ``MAX_TENSORS``, so the caller may size its
        metadata receive from them. ``header.id`` is the declared ``ChunkId``.

    Raises
    ------
    FramingError
        Wrong length, bad magic, tensor count or metadata length out of bounds.
    UnsupportedVersion
        Another protocol major version.
    UnknownAction
        An action code this build does not know.
    """
    if len(buf) != HEADER_SIZE:
        raise FramingError(f"header is {len(buf)} bytes, expected {HEADER_SIZE}")
    magic, version, code, count, call_id, chunk_index, epoch, meta_len, checksum = _HEADER.unpack(buf)
    action = ACTION_BY_CODE.get(code)
    if (
        magic == MAGIC
        and version == PROTOCOL_VERSION
        and action is not None
        and count <= MAX_TENSORS
        and 0 < meta_len <= MAX_META_BYTES
    ):  # the hot path: one test, no error context built
        # tuple.__new__ directly: NamedTuple's own __new__ is a Python-level call.
        return _new_header(Header, (version, action, count, call_id, chunk_index, epoch, meta_len, checksum))
    chunk = ChunkId(call_id, chunk_index, epoch)
    if magic != MAGIC:
        raise FramingError(f"bad magic {magic!r}", chunk=chunk)
    if version != PROTOCOL_VERSION:
        raise UnsupportedVersion(
            f"peer speaks protocol version {version}, this build speaks {PROTOCOL_VERSION}", chunk=chunk
        )
    if action is None:
        raise UnknownAction(f"unknown action code {code}", chunk=chunk)
    if count > MAX_TENSORS:
        raise FramingError(f"tensor count {count} exceeds {MAX_TENSORS}", chunk=chunk)
    raise FramingError(f"metadata length {meta_len} outside (0, {MAX_META_BYTES}]", chunk=chunk)


def decode_metadata(header: Header, header_bytes: bytes, meta: bytes | memoryview) -> WireMessage:
    """Decode the metadata that followed ``header``; checks checksum, identity and specs.

    Parameters
    ----------
    header : Header
        What ``parse_header(header_bytes)`` returned.
    header_bytes : bytes
        The raw header (the checksum covers it).
    meta : bytes-like
        Exactly ``header.meta_len`` bytes of metadata.

    Returns
    -------
    WireMessage
        The typed message. Its version, action, ids and tensor count equal the
        header's, and its tensor specs are self-consistent, so a receiver may
        allocate tensor buffers from them (``nbytes`` each, in order). Not yet
        checked against cross-field invariants: call ``validate`` next.

    Raises
    ------
    FramingError
        Length or checksum mismatch, or the metadata disagrees with the header.
    UnknownAction
        An unknown message tag.
    MetadataError
        Not msgpack, or not a known wire type.
    UnsupportedVersion
        The metadata's version differs from the header's.
    TensorSpecError
        A tensor spec is inconsistent.

    The metadata is decoded as the type the header's action names (one decoder
    per action). When that fails, only the tag is read to say why: a tag this
    build does not know (``UnknownAction``), the tag of another action than the
    header's (``FramingError``), or a field that does not fit (``MetadataError``).
    """
    # One unpack: a NamedTuple's attribute access goes through a Python property.
    version, action, tensor_count, call_id, chunk_index, cache_epoch, meta_len, checksum = header
    if len(meta) != meta_len:
        raise FramingError(f"metadata is {len(meta)} bytes, header says {meta_len}", chunk=header.id)
    if type(header_bytes) is not bytes:  # a memoryview has no ``+``
        header_bytes = bytes(header_bytes)
    if zlib.crc32(header_bytes[:-4] + meta) != checksum:  # unsigned since Python 3.0
        raise FramingError("checksum mismatch over header and metadata", chunk=header.id)
    try:
        msg = _DECODERS[action].decode(meta)
    except msgspec.ValidationError as exc:
        raise _why_undecodable(header, meta, exc) from exc
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        # msgspec raises UnicodeDecodeError (not DecodeError) for invalid UTF-8 in a str.
        raise MetadataError(f"metadata is not valid msgpack: {exc}", chunk=header.id) from exc
    if msg.version != version:
        raise UnsupportedVersion(
            f"metadata version {msg.version} differs from header version {version}", chunk=header.id
        )
    if msg.call_id != call_id or msg.chunk_index != chunk_index or msg.cache_epoch != cache_epoch:
        raise FramingError("metadata ids differ from header ids", chunk=header.id)
    if len(msg.tensors) != tensor_count:
        raise FramingError(
            f"metadata lists {len(msg.tensors)} tensors, header says {tensor_count}", chunk=header.id
        )
    _check_specs(msg)
    return msg


def _why_undecodable(header: Header, meta: bytes | memoryview, exc: msgspec.ValidationError) -> ProtocolError:
    try:
        tag = _TAG_DECODER.decode(meta).action
    except (msgspec.DecodeError, UnicodeDecodeError):
        tag = None
    if isinstance(tag, str) and tag != header.action:
        if tag not in _TYPE_OF:
            return UnknownAction(f"unknown message tag {tag!r}", chunk=header.id)
        return FramingError(f"metadata action {tag} != header action {header.action}", chunk=header.id)
    return MetadataError(f"metadata does not match a wire type: {exc}", chunk=header.id)


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
            chunk=header.id,
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
# Whole digest-free specs (name included) known valid: ``issuperset`` checks a
# message's specs in one C call, without building a key per spec.
_VALID_RECORDS: set[TensorSpec] = set()


def check_tensor_spec(spec: TensorSpec, *, chunk: ChunkId | None = None) -> None:
    """A spec must name a whitelisted dtype and a byte length equal to its shape.

    Raises
    ------
    TensorSpecError
        The dtype is not whitelisted, the shape has a negative dimension or more
        than 8, ``nbytes`` differs from ``prod(shape) * itemsize`` or exceeds
        1 GiB, or a field is of a type the check cannot read (a spec built in
        Python with a ``None`` dimension): never a bare ``TypeError``.
    """
    try:
        key = (spec.dtype, spec.shape, spec.nbytes)
        if key in _VALID_SPECS:
            return
    except TypeError:  # an unhashable shape built in Python (a list): check it in full
        key = None
    try:
        _check_spec_fields(spec, chunk)
    except TypeError:  # a field of the wrong type built in Python (a None dim, a list dtype)
        raise TensorSpecError(f"tensor {spec.name!r}: malformed spec {spec!r}", chunk=chunk) from None
    if key is not None:
        if len(_VALID_SPECS) >= _VALID_SPECS_MAX:
            _VALID_SPECS.clear()
        _VALID_SPECS.add(key)


def _check_spec_fields(spec: TensorSpec, chunk: ChunkId | None) -> None:
    itemsize = DTYPE_ITEMSIZE.get(spec.dtype)
    if itemsize is None:
        raise TensorSpecError(f"tensor {spec.name!r}: dtype {spec.dtype!r} not allowed", chunk=chunk)
    if len(spec.shape) > 8 or any(d < 0 for d in spec.shape):
        raise TensorSpecError(f"tensor {spec.name!r}: bad shape {spec.shape}", chunk=chunk)
    expected = prod(spec.shape) * itemsize
    if spec.nbytes != expected:
        raise TensorSpecError(
            f"tensor {spec.name!r}: {spec.nbytes} bytes declared, shape needs {expected}", chunk=chunk
        )
    if spec.nbytes > MAX_TENSOR_BYTES:
        raise TensorSpecError(f"tensor {spec.name!r}: {spec.nbytes} bytes exceed limit", chunk=chunk)


def check_tensor_digest(spec: TensorSpec, data: bytes | memoryview, *, chunk: ChunkId | None = None) -> None:
    """Compare received bytes with the digest the sender declared, if any."""
    if spec.digest is not None and digest_bytes(data) != spec.digest:
        raise DigestMismatch(f"tensor {spec.name!r}: digest mismatch", chunk=chunk)
