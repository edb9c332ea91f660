"""Frame layout on the backend: one fixed-size preamble, reused buffers that are never overwritten in use."""

from __future__ import annotations

import pytest
import torch

from ppstage.distributed.transport import byte_view, make_spec, rebuild
from ppstage.distributed.transport._frames import (
    GLOO_PREAMBLE_BYTES,
    PREAMBLE_BYTES,
    BufferPool,
    FrameReader,
    FrameWriter,
    frame_layout,
)
from protocol import HEADER_SIZE, StageHop, decode_metadata, encode_frame, parse_header

CPU = torch.device("cpu")


def _hop(call_id: int, tensor: torch.Tensor) -> StageHop:
    return StageHop(
        call_id=call_id, chunk_index=call_id, cache_epoch=0, call_kind="denoise", step=0,
        target="hidden", tensors=(make_spec("hidden", tensor),),
    )


class Wire:
    """A loopback pair: every send is one message; a receive must match its size exactly."""

    def __init__(self) -> None:
        self.messages: list[torch.Tensor] = []

    def send(self, t: torch.Tensor) -> None:
        self.messages.append(t.clone())

    def recv(self, buf: torch.Tensor) -> None:
        t = self.messages.pop(0)
        assert t.numel() <= buf.numel() if self.shorter_ok else t.numel() == buf.numel()
        buf[: t.numel()].copy_(t)

    shorter_ok = False


def _round_trip(writer: FrameWriter, reader: FrameReader, wire: Wire, msg, tensors):
    head, meta = encode_frame(msg)
    writer.send(head, meta, [byte_view(t.contiguous()) for t in tensors], wire.send)
    sent = len(wire.messages)
    got_head = reader.receive_preamble(wire.recv)
    header = parse_header(got_head)
    got = decode_metadata(header, got_head, reader.receive_meta(header.meta_len, wire.recv))
    flats = reader.receive_tensors(got_head, header.meta_len, got.tensors, wire.recv, lambda spec: None)
    assert not wire.messages
    return got, [rebuild(s, f) for s, f in zip(got.tensors, flats)], sent


def test_a_small_frame_is_one_send_and_a_large_one_adds_one_send_per_tensor():
    writer, reader, wire = FrameWriter(CPU), FrameReader(CPU), Wire()
    small = torch.randn(48, 64)  # the embedded model's 12 KiB hidden state
    msg, out, sends = _round_trip(writer, reader, wire, _hop(1, small), [small])
    assert sends == 1 and torch.equal(out[0], small)
    large = torch.randn(256, 64)  # 64 KiB
    msg, out, sends = _round_trip(writer, reader, wire, _hop(2, large), [large])
    assert sends == 2 and torch.equal(out[0], large)


def test_on_gloo_a_frame_of_up_to_256_kib_is_one_send_of_the_bytes_it_uses():
    writer = FrameWriter(CPU, GLOO_PREAMBLE_BYTES, exact=False)
    reader, wire = FrameReader(CPU, GLOO_PREAMBLE_BYTES), Wire()
    wire.shorter_ok = True
    for rows, sends in ((48, 1), (1024, 1), (1400, 2), (4096, 2)):  # 12 KiB, 256 KiB, 350 KiB (> the preamble), 1 MiB
        t = torch.randn(rows, 64)
        _, out, n = _round_trip(writer, reader, wire, _hop(rows, t), [t])
        assert n == sends and torch.equal(out[0], t)
    small = torch.randn(48, 64)
    _round_trip(writer, reader, wire, _hop(1, small), [small])
    head, meta = encode_frame(_hop(1, small))
    assert len(wire.messages) == 0
    writer.send(head, meta, [byte_view(small)], wire.send)
    assert wire.messages[0].numel() < 16 << 10  # only the used part goes out


def test_a_small_frame_that_arrives_short_is_a_framing_error():
    from protocol import FramingError

    writer = FrameWriter(CPU, GLOO_PREAMBLE_BYTES, exact=False)
    reader, wire = FrameReader(CPU, GLOO_PREAMBLE_BYTES), Wire()
    wire.shorter_ok = True
    t = torch.randn(48, 64)
    _round_trip(writer, reader, wire, _hop(1, t), [t])  # leaves an end mark behind
    head, meta = encode_frame(_hop(1, t))
    writer.send(head, meta, [byte_view(t)], wire.send)
    wire.messages[0] = wire.messages[0][:-100]  # the same frame, cut short
    got_head = reader.receive_preamble(wire.recv)
    header = parse_header(got_head)
    got = decode_metadata(header, got_head, reader.receive_meta(header.meta_len, wire.recv))
    with pytest.raises(FramingError):
        reader.receive_tensors(got_head, header.meta_len, got.tensors, wire.recv, lambda spec: None)


def test_layout_aligns_every_inline_tensor_and_falls_back_when_it_does_not_fit():
    layout = frame_layout(100, [12, 8, 3, 0])
    assert layout.tensors_inline and all(off % 16 == 0 for off in layout.offsets)
    assert layout.offsets[0] >= HEADER_SIZE + 100
    assert not frame_layout(100, [PREAMBLE_BYTES]).tensors_inline
    assert not frame_layout(PREAMBLE_BYTES, []).meta_inline


def test_padding_never_carries_bytes_of_an_earlier_frame():
    writer, wire = FrameWriter(CPU), Wire()
    big = torch.full((48, 64), 7.0)
    head, meta = encode_frame(_hop(1, big))
    writer.send(head, meta, [byte_view(big)], wire.send)
    tiny = torch.ones(16, 64)
    head, meta = encode_frame(_hop(2, tiny))
    writer.send(head, meta, [byte_view(tiny)], wire.send)
    second = wire.messages[1]
    end = frame_layout(len(meta), [tiny.numel() * 4]).offsets[0] + tiny.numel() * 4
    assert bytes(second[end + 4 : end + 8].numpy()) == b"PPSE"  # the end mark, then zeros only
    assert not second[end + 8 :].any()


def test_a_receive_buffer_is_reused_only_after_its_last_user_let_go():
    pool = BufferPool(CPU)
    spec = make_spec("hidden", torch.zeros(4, 4))
    first = rebuild(spec, pool.take(spec))
    second = pool.take(spec)
    assert second.data_ptr() != first.data_ptr()  # ``first`` still holds its storage
    kept_view = first[1:]
    del first
    third = pool.take(spec)
    assert third.data_ptr() != kept_view.untyped_storage().data_ptr()  # a view keeps it busy too
    del kept_view, second, third
    pool.take(spec)
    assert pool.reused >= 1


@pytest.mark.parametrize("shapes", [[(3, 4, 8, 8), (3, 4, 8, 8)], [(3,), (5,), (7,)]])
def test_tensors_of_equal_dtype_and_shape_in_one_frame_get_distinct_buffers(shapes):
    writer, reader, wire = FrameWriter(CPU), FrameReader(CPU), Wire()
    from protocol import NoopEnvelope

    tensors = [torch.randn(s) for s in shapes]
    specs = tuple(make_spec(f"t{i}", t) for i, t in enumerate(tensors))
    msg = NoopEnvelope(call_id=1, chunk_index=0, cache_epoch=0, tensors=specs)
    for _ in range(3):
        _, out, _ = _round_trip(writer, reader, wire, msg, tensors)
        assert all(torch.equal(a, b) for a, b in zip(out, tensors))
