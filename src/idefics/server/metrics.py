"""Prometheus metrics of one server, in a registry of its own (several apps in one process do not collide)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
STEP = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


class ImageCache:
    """The engine's image cache counters, read when scraped."""

    def __init__(self, encoder):
        self.encoder = encoder

    def collect(self):
        hits = CounterMetricFamily("idefics_image_cache_hits", "images found already encoded")
        hits.add_metric([], self.encoder.hits)
        misses = CounterMetricFamily("idefics_image_cache_misses", "images encoded")
        misses.add_metric([], self.encoder.misses)
        return [hits, misses]


class Metrics:
    def __init__(self, model, in_flight):
        r = self.registry = CollectorRegistry()
        s = model.scheduler
        self.requests = Counter("idefics_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        Gauge("idefics_queue_depth", "requests waiting for a slot", registry=r).set_function(lambda: len(s.waiting))
        Gauge("idefics_running", "requests decoding", registry=r).set_function(lambda: len(s.running))
        Gauge("idefics_in_flight", "choices admitted and not finished", registry=r).set_function(in_flight)
        self.ttft = Histogram("idefics_time_to_first_token_seconds", "arrival to first token", buckets=LATENCY,
                              registry=r)
        self.inter_token = Histogram("idefics_inter_token_seconds", "between two tokens of a choice", buckets=STEP,
                                     registry=r)
        self.e2e = Histogram("idefics_request_seconds", "arrival to the last token", buckets=LATENCY, registry=r)
        self.tokens_in = Counter("idefics_prompt_tokens", "prompt tokens", registry=r)
        self.tokens_out = Counter("idefics_generated_tokens", "generated tokens", registry=r)
        r.register(ImageCache(model.engine.encoder))

    def render(self) -> bytes:
        return generate_latest(self.registry)
