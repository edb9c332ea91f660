"""How a frame is laid out in backend messages, and the buffers that carry it.

The codec's frame is ``header | metadata | tensors`` (``protocol.codec``). On
the backend it travels as few messages as the receiver can size in advance:

1. **the preamble**, at most ``capacity`` bytes: the header, then the metadata
   when it fits, then, when everything fits, every tensor's bytes at 16-byte
   aligned offsets and an 8-byte end mark (a *small frame*: one send in all);
2. the metadata, only when it does not fit in the preamble;
3. one message per non-empty tensor, only when the tensors do not fit.

A receiver posts a receive of ``capacity`` bytes for the preamble, parses and
checks header and metadata (``parse_header``, ``decode_metadata``) and derives
the rest of the layout from the checked specs with ``frame_layout``, the same
function the sender used, so both ends agree on every message without sending
a length they could disagree on. Padding bytes are zeros.

Why: a blocking send on gloo returns only once the peer has posted the
matching receive (measured: a send waits 200 ms for a receiver that posts
200 ms late), so every message of a frame costs one wake-up of the peer's
receiver thread, which on a busy machine is a scheduling delay of up to
milliseconds. Three sends per frame (header, metadata, tensor) cost three;
one send costs one, and copying a few hundred KiB is cheaper than that.

Sizes per backend (``preamble_capacity``): gloo accepts a send shorter than
the posted receive, so the preamble is sent only as long as it is used and
its capacity is large (256 KiB of tensors inline: above that, two sends with no
copy beat one send with two copies, measured at 1 MiB: 692-744 vs 765-803 us one
way, docs/performance.md). NCCL needs equal sizes on
both ends, so there the preamble is always sent whole and is small (16 KiB).
The end mark (the header's checksum + ``b"PPSE"``) tells a receiver on gloo
that a small frame arrived whole: a short send would leave it missing.

Buffers: the sender thread owns one preamble buffer and the receiver thread of
each link owns one; tensors received are taken from a ``BufferPool`` that
reuses a buffer per ``(dtype, shape)`` once nobody else holds its storage.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch

from protocol import HEADER_SIZE, MAX_META_BYTES, FramingError, TensorSpec

PREAMBLE_BYTES = 16 * 1024  # NCCL: the preamble is always sent whole
GLOO_PREAMBLE_BYTES = (256 << 10) + (64 << 10)  # gloo: up to 256 KiB of tensors inline (see above)
END_MARK = b"PPSE"
_END = 8  # checksum (4) + END_MARK
_ALIGN = 16  # every tensor offset in a small frame: any dtype's view is aligned
_ZEROS = memoryview(bytes(GLOO_PREAMBLE_BYTES))  # the source of every zeroing slice (read-only)


def preamble_capacity(backend: str) -> int:
    """The preamble size both ends of a link use (both read it from the parity-checked config)."""
    return GLOO_PREAMBLE_BYTES if backend == "gloo" else PREAMBLE_BYTES

Recv = Callable[[torch.Tensor], None]
Send = Callable[[torch.Tensor], None]


class FrameLayout(NamedTuple):
    """Where each part of a frame travels (see the module docstring)."""

    meta_inline: bool  # metadata inside the preamble, right after the header
    tensors_inline: bool  # every tensor inside the preamble (a small frame)
    offsets: tuple[int, ...]  # byte offset of each tensor in the preamble (small frame only)
    end: int  # bytes of the preamble in use (a small frame: up to and with its end mark)


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def frame_layout(meta_len: int, nbytes: Sequence[int], capacity: int = PREAMBLE_BYTES) -> FrameLayout:
    """The layout of a frame with ``meta_len`` metadata bytes and tensors of ``nbytes``."""
    head = HEADER_SIZE + meta_len
    if head > capacity:
        return FrameLayout(False, False, (), HEADER_SIZE)
    end = head
    offsets = []
    for n in nbytes:
        end = _align(end)
        offsets.append(end)
        end += n
    if end + _END > capacity:
        return FrameLayout(True, False, (), head)
    return FrameLayout(True, True, tuple(offsets), end + _END)


class FrameWriter:
    """Sends frames; owned by one thread (the transport's sender thread).

    ``send`` cannot fail on its inputs: the transport's preflight already
    encoded the frame and checked every tensor. It fails only when the backend
    does, and then ``header_sent`` says whether the peer may hold a partial frame.
    ``exact``: send the whole preamble every time (NCCL); else only its used part.
    """

    def __init__(self, device: torch.device, capacity: int = PREAMBLE_BYTES, *, exact: bool = True) -> None:
        if capacity > len(_ZEROS):
            raise ValueError(f"preamble capacity {capacity} > {len(_ZEROS)} bytes (GLOO_PREAMBLE_BYTES)")
        self.device = device
        self.capacity = capacity
        self.exact = exact
        # Host staging for the preamble; on CUDA it is pinned and copied to a
        # device buffer per frame (NCCL sends device memory only).
        pin = device.type == "cuda"
        self._host = torch.zeros(capacity, dtype=torch.uint8, pin_memory=pin)
        # Byte-level writes go through a memoryview: a slice assignment is one
        # memcpy (~0.1 us), where a torch or numpy slice assignment costs 1-3 us
        # of dispatch each (measured: FrameWriter.send 23 -> 9 us per small frame).
        self._mv = memoryview(self._host.numpy())
        self._dev = self._host if device.type == "cpu" else torch.zeros_like(self._host, device=device)
        self._used = 0  # bytes of the preamble the previous frame wrote
        self.header_sent = False

    def send(self, header: bytes, meta: bytes, payload: Sequence[torch.Tensor], send: Send) -> None:
        self.header_sent = False
        layout = frame_layout(len(meta), [t.numel() for t in payload], self.capacity)
        mv = self._mv
        mv[:HEADER_SIZE] = header
        if layout.meta_inline:
            mv[HEADER_SIZE : HEADER_SIZE + len(meta)] = meta
        head = HEADER_SIZE + len(meta) if layout.meta_inline else HEADER_SIZE
        written = layout.end if layout.tensors_inline else head  # every byte below is this frame's
        if self._used > written:  # no stale bytes of an earlier frame go out as padding
            mv[written : self._used] = _ZEROS[: self._used - written]
        if layout.tensors_inline:
            pos = head
            for off, flat in zip(layout.offsets, payload):
                n = flat.numel()
                if off > pos:  # alignment padding: zeros, never an earlier frame's bytes
                    mv[pos:off] = _ZEROS[: off - pos]
                if n and flat.device.type == "cpu":
                    mv[off : off + n] = flat.numpy()
                elif n:
                    self._host[off : off + n].copy_(flat)
                pos = off + n
            mv[pos : layout.end - _END] = _ZEROS[: layout.end - _END - pos]
            mv[layout.end - _END : layout.end] = header[-4:] + END_MARK  # the checksum, the mark
        self._used = layout.end
        size = self.capacity if self.exact else layout.end
        if self._dev is not self._host:  # blocking: the host buffer is reused next frame
            self._dev[:size].copy_(self._host[:size])
        send(self._dev[:size])
        self.header_sent = True
        if not layout.meta_inline:
            send(_bytes_tensor(meta, self.device))
        if not layout.tensors_inline:
            for flat in payload:
                if flat.numel():  # zero-byte tensors are implied by their spec
                    send(flat)


class BufferPool:
    """Receive buffers per ``(dtype, shape)``, reused once their storage is free again.

    A buffer is handed out as the storage of an ``Inbound`` tensor; the
    consumer may keep it (or a view of it) as long as it likes. It is reused
    only when no tensor but the pool's own references its storage any more,
    so a reused buffer can never overwrite data still in use. Bounded: at most
    ``per_key`` buffers per key and ``max_keys`` keys (keys come from the wire).
    """

    def __init__(self, device: torch.device, *, per_key: int = 4, max_keys: int = 32) -> None:
        self.device = device
        self.per_key = per_key
        self.max_keys = max_keys
        self._free: dict[tuple[str, tuple[int, ...]], list[tuple[torch.Tensor, int]]] = {}
        self.reused = 0
        self.allocated = 0

    def take(self, spec: TensorSpec) -> torch.Tensor:
        key = (spec.dtype, tuple(spec.shape))
        bufs = self._free.get(key)
        if bufs is not None:
            for buf, alone in bufs:
                if _storage_refs(buf) == alone:
                    self.reused += 1
                    # A view, not the buffer itself: it holds a reference to the
                    # storage, so the same frame never gets this buffer twice.
                    return buf.view(-1)
        buf = torch.empty(spec.nbytes, dtype=torch.uint8, device=self.device)
        self.allocated += 1
        if bufs is None:
            if len(self._free) >= self.max_keys:
                self._free.pop(next(iter(self._free)))
            bufs = self._free[key] = []
        if len(bufs) < self.per_key:
            bufs.append((buf, _storage_refs(buf)))
        return buf.view(-1)


def _storage_refs(t: torch.Tensor) -> int:
    """References to ``t``'s storage (every view holds one); -1 where torch cannot say."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:  # pragma: no cover - then buffers are simply never reused
        return -1
    return use_count(t.untyped_storage()._cdata)


class FrameReader:
    """Receives frames from one link; owned by that link's receiver thread."""

    def __init__(self, device: torch.device, capacity: int = PREAMBLE_BYTES) -> None:
        if capacity > len(_ZEROS):
            raise ValueError(f"preamble capacity {capacity} > {len(_ZEROS)} bytes (GLOO_PREAMBLE_BYTES)")
        self.device = device
        self.capacity = capacity
        self.preamble = torch.zeros(capacity, dtype=torch.uint8, device=device)
        self._host = self.preamble
        # On the CPU, header, metadata, end mark and zeroing are plain memoryview
        # slices (see FrameWriter); on CUDA the preamble is copied to the host first.
        self._mv = memoryview(self.preamble.numpy()) if device.type == "cpu" else None
        self._meta: torch.Tensor | None = None  # for metadata too large for the preamble
        self._head_used = capacity  # header + metadata bytes the last frame wrote
        self._mark_at: int | None = None  # where the last frame's end mark lies
        self.pool = BufferPool(device)

    def receive_preamble(self, recv: Recv) -> bytes:
        """Receive the next preamble; returns its header bytes."""
        # Zeroed first (header, metadata and the last end mark): a short send
        # leaves zeros there, never bytes of an earlier frame, so it fails the
        # header, checksum or end-mark check. Tensor bytes need no zeroing: a
        # send that reached the end mark wrote everything before it.
        mv = self._mv
        if mv is not None:
            mv[: self._head_used] = _ZEROS[: self._head_used]
            if self._mark_at is not None:
                mv[self._mark_at : self._mark_at + _END] = _ZEROS[:_END]
        else:
            self.preamble[: self._head_used].zero_()
            if self._mark_at is not None:
                self.preamble[self._mark_at : self._mark_at + _END].zero_()
        recv(self.preamble)
        self._head_used, self._mark_at = self.capacity, None
        if mv is not None:
            return bytes(mv[:HEADER_SIZE])
        self._host = self.preamble.cpu()
        return self._host[:HEADER_SIZE].numpy().tobytes()

    def receive_meta(self, meta_len: int, recv: Recv) -> bytes:
        """The metadata after a parsed header (from the preamble, or one more receive)."""
        if HEADER_SIZE + meta_len <= self.capacity:
            if self._mv is not None:
                return bytes(self._mv[HEADER_SIZE : HEADER_SIZE + meta_len])
            return self._host[HEADER_SIZE : HEADER_SIZE + meta_len].numpy().tobytes()
        if self._meta is None:
            self._meta = torch.zeros(MAX_META_BYTES, dtype=torch.uint8, device=self.device)
        view = self._meta[:meta_len]
        view.zero_()
        recv(view)
        return (view if view.device.type == "cpu" else view.cpu()).numpy().tobytes()

    def receive_tensors(
        self,
        header_bytes: bytes,
        meta_len: int,
        specs: Sequence[TensorSpec],
        recv: Recv,
        on_tensor: Callable[[TensorSpec], None],
    ) -> list[torch.Tensor]:
        """Every tensor's bytes, flat ``uint8``, in spec order (specs already checked).

        Raises ``FramingError`` when a small frame's end mark is missing (a short send).
        """
        layout = frame_layout(meta_len, [s.nbytes for s in specs], self.capacity)
        self._head_used = HEADER_SIZE + meta_len if layout.meta_inline else HEADER_SIZE
        if layout.tensors_inline:
            self._mark_at = layout.end - _END
            if self._mv is not None:
                mark = bytes(self._mv[layout.end - _END : layout.end])
            else:
                mark = self._host[layout.end - _END : layout.end].numpy().tobytes()
            if mark != header_bytes[-4:] + END_MARK:
                raise FramingError(f"frame of {layout.end} bytes arrived short (no end mark)")
        flats = []
        for i, spec in enumerate(specs):
            on_tensor(spec)
            flat = self.pool.take(spec)
            if layout.tensors_inline:
                off = layout.offsets[i]
                if self._mv is not None:
                    if spec.nbytes:
                        memoryview(flat.numpy())[:] = self._mv[off : off + spec.nbytes]
                else:
                    flat.copy_(self.preamble[off : off + spec.nbytes])
            elif spec.nbytes:
                recv(flat)
            flats.append(flat)
        return flats


def _bytes_tensor(data: bytes, device: torch.device) -> torch.Tensor:
    t = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return t if device.type == "cpu" else t.to(device)


__all__ = [
    "GLOO_PREAMBLE_BYTES",
    "PREAMBLE_BYTES",
    "BufferPool",
    "FrameLayout",
    "FrameReader",
    "FrameWriter",
    "frame_layout",
    "preamble_capacity",
]
