"""Point-to-point messaging between stage leaders over ``torch.distributed``.

A frame is ``header -> metadata -> tensors in spec order`` (``protocol.codec``),
sent as blocking sends on the 2-rank link group of the pair: one fixed-size
preamble (header, metadata and, for a small frame, every tensor), then only
what did not fit (``_frames.py`` has the layout and why).

Threads
-------
The asyncio loop never blocks on the backend:

- **one sender thread per process** issues every outbound send, FIFO, from a
  single queue fed by ``Transport.send``;
- **one receiver thread per inbound link** (``Transport.open_inbound``) posts
  blocking receives on that link and appends each complete frame to the link's
  ``Mailbox``, which wakes the one consumer waiting: the loop (``await get()``,
  via ``loop.call_soon_threadsafe``) or a stage's worker thread (``take``)
  (gloo's ``is_completed()`` is never polled: it stays False until ``wait()``,
  SPEC section 10);
- ``Transport.enqueue`` lets a worker thread queue a frame itself (same
  preflight, same single outbox), so a stage's output hop need not pass
  through the loop.

Why this keeps framing safe: a frame is a sequence of messages on one link,
and both ends must see that sequence in order with nothing interleaved. Each
directed pair ``src -> dst`` is driven by exactly one thread on each side (the
sender thread of ``src``, the receiver thread of ``dst`` for ``src``), and that
thread handles a whole frame before the next one, so frames never interleave
and arrive in send order (gloo/NCCL keep per-pair message order). The two
directions of a pair are independent sequences driven by different threads.
Neither tags nor receive-from-any-source are used (NCCL honours neither), and
``batch_isend_irecv`` is avoided (it hangs on gloo).

Mesh collectives are not issued by these threads: the stage code issues them
from its own worker thread through ``ppstage.distributed.topology.MeshComm``.

Failure model
-------------
- Anything that can fail before sending (validation, serialisation, dtype,
  shape, making contiguous, digests) fails in ``send``'s preflight with a typed
  ``ProtocolError``, before the frame is queued: nothing reaches the wire.
- A send failing after that is a dead channel (``ChannelDead`` through
  ``on_fatal`` and from ``send``); after the header it is also half-framed, so
  the process must exit, never continue on that link.
- A well-framed but invalid frame (``validate`` fails, digest mismatch) is still
  received in full and delivered as ``Inbound.error``; the link stays usable.
- Undecodable bytes (bad header, metadata, checksum) and failed or timed-out
  receives are fatal: ``on_fatal(FramingError | ... | ChannelDead)``, and that
  receiver thread stops. Waiting for a next header has no deadline (liveness is
  the watchdogs' job); bytes of a started frame must come within
  ``runtime.pg_timeout_s``.
- Gloo hazard: a peer that sends *more* bytes than the posted receive aborts the
  receiving process inside gloo (uncatchable, loud, never a hang). This
  transport never does that: every receive size comes from the checked frame.
- Once a ``SHUTDOWN`` or ``ERROR`` went out or came in, or after ``close()``,
  a peer closing a link *between* frames is expected (it is exiting): that
  receiver thread stops quietly, without ``on_fatal``. A peer dying then is
  caught by the drain deadline, not by the transport.
- One sender thread serves every destination: a destination that stops taking
  frames delays the others by at most ``pg_timeout_s``, after which its
  channel is dead and the queue moves on.
- On NCCL a link idle longer than ``pg_timeout_s`` is aborted by NCCL's own
  watchdog: keep ``NOOP`` keepalives flowing on every link, or a large timeout.
"""

from ppstage.digests import byte_view, tensor_digest
from ppstage.distributed.bootstrap import init_process_group
from ppstage.distributed.transport._frames import FrameReader, FrameWriter, preamble_capacity
from ppstage.distributed.transport._mailbox import Mailbox, MailboxInterrupted
from ppstage.distributed.transport._p2p import IDLE_WAIT, TERMINAL_ACTIONS, Inbound, Transport
from ppstage.distributed.transport._tensors import (
    TORCH_DTYPE,
    WIRE_DTYPE,
    make_spec,
    prepare_tensors,
    rebuild,
)

__all__ = [
    "FrameReader",
    "FrameWriter",
    "IDLE_WAIT",
    "TERMINAL_ACTIONS",
    "TORCH_DTYPE",
    "WIRE_DTYPE",
    "Inbound",
    "Mailbox",
    "MailboxInterrupted",
    "Transport",
    "byte_view",
    "init_process_group",
    "make_spec",
    "preamble_capacity",
    "prepare_tensors",
    "rebuild",
    "tensor_digest",
]
