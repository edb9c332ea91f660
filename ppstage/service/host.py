"""``ServiceHost``: rank 0's HTTP service, in the stage-0 actor's event loop.

The host is created before the actor (it supplies the actor's frame sink and
per-chunk progress hook), started once the actor exists and stopped after the
actor has drained. It owns the aiohttp runner, the ``FrameHub`` and the
metrics; it reads the actor's state only through ``Stage0Actor.statistics``,
the planner's ``next_boundary`` and the chunk events the actor hands it.
Everything runs on the one event loop: no locks, and a request handler never
waits on the pipeline.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from typing import TYPE_CHECKING

import structlog
from aiohttp import web

from ppstage import __version__
from ppstage.distributed.supervision import restart_generation
from ppstage.observability.metrics import ChunkEvents, summarize
from ppstage.service.errors import StreamUnavailable
from ppstage.service.frames import FrameHub
from ppstage.service.metrics import ServiceMetrics
from ppstage.service.options import ServiceOptions

if TYPE_CHECKING:
    import torch

    from ppstage.config import PPStageConfig
    from ppstage.core.plan import ChunkPlan
    from ppstage.core.planner import Intent
    from ppstage.distributed.topology import Role
    from ppstage.stages.stage0 import Stage0Actor

log = structlog.get_logger("ppstage.service")


class ServiceHost:
    def __init__(self, config: "PPStageConfig", role: "Role", options: ServiceOptions) -> None:
        self.config = config
        self.role = role
        self.options = options
        self.generation = restart_generation()
        self.metrics = ServiceMetrics()
        self.actor: Stage0Actor | None = None
        self.hub = FrameHub(
            config.service, self.metrics,
            current_epoch=self._current_epoch, restart_generation=self.generation,
        )
        self.recent: deque[ChunkEvents] = deque(maxlen=config.service.status_window_chunks)
        self.last_plan: ChunkPlan | None = None
        self.chunks_emitted = 0
        self.started = time.monotonic()
        self.running = False
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.metrics.watch(self.status)

    # -- hooks the actor calls ------------------------------------------------
    def on_frames(self, plan: "ChunkPlan", pixels: "torch.Tensor") -> None:
        """The actor's output sink. Rank 0 calls it from its decode worker thread
        (the loop only orchestrates), so the frames hop onto the loop here: every
        FrameHub and metrics object is owned by the loop. ``call_soon_threadsafe``
        keeps the one decode thread's emission order."""
        if self._loop is None:
            return  # not started: nobody can watch yet
        self._loop.call_soon_threadsafe(self._publish, plan, pixels)

    def _publish(self, plan: "ChunkPlan", pixels: "torch.Tensor") -> None:
        self.last_plan = plan
        self.metrics.frames_emitted.inc(int(pixels.shape[0]))
        self.hub.publish(plan, pixels)

    def on_chunk(self, ev: ChunkEvents) -> None:
        if self.recent and ev.emitted > self.recent[-1].emitted:
            self.metrics.chunk_period.observe(ev.emitted - self.recent[-1].emitted)
        self.recent.append(ev)
        self.chunks_emitted += 1
        self.metrics.chunks_emitted.inc()
        self.metrics.stage0_seconds.observe(ev.s0)
        for stage, seconds in enumerate(ev.stage_durations, start=1):
            self.metrics.stage_seconds.labels(str(stage)).observe(seconds)

    # -- life cycle ----------------------------------------------------------
    async def start(self, actor: "Stage0Actor") -> None:
        """Bind the HTTP server (raises ``OSError`` if the port is taken)."""
        from ppstage.service.app import build_app

        self.actor = actor
        self._loop = asyncio.get_running_loop()
        self.running = True
        self._runner = web.AppRunner(build_app(self), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.options.host, self.options.port)
        try:
            await site.start()
        except OSError:
            await self._runner.cleanup()
            raise
        self.hub.start()
        for warning in self.options.warnings:
            log.warning("UNVALIDATED", warning=warning)
        log.info("serving", host=self.options.host, port=self.bound_port(), token_required=self.token_required,
                 mode=self.config.recompute.mode)

    async def stop(self) -> None:
        self.running = False
        await self.hub.close()
        if self._runner is not None:
            await asyncio.sleep(0)  # let kicked viewers' handlers run their cleanup
            await self._runner.cleanup()
        log.info("service stopped")

    def bound_port(self) -> int:
        if self._runner is None or not self._runner.addresses:
            return self.options.port
        return int(self._runner.addresses[0][1])

    @property
    def token_required(self) -> bool:
        return self.options.token is not None

    # -- control -------------------------------------------------------------
    def submit(self, intents: "list[Intent]") -> tuple[int, int]:
        """Queue intents for the next chunk boundary; returns ``(chunk_index, cache_epoch)`` there.

        Raises ``StreamUnavailable`` while draining, ``PlannerError`` for a bad
        intent (before anything is queued: every intent is checked first).
        """
        actor = self.actor
        if actor is None or not self.running or actor.statistics()["stopping"]:
            raise StreamUnavailable("the stream is not running (starting up or draining)")
        from ppstage.core.planner import Planner

        check = Planner(self.config)  # validate all first: a batch is applied whole or not at all
        for intent in intents:
            check.submit(intent)
        for intent in intents:
            actor.submit(intent)
            self.metrics.intents.labels(type(intent).__struct_config__.tag).inc()
        return actor.planner.next_boundary()

    def request_shutdown(self) -> None:
        if self.actor is not None:
            asyncio.get_running_loop().call_soon(self.actor.on_sigterm)

    # -- status --------------------------------------------------------------
    def _current_epoch(self) -> int:
        return self.actor.gate.epoch if self.actor is not None else -1

    def readiness(self) -> dict[str, bool]:
        stopping = self.actor is None or bool(self.actor.statistics()["stopping"])
        return {
            "parity_passed": self.actor is not None,  # the actor exists only after the handshake
            "warmup_done": self.chunks_emitted > 0,
            "stream_running": self.running and not stopping,
        }

    def status(self) -> dict:
        cfg = self.config
        stats = self.actor.statistics() if self.actor is not None else {}
        events = list(self.recent)
        summary = summarize(
            events, frames_per_chunk=cfg.cache.chunk_frames, max_in_flight=0, max_decode_queue=0,
            dropped={}, wall_s=0.0, warmup=0,
        )
        plan = self.last_plan
        ready = self.readiness()
        next_chunk, next_epoch = self.actor.planner.next_boundary() if self.actor is not None else (0, 0)
        return {
            "version": __version__,
            "mode": cfg.recompute.mode,
            "unvalidated": self.options.unvalidated,
            "warnings": list(self.options.warnings),
            "config_digest": cfg.digest(),
            "topology": {
                "stages": cfg.topology.stages,
                "tp": cfg.topology.tp,
                "world_size": cfg.topology.world_size,
                "layer_ranges": [list(r) for r in cfg.layer_ranges()],
                "backend": cfg.topology.backend,
            },
            "restart_generation": self.generation,
            "cache_epoch": stats.get("cache_epoch", -1),
            "chunk_index": plan.chunk_index if plan is not None else None,
            "call_id": plan.call_id if plan is not None else None,
            "next_boundary": {"chunk_index": next_chunk, "cache_epoch": next_epoch},
            "prompt": plan.prompt if plan is not None else None,
            "attention_bias": plan.kv_cache_attention_bias if plan is not None else None,
            "step_list": list(plan.denoising_step_list) if plan is not None else None,
            "chunks_emitted": self.chunks_emitted,
            "queues": {
                "in_flight": stats.get("in_flight", 0),
                "decode_queue": stats.get("decode_queue", 0),
                "d_in": cfg.runtime.d_in,
                "d_out": cfg.runtime.d_out,
                **self.hub.statistics(),
            },
            # null until two chunks are out: no period yet (never a misleading 0.0)
            "recent_period_ms": None if summary.median_period_ms is None else round(summary.median_period_ms, 3),
            "frames_per_s": round(summary.frames_per_s, 3),
            "stage0_ms": round(summary.median_s0_ms, 3),
            "stage_ms": [round(x, 3) for x in summary.stage_median_ms],
            "overlap_score": round(summary.overlap_score, 4),
            "dropped": dict(stats.get("dropped", {})),
            "ready": all(ready.values()),
            "readiness": ready,
            "uptime_s": round(time.monotonic() - self.started, 3),
            "pid": os.getpid(),
        }
