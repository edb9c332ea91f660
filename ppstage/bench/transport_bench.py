"""``ppstage bench transport``: one hop's cost against the raw backend, in one run.

Two real processes (gloo on loopback, the pipeline's own link group) play
ping-pong with messages of each size; one-way time = round trip / 2. Per size,
three ways to move the same bytes, measured alternately so that load on a
shared machine hits all three alike:

* **raw**: one ``dist.send`` / ``dist.recv`` of the tensor's bytes;
* **framed**: what the transport threads do for one frame, without the threads:
  preflight (``validate``, tensor checks, ``encode_frame``), the frame's sends
  (``FrameWriter``), the receive with every check (``parse_header``,
  ``decode_metadata``, ``validate``) into pooled buffers (``FrameReader``);
* **3 sends**: the framing before issue 11, for comparison in the same run: the
  same checks, then header, metadata and tensor as three blocking sends;
* **hop**: actor to actor through the threads: ``await Transport.send`` on one
  event loop, the sender thread, the peer's receiver thread, its loop's inbox,
  and the same back.

Each figure is the best of ``rounds`` (as ``timeit`` advises: slower rounds
measure other processes on a shared machine, not this code).

The message is a ``StageHop`` carrying one float32 tensor (an inter-stage
hidden state). Targets (issue 11): framed throughput >= 0.9 of raw at >= 1 MiB,
and <= 150 us added per message (framed - raw, one way) at 64 KiB.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import time
import traceback
from datetime import timedelta

import msgspec

from ppstage.bench.targets import Target, all_met

TARGET_RATIO = 0.9
TARGET_ADDED_US = 150.0
DEFAULT_SIZES = (4 << 10, 64 << 10, 1 << 20, 16 << 20)
MESSAGE_ROW_BYTES = 64 * 4  # one row of the message tensor: 64 float32


class SizeResult(msgspec.Struct, frozen=True, kw_only=True):
    nbytes: int
    iterations: int
    raw_us: float  # one way, median over rounds
    framed_us: float
    legacy_us: float  # header, metadata and tensor as three sends (before issue 11)
    hop_us: float

    @property
    def framed_ratio(self) -> float:
        """Framed throughput as a fraction of raw (raw time / framed time)."""
        return self.raw_us / self.framed_us

    @property
    def added_us(self) -> float:
        return self.framed_us - self.raw_us

    @property
    def hop_added_us(self) -> float:
        return self.hop_us - self.raw_us


class TransportBenchResult(msgspec.Struct, frozen=True, kw_only=True):
    sizes: tuple[SizeResult, ...]
    rounds: int

    def targets(self) -> tuple[Target, ...]:
        """The targets this run's sizes cover (none without a size >= 1 MiB or of 64 KiB)."""
        out: list[Target] = []
        big = [s for s in self.sizes if s.nbytes >= 1 << 20]
        if big:
            worst = min(s.framed_ratio for s in big)
            out.append(Target(claim=f"target: framed >= {TARGET_RATIO:g} of raw throughput at >= 1 MiB: "
                                    f"worst {worst:.2f}", met=worst >= TARGET_RATIO))
        at64 = [s for s in self.sizes if s.nbytes == 64 << 10]
        if at64:
            added = at64[0].added_us
            out.append(Target(claim=f"target: <= {TARGET_ADDED_US:g} us added per message at 64 KiB: {added:.1f} us",
                              met=added <= TARGET_ADDED_US))
        return tuple(out)

    @property
    def passed(self) -> bool:
        return all_met(self.targets())


def _iterations(nbytes: int, budget: int) -> int:
    """Fewer round trips for large messages: roughly ``budget`` KiB... of traffic per round."""
    return max(3, min(200, budget // max(1, nbytes >> 10)))


# -- the two processes -------------------------------------------------------------------


def _worker(rank: int, port: int, sizes: list[int], rounds: int, budget: int, conn) -> None:
    try:
        conn.send(("ok", _run_rank(rank, port, sizes, rounds, budget)))
    except BaseException:  # report, never hang the parent
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()
        os._exit(0)  # receiver threads may be blocked in gloo: no teardown


def _run_rank(rank: int, port: int, sizes: list[int], rounds: int, budget: int) -> dict[int, dict[str, float]]:
    import torch
    import torch.distributed as dist

    from ppstage.config import PPStageConfig
    from ppstage.distributed.topology import build_groups, role_for
    from ppstage.distributed.transport import init_process_group

    from ppstage.observability import logs

    torch.set_num_threads(1)
    logs.configure(rank=rank, stage=rank, level="warning")
    config = PPStageConfig().with_overrides({"topology.stages": 1, "runtime.pg_timeout_s": 60.0})
    init_process_group(config, rank, 2, "127.0.0.1", port)
    groups = build_groups(config, rank)
    # The transport's receiver thread keeps a receive posted on its link group:
    # raw and framed traffic get groups of their own, or that receive would take it.
    raw_link = dist.new_group([0, 1])
    framed_link = dist.new_group([0, 1])
    legacy_link = dist.new_group([0, 1])
    role = role_for(config, rank)
    peer = 1 - rank
    loop = asyncio.new_event_loop()
    transport = _transport(config, role, groups, loop)
    inbox = transport.open_inbound(peer)
    out: dict[int, dict[str, float]] = {}
    for nbytes in sizes:
        n = _iterations(nbytes, budget)
        tensor = torch.full((nbytes // MESSAGE_ROW_BYTES, 64), float(rank))
        raw_buf = torch.empty(tensor.numel() * 4, dtype=torch.uint8)
        framed = _FramedLink(framed_link, peer, tensor)
        legacy = _LegacyLink(legacy_link, peer, tensor)
        times: dict[str, list[float]] = {"raw": [], "framed": [], "legacy": [], "hop": []}
        dist.barrier()
        for r in range(rounds + 1):  # round 0 warms up
            for kind in ("raw", "framed", "legacy", "hop"):
                t0 = time.perf_counter()
                if kind == "raw":
                    _raw_ping_pong(rank, peer, raw_link, raw_buf, n)
                elif kind == "framed":
                    framed.ping_pong(rank, n)
                elif kind == "legacy":
                    legacy.ping_pong(rank, n)
                else:
                    loop.run_until_complete(_hop_ping_pong(rank, peer, transport, inbox, tensor, n))
                if r:
                    times[kind].append((time.perf_counter() - t0) / n / 2 * 1e6)
        out[nbytes] = {k: min(v) for k, v in times.items()} | {"iterations": n}
    transport.close()
    return out


def _transport(config, role, groups, loop):
    from ppstage.distributed.transport import Transport

    def fatal(exc) -> None:
        raise RuntimeError(f"transport failed during the benchmark: {exc}")

    return Transport(config, role, groups, loop=loop, geometry=None, on_fatal=fatal)


def _raw_ping_pong(rank: int, peer: int, link, buf, n: int) -> None:
    import torch.distributed as dist

    for _ in range(n):
        if rank == 0:
            dist.send(buf, dst=peer, group=link)
            dist.recv(buf, src=peer, group=link)
        else:
            dist.recv(buf, src=peer, group=link)
            dist.send(buf, dst=peer, group=link)


class _FramedLink:
    """One thread doing the transport's per-frame work on both directions of a link."""

    def __init__(self, link, peer: int, tensor) -> None:
        import torch

        from ppstage.distributed.transport import FrameReader, FrameWriter, preamble_capacity

        cpu = torch.device("cpu")
        self.link, self.peer, self.tensor = link, peer, tensor
        capacity = preamble_capacity("gloo")
        self.writer, self.reader = FrameWriter(cpu, capacity, exact=False), FrameReader(cpu, capacity)
        self.timeout = timedelta(seconds=60)

    def _send(self, call_id: int) -> None:
        # Imports at module level of the child process (``_imports``): an import
        # statement per frame costs ~5 us, which the transport itself never pays.
        torch, dist, prepare_tensors, hop, encode_frame, validate = _imports()
        env = _Ids(call_id)
        msg = hop(env, call_kind="denoise", step=0, target="hidden", tensor=self.tensor)  # type: ignore[arg-type]
        validate(msg, None)
        _, payload = prepare_tensors(msg.tensors, [self.tensor], torch.device("cpu"), fill_digests=False, chunk=None)
        head, meta = encode_frame(msg)
        self.writer.send(head, meta, payload, lambda buf: dist.send(buf, dst=self.peer, group=self.link))

    def _recv(self) -> None:
        dist, rebuild, decode_metadata, parse_header, validate = _recv_imports()

        def recv(buf) -> None:
            dist.irecv(buf, src=self.peer, group=self.link).wait(self.timeout)

        head = self.reader.receive_preamble(recv)
        header = parse_header(head)
        msg = decode_metadata(header, head, self.reader.receive_meta(header.meta_len, recv))
        flats = self.reader.receive_tensors(head, header.meta_len, msg.tensors, recv, lambda spec: None)
        validate(msg, None)
        [rebuild(s, f) for s, f in zip(msg.tensors, flats)]

    def ping_pong(self, rank: int, n: int) -> None:
        for i in range(n):
            if rank == 0:
                self._send(i)
                self._recv()
            else:
                self._recv()
                self._send(i)


_IMPORTS: tuple = ()
_RECV_IMPORTS: tuple = ()


def _imports() -> tuple:
    global _IMPORTS
    if not _IMPORTS:
        import torch
        import torch.distributed as dist

        from ppstage.distributed.transport import prepare_tensors
        from ppstage.stages.envelopes import hop
        from protocol import encode_frame, validate

        _IMPORTS = (torch, dist, prepare_tensors, hop, encode_frame, validate)
    return _IMPORTS


def _recv_imports() -> tuple:
    global _RECV_IMPORTS
    if not _RECV_IMPORTS:
        import torch.distributed as dist

        from ppstage.distributed.transport import rebuild
        from protocol import decode_metadata, parse_header, validate

        _RECV_IMPORTS = (dist, rebuild, decode_metadata, parse_header, validate)
    return _RECV_IMPORTS


class _LegacyLink(_FramedLink):
    """The framing before issue 11: header, metadata and tensor as three exact-size sends."""

    def _send(self, call_id: int) -> None:
        torch, dist, prepare_tensors, hop, encode_frame, validate = _imports()
        msg = hop(_Ids(call_id), call_kind="denoise", step=0, target="hidden", tensor=self.tensor)  # type: ignore[arg-type]
        validate(msg, None)
        _, payload = prepare_tensors(msg.tensors, [self.tensor], torch.device("cpu"), fill_digests=False, chunk=None)
        head, meta = encode_frame(msg)
        for part in (torch.frombuffer(bytearray(head), dtype=torch.uint8),
                     torch.frombuffer(bytearray(meta), dtype=torch.uint8), *payload):
            dist.send(part, dst=self.peer, group=self.link)

    def _recv(self) -> None:
        import torch

        from protocol import HEADER_SIZE

        dist, rebuild, decode_metadata, parse_header, validate = _recv_imports()

        def recv(buf) -> None:
            dist.irecv(buf, src=self.peer, group=self.link).wait(self.timeout)

        head_buf = torch.zeros(HEADER_SIZE, dtype=torch.uint8)
        recv(head_buf)
        head = head_buf.numpy().tobytes()
        header = parse_header(head)
        meta = torch.zeros(header.meta_len, dtype=torch.uint8)
        recv(meta)
        msg = decode_metadata(header, head, meta.numpy().tobytes())
        flats = []
        for spec in msg.tensors:
            flat = torch.empty(spec.nbytes, dtype=torch.uint8)
            recv(flat)
            flats.append(flat)
        validate(msg, None)
        [rebuild(s, f) for s, f in zip(msg.tensors, flats)]


class _Ids:
    """The identity ``hop`` stamps on a bench message (an envelope stand-in)."""

    def __init__(self, call_id: int) -> None:
        from protocol import ChunkId

        self.id = ChunkId(call_id, call_id, 0)


async def _hop_ping_pong(rank: int, peer: int, transport, inbox, tensor, n: int) -> None:
    from ppstage.stages.envelopes import hop

    for i in range(n):
        msg = hop(_Ids(i), call_kind="denoise", step=0, target="hidden", tensor=tensor)  # type: ignore[arg-type]
        if rank == 0:
            await transport.send(peer, msg, [tensor])
            await inbox.get()
        else:
            await inbox.get()
            await transport.send(peer, msg, [tensor])


# -- the parent ---------------------------------------------------------------------------


def run_transport_bench(
    sizes: tuple[int, ...] = DEFAULT_SIZES, *, rounds: int = 5, budget_kib: int = 64 << 10, timeout_s: float = 300.0
) -> TransportBenchResult:
    """Start two processes, measure every size, reap them; raise if either failed."""
    from ppstage.stages.launcher import free_port

    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if not sizes:
        raise ValueError("no message size given")
    # The message is a float32 tensor of rows of 64 values: whole rows of 256 bytes.
    odd = [n for n in sizes if n < MESSAGE_ROW_BYTES or n % MESSAGE_ROW_BYTES]
    if odd:
        raise ValueError(f"every size must be a multiple of {MESSAGE_ROW_BYTES} bytes (rows of 64 float32), got {odd}")
    sizes = tuple(dict.fromkeys(sizes))  # each size measured once, in the order given
    ctx = mp.get_context("spawn")
    port = free_port()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    pipes, procs = [], []
    try:
        for rank in (0, 1):
            parent, child = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_worker, args=(rank, port, list(sizes), rounds, budget_kib, child), daemon=True)
            p.start()
            child.close()
            pipes.append(parent)
            procs.append(p)
        results = []
        deadline = time.monotonic() + timeout_s
        for parent in pipes:
            if not parent.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"transport bench ran past {timeout_s:.0f}s")
            status, payload = parent.recv()
            if status != "ok":
                raise RuntimeError(f"a benchmark process failed:\n{payload}")
            results.append(payload)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    mine = results[0]
    return TransportBenchResult(
        rounds=rounds,
        sizes=tuple(
            SizeResult(
                nbytes=s, iterations=int(mine[s]["iterations"]), raw_us=mine[s]["raw"],
                framed_us=mine[s]["framed"], legacy_us=mine[s]["legacy"], hop_us=mine[s]["hop"],
            )
            for s in sizes
        ),
    )


def _size_label(n: int) -> str:
    """The exact size: ``4 KiB``, ``1 MiB``, else the byte count (a label never rounds)."""
    if n % (1 << 20) == 0:
        return f"{n >> 20} MiB"
    if n % (1 << 10) == 0:
        return f"{n >> 10} KiB"
    return f"{n} B"


def format_report(r: TransportBenchResult) -> str:
    lines = [
        "transport: StageHop + one float32 tensor, 2 processes, gloo loopback, one way = round trip / 2",
        f"(best of {r.rounds} rounds, raw / framed / 3 sends / hop alternating within each round)",
        "raw: one send/recv of the bytes; framed: the transport's framing and checks, no threads; "
        "3 sends: the framing before issue 11;",
        "hop: actor to actor through the transport threads; framed/raw tput = raw us / framed us; "
        "added = framed - raw; hop added = hop - raw; MB = 10^6 bytes",
        "",
        f"{'size':>8}  {'raw us':>9}  {'framed us':>9}  {'3 sends us':>10}  {'hop us':>9}  {'framed/raw tput':>15}  "
        f"{'added us':>9}  {'hop added us':>12}  {'raw MB/s':>9}",
    ]
    for s in r.sizes:
        lines.append(
            f"{_size_label(s.nbytes):>8}  {s.raw_us:9.1f}  {s.framed_us:9.1f}  {s.legacy_us:10.1f}  {s.hop_us:9.1f}  "
            f"{s.framed_ratio:15.2f}  {s.added_us:9.1f}  {s.hop_added_us:12.1f}  {s.nbytes / s.raw_us:9.0f}"
        )
    lines.append("")
    lines += [t.line() for t in r.targets()]
    return "\n".join(lines)
