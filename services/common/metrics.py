"""Prometheus metrics for the services (served on `ranking.metrics_port` when it is not 0)."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from services.common import prometheus_mode

prometheus_mode.install()  # before any metric exists: see services/common/prometheus_mode.py

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server  # noqa: E402
from prometheus_client.core import HistogramMetricFamily  # noqa: E402
from prometheus_client.registry import Collector  # noqa: E402
from prometheus_client.utils import floatToGoString  # noqa: E402


class ArrayHistogram(Collector):
    """A label-less Prometheus histogram that takes a whole array per `observe`.

    prometheus_client's `Histogram.observe` takes one value under a lock: ~2 µs a value,
    ~0.14 ms for one answer's ~70 relevance scores, on the request thread (measured on the
    2-core EPYC). Here one answer is one `np.searchsorted` + `np.bincount` into numpy counts
    (~5 µs), exposed in the same exposition format (`_bucket{le}`, `_count`, `_sum`).
    """

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]) -> None:
        bounds = [float(b) for b in buckets]
        if bounds != sorted(bounds) or len(set(bounds)) != len(bounds):
            raise ValueError(f"buckets must be strictly increasing, got {bounds}")
        if bounds[-1] != float("inf"):
            bounds.append(float("inf"))
        self.name = name
        self.documentation = documentation
        self._bounds = np.asarray(bounds)
        self._counts = np.zeros(len(bounds), dtype=np.int64)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, values: Iterable[float] | np.ndarray) -> None:
        """Add every finite value of `values` (NaN and infinities are dropped: they carry no
        relevance and would poison `_sum`)."""
        x = np.asarray(values, dtype=np.float64).ravel()
        x = x[np.isfinite(x)]
        if not len(x):
            return
        # Prometheus buckets are cumulative upper bounds (value <= le): side="left".
        counts = np.bincount(
            np.searchsorted(self._bounds, x, side="left"), minlength=len(self._bounds)
        )
        total = float(x.sum())
        with self._lock:
            self._counts += counts
            self._sum += total

    def collect(self) -> Iterator[HistogramMetricFamily]:
        with self._lock:
            cumulative = np.cumsum(self._counts)
            total = self._sum
        family = HistogramMetricFamily(self.name, self.documentation)
        family.add_metric(
            [],
            [
                (floatToGoString(float(b)), float(c))
                for b, c in zip(self._bounds, cumulative, strict=True)
            ],
            total,
        )
        yield family


STAGE_SECONDS = Histogram(
    "freshrec_stage_seconds",
    "Latency of each ranking pipeline step and of the whole request.",
    ["stage"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
REQUESTS = Counter("freshrec_requests_total", "RPCs by method and outcome.", ["method", "outcome"])
DEGRADED = Counter("freshrec_degraded_total", "Answers served by a fallback.", ["reason"])
COLD_START = Counter(
    "freshrec_cold_start_answers_total",
    "Recommend answers for users the online store holds no profile for (popular items). Its "
    "share of all answers near 1 means the store lost its profiles (a Redis restart without "
    "persistence): run `freshrec materialize --full`.",
)
SERVING_VERSION = Gauge(
    "freshrec_serving_version_info",
    "1 for the (model, index) versions being served.",
    ["model", "index"],
)
USER_STATES_PREPARED = Counter(
    "freshrec_user_states_prepared_total",
    "User sides of the re-ranker computed after LogEvents changed a profile, ahead of that "
    "user's next Recommend (`ranking.prepare_user_states`): with it, that request finds its "
    "user side cached (freshrec_user_state_cache_hit_rate).",
)
MODEL_LOADS = Counter(
    "freshrec_model_loads_total",
    "New versions the ranking service verified and loaded, by kind and outcome: ok (then "
    "served), refused (failed its hash or did not load: never retried, the serving one stays), "
    "failed (the registry could not be read: retried at the next poll).",
    ["kind", "outcome"],
)
MODEL_LOAD_SECONDS = Histogram(
    "freshrec_model_load_seconds",
    "Wall time of each successful load: verify, read, and prepare the item states (seconds "
    "when they are shared, minutes when computed, longer at ranking.load_nice under full load).",
    ["kind"],
    buckets=(0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0),
)
MODEL_LOAD_STARTED = Gauge(
    "freshrec_model_load_started_seconds",
    "Unix time the load of a new version of this kind began; 0 while none is loading "
    "(alert on time() - this when it is above 0).",
    ["kind"],
)
EVENTS = Counter("freshrec_events_total", "LogEvents events by outcome/reason.", ["outcome"])
SERVED_RELEVANCE = ArrayHistogram(
    "freshrec_served_relevance",
    "Relevance of every candidate the re-ranker scored for a Recommend answer.",
    buckets=tuple(round(0.1 * i, 1) for i in range(1, 11)),
)
REGISTRY.register(SERVED_RELEVANCE)


# The split re-ranker's caches (model/reranker.py), read from the serving version at scrape time.
USER_STATE_CACHE_HIT_RATE = Gauge(
    "freshrec_user_state_cache_hit_rate",
    "Share of re-ranks that found the user side cached, since the serving version loaded.",
)
SCORE_CACHE_HIT_RATE = Gauge(
    "freshrec_score_cache_hit_rate",
    "Share of re-ranks answered from cached logits (same user context, same item texts) "
    "without a forward pass, since the serving version loaded.",
)
ITEM_FEATURE_CACHE_HIT_RATE = Gauge(
    "freshrec_item_feature_cache_hit_rate",
    "Share of item feature reads served from the ranking process's item cache "
    "(`ranking.item_cache_seconds`) instead of Redis, since the process started.",
)
GC_PAUSE_SECONDS = Histogram(
    "freshrec_gc_pause_seconds",
    "Python's cyclic garbage collections by generation: how long each held the interpreter "
    "(no request moves meanwhile; services/common/heap.py).",
    ["generation"],
    buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
ITEM_STATES_CACHED = Gauge(
    "freshrec_item_states_cached", "Items whose re-ranker item side is cached (serving version)."
)
ITEM_STATE_BYTES = Gauge(
    "freshrec_item_state_bytes",
    "Memory the serving version's cached item-side states take, in bytes.",
)
ITEM_STATES_READ = Gauge(
    "freshrec_item_states_read",
    "Item-side states the serving version read from disk (its item side's snapshot) instead "
    "of computing them, since it loaded.",
)
CATALOG_OVERLAY = Gauge(
    "freshrec_catalog_overlay_items",
    "Catalogue changes the serving index searches beside its FAISS base: items added or "
    "changed (searched exactly on every request) and base items hidden (each widens every "
    "FAISS search), since the base's catalogue position; `freshrec index-rebuild` folds them in.",
    ["part"],
)
CATALOG_STREAM_GAP = Gauge(
    "freshrec_catalog_stream_gap",
    "1 while the serving index lacks catalogue changes the change stream no longer gives this "
    "replica (trimmed, or lost by Redis): they are missing from its recall until an index "
    "from `freshrec index-rebuild` folds them in; else 0.",
)

# The updater (served on `updater.metrics_port` when it is not 0).
UPDATES = Counter("freshrec_updates_total", "Update jobs by final state.", ["state"])
UPDATE_SECONDS = Histogram(
    "freshrec_update_seconds",
    "Wall time of update jobs (fine-tune, gate, publish).",
    buckets=(5, 15, 30, 60, 120, 300, 600, 1200, 3600),
)
DRIFT_SIGNAL = Gauge("freshrec_drift_signal", "Latest drift signals of the updater.", ["signal"])
CHAMPION_INFO = Gauge("freshrec_champion_info", "1 for the re-ranker champion.", ["version"])


def watch_reranker_caches(current: Callable[[], Any]) -> None:
    """Point the cache gauges at `current()` (the serving re-ranker), read at scrape time."""

    def hit_rate() -> float:
        reranker = current()
        total = reranker.user_cache_hits + reranker.user_cache_misses
        return reranker.user_cache_hits / total if total else 0.0

    def score_hit_rate() -> float:
        reranker = current()
        total = reranker.score_cache_hits + reranker.score_cache_misses
        return reranker.score_cache_hits / total if total else 0.0

    USER_STATE_CACHE_HIT_RATE.set_function(hit_rate)
    SCORE_CACHE_HIT_RATE.set_function(score_hit_rate)
    ITEM_STATES_CACHED.set_function(lambda: float(current().cached_items()))
    ITEM_STATE_BYTES.set_function(lambda: float(current().item_state_bytes()))
    ITEM_STATES_READ.set_function(lambda: float(current().item_states_read))


def watch_index(current: Callable[[], Any]) -> None:
    """Point the overlay gauge at `current()` (the serving RecallIndex), read at scrape time."""
    CATALOG_OVERLAY.labels(part="searched").set_function(lambda: float(len(current().overlay_ids)))
    CATALOG_OVERLAY.labels(part="hidden").set_function(lambda: float(len(current().removed)))


def watch_catalog_follower(follower: Any) -> None:
    """Point the stream-gap gauge at `follower` (the replica's ChangeFollower), read at scrape
    time."""
    CATALOG_STREAM_GAP.set_function(lambda: float(follower.missing))


def watch_item_feature_cache(reader: Any) -> None:
    """Point the item-feature cache gauge at `reader` (a RedisFeatureReader), read at scrape
    time."""
    ITEM_FEATURE_CACHE_HIT_RATE.set_function(lambda: float(reader.item_cache_hit_rate))


_gc_watched: list[bool] = []


def watch_gc_pauses() -> None:
    """Time every garbage collection of this process into GC_PAUSE_SECONDS (once a process,
    however many services it starts)."""
    from services.common.heap import watch_pauses

    if _gc_watched:
        return
    _gc_watched.append(True)
    by_generation = [GC_PAUSE_SECONDS.labels(generation=str(g)) for g in range(3)]
    watch_pauses(lambda generation, seconds: by_generation[generation].observe(seconds))


def observe_update(state: str, seconds: float, champion: str) -> None:
    UPDATES.labels(state=state).inc()
    UPDATE_SECONDS.observe(seconds)
    if champion:
        CHAMPION_INFO.clear()
        CHAMPION_INFO.labels(version=champion).set(1)


def observe_signals(signals: Mapping[str, float]) -> None:
    for name, value in signals.items():
        DRIFT_SIGNAL.labels(signal=name).set(value)


def serve_metrics(port: int) -> None:
    """Expose /metrics on `port` (a daemon thread)."""
    start_http_server(port)


@functools.lru_cache(maxsize=64)
def stage_seconds(stage: str) -> Any:
    """STAGE_SECONDS' child for `stage`, resolved once: `labels()` takes a lock and builds a
    key each call (~2 µs; five stages a request)."""
    return STAGE_SECONDS.labels(stage=stage)


def observe_relevance(relevance: Iterable[float] | np.ndarray) -> None:
    """Add one answer's re-ranked relevance scores to SERVED_RELEVANCE."""
    SERVED_RELEVANCE.observe(relevance)


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
