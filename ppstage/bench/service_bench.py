"""``ppstage bench service``: do viewers slow the pipeline, does rank 0's memory stay flat?

Starts a local ``ppstage serve`` (rank 0 + 2 stages, the embedded model, a
simulated generator cost), then measures in one run:

1. the period with no viewer;
2. the period with N WebSocket viewers reading every frame;
3. after churn (many viewers connecting and vanishing), that the viewer gauge
   is back to 0, and rank 0's resident memory at each step.

Each phase starts once ``/readyz`` answers (parity passed, warm-up chunk
done), so start-up is in none of them; its period is the phase's seconds over
the chunks emitted in it (a mean, not a median).

Prints figures and ratios; it asserts nothing (timings on a shared machine are
noise-prone: the test suite checks behaviour, this reports numbers).
"""

from __future__ import annotations

import asyncio
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from ppstage.config import PPStageConfig
from ppstage.stages.launcher import free_port, start_pipeline


@dataclass
class Phase:
    name: str
    seconds: float
    chunks: int
    rss_mb: float
    frames_per_viewer: float = 0.0  # frames a connected viewer received during the phase (mean)
    viewers: int = 0  # viewers connected through the phase (the service refuses above max_viewers)

    @property
    def period_ms(self) -> float:
        return 1e3 * self.seconds / self.chunks if self.chunks else float("nan")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _status(http: aiohttp.ClientSession, url: str) -> dict:
    async with http.get(url + "/v1/status") as r:
        return await r.json()


async def _measure(http, url: str, pid: int, name: str, seconds: float, viewers: int) -> Phase:
    received = [0] * viewers
    connected = [False] * viewers

    async def viewer(i: int) -> None:
        async with http.ws_connect(url + "/v1/frames") as ws:
            connected[i] = True
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    received[i] += 1

    tasks = [asyncio.ensure_future(viewer(i)) for i in range(viewers)]
    try:
        await asyncio.sleep(1.0 if viewers else 0.0)  # let them connect
        start = await _status(http, url)
        # Frames are counted over the same window as the chunks: from here to ``end``.
        before = list(received)
        t0 = time.monotonic()
        await asyncio.sleep(seconds)
        end = await _status(http, url)
        elapsed = time.monotonic() - t0
        during = [r - b for r, b in zip(received, before)]
        # Connected at the start of the window and still connected at its end.
        live = [i for i, t in enumerate(tasks) if connected[i] and not t.done()]
    finally:
        for t in tasks:
            t.cancel()
        # Every viewer's outcome retrieved, a refused connection's included: none is left unread.
        await asyncio.gather(*tasks, return_exceptions=True)
    per_viewer = sum(during[i] for i in live) / len(live) if live else 0.0
    return Phase(name, elapsed, end["chunks_emitted"] - start["chunks_emitted"], _rss_mb(pid), per_viewer, len(live))


async def _churn(http, url: str, clients: int) -> None:
    async def one() -> None:
        async with http.ws_connect(url + "/v1/frames") as ws:
            await ws.receive(timeout=30)

    await asyncio.gather(*(one() for _ in range(clients)), return_exceptions=True)


async def _run(url: str, seconds: float, viewers: int, churn: int) -> list[Phase]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        end = time.monotonic() + 120
        while True:
            try:
                async with http.get(url + "/readyz") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            if time.monotonic() > end:
                raise RuntimeError("the service did not become ready within 120 s")
            await asyncio.sleep(0.3)
        pid = (await _status(http, url))["pid"]
        phases = [await _measure(http, url, pid, "no viewer", seconds, 0)]
        phases.append(await _measure(http, url, pid, f"{viewers} viewers", seconds, viewers))
        for _ in range(3):
            await _churn(http, url, churn)
        phases.append(await _measure(http, url, pid, f"after {3 * churn} churned viewers", seconds, 0))
        st = await _status(http, url)
        phases[-1].name += f" (viewers now {st['queues']['viewers']})"
        return phases


def run_service_bench(*, seconds: float = 8.0, viewers: int = 50, churn: int = 200,
                      call_ms: float = 8.0) -> list[Phase]:
    """Run the three phases against a fresh local service; raises ``ValueError`` for ``viewers``
    above the service's ``service.max_viewers`` (it would refuse them: nothing to measure)."""
    config = PPStageConfig().with_overrides({
        "topology.stages": 2, "runtime.simulated_call_ms": call_ms, "runtime.result_deadline_min_s": 15.0,
    })
    if viewers > config.service.max_viewers:
        raise ValueError(
            f"--viewers {viewers}: the service takes at most service.max_viewers = {config.service.max_viewers}"
        )
    port = free_port()
    out = tempfile.mkdtemp(prefix="ppstage-bench-service-")
    pipe = start_pipeline(config, out, chunks=None, command="serve", launch_args=["--port", str(port)])
    try:
        return asyncio.run(_run(f"http://127.0.0.1:{port}", seconds, viewers, churn))
    finally:
        pipe.signal_rank0(signal.SIGTERM)
        pipe.wait(60)
        pipe.kill()


def format_report(phases: list[Phase]) -> str:
    base = phases[0]
    lines = [
        "service: rank 0 + 2 stages, embedded model; period = a phase's seconds / the chunks emitted in it "
        "(a mean; every phase starts after /readyz, so start-up is excluded)",
        "",
        "frames/viewer: frames each viewer connected through the phase received in it (frames per chunk x chunks when "
        "none is dropped); viewers: how many were connected through the phase",
        "",
        f"{'phase':<40} {'chunks':>7} {'period ms':>10} {'vs none':>8} {'viewers':>8} {'frames/viewer':>14} "
        f"{'rank0 RSS MB':>13}",
    ]
    for p in phases:
        ratio = p.period_ms / base.period_ms if base.chunks else float("nan")
        lines.append(f"{p.name:<40} {p.chunks:>7} {p.period_ms:>10.1f} {ratio:>8.3f} {p.viewers:>8} "
                     f"{p.frames_per_viewer:>14.1f} {p.rss_mb:>13.1f}")
    lines.append(f"rank 0 RSS change over the run: {phases[-1].rss_mb - base.rss_mb:+.1f} MB")
    return "\n".join(lines)
