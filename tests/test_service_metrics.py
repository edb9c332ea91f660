"""``/metrics`` through a real aiohttp server over the service's own app and ``FrameHub``.

No pipeline: the host has no actor, and chunks are handed to it the way the
actor's sink does. What a scrape shows must be the live state at scrape time,
never a value left over from the last fan-out.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
import torch
from aiohttp.test_utils import TestServer
from service_helpers import metric

from ppstage.config import PPStageConfig
from ppstage.core.planner import Planner, StreamStart
from ppstage.service.app import build_app
from ppstage.service.frames import unpack_frame
from ppstage.service.host import ServiceHost
from ppstage.service.options import ServiceOptions

pytestmark = pytest.mark.timeout(60)


async def _until(cond, what: str, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not await cond():
        assert loop.time() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_viewer_queue_gauge_reads_the_live_queues_at_scrape_time():
    config = PPStageConfig()
    host = ServiceHost(config, role=None, options=ServiceOptions())  # type: ignore[arg-type]
    planner = Planner(config)
    planner.submit(StreamStart("a lighthouse at dusk"))
    frames = 3
    pixels = torch.randint(0, 256, (frames, 3, 8, 8), dtype=torch.uint8)
    server = TestServer(build_app(host))
    await server.start_server()
    host.hub.start()
    url = str(server.make_url("")).rstrip("/")
    try:
        async with aiohttp.ClientSession() as http:
            # A viewer that reads: every frame reaches it, so nothing stays queued.
            async with http.ws_connect(url + "/v1/frames?format=png") as ws:
                await _until(lambda: _true(len(host.hub.viewers) == 1), "the viewer to attach")
                host._publish(planner.next_chunk(), pixels)
                got = [unpack_frame((await ws.receive(timeout=10)).data)[0] for _ in range(frames)]
                assert [h.frame for h in got] == list(range(frames))
                assert await metric(http, url, "ppstage_viewer_queue_frames") == 0.0

            # A viewer that does not read (attached, never pumped): its frames stay queued ...
            await _until(lambda: _true(not host.hub.viewers), "the first viewer to detach")
            stalled = host.hub.attach("png")
            host._publish(planner.next_chunk(), pixels)
            await _until(lambda: _true(len(stalled.queue) == frames), "frames queued for the stalled viewer")
            assert await metric(http, url, "ppstage_viewer_queue_frames") == float(frames)
            # ... until it goes away, and the next scrape says so without another chunk.
            host.hub.detach(stalled, "client_closed")
            assert await metric(http, url, "ppstage_viewer_queue_frames") == 0.0
    finally:
        await host.hub.close()
        await server.close()


async def _true(value: bool) -> bool:
    return value
