"""``Transport``: framed point-to-point messages between stage leaders.

See the package docstring for the thread layout and the ordering argument.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from datetime import timedelta
from typing import Any, Callable, NamedTuple, Sequence

import msgspec
import structlog
import torch
import torch.distributed as dist

from protocol import (
    HEADER_SIZE,
    MAX_META_BYTES,
    WIRE_TYPES,
    FramingError,
    MetadataError,
    ProtocolError,
    WireGeometry,
    WireMessage,
    action_of,
    check_tensor_digest,
    decode_metadata,
    encode_frame,
    parse_header,
    validate,
)

from ppstage.config import PPStageConfig
from ppstage.errors import ChannelDead
from ppstage.distributed.topology import ProcessGroups, Role
from ppstage.distributed.transport._tensors import frame_limit_bytes, make_spec, prepare_tensors, rebuild

# After either of these goes out or comes in, the stream is ending by protocol:
# peers are about to exit, so an idle link closing is expected, not fatal.
TERMINAL_ACTIONS = frozenset({"SHUTDOWN", "ERROR"})

# Waiting for the *next header* is idleness, and liveness is the watchdogs' job
# (keepalives, result deadlines): gloo would otherwise apply the group timeout
# to an idle receive and close the pair for good (SPEC section 10). Bytes of a
# frame already started are waited for with the group timeout instead.
IDLE_WAIT = timedelta(days=365)


class Inbound(NamedTuple):
    """One fully received frame, as handed to the event loop.

    Attributes
    ----------
    msg:
        The decoded message (framing checks passed).
    tensors:
        ``spec name -> tensor`` rebuilt from the specs, on the transport's device.
    error:
        None, or why the message must not be acted on: ``validate`` failed or a
        tensor digest did not match. The frame was still received in full, so
        the link stays in step; the consumer decides (e.g. a leader broadcasts a
        terminal action and reports an error result).
    received_at:
        ``time.monotonic()`` when the frame's last byte had arrived.
    """

    msg: WireMessage
    tensors: dict[str, torch.Tensor]
    error: ProtocolError | None
    received_at: float


class _LinkFailure(Exception):
    """The backend failed a receive (peer gone, timeout): the link is dead."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class _Outgoing(NamedTuple):
    dst: int
    group: Any
    header: torch.Tensor
    meta: torch.Tensor
    payload: tuple[torch.Tensor, ...]
    msg: WireMessage
    future: asyncio.Future


def _ids(msg: Any) -> dict[str, Any]:
    return {k: getattr(msg, k, None) for k in ("call_id", "chunk_index", "cache_epoch")}


def _resolve(future: asyncio.Future, exc: BaseException | None) -> None:
    if future.done():  # the awaiting task was cancelled; the bytes went out anyway
        return
    if exc is None:
        future.set_result(None)
    else:
        future.set_exception(exc)


class Transport:
    """Framed, validated P2P messaging for one process (see the package docstring).

    Parameters
    ----------
    config, role, groups:
        The parity-checked config, this rank's role and its process groups.
    loop:
        The event loop that owns the inbound queues and awaits sends. Every
        method except ``close`` must be called from this loop's thread.
    device:
        Where frames live: ``"cpu"`` on gloo, this rank's CUDA device on NCCL.
    geometry:
        Shapes ``validate`` checks against on both ends (normally
        ``config.wire_geometry()``); None checks structure only.
    on_fatal:
        Called on the loop with a ``ProtocolError`` (``ChannelDead`` for a
        failed or timed-out link, ``FramingError`` and friends for undecodable
        bytes) when a link can no longer be trusted. The process must then
        report and exit: the link is out of step or gone. It may be called
        more than once (each failing thread reports); treat it as idempotent.
    on_terminal:
        Optional; called on the loop with each inbound ``SHUTDOWN`` / ``ERROR``
        as it arrives, before the consumer reads it. After a terminal action a
        closing link is expected rather than fatal, so this is how a process
        whose actor is stuck (say, in a hung kernel) still learns it must end.
    """

    def __init__(
        self,
        config: PPStageConfig,
        role: Role,
        groups: ProcessGroups,
        *,
        loop: asyncio.AbstractEventLoop,
        device: str | torch.device = "cpu",
        geometry: WireGeometry | None = None,
        on_fatal: Callable[[ProtocolError], Any],
        on_terminal: Callable[[WireMessage], Any] | None = None,
    ) -> None:
        self.config = config
        self.role = role
        self.groups = groups
        self.device = torch.device(device)
        self.geometry = geometry
        self._loop = loop
        self._on_fatal = on_fatal
        self._on_terminal = on_terminal
        self._frame_timeout = timedelta(seconds=config.runtime.pg_timeout_s)
        self._outbox: queue.SimpleQueue[_Outgoing | None] = queue.SimpleQueue()
        self._inbound: dict[int, asyncio.Queue[Inbound]] = {}
        self._dead: set[int] = set()  # destinations whose channel is poisoned
        self._closed = False
        # Guards ``_closed`` + queueing: a send racing ``close`` is either queued
        # before the sentinel (and goes out) or refused; it never waits forever.
        self._close_lock = threading.Lock()
        # The largest frame this geometry allows; a header announcing more is
        # refused before any receive buffer is allocated.
        self._max_frame_bytes = frame_limit_bytes(geometry)
        self._ending = False  # a terminal action went out or came in
        self._log = structlog.get_logger("ppstage.distributed.transport").bind(rank=role.rank, stage=role.stage)
        self._sender = threading.Thread(
            target=self._send_loop, name=f"ppstage-send-r{role.rank}", daemon=True
        )
        self._sender.start()

    make_spec = staticmethod(make_spec)

    # -- public API ------------------------------------------------------------
    def open_inbound(self, src_rank: int) -> asyncio.Queue[Inbound]:
        """Start the receiver thread for the link from ``src_rank``; return its queue.

        The queue is unbounded so the receiver thread never waits on the
        consumer (a sender blocked on a full queue could stall the peer's one
        sender thread); flow control is the pipeline's ``D_in``/``D_out`` credit.
        Raises ``WrongGroup`` when no link group joins this rank and ``src_rank``.
        """
        if src_rank in self._inbound:
            raise ValueError(f"inbound link from rank {src_rank} is already open")
        group = self.groups.link(src_rank, self.role.rank)
        inbox: asyncio.Queue[Inbound] = asyncio.Queue()
        self._inbound[src_rank] = inbox
        threading.Thread(
            target=self._receive_loop,
            args=(src_rank, group, inbox),
            name=f"ppstage-recv-r{self.role.rank}-from-r{src_rank}",
            daemon=True,
        ).start()
        return inbox

    async def send(
        self,
        dst_rank: int,
        msg: WireMessage,
        tensors: Sequence[torch.Tensor] = (),
        *,
        fill_digests: bool = False,
        drill_frame: Callable[[bytes], bytes] | None = None,
    ) -> None:
        """Send ``msg`` and its tensors (in spec order) to ``dst_rank``.

        Preflight runs here, in the caller, before anything is queued: validate
        (except HELLO), tensor dtype/shape/size against the specs, contiguous
        copies on the transport device, digests (``fill_digests`` replaces each
        spec's digest with that of its tensor), then ``encode_frame``. Any
        failure raises a typed ``ProtocolError`` and nothing reaches the wire.

        Then the frame is queued to the sender thread; this returns once its
        last byte was handed to the backend (gloo: taken by the peer's receive;
        NCCL: enqueued on the stream). A failure at that point raises
        ``ChannelDead`` here and also reports it through ``on_fatal``.
        Cancelling the await does not withdraw a queued frame.

        ``drill_frame`` is for fault drills only (``ppstage.faults``): ``validate``
        is skipped and the encoded header is passed through it, so that a
        receiver can be tested with a frame its sender would have refused.
        """
        item = self._preflight(dst_rank, msg, tensors, fill_digests, drill_frame)
        with self._close_lock:
            if self._closed:
                raise ChannelDead(f"transport closed: send to rank {dst_rank} refused", **_ids(msg))
            self._outbox.put(item)
        await item.future

    def close(self) -> None:
        """Stop accepting sends; frames queued before still go out, in order.

        After ``close`` a peer closing an idle link is expected and no longer
        fatal. Receiver threads stay blocked in their receive: a blocked
        receive cannot be interrupted, so they are daemon threads that process
        exit ends. Do not call ``torch.distributed.destroy_process_group`` while
        they are blocked (gloo aborts the process); just exit.
        """
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self._outbox.put(None)

    @property
    def closed(self) -> bool:
        return self._closed

    # -- preflight (caller's thread) ---------------------------------------------
    def _preflight(
        self,
        dst: int,
        msg: WireMessage,
        tensors: Sequence[torch.Tensor],
        fill_digests: bool,
        drill_frame: Callable[[bytes], bytes] | None = None,
    ) -> _Outgoing:
        ids = _ids(msg)
        if self._closed:
            raise ChannelDead(f"transport closed: send to rank {dst} refused", **ids)
        group = self.groups.link(self.role.rank, dst)
        if dst in self._dead:
            raise ChannelDead(f"channel to rank {dst} is dead: send refused", **ids)
        try:
            if not isinstance(msg, WIRE_TYPES):
                raise MetadataError(f"{type(msg).__name__} is not a wire message", **ids)
            # Exact field types first (encode, then decode with the receiver's strict
            # decoder): a float in an int field must be named as such, not trip validate.
            header, meta = encode_frame(msg)
            if action_of(msg) != "HELLO" and drill_frame is None:
                validate(msg, self.geometry)
            specs, payload = prepare_tensors(
                msg.tensors, tensors, self.device, fill_digests=fill_digests, ids=ids
            )
            if fill_digests:
                msg = msgspec.structs.replace(msg, tensors=specs)
                header, meta = encode_frame(msg)
            if drill_frame is not None:
                header = drill_frame(header)
            header_t, meta_t = self._frame_tensor(header), self._frame_tensor(meta)
        except ProtocolError:
            raise
        except Exception as exc:  # e.g. a field of the wrong type trips validate()
            raise MetadataError(f"message cannot be framed: {exc!r}", **ids) from exc
        future = self._loop.create_future()
        return _Outgoing(dst, group, header_t, meta_t, payload, msg, future)

    def _frame_tensor(self, data: bytes) -> torch.Tensor:
        t = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return t if self.device.type == "cpu" else t.to(self.device)

    # -- sender thread -----------------------------------------------------------
    def _send_loop(self) -> None:
        self._bind_device()
        while True:
            item = self._outbox.get()
            if item is None:
                # ``close`` queued the sentinel under the lock, after which no
                # send can queue: nothing is left behind unsettled.
                return
            self._send_one(item)

    def _send_one(self, item: _Outgoing) -> None:
        ids = _ids(item.msg)
        action = action_of(item.msg)
        if item.dst in self._dead:
            self._settle(item.future, ChannelDead(f"channel to rank {item.dst} is dead", **ids))
            return
        if action in TERMINAL_ACTIONS:
            # Set before the first byte: the peer may exit as soon as it has it.
            self._ending = True
        header_sent = False
        try:
            dist.send(item.header, dst=item.dst, group=item.group)
            header_sent = True
            dist.send(item.meta, dst=item.dst, group=item.group)
            for flat in item.payload:
                if flat.numel():  # zero-byte tensors are implied by their spec
                    dist.send(flat, dst=item.dst, group=item.group)
        except Exception as exc:
            self._dead.add(item.dst)
            where = "after the header (the channel is half-framed)" if header_sent else "on the header"
            err = ChannelDead(f"{action} to rank {item.dst} failed {where}: {exc}", **ids)
            self._settle(item.future, err)
            self._fatal(err)
            return
        self._log.debug("transport.sent", dst=item.dst, action=action, **ids)
        self._settle(item.future, None)

    # -- receiver threads ----------------------------------------------------------
    def _receive_loop(self, src: int, group: Any, inbox: asyncio.Queue[Inbound]) -> None:
        self._bind_device()
        # Allocated once per link; tensors are allocated per frame, from specs only.
        header_buf = torch.zeros(HEADER_SIZE, dtype=torch.uint8, device=self.device)
        meta_buf = torch.zeros(MAX_META_BYTES, dtype=torch.uint8, device=self.device)
        while True:
            ids: dict[str, Any] = {}
            waiting_for = "a header"
            try:
                # Zeroed first: a short (truncated) send leaves zeros, never stale
                # bytes of an earlier frame, so it fails the checks below.
                header_buf.zero_()
                self._recv(header_buf, src, group, IDLE_WAIT)
                head = _host_bytes(header_buf)
                header = parse_header(head)
                ids = dict(
                    call_id=header.call_id, chunk_index=header.chunk_index, cache_epoch=header.cache_epoch
                )
                waiting_for = "metadata"
                meta_view = meta_buf[: header.meta_len]
                meta_view.zero_()
                self._recv(meta_view, src, group, self._frame_timeout)
                msg = decode_metadata(header, head, _host_bytes(meta_view))
                # Metadata and geometry are checked before any buffer exists: a
                # corrupted or hostile spec never makes this rank allocate.
                error = self._validate(msg, ids)
                total = sum(spec.nbytes for spec in msg.tensors)
                if total > self._max_frame_bytes:
                    raise FramingError(
                        f"frame from rank {src} announces {total} tensor bytes, over the "
                        f"{self._max_frame_bytes} this geometry allows; refused before allocation",
                        **ids,
                    )
                flats: list[torch.Tensor] = []
                for spec in msg.tensors:
                    waiting_for = f"tensor {spec.name!r}"
                    flat = self._allocate(spec, src, ids)
                    if spec.nbytes:
                        self._recv(flat, src, group, self._frame_timeout)
                    flats.append(flat)
                received_at = time.monotonic()
            except _LinkFailure as failure:
                if waiting_for == "a header" and (self._closed or self._ending):
                    # The stream is ending and the peer left between frames: expected.
                    self._log.debug("transport.link_closed", src=src, reason=str(failure.cause))
                    return
                self._fatal(
                    ChannelDead(
                        f"receive from rank {src} failed waiting for {waiting_for}: {failure.cause}", **ids
                    )
                )
                return
            except ProtocolError as exc:  # undecodable bytes: framing is lost
                self._fatal(exc)
                return
            except Exception as exc:  # a decoder bug must still surface typed
                self._fatal(FramingError(f"undecodable frame from rank {src}: {exc!r}", **ids))
                return
            tensors = {spec.name: rebuild(spec, flat) for spec, flat in zip(msg.tensors, flats)}
            if error is None:
                error = self._check_digests(msg, flats, ids)
            action = action_of(msg)
            if action in TERMINAL_ACTIONS:
                self._ending = True
                if self._on_terminal is not None:
                    self._call_soon(self._on_terminal, msg)
            self._log.debug("transport.received", src=src, action=action, invalid=error is not None, **ids)
            if not self._call_soon(inbox.put_nowait, Inbound(msg, tensors, error, received_at)):
                return

    def _recv(self, buf: torch.Tensor, src: int, group: Any, timeout: timedelta) -> None:
        try:
            work = dist.irecv(buf, src=src, group=group)
            if work is None:
                raise RuntimeError(f"rank {self.role.rank} is not in the link group with rank {src}")
            work.wait(timeout)  # a timeout closes the pair for good: a dead channel
        except Exception as exc:
            raise _LinkFailure(exc) from exc

    def _validate(self, msg: WireMessage, ids: dict[str, Any]) -> ProtocolError | None:
        try:
            validate(msg, self.geometry)
        except ProtocolError as exc:
            return exc
        except Exception as exc:  # defensive: never let a checker kill the link
            return MetadataError(f"message could not be checked: {exc!r}", **ids)
        return None

    def _allocate(self, spec: Any, src: int, ids: dict[str, Any]) -> torch.Tensor:
        try:
            return torch.empty(spec.nbytes, dtype=torch.uint8, device=self.device)
        except (RuntimeError, MemoryError) as exc:  # not "undecodable": say what failed
            raise ChannelDead(
                f"cannot allocate {spec.nbytes} bytes for tensor {spec.name!r} from rank {src}: {exc}", **ids
            ) from exc

    def _check_digests(
        self, msg: WireMessage, flats: list[torch.Tensor], ids: dict[str, Any]
    ) -> ProtocolError | None:
        try:
            for spec, flat in zip(msg.tensors, flats):
                if spec.digest is not None:
                    check_tensor_digest(spec, memoryview(_host_array(flat)), **ids)
        except ProtocolError as exc:
            return exc
        except Exception as exc:  # defensive: never let a checker kill the link
            return MetadataError(f"message could not be checked: {exc!r}", **ids)
        return None

    # -- helpers -------------------------------------------------------------------
    def _bind_device(self) -> None:
        if self.device.type == "cuda":  # the current CUDA device is per thread
            torch.cuda.set_device(self.device)

    def _settle(self, future: asyncio.Future, exc: BaseException | None) -> None:
        self._call_soon(_resolve, future, exc)

    def _fatal(self, exc: ProtocolError) -> None:
        self._log.error("transport.fatal", error=str(exc), kind=type(exc).__name__)
        self._call_soon(self._on_fatal, exc)

    def _call_soon(self, fn: Callable[..., Any], *args: Any) -> bool:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the process is exiting
            return False
        return True


def _host_array(t: torch.Tensor):
    return (t if t.device.type == "cpu" else t.cpu()).numpy()


def _host_bytes(t: torch.Tensor) -> bytes:
    return _host_array(t).tobytes()
