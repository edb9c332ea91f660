"""Live frames to WebSocket viewers: encode once, fan out, never slow the pipeline.

``FrameHub.publish`` is the stage-0 actor's sink: it runs on the event loop
right after a chunk is decoded and only appends to a small bounded backlog.
One hub task takes chunks in order, encodes each frame once per format that
some viewer asked for (JPEG or PNG, in a one-thread executor, off the loop)
and offers the message to every viewer. Each ``Viewer`` has a bounded queue:
a viewer that does not read loses its oldest frames and, after
``viewer_drop_limit`` frames lost since its last successful send, is
disconnected. Frames of an epoch older than rank 0's current one are never
sent: they are skipped when encoded, when offered and again just before the
send (a hard cut flushes viewer queues the way it flushes the decode queue).

Wire format of one binary WebSocket message::

    uint32 big-endian n | n bytes: FrameHeader as JSON | image bytes (JPEG or PNG)

JSON rather than msgpack for the header so that the viewer page reads it with
``JSON.parse`` and no decoder library.
"""

from __future__ import annotations

import asyncio
import io
import struct
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable, Literal

import msgspec
import structlog

if TYPE_CHECKING:
    import torch

    from ppstage.config import ServiceConfig
    from ppstage.core.plan import ChunkPlan
    from ppstage.service.metrics import ServiceMetrics

log = structlog.get_logger("ppstage.service.frames")

FrameFormat = Literal["jpeg", "png"]
FORMATS: tuple[FrameFormat, ...] = ("jpeg", "png")
HEADER_VERSION = 1
ENCODER_BACKLOG_CHUNKS = 4  # chunks awaiting encoding; more means encoding is slower than the stream
_LEN = struct.Struct(">I")


class FrameHeader(msgspec.Struct, frozen=True, kw_only=True):
    """Identity of one emitted frame, in front of its image bytes."""

    v: int = HEADER_VERSION
    restart_generation: int
    cache_epoch: int
    chunk_index: int
    call_id: int
    frame: int  # index within the chunk
    stream_frame: int  # current_start_frame + frame: position in the epoch's timeline
    width: int
    height: int
    format: FrameFormat


def pack_frame(header: FrameHeader, image: bytes) -> bytes:
    meta = msgspec.json.encode(header)
    return _LEN.pack(len(meta)) + meta + image


def unpack_frame(message: bytes) -> tuple[FrameHeader, bytes]:
    """Inverse of ``pack_frame`` (clients and tests); raises ``ValueError`` on a bad message."""
    if len(message) < _LEN.size:
        raise ValueError("frame message shorter than its length prefix")
    (n,) = _LEN.unpack_from(message)
    if _LEN.size + n > len(message):
        raise ValueError("frame header runs past the message")
    try:
        header = msgspec.json.decode(message[_LEN.size : _LEN.size + n], type=FrameHeader)
    except msgspec.DecodeError as exc:
        raise ValueError(f"bad frame header: {exc}") from exc
    return header, message[_LEN.size + n :]


def encode_chunk(pixels: "torch.Tensor", formats: frozenset[str], jpeg_quality: int) -> dict[str, list[bytes]]:
    """``[F, 3, H, W]`` uint8 -> per format, one image per frame (runs in the encoder thread)."""
    from PIL import Image

    frames = pixels.permute(0, 2, 3, 1).contiguous().numpy()
    out: dict[str, list[bytes]] = {f: [] for f in formats}
    for rgb in frames:
        image = Image.fromarray(rgb)
        for fmt in formats:
            buf = io.BytesIO()
            if fmt == "jpeg":
                image.save(buf, format="JPEG", quality=jpeg_quality)
            else:
                image.save(buf, format="PNG", compress_level=1)
            out[fmt].append(buf.getvalue())
    return out


class Viewer:
    """One WebSocket client's bounded queue of packed frames (owned by the event loop)."""

    def __init__(self, viewer_id: int, fmt: FrameFormat, *, queue_frames: int, drop_limit: int) -> None:
        self.id = viewer_id
        self.format = fmt
        self.queue: deque[tuple[int, bytes]] = deque()  # (cache_epoch, message)
        self.queue_frames = queue_frames
        self.drop_limit = drop_limit
        self.ready = asyncio.Event()
        self.gone = asyncio.Event()  # set with ``kicked``: the connection handler ends the viewer
        self.lost_since_send = 0
        self.sent = 0
        self.dropped = 0
        self.kicked: str | None = None  # why the hub wants this viewer gone

    def offer(self, epoch: int, message: bytes) -> int:
        """Queue a frame; returns how many old frames it pushed out (0 or 1)."""
        lost = 0
        if len(self.queue) >= self.queue_frames:
            self.queue.popleft()
            lost = 1
            self.dropped += 1
            self.lost_since_send += 1
        self.queue.append((epoch, message))
        self.ready.set()
        if self.lost_since_send >= self.drop_limit:
            self.kick("slow")
        return lost

    def kick(self, reason: str) -> None:
        if self.kicked is None:
            self.kicked = reason
        self.ready.set()
        self.gone.set()

    def discard_older_than(self, epoch: int) -> int:
        kept = deque(item for item in self.queue if item[0] >= epoch)
        n = len(self.queue) - len(kept)
        self.queue = kept
        return n


class FrameHub:
    """Fan-out of emitted frames to viewers (see the module docstring)."""

    def __init__(
        self,
        config: "ServiceConfig",
        metrics: "ServiceMetrics",
        *,
        current_epoch: Callable[[], int],
        restart_generation: int,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.current_epoch = current_epoch
        self.restart_generation = restart_generation
        self.viewers: dict[int, Viewer] = {}
        self._next_id = 0
        self._backlog: deque[tuple[ChunkPlan, torch.Tensor]] = deque()
        self._wake = asyncio.Event()
        self._encoder = ThreadPoolExecutor(1, thread_name_prefix="frame-encode")
        self._task: asyncio.Task | None = None
        # Read at scrape time, not set at fan-out: pumps drain and viewers leave
        # between chunks, and a value set only when frames are offered goes stale.
        # Scrapes run on the event loop that owns the queues.
        metrics.viewer_queue_frames.set_function(self.queued_frames)

    # -- producer side: the stage-0 actor ----------------------------------
    def publish(self, plan: "ChunkPlan", pixels: "torch.Tensor") -> None:
        """The actor's sink: O(1) on the event loop, never waits on a viewer."""
        if not self.viewers:
            return  # nobody watches: nothing is encoded
        if len(self._backlog) >= ENCODER_BACKLOG_CHUNKS:
            _, old = self._backlog.popleft()
            self.metrics.viewer_frames_dropped.labels("encoder_backlog").inc(old.shape[0])
        self._backlog.append((plan, pixels))
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            while not self._backlog:
                self._wake.clear()
                await self._wake.wait()
            plan, pixels = self._backlog.popleft()
            try:
                await self._fan_out(plan, pixels)
            except Exception:  # viewers must never end the stream: log, count, go on
                log.exception("frame fan-out failed", chunk_index=plan.chunk_index, cache_epoch=plan.cache_epoch)
                self.metrics.viewer_frames_dropped.labels("error").inc(int(pixels.shape[0]))

    async def _fan_out(self, plan: "ChunkPlan", pixels: "torch.Tensor") -> None:
        loop = asyncio.get_running_loop()
        formats = frozenset(v.format for v in self.viewers.values())
        if not formats or self._stale(plan, pixels):
            return
        with self.metrics.encode_seconds.time():
            images = await loop.run_in_executor(
                self._encoder, encode_chunk, pixels, formats, self.config.jpeg_quality
            )
        if self._stale(plan, pixels):
            return
        height, width = int(pixels.shape[2]), int(pixels.shape[3])
        for fmt, frames in images.items():
            self.metrics.frames_encoded.labels(fmt).inc(len(frames))
        for i in range(int(pixels.shape[0])):
            packed = {
                fmt: pack_frame(
                    FrameHeader(
                        restart_generation=self.restart_generation,
                        cache_epoch=plan.cache_epoch,
                        chunk_index=plan.chunk_index,
                        call_id=plan.call_id,
                        frame=i,
                        stream_frame=plan.current_start_frame + i,
                        width=width,
                        height=height,
                        format=fmt,  # type: ignore[arg-type]
                    ),
                    frames[i],
                )
                for fmt, frames in images.items()
            }
            for viewer in list(self.viewers.values()):
                if viewer.format not in packed:
                    continue  # joined after this chunk was encoded: starts with the next
                stale = viewer.discard_older_than(plan.cache_epoch)
                if stale:
                    self.metrics.viewer_frames_dropped.labels("stale_epoch").inc(stale)
                lost = viewer.offer(plan.cache_epoch, packed[viewer.format])
                if lost:
                    self.metrics.viewer_frames_dropped.labels("slow_viewer").inc(lost)

    def _stale(self, plan: "ChunkPlan", pixels: "torch.Tensor") -> bool:
        if plan.cache_epoch < self.current_epoch():
            self.metrics.viewer_frames_dropped.labels("stale_epoch").inc(int(pixels.shape[0]))
            return True
        return False

    # -- viewer side --------------------------------------------------------
    def has_room(self) -> bool:
        return len(self.viewers) < self.config.max_viewers

    def attach(self, fmt: FrameFormat) -> Viewer:
        viewer = Viewer(
            self._next_id, fmt,
            queue_frames=self.config.viewer_queue_frames, drop_limit=self.config.viewer_drop_limit,
        )
        self._next_id += 1
        self.viewers[viewer.id] = viewer
        self.metrics.viewers.inc()
        return viewer

    def detach(self, viewer: Viewer, reason: str) -> None:
        if self.viewers.pop(viewer.id, None) is not None:
            self.metrics.viewers.dec()
            self.metrics.viewer_disconnects.labels(reason).inc()
            viewer.queue.clear()

    async def pump(self, viewer: Viewer, send: Callable[[bytes], "asyncio.Future"]) -> str:
        """Send ``viewer``'s queue in order until it is kicked; returns why it stopped.

        ``send`` may block (the client stopped reading and the socket buffers are
        full): the hub keeps offering frames meanwhile, the queue drops the
        oldest, and the viewer is kicked once it lost too many.
        """
        timeout = self.config.viewer_send_timeout_s
        while True:
            while not viewer.queue and viewer.kicked is None:
                viewer.ready.clear()
                await viewer.ready.wait()
            if viewer.kicked is not None:
                return viewer.kicked
            epoch, message = viewer.queue.popleft()
            if epoch < self.current_epoch():
                self.metrics.viewer_frames_dropped.labels("stale_epoch").inc()
                continue
            try:
                await asyncio.wait_for(send(message), timeout)
            except asyncio.TimeoutError:
                return "send_timeout"
            viewer.sent += 1
            viewer.lost_since_send = 0
            self.metrics.viewer_frames_sent.inc()

    def queued_frames(self) -> int:
        """Frames queued for all viewers together, now."""
        return sum(len(v.queue) for v in self.viewers.values())

    def statistics(self) -> dict[str, int]:
        return {
            "viewers": len(self.viewers),
            "viewer_queue_frames": self.queued_frames(),
            "encoder_backlog_chunks": len(self._backlog),
        }

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for viewer in list(self.viewers.values()):
            viewer.kick("shutdown")
        self._encoder.shutdown(wait=False, cancel_futures=True)
