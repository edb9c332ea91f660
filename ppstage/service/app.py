"""The HTTP API's routes (aiohttp), thin over ``ServiceHost``.

| route | what |
|---|---|
| ``GET /`` | the viewer page (``static/viewer.html``) |
| ``GET /healthz``, ``GET /readyz`` | alive; ready = parity passed, warm-up chunk done, stream running |
| ``GET /v1/status`` | the status snapshot (JSON) |
| ``POST /v1/prompt``, ``/v1/cut``, ``/v1/params`` | intents for the next chunk boundary |
| ``POST /v1/shutdown`` | drain and exit 0, as SIGTERM |
| ``GET /v1/frames`` | WebSocket: every emitted frame (``?format=jpeg|png``) |
| ``GET /metrics`` | Prometheus exposition |

Every request gets a request id (``X-Request-Id``: the client's if it sent a
sane one, else a fresh one), bound to every log line of its handler and
returned in the response. Errors are JSON ``ApiError`` bodies with a stable
code and the offending field. POSTs need ``Authorization: Bearer <token>``
whenever the service has a token (always, off loopback).
"""

from __future__ import annotations

import asyncio
import hmac
import re
import time
import uuid
from importlib import resources
from typing import TYPE_CHECKING

import msgspec
import structlog
from aiohttp import WSMsgType, web

from ppstage.core.planner import (
    AttentionBiasChange,
    HardCut,
    PlannerError,
    PromptUpdate,
    StepListChange,
)
from ppstage.service.errors import StreamUnavailable
from ppstage.service.frames import FORMATS
from ppstage.service.metrics import CONTENT_TYPE
from ppstage.service.schemas import (
    ApiError,
    AppliesAt,
    BadRequest,
    CutRequest,
    IntentAccepted,
    ParamsRequest,
    PromptRequest,
    decode_body,
)

if TYPE_CHECKING:
    from ppstage.service.host import ServiceHost

log = structlog.get_logger("ppstage.service.api")

HOST: web.AppKey[ServiceHost] = web.AppKey("host")
REQUEST_ID: web.RequestKey[str] = web.RequestKey("request_id", str)
_SANE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_WS_HEARTBEAT_S = 20.0


def build_app(host: ServiceHost) -> web.Application:
    app = web.Application(
        middlewares=[_request_context, _authorize],
        client_max_size=host.config.service.max_body_bytes,
    )
    app[HOST] = host
    app.router.add_get("/", viewer_page)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/status", status)
    app.router.add_post("/v1/prompt", post_prompt)
    app.router.add_post("/v1/cut", post_cut)
    app.router.add_post("/v1/params", post_params)
    app.router.add_post("/v1/shutdown", post_shutdown)
    app.router.add_get("/v1/frames", frames)
    return app


# -- middlewares ---------------------------------------------------------------
def _json(obj: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=msgspec.json.encode(obj), status=status, content_type="application/json",
                        headers=headers)


def _error(request: web.Request, status: int, error: str, detail: str, field: str | None = None,
           headers: dict[str, str] | None = None) -> web.Response:
    body = ApiError(error=error, detail=detail, field=field, request_id=request.get(REQUEST_ID))
    return _json(body, status, headers)


@web.middleware
async def _request_context(request: web.Request, handler) -> web.StreamResponse:
    supplied = request.headers.get("X-Request-Id", "")
    rid = supplied if _SANE_ID.match(supplied) else uuid.uuid4().hex[:16]
    request[REQUEST_ID] = rid
    host = request.app[HOST]
    route = request.match_info.route.resource
    label = route.canonical if route is not None else "unmatched"
    t0 = time.perf_counter()
    host.metrics.http_in_flight.inc()
    with structlog.contextvars.bound_contextvars(request_id=rid):
        try:
            try:
                response = await handler(request)
            except BadRequest as exc:
                response = _error(request, exc.status, exc.error, exc.detail, exc.field)
            except web.HTTPRequestEntityTooLarge:
                limit = host.config.service.max_body_bytes
                response = _error(request, 413, "body_too_large", f"request body exceeds {limit} bytes")
            except web.HTTPException as exc:  # 404, 405, ...: JSON like every other error
                response = _error(request, exc.status, exc.reason.lower().replace(" ", "_"), exc.reason,
                                  headers={k: v for k, v in exc.headers.items() if k == "Allow"})
            except Exception as exc:  # a bug: answer 500 with the request id, keep serving
                log.exception("api handler failed")
                response = _error(request, 500, "internal", f"{type(exc).__name__}: {exc}")
        finally:
            host.metrics.http_in_flight.dec()
        seconds = time.perf_counter() - t0
        host.metrics.http_requests.labels(label, str(response.status)).inc()
        host.metrics.http_seconds.labels(label).observe(seconds)
        if not isinstance(response, web.WebSocketResponse):
            response.headers["X-Request-Id"] = rid
        log.info("api request", method=request.method, path=request.path, status=response.status,
                 ms=round(1e3 * seconds, 2), remote=request.remote)
    return response


@web.middleware
async def _authorize(request: web.Request, handler) -> web.StreamResponse:
    host = request.app[HOST]
    if request.method == "POST" and host.token_required:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        token = host.options.token or ""
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            return _error(request, 401, "unauthorized",
                          "this call needs 'Authorization: Bearer <token>' (the service's API token)",
                          field="Authorization", headers={"WWW-Authenticate": "Bearer"})
    return await handler(request)


# -- read-only -------------------------------------------------------------------
async def viewer_page(request: web.Request) -> web.Response:
    html = resources.files("ppstage.service").joinpath("static/viewer.html").read_bytes()
    return web.Response(body=html, content_type="text/html", charset="utf-8")


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    checks = request.app[HOST].readiness()
    ok = all(checks.values())
    return _json({"ready": ok, **checks}, 200 if ok else 503)


async def status(request: web.Request) -> web.Response:
    return _json(request.app[HOST].status())


async def metrics(request: web.Request) -> web.Response:
    body = request.app[HOST].metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


# -- intents ---------------------------------------------------------------------
async def _body(request: web.Request, type_: type):
    limit = request.app[HOST].config.service.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise BadRequest(413, "body_too_large", f"request body of {request.content_length} bytes exceeds {limit}")
    return decode_body(await request.read(), type_)


def _accepted(request: web.Request, intents: list) -> web.Response:
    host = request.app[HOST]
    try:
        chunk_index, epoch = host.submit(intents)
    except StreamUnavailable as exc:
        return _error(request, 503, "not_running", str(exc))
    except PlannerError as exc:
        field = "step_list" if any(isinstance(i, StepListChange) for i in intents) else None
        return _error(request, 422, "invalid_field", str(exc), field)
    kinds = [type(i).__struct_config__.tag for i in intents]
    log.info("intent accepted", intents=kinds, applies_at_chunk=chunk_index, applies_at_epoch=epoch)
    return _json(IntentAccepted(
        request_id=request[REQUEST_ID],
        intents=kinds,  # type: ignore[arg-type]
        applies_at=AppliesAt(chunk_index=chunk_index, cache_epoch=epoch, restart_generation=host.generation),
    ))


async def post_prompt(request: web.Request) -> web.Response:
    body: PromptRequest = await _body(request, PromptRequest)
    return _accepted(request, [PromptUpdate(body.prompt)])


async def post_cut(request: web.Request) -> web.Response:
    body: CutRequest = await _body(request, CutRequest)
    intents: list = [HardCut()]
    if body.prompt is not None:
        intents.append(PromptUpdate(body.prompt))
    return _accepted(request, intents)


async def post_params(request: web.Request) -> web.Response:
    body: ParamsRequest = await _body(request, ParamsRequest)
    intents: list = []
    if body.attention_bias is not None:
        intents.append(AttentionBiasChange(body.attention_bias))
    if body.step_list is not None:
        intents.append(StepListChange(tuple(body.step_list)))
    if not intents:
        raise BadRequest(422, "invalid_field", "give attention_bias and/or step_list", "attention_bias")
    return _accepted(request, intents)


class _Empty(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


async def post_shutdown(request: web.Request) -> web.Response:
    await _body(request, _Empty)
    log.warning("shutdown requested through the API")
    request.app[HOST].request_shutdown()
    return _json({"draining": True, "request_id": request[REQUEST_ID]}, 202)


# -- frames ------------------------------------------------------------------------
async def frames(request: web.Request) -> web.StreamResponse:
    host = request.app[HOST]
    fmt = request.query.get("format", "jpeg")
    if fmt not in FORMATS:
        raise BadRequest(400, "invalid_field", f"format must be one of {', '.join(FORMATS)}, got {fmt!r}", "format")
    if not host.hub.has_room():
        return _error(request, 503, "too_many_viewers", f"{host.config.service.max_viewers} viewers connected")
    ws = web.WebSocketResponse(heartbeat=_WS_HEARTBEAT_S, max_msg_size=4096)
    await ws.prepare(request)
    viewer = host.hub.attach(fmt)  # type: ignore[arg-type]
    log.info("viewer connected", viewer=viewer.id, format=fmt)
    pump = asyncio.ensure_future(host.hub.pump(viewer, ws.send_bytes))
    reader = asyncio.ensure_future(_read_until_closed(ws))
    gone = asyncio.ensure_future(viewer.gone.wait())
    reason = "error"
    try:
        done, _ = await asyncio.wait({pump, reader, gone}, return_when=asyncio.FIRST_COMPLETED)
        if pump in done:
            reason = pump.result() if pump.exception() is None else "error"
        elif gone in done:
            reason = viewer.kicked or "error"
        else:
            reason = "client_closed"
    finally:
        for t in (pump, reader, gone):
            t.cancel()
        host.hub.detach(viewer, reason)
        log.info("viewer gone", viewer=viewer.id, reason=reason, sent=viewer.sent, dropped=viewer.dropped)
        await _close(request, ws, reason)
    return ws


async def _read_until_closed(ws: web.WebSocketResponse) -> None:
    async for msg in ws:  # viewers send nothing we act on; reading notices a close or an error
        if msg.type in (WSMsgType.ERROR, WSMsgType.CLOSE):
            break


async def _close(request: web.Request, ws: web.WebSocketResponse, reason: str) -> None:
    if ws.closed:
        return
    code = {"shutdown": 1001, "slow": 1008, "send_timeout": 1008}.get(reason, 1000)
    try:
        await asyncio.wait_for(ws.close(code=code, message=reason.encode()), 1.0)
    except (asyncio.TimeoutError, ConnectionError, RuntimeError):
        # A viewer that stopped reading has full socket buffers: even the close
        # frame cannot go out. Drop the connection instead of waiting on it.
        transport = request.transport
        if transport is not None:
            transport.abort()
