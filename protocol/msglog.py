"""The per-rank message log: an append-only file of checksummed records.

A log file is::

    MAGIC (8 bytes) | record 0 (a LogHeader) | record 1 | record 2 | ...

and every record is::

    length (u32 LE) | crc32 of the body (u32 LE) | body (length bytes, msgpack)

The body is one ``LogRecord``: a msgspec Struct of a tagged union whose tag
field is ``kind``. Records are self-delimiting, so a reader streams them one
by one and everything before a damaged record stays usable: a short tail or a
checksum that does not match is reported as ``LogTruncated`` /
``LogChecksumError`` with the byte offset and the record number where the
damage starts. Random bytes only ever produce a ``LogError``.

Version policy (docs/protocol.md): ``LOG_FORMAT_VERSION`` is the major
version of the file layout and of the record types. Record types only gain
fields appended with a default; unknown fields and unknown record kinds are
tolerated by the reader (unknown kinds come back as ``UnknownRecord``), so an
older reader reads a newer minor log. Anything else bumps the major version,
which a reader refuses up front (``LogFormatError``).

No torch and no pickle: tensor payloads are opaque bytes here.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Literal, Union

import msgspec

from .errors import ProtocolError
from .messages import TensorSpec

MAGIC = b"PPSLOG\x00\x01"
LOG_FORMAT_VERSION = 1
_PREFIX = struct.Struct("<II")  # length, crc32(body)
PREFIX_SIZE = _PREFIX.size
MAX_RECORD_BYTES = 1 << 30  # a full-tensor record of a large chunk still fits

Direction = Literal["send", "recv", "publish"]


# -- errors ----------------------------------------------------------------------
class LogError(ProtocolError):
    """A message log cannot be read past some point.

    ``offset`` is the byte offset where the unreadable record starts and
    ``record`` its number (0 = the header record); every record before it was
    read and checked.
    """

    def __init__(self, message: str, *, offset: int, record: int, path: str | None = None) -> None:
        super().__init__(message)
        self.offset = offset
        self.record = record
        self.path = path

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{where}record {self.record} at byte {self.offset}: {self.reason}"


class LogFormatError(LogError):
    """Not a ppstage log, an unsupported major version, or a record that is no log record."""


class LogTruncated(LogError):
    """The file ends inside a record (a writer was killed mid-write, or a copy was cut)."""


class LogChecksumError(LogError):
    """A record's bytes do not match its checksum (bit rot, a bad copy, a tampered file)."""


# -- record types ----------------------------------------------------------------
class _Rec(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    pass


class LogHeader(_Rec, tag="header", kw_only=True):
    """Record 0 of every log: who wrote it and under which config.

    ``config_json`` is the resolved config (canonical JSON) so a log alone is
    enough to replay; ``t0_ns`` is the writer's monotonic clock at start, the
    origin of every ``t_ns`` in the file; ``flight`` marks a flight-recorder
    dump (the last records before a failure, not the whole run).
    """

    format_version: int = LOG_FORMAT_VERSION
    protocol_version: int
    rank: int
    role: str  # "stage0" | "leader" | "follower"
    stage: int
    world_size: int
    config_digest: str
    config_json: bytes = b""
    start_unix_s: float
    t0_ns: int
    tensors: Literal["full", "digest"] = "digest"
    flight: bool = False
    restart_generation: int = 0


class MessageRecord(_Rec, tag="msg", kw_only=True):
    """A message at a commitment point: sent, received, or published into a mesh.

    ``header`` and ``meta`` are the frame's exact header and canonical
    metadata bytes (``protocol.decode_frame(header + meta)`` gives the
    message back). ``specs`` are the message's tensor specs with every digest
    filled; ``payload`` holds the tensor bytes (in spec order) only when the
    log records tensors in full. ``error`` is set for a received message that
    failed validation (it was received in full but not acted on).
    """

    t_ns: int
    direction: Direction
    peer: int  # the other rank (-1 for a mesh publish: the whole mesh)
    group: str
    action: str
    call_id: int
    chunk_index: int
    cache_epoch: int
    header: bytes
    meta: bytes
    specs: tuple[TensorSpec, ...] = ()
    payload: tuple[bytes, ...] = ()
    error: str | None = None


class PlanRecord(_Rec, tag="plan", kw_only=True):
    """Rank 0's plan of a chunk (canonical msgpack of ``ChunkPlan``), as registered with the gate.

    ``state_digest`` is rank 0's shadow lifecycle digest after the chunk: what
    every stage must report.
    """

    t_ns: int
    call_id: int
    chunk_index: int
    cache_epoch: int
    plan: bytes
    state_digest: str


class ChunkRecord(_Rec, tag="chunk", kw_only=True):
    """A chunk boundary on a generator rank: its lifecycle state after the chunk."""

    t_ns: int
    call_id: int
    chunk_index: int
    cache_epoch: int
    stage: int
    state_digest: str
    output_digest: str | None
    current_start_frame: int
    global_end_index: int
    local_end_index: int
    calls: int


class GateRecord(_Rec, tag="gate", kw_only=True):
    """Rank 0's verdict on a result or chunk: accepted / a drop reason / flushed / emitted."""

    t_ns: int
    call_id: int
    chunk_index: int
    cache_epoch: int
    verdict: str


class SpanRecord(_Rec, tag="span", kw_only=True):
    """A phase of a chunk on this rank, ``[start_ns, end_ns)`` on its monotonic clock."""

    name: str
    start_ns: int
    end_ns: int
    call_id: int
    chunk_index: int
    cache_epoch: int


class EventRecord(_Rec, tag="event", kw_only=True):
    """Something worth a line in a post-mortem: a failure, a signal, a clean end."""

    t_ns: int
    name: str
    detail: str = ""


class UnknownRecord(msgspec.Struct, frozen=True):
    """A record of a kind this reader does not know (written by a newer minor version)."""

    kind: str


LogRecord = Union[LogHeader, MessageRecord, PlanRecord, ChunkRecord, GateRecord, SpanRecord, EventRecord]
RECORD_TYPES = (LogHeader, MessageRecord, PlanRecord, ChunkRecord, GateRecord, SpanRecord, EventRecord)
KNOWN_KINDS = frozenset(t.__struct_config__.tag for t in RECORD_TYPES)  # type: ignore[misc]

_ENCODER = msgspec.msgpack.Encoder(order="deterministic")
_DECODER = msgspec.msgpack.Decoder(LogRecord)


class _KindOnly(msgspec.Struct):
    kind: str


_KIND_DECODER = msgspec.msgpack.Decoder(_KindOnly)


# -- writing ---------------------------------------------------------------------
def encode_record(record: LogRecord) -> bytes:
    """``length | crc32 | body`` of one record."""
    body = _ENCODER.encode(record)
    if len(body) > MAX_RECORD_BYTES:
        raise ValueError(f"record of {len(body)} bytes exceeds {MAX_RECORD_BYTES}")
    return _PREFIX.pack(len(body), zlib.crc32(body) & 0xFFFFFFFF) + body


def encode_log(header: LogHeader, records: list[LogRecord] | tuple[LogRecord, ...] = ()) -> bytes:
    """A whole log in memory (tests, flight dumps)."""
    return MAGIC + encode_record(header) + b"".join(encode_record(r) for r in records)


class LogWriter:
    """Appends records to one log file. Not thread-safe: one owner writes.

    ``append`` buffers in memory; ``flush`` hands the buffer to the OS with one
    ``write`` (a process killed afterwards loses nothing; only a power cut
    could). The file is created new, replacing a previous run's log of the
    same name: a log is never appended to across runs.
    """

    def __init__(self, path: str | Path, header: LogHeader) -> None:
        self.path = Path(path)
        self._file: BinaryIO = open(self.path, "wb", buffering=0)
        self._pending: list[bytes] = [MAGIC, encode_record(header)]
        self.records = 1
        self.bytes_written = 0
        self.flush()

    def append(self, record: LogRecord) -> None:
        self._pending.append(encode_record(record))
        self.records += 1

    def append_encoded(self, data: bytes) -> None:
        """A record already framed by ``encode_record`` (encoded by another thread)."""
        self._pending.append(data)
        self.records += 1

    def flush(self) -> None:
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        view = memoryview(data)
        while view:
            n = self._file.write(view)
            view = view[n:]
        self.bytes_written += len(data)

    def close(self) -> None:
        if self._file.closed:
            return
        self.flush()
        self._file.close()


# -- reading ---------------------------------------------------------------------
class LogReader:
    """Streams the records of one log; raises a ``LogError`` where it cannot go on.

    Iterate for records (the header first); ``offset`` and ``count`` say how
    far it got. Every record yielded before an error was complete and matched
    its checksum.
    """

    def __init__(self, source: str | Path | bytes | BinaryIO, *, name: str | None = None) -> None:
        if isinstance(source, (bytes, bytearray, memoryview)):
            import io

            self._f: BinaryIO = io.BytesIO(bytes(source))
            self.name = name or "<bytes>"
            self._owned = True
        elif isinstance(source, (str, Path)):
            self._f = open(source, "rb")
            self.name = name or str(source)
            self._owned = True
        else:
            self._f = source
            self.name = name or getattr(source, "name", "<stream>")
            self._owned = False
        self.offset = 0
        self.count = 0
        self.header: LogHeader | None = None

    def close(self) -> None:
        if self._owned:
            self._f.close()

    def __enter__(self) -> "LogReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fail(self, cls: type[LogError], text: str) -> LogError:
        return cls(text, offset=self.offset, record=self.count, path=self.name)

    def __iter__(self) -> Iterator[LogRecord | UnknownRecord]:
        magic = self._f.read(len(MAGIC))
        if magic != MAGIC:
            if len(magic) < len(MAGIC) and MAGIC.startswith(magic):
                raise self._fail(LogTruncated, f"file ends after {len(magic)} bytes, inside the magic")
            raise self._fail(LogFormatError, f"not a ppstage message log (magic {magic[:8]!r})")
        self.offset = len(MAGIC)
        while True:
            prefix = self._f.read(PREFIX_SIZE)
            if not prefix:
                if self.header is None:
                    raise self._fail(LogTruncated, "file ends before the header record")
                return
            if len(prefix) < PREFIX_SIZE:
                raise self._fail(LogTruncated, f"file ends {len(prefix)} bytes into a record prefix")
            length, crc = _PREFIX.unpack(prefix)
            if length > MAX_RECORD_BYTES:
                raise self._fail(LogFormatError, f"record length {length} exceeds {MAX_RECORD_BYTES}")
            body = self._f.read(length)
            if len(body) < length:
                raise self._fail(LogTruncated, f"file ends {len(body)} of {length} bytes into the record")
            if zlib.crc32(body) & 0xFFFFFFFF != crc:
                raise self._fail(LogChecksumError, "checksum mismatch")
            record = self._decode(body)
            self.offset += PREFIX_SIZE + length
            self.count += 1
            yield record

    def _decode(self, body: bytes) -> LogRecord | UnknownRecord:
        try:
            record = _DECODER.decode(body)
        except msgspec.ValidationError as exc:
            try:
                kind = _KIND_DECODER.decode(body).kind
            except (msgspec.DecodeError, UnicodeDecodeError):
                kind = None
            if kind is not None and kind not in KNOWN_KINDS and self.header is not None:
                return UnknownRecord(kind)  # a newer minor version's record: skip it
            raise self._fail(LogFormatError, f"not a log record: {exc}") from None
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise self._fail(LogFormatError, f"record is not valid msgpack: {exc}") from None
        if self.header is None:
            if not isinstance(record, LogHeader):
                raise self._fail(LogFormatError, f"first record is {type(record).__name__}, not a header")
            if record.format_version != LOG_FORMAT_VERSION:
                raise self._fail(
                    LogFormatError,
                    f"log format version {record.format_version}, this build reads {LOG_FORMAT_VERSION}",
                )
            self.header = record
        elif isinstance(record, LogHeader):
            raise self._fail(LogFormatError, "a second header record")
        return record


@dataclass
class LogContents:
    """Everything readable from one log, and the error that stopped the reader, if any."""

    path: str
    header: LogHeader | None
    records: list  # LogRecord | UnknownRecord, header excluded
    error: LogError | None = None
    size: int = 0  # bytes read and checked

    @property
    def complete(self) -> bool:
        return self.error is None


def read_log(source: str | Path | bytes, *, name: str | None = None) -> LogContents:
    """Read a whole log; a damaged one gives its readable part plus ``error``."""
    records: list = []
    reader = LogReader(source, name=name)
    error: LogError | None = None
    try:
        for rec in reader:
            if not isinstance(rec, LogHeader):
                records.append(rec)
    except LogError as exc:
        error = exc
    finally:
        reader.close()
    return LogContents(path=reader.name, header=reader.header, records=records, error=error, size=reader.offset)


__all__ = [
    "KNOWN_KINDS",
    "LOG_FORMAT_VERSION",
    "MAGIC",
    "MAX_RECORD_BYTES",
    "PREFIX_SIZE",
    "RECORD_TYPES",
    "ChunkRecord",
    "EventRecord",
    "GateRecord",
    "LogChecksumError",
    "LogContents",
    "LogError",
    "LogFormatError",
    "LogHeader",
    "LogReader",
    "LogRecord",
    "LogTruncated",
    "LogWriter",
    "MessageRecord",
    "PlanRecord",
    "SpanRecord",
    "UnknownRecord",
    "encode_log",
    "encode_record",
    "read_log",
]
