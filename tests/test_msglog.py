"""The message-log format (``protocol.msglog``): round trips, damage is located, bytes never crash the reader."""

from __future__ import annotations

import struct
import zlib

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import PROTOCOL_VERSION, TensorSpec, encode_frame_bytes
from protocol.msglog import (
    MAGIC,
    PREFIX_SIZE,
    ChunkRecord,
    EventRecord,
    GateRecord,
    LogChecksumError,
    LogError,
    LogFormatError,
    LogHeader,
    LogReader,
    LogTruncated,
    LogWriter,
    MessageRecord,
    PlanRecord,
    SpanRecord,
    UnknownRecord,
    encode_log,
    encode_record,
    read_log,
)
from wire_samples import infer_envelope


def header(**kw) -> LogHeader:
    base = dict(
        protocol_version=PROTOCOL_VERSION, rank=1, role="leader", stage=1, world_size=3,
        config_digest="c0ffee", config_json=b'{"a":1}', start_unix_s=1.5, t0_ns=10,
    )
    return LogHeader(**{**base, **kw})


def sample_records() -> list:
    env = infer_envelope()
    frame = encode_frame_bytes(env)
    spec = TensorSpec(name="hidden", dtype="float32", shape=(2, 3), nbytes=24, digest="ab" * 16)
    return [
        MessageRecord(
            t_ns=100, direction="recv", peer=0, group="link0>1", action="INFER", call_id=env.call_id,
            chunk_index=env.chunk_index, cache_epoch=env.cache_epoch, header=frame[:36], meta=frame[36:],
            specs=env.tensors,
        ),
        MessageRecord(
            t_ns=120, direction="send", peer=2, group="link1>2", action="HOP", call_id=1, chunk_index=1,
            cache_epoch=0, header=b"h" * 36, meta=b"m", specs=(spec,), payload=(b"\x00" * 24,),
        ),
        PlanRecord(t_ns=130, call_id=1, chunk_index=1, cache_epoch=0, plan=b"\x80", state_digest="d1"),
        ChunkRecord(
            t_ns=140, call_id=1, chunk_index=1, cache_epoch=0, stage=1, state_digest="d1", output_digest="o1",
            current_start_frame=3, global_end_index=96, local_end_index=96, calls=5,
        ),
        GateRecord(t_ns=150, call_id=1, chunk_index=1, cache_epoch=0, verdict="stale_epoch"),
        SpanRecord(name="chunk", start_ns=90, end_ns=150, call_id=1, chunk_index=1, cache_epoch=0),
        EventRecord(t_ns=160, name="failure", detail="WatchdogExpired: no result"),
    ]


def test_every_record_kind_round_trips_through_the_writer_and_reader(tmp_path):
    path = tmp_path / "rank1.ppslog"
    writer = LogWriter(path, header())
    for r in sample_records():
        writer.append(r)
    writer.close()
    contents = read_log(path)
    assert contents.complete and contents.header == header()
    assert contents.records == sample_records()
    assert contents.size == path.stat().st_size
    # The frame inside a message record decodes back to the message it came from.
    from protocol import decode_frame

    m = contents.records[0]
    assert decode_frame(m.header + m.meta) == infer_envelope()


def _boundaries(data: bytes) -> list[int]:
    """Byte offsets where records start (after the magic), and the end."""
    out, pos = [], len(MAGIC)
    while pos < len(data):
        out.append(pos)
        (length, _) = struct.unpack_from("<II", data, pos)
        pos += PREFIX_SIZE + length
    return out + [len(data)]


def test_truncation_at_every_record_boundary_keeps_every_record_before_it():
    data = encode_log(header(), sample_records())
    bounds = _boundaries(data)
    for i, cut in enumerate(bounds[1:], start=1):  # cut after record i-1 (0 = header)
        contents = read_log(data[:cut])
        assert contents.complete, contents.error
        assert contents.records == sample_records()[: i - 1]


def test_truncation_inside_any_record_is_located_at_that_record():
    data = encode_log(header(), sample_records())
    bounds = _boundaries(data)
    for n, (start, end) in enumerate(zip(bounds, bounds[1:])):
        for cut in sorted({start + 1, start + PREFIX_SIZE - 1, start + PREFIX_SIZE, (start + end) // 2, end - 1}):
            if not start < cut < end:
                continue
            contents = read_log(data[:cut])
            assert isinstance(contents.error, LogTruncated), (cut, contents.error)
            assert (contents.error.offset, contents.error.record) == (start, n)
            assert contents.records == sample_records()[: max(n - 1, 0)]
            assert f"record {n} at byte {start}" in str(contents.error)


def test_truncation_inside_the_magic_is_a_truncation_not_a_format_error():
    for cut in range(1, len(MAGIC)):
        assert isinstance(read_log(MAGIC[:cut]).error, LogTruncated)
    assert isinstance(read_log(b"").error, LogTruncated)
    assert isinstance(read_log(MAGIC).error, LogTruncated)  # no header record


def test_a_flipped_byte_in_a_record_body_is_a_checksum_error_at_that_record():
    data = bytearray(encode_log(header(), sample_records()))
    bounds = _boundaries(bytes(data))
    start = bounds[3]  # record 3 (the third after the header)
    data[start + PREFIX_SIZE + 2] ^= 0x40
    contents = read_log(bytes(data))
    assert isinstance(contents.error, LogChecksumError)
    assert (contents.error.offset, contents.error.record) == (start, 3)
    assert contents.records == sample_records()[:2]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_flipped_bytes_anywhere_give_a_typed_error_or_the_same_records(data):
    raw = bytearray(encode_log(header(), sample_records()))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= data.draw(st.integers(1, 255))
    try:
        records = list(LogReader(bytes(raw)))
    except LogError as exc:
        assert exc.offset >= 0 and exc.record >= 0
        return
    # A flip the checksums cannot see (none expected) would have to leave the records intact.
    assert records[1:] == sample_records()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_only_ever_give_a_typed_error(blob):
    for candidate in (blob, MAGIC + blob):
        try:
            list(LogReader(candidate))
        except LogError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=256))
def test_a_well_framed_record_of_random_bytes_is_a_format_error_not_a_crash(body):
    raw = MAGIC + encode_record(header()) + struct.pack("<II", len(body), zlib.crc32(body)) + body
    try:
        list(LogReader(raw))
    except LogFormatError as exc:
        assert exc.record == 1


def test_an_unknown_record_kind_from_a_newer_minor_version_is_skipped():
    class Future(msgspec.Struct, tag="future_kind", tag_field="kind"):
        x: int

    body = msgspec.msgpack.encode(Future(x=1))
    raw = encode_log(header(), [EventRecord(t_ns=1, name="a")])
    raw += struct.pack("<II", len(body), zlib.crc32(body)) + body + encode_record(EventRecord(t_ns=2, name="b"))
    contents = read_log(raw)
    assert contents.complete
    assert contents.records == [EventRecord(t_ns=1, name="a"), UnknownRecord("future_kind"), EventRecord(t_ns=2, name="b")]


def test_a_newer_major_format_version_is_refused_up_front():
    contents = read_log(encode_log(header(format_version=2), sample_records()))
    assert isinstance(contents.error, LogFormatError) and "format version 2" in str(contents.error)
    assert contents.records == []


def test_a_log_must_start_with_exactly_one_header():
    no_header = MAGIC + encode_record(EventRecord(t_ns=1, name="x"))
    assert isinstance(read_log(no_header).error, LogFormatError)
    twice = encode_log(header(), [header()])
    assert isinstance(read_log(twice).error, LogFormatError)


def test_a_record_length_beyond_the_limit_is_refused_before_reading_it():
    raw = MAGIC + encode_record(header()) + struct.pack("<II", 0xFFFFFFFF, 0)
    contents = read_log(raw)
    assert isinstance(contents.error, LogFormatError) and "exceeds" in str(contents.error)


def test_the_writer_hands_records_to_the_os_on_flush(tmp_path):
    path = tmp_path / "rank0.ppslog"
    writer = LogWriter(path, header())
    writer.append(EventRecord(t_ns=1, name="a"))
    assert read_log(path).records == []  # buffered, header only
    writer.flush()
    assert read_log(path).records == [EventRecord(t_ns=1, name="a")]
    writer.close()


def test_message_records_refuse_pickle_shaped_payloads_by_construction():
    # The log is msgpack of known Structs: a value of an unexpected type is a format error.
    body = msgspec.msgpack.encode({"kind": "event", "t_ns": "not an int", "name": "x"})
    raw = encode_log(header()) + struct.pack("<II", len(body), zlib.crc32(body)) + body
    assert isinstance(read_log(raw).error, LogFormatError)


@pytest.mark.parametrize("tensors", ["full", "digest"])
def test_the_recorder_writes_a_log_and_a_flight_dump(tmp_path, tensors):
    import torch

    from ppstage.config import PPStageConfig
    from ppstage.distributed.transport import byte_view, tensor_digest
    from ppstage.observability.recorder import MessageRecorder
    from protocol import StageHop

    config = PPStageConfig().with_overrides({"record.tensors": tensors, "record.flight_records": 3})
    rec = MessageRecorder(config, rank=2, role="leader", stage=2, world_size=3,
                          record_dir=tmp_path / "rec", flight_dir=tmp_path)
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    spec = TensorSpec(name="hidden", dtype="float32", shape=(2, 3), nbytes=24)
    hop = StageHop(call_id=1, chunk_index=1, cache_epoch=0, call_kind="denoise", step=0, target="hidden", tensors=(spec,))
    for _ in range(5):
        rec.message("send", 3, "link2>3", hop, [byte_view(x)])
    rec.event("failure", "test")
    flight = rec.dump_flight("test failure")
    rec.close()
    log = read_log(tmp_path / "rec" / "rank2.ppslog")
    assert log.complete and log.header.tensors == tensors and not log.header.flight
    msgs = [r for r in log.records if isinstance(r, MessageRecord)]
    assert len(msgs) == 5
    assert msgs[0].specs[0].digest == tensor_digest(x)  # digest filled by the recorder
    assert msgs[0].payload == ((x.numpy().tobytes(),) if tensors == "full" else ())
    dump = read_log(flight)
    assert dump.complete and dump.header.flight
    assert len(dump.records) == 4  # the ring's last 3 records + the dump's own event
    assert dump.records[-1].name == "flight_dump" and dump.records[-1].detail == "test failure"


# -- the log schema is frozen like the wire schema -------------------------------------------------
LOG_SNAPSHOT = __import__("pathlib").Path(__file__).parent / "snapshots" / "log_schema.json"


def _log_contract() -> dict:
    import json

    from protocol.msglog import LOG_FORMAT_VERSION, RECORD_TYPES

    _, components = msgspec.json.schema_components(RECORD_TYPES)

    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k != "description"}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    return {"format_version": LOG_FORMAT_VERSION,
            "types": json.loads(json.dumps(strip({k: components[k] for k in sorted(components)})))}


def test_log_schema_matches_snapshot():
    """A change to the record types is deliberate: regenerate with PPSTAGE_UPDATE_SNAPSHOT=1 after
    checking docs/protocol.md's log version policy (append fields with defaults, new kinds only)."""
    import json
    import os

    current = _log_contract()
    if os.environ.get("PPSTAGE_UPDATE_SNAPSHOT") == "1":
        LOG_SNAPSHOT.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
    assert json.loads(LOG_SNAPSHOT.read_text()) == current


def test_flight_records_must_be_positive():
    from ppstage.config import ConfigError, PPStageConfig

    with pytest.raises(ConfigError, match="flight_records"):
        PPStageConfig().with_overrides({"record.flight_records": 0})
