"""Prometheus metrics of the service (prometheus-client, one registry per process).

Two kinds: instruments the service updates as things happen (counters and
histograms of emitted chunks, API requests, viewer traffic), and a collector
that reads the live state of the stage-0 actor at scrape time (epoch, queue
depths, drops by reason, OverlapScore), so the figures are never two copies
that drift. Every name is listed with its meaning and what to do about it in
``docs/operations.md``.
"""

from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_PERIOD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServiceMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)  # process_resident_memory_bytes etc. of rank 0
        self.chunks_emitted = Counter("ppstage_chunks_emitted", "chunks decoded and emitted by rank 0", registry=r)
        self.frames_emitted = Counter("ppstage_frames_emitted", "frames emitted by rank 0", registry=r)
        self.chunk_period = Histogram(
            "ppstage_chunk_period_seconds", "time between two emitted chunks", buckets=_PERIOD_BUCKETS, registry=r
        )
        self.stage0_seconds = Histogram(
            "ppstage_stage0_seconds", "rank 0's own time per chunk (envelope build + decode)",
            buckets=_PERIOD_BUCKETS, registry=r,
        )
        self.stage_seconds = Histogram(
            "ppstage_stage_seconds", "a generator stage's reported time per chunk", ["stage"],
            buckets=_PERIOD_BUCKETS, registry=r,
        )
        self.intents = Counter("ppstage_intents", "intents accepted through the API", ["kind"], registry=r)
        self.http_requests = Counter(
            "ppstage_http_requests", "API requests by route and status code", ["route", "code"], registry=r
        )
        self.http_in_flight = Gauge("ppstage_http_requests_in_flight", "API requests being handled", registry=r)
        self.http_seconds = Histogram("ppstage_http_request_seconds", "API request latency", ["route"], registry=r)
        self.viewers = Gauge("ppstage_viewers", "WebSocket viewers connected (in flight)", registry=r)
        self.viewer_queue_frames = Gauge(
            "ppstage_viewer_queue_frames", "frames queued for all viewers together", registry=r
        )  # a function gauge: FrameHub hands it the live count (read at scrape time)
        self.viewer_frames_sent = Counter("ppstage_viewer_frames_sent", "frames sent to viewers", registry=r)
        self.viewer_frames_dropped = Counter(
            "ppstage_viewer_frames_dropped", "frames not sent to a viewer, by reason", ["reason"], registry=r
        )
        self.viewer_disconnects = Counter(
            "ppstage_viewer_disconnects", "viewers that went away, by reason", ["reason"], registry=r
        )
        self.frames_encoded = Counter(
            "ppstage_frames_encoded", "frames encoded for viewers (once per format)", ["format"], registry=r
        )
        self.encode_seconds = Histogram(
            "ppstage_frame_encode_seconds", "time to encode one chunk's frames for viewers",
            buckets=_PERIOD_BUCKETS, registry=r,
        )

    def watch(self, live: Callable[[], dict]) -> None:
        """Expose ``live()`` (the status snapshot) at scrape time."""
        self.registry.register(_LiveState(live))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _LiveState(Collector):
    def __init__(self, live: Callable[[], dict]) -> None:
        self.live = live

    def describe(self) -> list:
        return []  # unchecked collector: names come from collect() at scrape time

    def collect(self) -> Iterator:
        s = self.live()
        gauges = {
            "ppstage_cache_epoch": ("current cache epoch (hard-cut generation)", s["cache_epoch"]),
            "ppstage_chunk_index": ("chunk_index of the last emitted chunk", s["chunk_index"]),
            "ppstage_call_id": ("call_id of the last emitted chunk", s["call_id"]),
            "ppstage_in_flight": ("chunks sent and not yet received (D_in in use)", s["queues"]["in_flight"]),
            "ppstage_decode_queue": ("results awaiting decode (D_out in use)", s["queues"]["decode_queue"]),
            "ppstage_overlap_score": ("OverlapScore over the recent window (1 = full overlap)", s["overlap_score"]),
            "ppstage_recent_period_seconds": ("median period over the recent window", _seconds(s["recent_period_ms"])),
            "ppstage_restart_generation": ("torchrun restart count of this job", s["restart_generation"]),
            "ppstage_unvalidated": ("1: R0 runs without a passing quality report (--force-unvalidated)",
                                    int(s["unvalidated"])),
            "ppstage_ready": ("1 when /readyz answers 200", int(s["ready"])),
            "ppstage_uptime_seconds": ("seconds since the service started", s["uptime_s"]),
        }
        for name, (doc, value) in gauges.items():
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], float(value if value is not None else -1))
            yield g
        dropped = CounterMetricFamily(
            "ppstage_results_dropped", "results rank 0 did not emit, by reason", labels=["reason"]
        )
        for reason, n in sorted(s["dropped"].items()):
            dropped.add_metric([reason], float(n))
        yield dropped
        mode = GaugeMetricFamily("ppstage_recompute_mode", "recompute mode in force (1 for the label)", labels=["mode"])
        mode.add_metric([s["mode"]], 1.0)
        yield mode


def _seconds(ms: float | None) -> float:
    # NaN, not 0, before the second chunk: there is no period yet, and 0 s would read as infinitely fast.
    return float("nan") if ms is None else ms / 1e3
