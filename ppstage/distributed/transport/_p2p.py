"""``Transport``: framed point-to-point messages between stage leaders.

See the package docstring for the thread layout and the ordering argument.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from datetime import timedelta
from functools import partial
from typing import Any, Callable, NamedTuple, Sequence

import msgspec
import structlog
import torch
import torch.distributed as dist

from protocol import (
    WIRE_TYPES,
    ChunkError,
    ChunkId,
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
from ppstage.distributed.devices import after_receive, before_send, comm_stream, on_stream
from ppstage.distributed.topology import ProcessGroups, Role
from ppstage.distributed.transport._frames import FrameReader, FrameWriter, preamble_capacity
from ppstage.distributed.transport._mailbox import Mailbox
from ppstage.distributed.transport._tensors import frame_limit_bytes, make_spec, prepare_tensors, rebuild
from ppstage.observability.recorder import current as current_recorder

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
    header: bytes
    meta: bytes
    payload: tuple[torch.Tensor, ...]
    msg: WireMessage
    future: asyncio.Future | None  # None: a failure is reported through on_fatal only


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
        Called on the loop with a typed error (``ChannelDead`` for a
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
        on_fatal: Callable[[ChunkError], Any],
        on_terminal: Callable[[WireMessage], Any] | None = None,
        recorder: Any = None,
    ) -> None:
        self.config = config
        self.role = role
        self.groups = groups
        self.device = torch.device(device)
        self.geometry = geometry
        self._loop = loop
        self._on_fatal = on_fatal
        self._on_terminal = on_terminal
        # Message log + flight recorder (ppstage.observability.recorder): one call per commitment point.
        self.recorder = recorder if recorder is not None else current_recorder()
        self._frame_timeout = timedelta(seconds=config.runtime.pg_timeout_s)
        self._outbox: queue.SimpleQueue[_Outgoing | None] = queue.SimpleQueue()
        self._inbound: dict[int, Mailbox[Inbound]] = {}
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
    def open_inbound(self, src_rank: int) -> Mailbox[Inbound]:
        """Start the receiver thread for the link from ``src_rank``; return its mailbox.

        The mailbox (``_mailbox.py``) is unbounded so the receiver thread never
        waits on the consumer (a sender blocked on a full queue could stall the
        peer's one sender thread); flow control is the pipeline's
        ``D_in``/``D_out`` credit. Read it with ``await get()`` on the loop or
        ``take(timeout_s)`` from one worker thread, one consumer at a time.
        Raises ``WrongGroup`` when no link group joins this rank and ``src_rank``.
        """
        if src_rank in self._inbound:
            raise ValueError(f"inbound link from rank {src_rank} is already open")
        group = self.groups.link(src_rank, self.role.rank)
        inbox: Mailbox[Inbound] = Mailbox(self._loop)
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
        spec's digest with that of its tensor, before the one ``encode_frame``
        and ``validate``, so that the frame is encoded once). Any
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
        future = self._loop.create_future()
        self.enqueue(dst_rank, msg, tensors, future, fill_digests=fill_digests, drill_frame=drill_frame)
        await future

    def enqueue(
        self,
        dst_rank: int,
        msg: WireMessage,
        tensors: Sequence[torch.Tensor],
        future: asyncio.Future | None = None,
        *,
        fill_digests: bool = False,
        drill_frame: Callable[[bytes], bytes] | None = None,
    ) -> None:
        """``send`` without the await, callable from any thread (a stage's worker).

        Runs the same preflight in the calling thread (raising the same typed
        errors, nothing queued) and queues the frame; ``future`` (created on
        the loop by the caller), if given, is settled on the loop once the
        frame's last byte was handed to the backend, with ``ChannelDead`` on
        failure. Without one, a failure reaches the process only through
        ``on_fatal`` (which it always does), and the loop is not woken per
        frame. A stage's worker queues its output hop this way, so the hop goes
        worker -> sender thread without waking the loop (``_mailbox.py`` says
        what that saves).
        """
        item = self._preflight(dst_rank, msg, tensors, fill_digests, drill_frame, future)
        with self._close_lock:
            if self._closed:
                raise ChannelDead(f"transport closed: send to rank {dst_rank} refused", chunk=ChunkId.find(msg))
            self._outbox.put(item)

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
        drill_frame: Callable[[bytes], bytes] | None,
        future: asyncio.Future | None,
    ) -> _Outgoing:
        chunk = ChunkId.find(msg)
        if self._closed:
            raise ChannelDead(f"transport closed: send to rank {dst} refused", chunk=chunk)
        group = self.groups.link(self.role.rank, dst)
        if dst in self._dead:
            raise ChannelDead(f"channel to rank {dst} is dead: send refused", chunk=chunk)
        try:
            if not isinstance(msg, WIRE_TYPES):
                raise MetadataError(f"{type(msg).__name__} is not a wire message", chunk=chunk)
            payload = None
            if fill_digests:
                # The digests are part of the metadata: prepare the tensors first,
                # so that the frame is encoded once, with them.
                specs, payload = prepare_tensors(msg.tensors, tensors, self.device, fill_digests=True, chunk=chunk)
                msg = msgspec.structs.replace(msg, tensors=specs)
            # Exact field types before validate (encode, then decode with the receiver's
            # strict decoder): a float in an int field must be named as such, not trip validate.
            header, meta = encode_frame(msg)
            if action_of(msg) != "HELLO" and drill_frame is None:
                validate(msg, self.geometry)
            if payload is None:
                _, payload = prepare_tensors(msg.tensors, tensors, self.device, fill_digests=False, chunk=chunk)
            if drill_frame is not None:
                header = drill_frame(header)
        except ProtocolError:
            raise
        except Exception as exc:  # e.g. a field of the wrong type trips validate()
            raise MetadataError(f"message cannot be framed: {exc!r}", chunk=chunk) from exc
        return _Outgoing(dst, group, header, meta, payload, msg, future)

    # -- sender thread -----------------------------------------------------------
    def _send_loop(self) -> None:
        self._bind_device()
        backend = self.config.topology.backend
        # Owned by this thread: the preamble buffer is reused for every frame.
        writer = FrameWriter(self.device, preamble_capacity(backend), exact=backend != "gloo")
        stream = comm_stream(self.device)  # None on CPU
        with on_stream(stream):
            while True:
                item = self._outbox.get()
                if item is None:
                    # ``close`` queued the sentinel under the lock, after which no
                    # send can queue: nothing is left behind unsettled.
                    return
                before_send(stream, item.payload)
                self._send_one(writer, item)

    def _send_one(self, writer: FrameWriter, item: _Outgoing) -> None:
        chunk = item.msg.id
        action = action_of(item.msg)
        if item.dst in self._dead:
            self._settle(item.future, ChannelDead(f"channel to rank {item.dst} is dead", chunk=chunk))
            return
        if action in TERMINAL_ACTIONS:
            # Set before the first byte: the peer may exit as soon as it has it.
            self._ending = True
        t_ns = time.monotonic_ns()
        try:
            writer.send(item.header, item.meta, item.payload, partial(dist.send, dst=item.dst, group=item.group))
        except Exception as exc:
            self._dead.add(item.dst)
            where = "after the header (the channel is half-framed)" if writer.header_sent else "on the header"
            err = ChannelDead(f"{action} to rank {item.dst} failed {where}: {exc}", chunk=chunk)
            self.recorder.message("send", item.dst, _link_name(self.role.rank, item.dst), item.msg, error=str(err), t_ns=t_ns)
            self._settle(item.future, err)
            self._fatal(err)
            return
        self._log.debug("transport.sent", dst=item.dst, action=action, **chunk.fields())
        self.recorder.message("send", item.dst, _link_name(self.role.rank, item.dst), item.msg, item.payload, t_ns=t_ns)
        self._settle(item.future, None)

    # -- receiver threads ----------------------------------------------------------
    def _receive_loop(self, src: int, group: Any, inbox: Mailbox[Inbound]) -> None:
        self._bind_device()
        stream = comm_stream(self.device)  # None on CPU
        with on_stream(stream):
            self._receive_frames(src, group, inbox, stream)

    def _receive_frames(self, src: int, group: Any, inbox: Mailbox[Inbound], stream) -> None:
        reader = FrameReader(self.device, preamble_capacity(self.config.topology.backend))  # reused per link
        idle = partial(self._recv, src=src, group=group, timeout=IDLE_WAIT)
        framed = partial(self._recv, src=src, group=group, timeout=self._frame_timeout)
        while True:
            chunk: ChunkId | None = None
            waiting_for = "a header"

            def on_tensor(spec) -> None:
                nonlocal waiting_for
                waiting_for = f"tensor {spec.name!r}"

            try:
                head = reader.receive_preamble(idle)
                header = parse_header(head)
                chunk = header.id
                waiting_for = "metadata"
                meta = reader.receive_meta(header.meta_len, framed)
                msg = decode_metadata(header, head, meta)
                # Metadata and geometry are checked before any tensor is received into
                # a buffer: a corrupted or hostile spec never makes this rank allocate.
                error = self._validate(msg, chunk)
                total = sum(spec.nbytes for spec in msg.tensors)
                if total > self._max_frame_bytes:
                    raise FramingError(
                        f"frame from rank {src} announces {total} tensor bytes, over the "
                        f"{self._max_frame_bytes} this geometry allows; refused before allocation",
                        chunk=chunk,
                    )
                flats = reader.receive_tensors(head, header.meta_len, msg.tensors, framed, on_tensor)
                after_receive(stream, flats)
                received_ns = time.monotonic_ns()
                received_at = received_ns / 1e9
            except _LinkFailure as failure:
                if waiting_for == "a header" and (self._closed or self._ending):
                    # The stream is ending and the peer left between frames: expected.
                    self._log.debug("transport.link_closed", src=src, reason=str(failure.cause))
                    return
                self._fatal(
                    ChannelDead(
                        f"receive from rank {src} failed waiting for {waiting_for}: {failure.cause}",
                        chunk=chunk,
                    )
                )
                return
            except ProtocolError as exc:  # undecodable bytes: framing is lost
                self._fatal(exc)
                return
            except Exception as exc:  # a decoder bug must still surface typed
                self._fatal(FramingError(f"undecodable frame from rank {src}: {exc!r}", chunk=chunk))
                return
            tensors = {spec.name: rebuild(spec, flat) for spec, flat in zip(msg.tensors, flats)}
            if error is None:
                error = self._check_digests(msg, flats, msg.id)
            action = action_of(msg)
            if action in TERMINAL_ACTIONS:
                self._ending = True
                if self._on_terminal is not None:
                    self._call_soon(self._on_terminal, msg)
            self._log.debug(
                "transport.received", src=src, action=action, invalid=error is not None, **msg.id.fields()
            )
            self.recorder.message(
                "recv", src, _link_name(src, self.role.rank), msg, flats, header=head, meta=meta,
                error=None if error is None else str(error), t_ns=received_ns,
            )
            if not inbox.put(Inbound(msg, tensors, error, received_at)):
                return

    def _recv(self, buf: torch.Tensor, *, src: int, group: Any, timeout: timedelta) -> None:
        try:
            work = dist.irecv(buf, src=src, group=group)
            if work is None:
                raise RuntimeError(f"rank {self.role.rank} is not in the link group with rank {src}")
            work.wait(timeout)  # a timeout closes the pair for good: a dead channel
        except Exception as exc:
            raise _LinkFailure(exc) from exc

    def _validate(self, msg: WireMessage, chunk: ChunkId | None) -> ProtocolError | None:
        try:
            validate(msg, self.geometry)
        except ProtocolError as exc:
            return exc
        except Exception as exc:  # defensive: never let a checker kill the link
            return MetadataError(f"message could not be checked: {exc!r}", chunk=chunk)
        return None

    def _check_digests(self, msg: WireMessage, flats: list[torch.Tensor], chunk: ChunkId) -> ProtocolError | None:
        try:
            for spec, flat in zip(msg.tensors, flats):
                if spec.digest is not None:
                    check_tensor_digest(spec, memoryview(_host_array(flat)), chunk=chunk)
        except ProtocolError as exc:
            return exc
        except Exception as exc:  # defensive: never let a checker kill the link
            return MetadataError(f"message could not be checked: {exc!r}", chunk=chunk)
        return None

    # -- helpers -------------------------------------------------------------------
    def _bind_device(self) -> None:
        if self.device.type == "cuda":  # the current CUDA device is per thread
            torch.cuda.set_device(self.device)

    def _settle(self, future: asyncio.Future | None, exc: BaseException | None) -> None:
        if future is not None:
            self._call_soon(_resolve, future, exc)

    def _fatal(self, exc: ChunkError) -> None:
        self._log.error("transport.fatal", error=str(exc), kind=type(exc).__name__)
        self.recorder.event("channel_failed", f"{type(exc).__name__}: {exc}")
        self._call_soon(self._on_fatal, exc)

    def _call_soon(self, fn: Callable[..., Any], *args: Any) -> bool:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the process is exiting
            return False
        return True


def _link_name(src: int, dst: int) -> str:
    return f"link{src}>{dst}"


def _host_array(t: torch.Tensor):
    return (t if t.device.type == "cpu" else t.cpu()).numpy()


