"""Prometheus metrics of one server, in a registry of its own (several servers can live in one
process, as in the tests): requests by endpoint and status, request latency, queue depth, batch
sizes, and the low-res cache (hits, misses, bytes, entries, low-res passes run)."""
from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class _EngineCollector:
    """Reads the engine's and the cache's counters at scrape time."""

    def __init__(self, engine, sessions):
        self.engine, self.sessions = engine, sessions

    def collect(self):
        cache = self.engine.cache
        for name, doc, value in (
                ("ps3_serve_cache_hits", "requests whose image's low-res pass was in the cache", cache.hits),
                ("ps3_serve_cache_misses", "requests whose image's low-res pass was not in the cache", cache.misses),
                ("ps3_serve_low_res_images", "images whose low-res pass this server ran", self.engine.low_res_images),
                ("ps3_serve_tokens", "tokens returned (low-res and high-res)", self.engine.tokens_encoded)):
            family = CounterMetricFamily(name, doc)
            family.add_metric([], value)
            yield family
        for name, doc, value in (("ps3_serve_cache_bytes", "bytes held by the low-res cache", cache.bytes),
                                 ("ps3_serve_cache_entries", "images in the low-res cache", len(cache)),
                                 ("ps3_serve_sessions", "live look-closer sessions", len(self.sessions))):
            family = GaugeMetricFamily(name, doc)
            family.add_metric([], value)
            yield family


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("ps3_serve_requests", "requests answered, by endpoint and HTTP status",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("ps3_serve_request_seconds", "time from a request's arrival to its answer",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("ps3_serve_batch_size", "jobs per encoder call", buckets=BATCH_BUCKETS,
                                    registry=self.registry)
        self.queue_depth = Gauge("ps3_serve_queue_depth", "requests holding a queue slot (waiting or encoding)",
                                 registry=self.registry)

    def attach(self, engine, batcher, sessions) -> None:
        self.queue_depth.set_function(lambda: batcher.slots)
        self.registry.register(_EngineCollector(engine, sessions))

    def render(self) -> bytes:
        return generate_latest(self.registry)
