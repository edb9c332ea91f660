"""``ppstage serve`` end to end: real processes (gloo), a real HTTP server, real aiohttp clients.

One service (rank 0 + 2 stages, local mode, an API token) serves every test of
this module, in file order; the last one stops it with SIGTERM and expects
every rank to exit 0. Frames are compared bitwise (PNG) with the
single-process reference pipeline fed the same intents at the chunks the API
announced: an intent applied anywhere else changes the pixels.
"""

from __future__ import annotations

import asyncio
import io
import socket
import time

import aiohttp
import numpy as np
import pytest
from PIL import Image
from service_helpers import AUTH, TOKEN, metric, service_config, start_service

from ppstage.core.planner import (
    AttentionBiasChange,
    HardCut,
    Planner,
    PromptUpdate,
    StepListChange,
    StreamStart,
)
from ppstage.model.reference import ReferencePipeline
from ppstage.service.frames import unpack_frame

pytestmark = pytest.mark.timeout(240)

FIRST_PROMPT = "a lighthouse at dusk"
CONFIG = service_config(**{"service.viewer_queue_frames": 6, "service.viewer_drop_limit": 12})


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    svc = start_service(
        tmp_path_factory.mktemp("serve"), CONFIG, args=["--prompt", FIRST_PROMPT],
        env={"PPSTAGE_API_TOKEN": TOKEN},
    )
    yield svc
    svc.stop()


class FrameLog:
    """A WebSocket viewer that keeps every frame it receives, in arrival order."""

    def __init__(self) -> None:
        self.frames: list[tuple] = []  # (header, image bytes)
        self.error: BaseException | None = None

    async def follow(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        try:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    self.frames.append(unpack_frame(msg.data))
        except BaseException as exc:  # surfaced by the test, never swallowed
            self.error = exc
            raise

    def last_chunk(self) -> int:
        return self.frames[-1][0].chunk_index if self.frames else -1


async def until(cond, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def post(http, url, path, body, headers=AUTH):
    async with http.post(url + path, json=body, headers=headers) as r:
        return r.status, await r.json()


def reference(config, intents_at: dict[int, list], upto: int):
    """Reference records of chunks ``0..upto`` with ``intents_at[k]`` submitted before chunk k."""
    planner = Planner(config)
    pipeline = ReferencePipeline(config)
    records = {}
    for k in range(upto + 1):
        if k == 0:
            planner.submit(StreamStart(FIRST_PROMPT))
        for intent in intents_at.get(k, []):
            planner.submit(intent)
        records[k] = pipeline.run_chunk(planner.next_chunk())
    return records


async def test_live_intents_take_effect_at_the_announced_chunk_and_epoch(service):
    url = service.url
    viewer = FrameLog()
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(url + "/v1/frames?format=png") as ws:
            task = asyncio.ensure_future(viewer.follow(ws))
            await until(lambda: len({h.chunk_index for h, _ in viewer.frames}) >= 2, 60, "first frames")

            status, prompt = await post(http, url, "/v1/prompt", {"prompt": "a storm over the sea"})
            assert status == 200, prompt
            status, params = await post(http, url, "/v1/params", {"attention_bias": 0.6, "step_list": [1000, 500, 250]})
            assert status == 200, params
            assert params["intents"] == ["attention_bias", "step_list"]
            await until(lambda: viewer.last_chunk() > params["applies_at"]["chunk_index"], 60, "params applied")

            status, cut = await post(http, url, "/v1/cut", {})
            assert status == 200, cut
            k_cut, e_cut = cut["applies_at"]["chunk_index"], cut["applies_at"]["cache_epoch"]
            await until(lambda: viewer.last_chunk() >= k_cut + 2, 60, "frames after the cut")
            async with http.get(url + "/v1/status") as r:
                st = await r.json()
            await ws.close()
            await task

    assert viewer.error is None
    assert e_cut == prompt["applies_at"]["cache_epoch"] + 1
    assert st["cache_epoch"] == e_cut and st["chunk_index"] >= k_cut
    assert st["step_list"] == [1000, 500, 250] and st["attention_bias"] == 0.6

    # In order, never a stale epoch: (chunk, frame) strictly increasing, epochs never go back.
    keys = [(h.chunk_index, h.frame) for h, _ in viewer.frames]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    epochs = [h.cache_epoch for h, _ in viewer.frames]
    assert epochs == sorted(epochs)
    assert all((h.cache_epoch == e_cut) == (h.chunk_index >= k_cut) for h, _ in viewer.frames)

    # Bitwise: the reference, fed the same intents at the announced chunks, draws the same frames.
    intents_at: dict[int, list] = {}
    intents_at.setdefault(prompt["applies_at"]["chunk_index"], []).append(PromptUpdate("a storm over the sea"))
    intents_at.setdefault(params["applies_at"]["chunk_index"], []).extend(
        [AttentionBiasChange(0.6), StepListChange((1000, 500, 250))]
    )
    intents_at.setdefault(k_cut, []).append(HardCut())
    records = reference(CONFIG, intents_at, viewer.last_chunk())
    for header, png in viewer.frames:
        rec = records[header.chunk_index]
        assert header.cache_epoch == rec.cache_epoch
        assert header.stream_frame == rec.current_start_frame + header.frame
        got = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        want = rec.pixels[header.frame].permute(1, 2, 0).numpy()
        assert np.array_equal(got, want), f"chunk {header.chunk_index} frame {header.frame} differs"


async def test_status_and_metrics_report_the_stream(service):
    async with aiohttp.ClientSession() as http:
        async with http.get(service.url + "/v1/status") as r:
            assert r.status == 200
            assert r.headers["X-Request-Id"]
            st = await r.json()
        assert st["mode"] == "r0a" and st["topology"]["stages"] == 2 and st["topology"]["world_size"] == 3
        assert st["restart_generation"] == 0 and st["ready"] is True and not st["unvalidated"]
        assert st["chunks_emitted"] > 0 and st["recent_period_ms"] > 0 and len(st["stage_ms"]) == 2
        assert set(st["queues"]) >= {"in_flight", "decode_queue", "viewers", "d_in", "d_out"}
        for key in ("cache_epoch", "chunk_index", "call_id", "overlap_score", "dropped", "uptime_s"):
            assert key in st
        emitted = await metric(http, service.url, "ppstage_chunks_emitted_total")
        assert emitted is not None and emitted >= st["chunks_emitted"]
        assert await metric(http, service.url, "ppstage_ready") == 1.0
        assert await metric(http, service.url, "ppstage_unvalidated") == 0.0
        assert await metric(http, service.url, "ppstage_recompute_mode", 'mode="r0a"') == 1.0
        assert await metric(http, service.url, "ppstage_cache_epoch") == st["cache_epoch"]
        assert (await metric(http, service.url, "process_resident_memory_bytes") or 0) > 0
        async with http.get(service.url + "/") as r:
            assert r.status == 200 and "/v1/frames" in await r.text()
        async with http.get(service.url + "/healthz") as r:
            assert r.status == 200


BAD_REQUESTS = [
    # (path, raw body, headers, status, error code, field)
    ("/v1/prompt", b"{not json", AUTH, 400, "invalid_json", None),
    ("/v1/prompt", b'{"prompt": 7}', AUTH, 422, "invalid_field", "prompt"),
    ("/v1/prompt", b'{"prompt": ""}', AUTH, 422, "invalid_field", "prompt"),
    ("/v1/prompt", b"{}", AUTH, 422, "invalid_field", "prompt"),
    ("/v1/prompt", b'{"prompt": "x", "promt": "y"}', AUTH, 422, "invalid_field", "promt"),
    ("/v1/params", b'{"attention_bias": "high"}', AUTH, 422, "invalid_field", "attention_bias"),
    ("/v1/params", b'{"step_list": [1000, 0]}', AUTH, 422, "invalid_field", "step_list[1]"),
    ("/v1/params", b'{"step_list": [250, 500]}', AUTH, 422, "invalid_field", "step_list"),
    ("/v1/params", b"{}", AUTH, 422, "invalid_field", "attention_bias"),
    ("/v1/cut", b'{"scene": 2}', AUTH, 422, "invalid_field", "scene"),
    ("/v1/cut", b"[]", AUTH, 422, "invalid_field", None),
    ("/v1/prompt", b'{"prompt": "' + b"x" * 20000 + b'"}', AUTH, 413, "body_too_large", None),
    ("/v1/prompt", b'{"prompt": "a"}', {}, 401, "unauthorized", "Authorization"),
    ("/v1/cut", b"{}", {"Authorization": "Bearer wrong"}, 401, "unauthorized", "Authorization"),
    ("/v1/shutdown", b"{}", {"Authorization": "Basic " + TOKEN}, 401, "unauthorized", "Authorization"),
    ("/v1/nothing", b"{}", AUTH, 404, "not_found", None),
]


async def test_bad_input_is_refused_naming_the_problem_and_the_stream_goes_on(service):
    async with aiohttp.ClientSession() as http:
        async with http.get(service.url + "/v1/status") as r:
            before = await r.json()
        for path, body, headers, status, error, field in BAD_REQUESTS:
            async with http.post(service.url + path, data=body,
                                 headers={"Content-Type": "application/json", **headers}) as r:
                got = await r.json()
                assert (r.status, got["error"], got["field"]) == (status, error, field), (path, body[:60], got)
                assert got["detail"] and got["request_id"] == r.headers["X-Request-Id"]
        async with http.get(service.url + "/v1/cut") as r:
            assert r.status == 405
        async with http.get(service.url + "/v1/frames?format=gif") as r:
            assert r.status == 400 and (await r.json())["field"] == "format"
        # The stream is unaffected: still ready, same epoch, still emitting.
        await asyncio.sleep(0.5)
        async with http.get(service.url + "/v1/status") as r:
            after = await r.json()
        assert after["ready"] and after["cache_epoch"] == before["cache_epoch"]
        assert after["chunks_emitted"] > before["chunks_emitted"]


def _stalled_viewer(url: str) -> socket.socket:
    """A WebSocket client that completes the handshake and then never reads (tiny receive buffer)."""
    host, port = url.removeprefix("http://").split(":")
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect((host, int(port)))
    s.sendall(
        b"GET /v1/frames?format=png HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return s


async def test_slow_and_vanishing_viewers_are_cleaned_up_and_counted(service):
    url = service.url
    async with aiohttp.ClientSession() as http:
        slow_before = await metric(http, url, "ppstage_viewer_disconnects_total", 'reason="slow"') or 0.0
        stalled = _stalled_viewer(url)
        try:
            # 200 viewers that vanish mid-stream: half close politely, half just drop the connection.
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=connector) as crowd:
                sockets = await asyncio.gather(*(crowd.ws_connect(url + "/v1/frames") for _ in range(200)))
                await asyncio.gather(*(ws.receive(timeout=30) for ws in sockets[:20]))
                assert await metric(http, url, "ppstage_viewers") >= 200
                for i, ws in enumerate(sockets):
                    if i % 2:
                        await ws.close()
                    else:
                        ws._response.connection.transport.abort()  # vanished: no close frame
            # The stalled viewer loses frames, then is disconnected as slow.
            end = time.monotonic() + 90
            while (await metric(http, url, "ppstage_viewer_disconnects_total", 'reason="slow"') or 0) <= slow_before:
                assert time.monotonic() < end, "the stalled viewer was never disconnected"
                await asyncio.sleep(0.3)
            assert (await metric(http, url, "ppstage_viewer_frames_dropped_total", 'reason="slow_viewer"') or 0) > 0
        finally:
            stalled.close()
        end = time.monotonic() + 30
        while True:
            viewers = await metric(http, url, "ppstage_viewers")
            in_flight = await metric(http, url, "ppstage_http_requests_in_flight")
            queued = await metric(http, url, "ppstage_viewer_queue_frames")
            if (viewers, in_flight, queued) == (0.0, 1.0, 0.0):  # 1: this scrape itself
                break
            assert time.monotonic() < end, f"viewers {viewers}, requests in flight {in_flight}, queued {queued}"
            await asyncio.sleep(0.3)
        async with http.get(url + "/readyz") as r:
            assert r.status == 200


def test_sigterm_drains_and_every_rank_exits_0(service):
    assert service.alive()
    assert service.stop() == 0, service.output()
    assert "every rank exited 0" in service.log.read_text()
