"""Prometheus metrics for the services (served on `ranking.metrics_port` when it is not 0)."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server

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
SERVED_RELEVANCE = Histogram(
    "freshrec_served_relevance",
    "Relevance of every candidate the re-ranker scored for a Recommend answer.",
    buckets=tuple(round(0.1 * i, 1) for i in range(1, 11)),
)


def serve_metrics(port: int) -> None:
    """Expose /metrics on `port` (a daemon thread)."""
    start_http_server(port)


def observe_relevance(relevance: Iterable[float]) -> None:
    """Add one answer's re-ranked relevance scores to SERVED_RELEVANCE."""
    for value in relevance:
        SERVED_RELEVANCE.observe(float(value))


def observe_swap(model: str, index: str) -> None:
    SERVING_VERSION.clear()
    SERVING_VERSION.labels(model=model, index=index).set(1)


# The event spool (services/ingestion/spool.py): events in while Redis is unreachable, and out
# by outcome once it answers: delivered, duplicate (seen before the outage), failed (set aside).
SPOOL_EVENTS = Counter(
    "freshrec_spool_events_total", "Events through the LogEvents spool.", ["direction"]
)
FEATURES_AVAILABLE = Gauge(
    "freshrec_features_available", "1 while the online feature store answers, else 0."
)


def spool_counts() -> dict[str, int]:
    """{"in": n, "delivered": n, "duplicate": n, "failed": n} since the process started."""
    return {
        direction: int(
            REGISTRY.get_sample_value("freshrec_spool_events_total", {"direction": direction}) or 0
        )
        for direction in ("in", "delivered", "duplicate", "failed")
    }
