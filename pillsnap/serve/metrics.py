"""Prometheus metrics of one API process: requests, errors and latency per endpoint and mode."""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)


class ApiMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()  # one per app: two apps in a process never share counts
        self.requests = Counter("pillsnap_requests", "Requests answered", ["endpoint", "mode", "status"],
                                registry=self.registry)
        self.errors = Counter("pillsnap_errors", "Requests or photos refused or failed", ["endpoint", "reason"],
                              registry=self.registry)
        self.latency = Histogram("pillsnap_request_latency_seconds", "Request latency in the server",
                                 ["endpoint", "mode"], buckets=LATENCY_BUCKETS, registry=self.registry)

    def observe(self, endpoint: str, mode: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, mode, str(status)).inc()
        self.latency.labels(endpoint, mode).observe(seconds)
        if status >= 400:
            self.errors.labels(endpoint, f"status_{status}").inc()

    def error(self, endpoint: str, reason: str) -> None:
        self.errors.labels(endpoint, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
