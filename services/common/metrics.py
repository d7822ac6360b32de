"""Prometheus metrics for the services (served on `ranking.metrics_port` when it is not 0)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

STAGE_SECONDS = Histogram(
    "freshrec_stage_seconds",
    "Latency of each ranking pipeline step and of the whole request.",
    ["stage"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
REQUESTS = Counter("freshrec_requests_total", "RPCs by method and outcome.", ["method", "outcome"])
DEGRADED = Counter("freshrec_degraded_total", "Answers served by a fallback.", ["reason"])
SERVING_VERSION = Gauge(
    "freshrec_serving_version_info",
    "1 for the (model, index) versions being served.",
    ["model", "index"],
)
EVENTS = Counter("freshrec_events_total", "LogEvents events by outcome/reason.", ["outcome"])


def serve_metrics(port: int) -> None:
    """Expose /metrics on `port` (a daemon thread)."""
    start_http_server(port)


def observe_swap(model: str, index: str) -> None:
    SERVING_VERSION.clear()
    SERVING_VERSION.labels(model=model, index=index).set(1)
