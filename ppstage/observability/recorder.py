"""``MessageRecorder``: one rank's message log and its always-on flight recorder.

Hooks at the commitment points call one method each: ``message`` (a frame
sent, received, or published into a mesh), ``plan`` and ``gate`` (rank 0),
``chunk`` (a chunk boundary on a generator rank), ``span`` and ``event``.
Each call does the least it can on the caller's thread: a timestamp, tensor
digests (``digest`` mode; the tensor may be reused after the call returns) or
bytes (``full``) and one append to the flight ring and, when recording, to a
pending batch. ``flush`` (once per chunk, and at exit) hands the batch to the
recorder's own writer thread, which encodes and writes it: one wake-up per
chunk, never a file write on the event loop.

The flight ring (``collections.deque(maxlen=record.flight_records)``) holds
the last records unencoded; ``dump_flight`` writes them as a log marked
``flight = true`` when the process fails. ``finish(exit_code)`` is called by
``exit_process`` on every exit path: it closes (flushes) the log, and on a
non-zero exit writes the flight dump and logs where it went.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Sequence

import msgspec
import structlog

from protocol import PROTOCOL_VERSION, ChunkId, TensorSpec, action_of, digest_bytes, encode_frame
from protocol.msglog import (
    ChunkRecord,
    EventRecord,
    GateRecord,
    LogHeader,
    LogRecord,
    LogWriter,
    MessageRecord,
    PlanRecord,
    SpanRecord,
    encode_log,
    encode_record,
)

from ppstage.config import PPStageConfig

log = structlog.get_logger("ppstage.observability.recorder")
_PLAN_ENCODER = msgspec.msgpack.Encoder()  # created once (STYLE: encoders per actor, not per message)



def log_path(directory: str | Path, rank: int) -> Path:
    return Path(directory) / f"rank{rank}.ppslog"


def flight_path(directory: str | Path, rank: int) -> Path:
    return Path(directory) / f"rank{rank}.flight.ppslog"


class _Msg(msgspec.Struct, frozen=True):
    """A message record not yet encoded (what the ring and the queue hold)."""

    t_ns: int
    direction: str
    peer: int
    group: str
    msg: Any
    specs: tuple[TensorSpec, ...]
    copies: tuple[bytes | None, ...]  # tensor bytes to digest (and, full mode, keep), copied at the hook
    header: bytes | None
    meta: bytes | None
    error: str | None
    full: bool = False


def _materialise(item: Any) -> LogRecord:
    if not isinstance(item, _Msg):
        return item
    msg = item.msg
    specs, payload = item.specs, ()
    if item.copies:
        # Digests are taken here, on the writer thread (hashlib drops the GIL), not in the hook.
        specs = tuple(
            s if s.digest is not None or c is None else msgspec.structs.replace(s, digest=digest_bytes(c))
            for s, c in zip(item.specs, item.copies)
        )
        if item.full:
            payload = tuple(c if c is not None else b"" for c in item.copies)
    header, meta = item.header, item.meta
    if header is None or meta is None:
        header, meta = encode_frame(msg)
    return MessageRecord(
        t_ns=item.t_ns,
        direction=item.direction,  # type: ignore[arg-type]
        peer=item.peer,
        group=item.group,
        action=action_of(msg),
        **ChunkId.of(msg).fields(),
        header=header,
        meta=meta,
        specs=specs,
        payload=payload,
        error=item.error,
    )


def _uint8():
    import torch

    return torch.uint8


class MessageRecorder:
    """Records one rank's commitment points (see the module docstring).

    Parameters
    ----------
    config:
        The resolved config; ``config.record`` says whether and how to record.
    rank, role, stage, world_size:
        Who writes (``role``: ``"stage0"``, ``"leader"`` or ``"follower"``).
    flight_dir:
        Where ``dump_flight`` writes ``rank<r>.flight.ppslog`` (default: the
        record directory, else the current directory).
    record_dir:
        Overrides ``config.record.dir`` (None: use the config's).
    """

    def __init__(
        self,
        config: PPStageConfig,
        *,
        rank: int,
        role: str,
        stage: int,
        world_size: int,
        flight_dir: str | Path | None = None,
        record_dir: str | Path | None = None,
    ) -> None:
        rec = config.record
        self.rank = rank
        self.full = rec.tensors == "full"
        record_dir = record_dir if record_dir is not None else rec.dir
        self.flight_dir = Path(flight_dir or record_dir or ".")
        self.header = LogHeader(
            protocol_version=PROTOCOL_VERSION,
            rank=rank,
            role=role,
            stage=stage,
            world_size=world_size,
            config_digest=config.digest(),
            config_json=config.canonical_bytes(),
            start_unix_s=time.time(),
            t0_ns=time.monotonic_ns(),
            tensors=rec.tensors,
        )
        self._ring: deque[Any] = deque(maxlen=rec.flight_records)
        self._ring_lock = threading.RLock()  # re-entrant: a signal handler may dump mid-append
        self._pending: list[Any] = []  # recorded since the last flush (under _ring_lock)
        self._queue: queue.SimpleQueue[Any] | None = None
        self._writer: threading.Thread | None = None
        self.path: Path | None = None
        self.flight_written: Path | None = None
        self._closed = False
        if record_dir is not None:
            Path(record_dir).mkdir(parents=True, exist_ok=True)
            self.path = log_path(record_dir, rank)
            writer = LogWriter(self.path, self.header)  # header on disk before any message
            self._queue = queue.SimpleQueue()
            self._writer = threading.Thread(
                target=self._write_loop, args=(writer,), name=f"ppstage-record-r{rank}", daemon=True
            )
            self._writer.start()

    @property
    def recording(self) -> bool:
        return self._queue is not None

    # -- hooks (any thread) -------------------------------------------------------
    def message(
        self,
        direction: str,
        peer: int,
        group: str,
        msg: Any,
        flats: Sequence[Any] = (),
        *,
        header: bytes | None = None,
        meta: bytes | None = None,
        error: str | None = None,
        t_ns: int | None = None,
    ) -> None:
        """A frame at a commitment point; ``flats`` are its tensors as flat uint8 tensors, in spec order."""
        specs: tuple[TensorSpec, ...] = msg.tensors
        copies: tuple[bytes | None, ...] = ()
        if self._queue is not None and specs and len(flats) == len(specs):
            copies = self._copies(specs, flats)
        self._put(
            _Msg(
                time.monotonic_ns() if t_ns is None else t_ns,
                direction, peer, group, msg, specs, copies, header, meta, error, self.full,
            )
        )

    def plan(self, plan: Any, state_digest: str) -> None:
        self._put(
            PlanRecord(
                t_ns=time.monotonic_ns(),
                **ChunkId.of(plan).fields(),
                plan=_PLAN_ENCODER.encode(plan),
                state_digest=state_digest,
            )
        )

    def gate(self, ids: Any, verdict: str) -> None:
        self._put(
            GateRecord(
                t_ns=time.monotonic_ns(),
                **ChunkId.of(ids).fields(),
                verdict=verdict,
            )
        )

    def chunk(self, env: Any, stage: int, state: Any, state_digest: str, output_digest: str | None) -> None:
        """A chunk boundary on a generator rank (``state``: the lifecycle state after it); flushes."""
        self._put(
            ChunkRecord(
                t_ns=time.monotonic_ns(),
                **ChunkId.of(env).fields(),
                stage=stage,
                state_digest=state_digest,
                output_digest=output_digest,
                current_start_frame=state.current_start_frame,
                global_end_index=state.global_end_index,
                local_end_index=state.local_end_index,
                calls=state.calls_made,
            )
        )
        self.flush()

    def span(self, name: str, start_ns: int, ids: Any) -> None:
        """A phase ``[start_ns, now)`` of chunk ``ids`` on this rank."""
        self._put(
            SpanRecord(
                name=name,
                start_ns=start_ns,
                end_ns=time.monotonic_ns(),
                **ChunkId.of(ids).fields(),
            )
        )

    def event(self, name: str, detail: str = "") -> None:
        self._put(EventRecord(t_ns=time.monotonic_ns(), name=name, detail=detail))

    def flush(self) -> None:
        """Hand everything recorded so far to the OS (asynchronously, on the writer thread)."""
        if self._queue is not None:
            with self._ring_lock:
                batch, self._pending = self._pending, []
            if batch:
                self._queue.put(batch)

    # -- ending ---------------------------------------------------------------------
    def close(self, timeout_s: float = 5.0) -> None:
        """Write everything recorded and close the log (waits up to ``timeout_s``)."""
        if self._closed:
            return
        self._closed = True
        if self._queue is not None and self._writer is not None:
            self.flush()
            self._queue.put(None)
            self._writer.join(timeout_s)

    def dump_flight(self, reason: str) -> Path | None:
        """Write the flight ring to ``flight_dir/rank<r>.flight.ppslog``; returns the path (None if it failed)."""
        with self._ring_lock:
            items = list(self._ring)
        records = []
        for item in items:
            try:
                records.append(_materialise(item))
            except Exception:  # a message that cannot be re-encoded is left out, not fatal
                continue
        records.append(EventRecord(t_ns=time.monotonic_ns(), name="flight_dump", detail=reason))
        header = msgspec.structs.replace(self.header, flight=True)
        path = flight_path(self.flight_dir, self.rank)
        try:
            self.flight_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".part")
            tmp.write_bytes(encode_log(header, records))
            os.replace(tmp, path)
        except OSError as exc:
            log.error("flight recorder could not be written", path=str(path), error=str(exc))
            return None
        self.flight_written = path
        return path

    def finish(self, exit_code: int, reason: str = "") -> None:
        """Every exit path: close the log; on failure also dump the flight ring and say where."""
        if exit_code != 0 and self.flight_written is None:
            self.event("exit", f"exit code {exit_code} {reason}".strip())
            path = self.dump_flight(reason or f"exit code {exit_code}")
            if path is not None:
                log.error("flight recorder written", path=str(path), records=len(self._ring))
        else:
            self.event("exit", f"exit code {exit_code}")
        self.close()

    # -- internals ------------------------------------------------------------------
    def _copies(self, specs: tuple[TensorSpec, ...], flats: Sequence[Any]) -> tuple[bytes | None, ...]:
        """The bytes of each tensor whose digest the log still needs (all of them in full mode).

        A copy (a memcpy), because the caller may reuse the tensor once the
        hook returns; hashing happens later, on the writer thread.
        """
        from ppstage.digests import byte_view

        torch_uint8 = _uint8()
        out: list[bytes | None] = []
        for spec, flat in zip(specs, flats):
            if spec.digest is not None and not self.full:
                out.append(None)
                continue
            if flat.dtype != torch_uint8 or flat.dim() != 1:  # the transport's flats already are
                flat = byte_view(flat)
            out.append(bytes((flat if flat.device.type == "cpu" else flat.cpu()).numpy()))
        return tuple(out)

    def _put(self, item: Any) -> None:
        with self._ring_lock:
            self._ring.append(item)
            if self._queue is not None and not self._closed:
                self._pending.append(item)

    def _write_loop(self, writer: LogWriter) -> None:
        try:
            while True:
                batch = self._queue.get()  # type: ignore[union-attr]
                if batch is None:
                    break
                for item in batch:
                    try:
                        writer.append_encoded(encode_record(_materialise(item)))
                    except Exception as exc:  # one bad record must not stop the log
                        log.error("record could not be encoded", error=repr(exc))
                writer.flush()
        except OSError as exc:
            log.error("message log write failed", path=str(writer.path), error=str(exc))
        finally:
            try:
                writer.close()
            except OSError:
                pass


class _NullRecorder(MessageRecorder):
    """What components get outside a rank process (unit tests): a ring, no file."""

    def __init__(self) -> None:  # noqa: D107 - no config, nothing recorded to disk
        self.rank = -1
        self.full = False
        self.flight_dir = Path(".")
        self.header = LogHeader(
            protocol_version=PROTOCOL_VERSION, rank=-1, role="none", stage=-1, world_size=0,
            config_digest="", start_unix_s=0.0, t0_ns=0,
        )
        self._ring = deque(maxlen=64)
        self._ring_lock = threading.RLock()  # re-entrant: a signal handler may dump mid-append
        self._pending = []
        self._queue = None
        self._writer = None
        self.path = None
        self.flight_written = None
        self._closed = False


_CURRENT: MessageRecorder | None = None


def install(recorder: MessageRecorder) -> MessageRecorder:
    """Make ``recorder`` this process's recorder (``current()``); one per rank process."""
    global _CURRENT
    _CURRENT = recorder
    return recorder


def current() -> MessageRecorder:
    """This process's recorder; a file-less one when none was installed."""
    global _CURRENT
    if _CURRENT is None:
        _CURRENT = _NullRecorder()
    return _CURRENT


def finish(exit_code: int, reason: str = "") -> None:
    """Close this process's recorder (and dump its flight ring on failure), if it has one."""
    if _CURRENT is not None and not isinstance(_CURRENT, _NullRecorder):
        _CURRENT.finish(exit_code, reason)
