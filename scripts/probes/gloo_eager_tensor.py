"""Probe: does a pre-posted receive on a second gloo tag make a large frame cheaper?

A framed message of one large tensor is two sends: a small preamble, then the
tensor, whose receive the peer can post only after it parsed the preamble.
This ping-pong compares, between two gloo processes on loopback:

* ``raw``: one send of the tensor's bytes;
* ``two``: a 512-byte preamble, then the tensor (today's framing, without its checks);
* ``eager``: the same two sends, the tensor on tag 1 into a receive posted in advance.

Prints min / p25 / median one-way microseconds over alternating rounds.
Run: ``.venv/bin/python scripts/probes/gloo_eager_tensor.py [NBYTES] [ROUNDS]``
(docs/performance.md, "Tried later on 2026-12-03").
"""

from __future__ import annotations

import socket
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PREAMBLE = 512
ITERATIONS = 100


def _run(rank: int, port: int, nbytes: int, rounds: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    peer = 1 - rank
    buf = torch.zeros(nbytes, dtype=torch.uint8)
    pre = torch.zeros(PREAMBLE, dtype=torch.uint8)
    early = torch.zeros(nbytes, dtype=torch.uint8)

    def raw() -> None:
        for _ in range(ITERATIONS):
            if rank == 0:
                dist.send(buf, peer)
                dist.recv(buf, peer)
            else:
                dist.recv(buf, peer)
                dist.send(buf, peer)

    def two() -> None:
        for _ in range(ITERATIONS):
            if rank == 0:
                dist.send(pre, peer)
                dist.send(buf, peer)
                dist.recv(pre, peer)
                dist.recv(buf, peer)
            else:
                dist.recv(pre, peer)
                dist.recv(buf, peer)
                dist.send(pre, peer)
                dist.send(buf, peer)

    def eager() -> None:
        posted = dist.irecv(early, peer, tag=1)
        for _ in range(ITERATIONS):
            if rank == 1:
                dist.irecv(pre, peer).wait()
                posted.wait()
                posted = dist.irecv(early, peer, tag=1)
            dist.send(pre, peer)
            dist.send(buf, peer, tag=1)
            if rank == 0:
                dist.irecv(pre, peer).wait()
                posted.wait()
                posted = dist.irecv(early, peer, tag=1)
        dist.send(buf, peer, tag=1)  # match the receive each side still has posted
        posted.wait()

    times: dict[str, list[float]] = {"raw": [], "two": [], "eager": []}
    for _ in range(rounds):
        for name, fn in (("raw", raw), ("two", two), ("eager", eager)):
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) / ITERATIONS / 2 * 1e6)
    if rank == 0:
        print(f"{nbytes} bytes, {rounds} alternating rounds of {ITERATIONS} round trips, one way (us):")
        for name, v in times.items():
            v.sort()
            print(f"  {name:<6} min {v[0]:7.0f}  p25 {v[len(v) // 4]:7.0f}  median {v[len(v) // 2]:7.0f}")
    dist.destroy_process_group()


def main() -> None:
    nbytes = int(sys.argv[1]) if len(sys.argv) > 1 else 1 << 20
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 30
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_run, args=(port, nbytes, rounds), nprocs=2)


if __name__ == "__main__":
    main()
