"""Wires the ranking service: feature store, dedup, offline log, models; then serves gRPC.

`build_ranking` connects everything, loads the champion versions, warms the re-ranker with one
real request, and only then reports SERVING.

Redis outages: feature reads go through a `CachingFeatureReader` with a circuit breaker, events
that cannot reach Redis go to the spool (`<workdir>/spool/`), and a watcher thread probes the
store and delivers the spool once it answers. Health: the server ("") and the RankingService
name stay SERVING during an outage (the process answers, degraded; restarting it would not
help), while `FEATURES_HEALTH_NAME` reports NOT_SERVING until the store answers again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from grpc_health.v1 import health_pb2

from freshrec.config import FreshRecConfig
from freshrec.errors import FailedPrecondition
from freshrec.v1 import catalog_pb2, catalog_pb2_grpc, ranking_pb2, ranking_pb2_grpc
from model.embeddings import TextEncoder
from model.index import RecallIndex
from model.item_state_snapshot import ItemStateSnapshot
from model.reranker import CrossEncoderReranker
from model.text import ranking_item_text
from services.catalog.apply import apply_changes
from services.catalog.changes import (
    ChangeFollower,
    ChangeStream,
    InMemoryChangeStream,
    RedisChangeStream,
)
from services.catalog.servicer import CatalogServicer
from services.common import metrics
from services.common.auth import server_credentials
from services.common.breaker import CircuitBreaker
from services.common.heap import freeze_heap, full_collections_deferred
from services.common.memory import release_free_heap
from services.common.privacy import pseudonymizer
from services.common.served_scores import SERVED_SCORES_DIR, ServedScoreLog
from services.common.server import ServerHandle, create_server
from services.features.caching import CachingFeatureReader
from services.features.feast_store import FeastFeatureStore
from services.features.profiles import iter_item_records
from services.features.reader import FeatureReader
from services.features.redis_reader import RedisFeatureReader
from services.features.store import ITEM_FEATURES_TABLE
from services.ingestion.dedup import RedisDeduplicator, SqliteDeduplicator
from services.ingestion.hygiene import EventHygiene
from services.ingestion.ledger import REJECTIONS_FILE, RejectionLedger
from services.ingestion.offline_log import OfflineEventLog
from services.ingestion.pipeline import EventIngestor
from services.ingestion.spool import EventSpool
from services.jobs.bootstrap import read_online_store_choice
from services.ranking.batching import RerankBatcher
from services.ranking.compute import TorchWorker, WorkerEncoder, in_passing_thread
from services.ranking.models import ModelHolder
from services.ranking.pipeline import (
    PipelineSettings,
    RankingPipeline,
    RecommendInput,
    ServingModels,
)
from services.ranking.servicer import RankingServicer
from services.ranking.user_prepare import UserSidePreparer
from services.registry import open_registry

log = logging.getLogger(__name__)

# A load that read a snapshot writes a new one when it computed at least this share of its
# warm set (texts changed or new since): writing ~2 GiB at every restart for a few changed
# texts would cost more than computing them again at the next.
SNAPSHOT_REWRITE = 0.05
SERVICE_NAME = ranking_pb2.DESCRIPTOR.services_by_name["RankingService"].full_name
CATALOG_SERVICE_NAME = catalog_pb2.DESCRIPTOR.services_by_name["CatalogService"].full_name
DEDUP_TTL_SECONDS = 31 * 24 * 3600  # longer than the event API's 30-day lateness bound
# Health name that is NOT_SERVING while the online feature store (Redis) is unreachable. Not the
# server's "" status, which Kubernetes probes: a Redis outage must not restart healthy pods.
FEATURES_HEALTH_NAME = f"{SERVICE_NAME}/features"
STORE_COOLDOWN_S = 1.0  # after a failed Redis call, skip Redis this long before probing again
WATCH_INTERVAL_S = 0.25  # how often the watcher probes the store and drains the spool
SPOOL_BATCHES_PER_ROUND = 200


class StoreWatcher:
    """A daemon thread: probe the feature store while its breaker is open, deliver the spool.

    Probing without traffic is what turns the features health back to SERVING within
    STORE_COOLDOWN_S + WATCH_INTERVAL_S of Redis answering again.
    """

    def __init__(self, reader: CachingFeatureReader, ingestor: EventIngestor) -> None:
        self.reader = reader
        self.ingestor = ingestor
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="store-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(WATCH_INTERVAL_S):
            try:
                if self.reader.probe():
                    # Keep going while whole rounds are delivered: drain fast after an outage.
                    while (
                        not self._stop.is_set()
                        and self.ingestor.deliver_spooled(SPOOL_BATCHES_PER_ROUND) > 0
                    ):
                        pass
            except Exception:  # the watcher must outlive any one bad round
                log.exception("store watcher round failed")


@dataclass
class RankingApp:
    handle: ServerHandle
    models: ModelHolder
    closers: list[Any] = field(default_factory=list)
    ingestor: EventIngestor | None = None
    breaker: CircuitBreaker | None = None
    worker: TorchWorker | None = None  # the one thread that runs torch (compute.py)
    pipeline: RankingPipeline | None = None
    follower: ChangeFollower | None = None  # the catalogue change stream's

    @property
    def port(self) -> int:
        return self.handle.port

    def stop(self, grace: float = 5.0) -> None:
        self.handle.stop(grace)
        self.models.stop()
        for close in self.closers:
            close()


def _dedup(config: FreshRecConfig) -> Any:
    choice = read_online_store_choice(config)
    if choice["kind"] == "redis" and choice["redis_url"]:
        return RedisDeduplicator(
            str(choice["redis_url"]), f"freshrec:{config.project}:event", DEDUP_TTL_SECONDS
        )
    return SqliteDeduplicator(config.workdir / "dedup.sqlite")


def build_ranking(config: FreshRecConfig, port: int | None = None) -> RankingApp:
    """Start a ranking server for `config.workdir`; returns once it reports SERVING."""
    # Security settings first: a missing key or certificate fails before any model loads.
    pseudonyms = pseudonymizer(config)
    credentials = server_credentials(config.security)
    if config.model.torch_threads:
        torch.set_num_threads(config.model.torch_threads)

    features = FeastFeatureStore(config.feature_repo_dir)
    features.start()
    online = read_online_store_choice(config)
    breaker = CircuitBreaker("online feature store", STORE_COOLDOWN_S)
    reader = CachingFeatureReader(_hot_path_reader(config, features, online), breaker)
    dedup = _dedup(config)
    dedup.start()
    spool = EventSpool(config.workdir / "spool")
    spool.start()
    registry = open_registry(config)
    holder: ModelHolder | None = None

    def load_reranker(path: str) -> CrossEncoderReranker:
        started = time.perf_counter()
        live = holder.current if holder is not None and holder.ready else None
        reranker = CrossEncoderReranker.from_pretrained(
            path,
            config.model.max_length,
            config.model.device,
            config.model.rerank_dtype,
            joint_layers=config.model.joint_layers,
            tokenizer_of=live.reranker if live is not None else None,
        )
        # Item-side states of a split re-ranker, before the version serves: no request pays
        # for the popular head of the catalogue after a hot swap.
        if reranker.split is None:
            return reranker
        reranker.prepare_serving(config.model.user_side_int8, config.model.item_states_int8)
        reranker.use_score_cache = config.ranking.score_cache
        reranker.item_state_capacity = max(
            reranker.item_state_capacity, config.ranking.warm_item_states
        )
        log.info(
            "re-ranker %s read and prepared in %.2f s (tokenizer %s)",
            path,
            time.perf_counter() - started,
            "the serving version's"
            if live is not None and reranker.tokenizer is live.reranker.tokenizer
            else "read",
        )
        # A version whose fine-tune froze everything below the split computes the same item
        # states as the serving one: it fills that one's store and computes none (a swap
        # without a warm-up; `freshrec bench swap`).
        if live is not None and reranker.share_item_states(live.reranker):
            reranker.item_state_source = live.reranker.item_state_source
            log.info(
                "re-ranker %s: the serving version's %d item states kept, users' states %s "
                "(same embeddings and layers below the split)",
                path,
                reranker.cached_items(),
                "too" if reranker.shares_user_states_with(live.reranker) else "not",
            )
            return reranker
        started = time.perf_counter()
        texts = _live_texts(config, live.reranker) if live is not None else []
        source = "the texts the serving version holds"
        if not texts:
            texts = _warm_texts(config, live.index if live else None)
            source = "the offline catalogue"
        # States an earlier load computed for this item side, from disk (a restart, another
        # replica on the same volume): only new and changed texts are computed below.
        fingerprint = (
            reranker.item_side_fingerprint() if config.ranking.item_state_snapshots else None
        )
        snapshot, read = _read_item_states(config, reranker, fingerprint, texts, path)
        # From now on a text missing from the store is read from disk where the snapshot
        # holds it (a request's candidate beyond the warm set), computed otherwise.
        reranker.item_state_source = snapshot
        started = time.perf_counter()
        warmed = reranker.warm_items(texts)
        if warmed:
            log.info(
                "re-ranker %s: %d item states computed in %.1f s (warm set: %s)",
                path,
                warmed,
                time.perf_counter() - started,
                source,
            )
            if fingerprint is not None and (not read or warmed >= SNAPSHOT_REWRITE * len(texts)):
                _write_item_states(config, reranker, fingerprint, snapshot, path)
        if warmed or read:
            # The warm-up's freed temporaries would stay in the RSS (services/common/memory.py).
            started = time.perf_counter()
            release_free_heap()
            log.info("free C heap returned in %.0f ms", (time.perf_counter() - started) * 1e3)
        return reranker

    serving = threading.Event()
    follower: ChangeFollower | None = None  # set below, once the holder it applies to exists
    index_served = ""

    def on_swap(models: ServingModels) -> None:
        nonlocal index_served
        metrics.observe_swap(models.model_version, models.index_version)
        if follower is not None and models.index_version != index_served:
            # A newer index may fold in what the stream lost (an older one rewinds the
            # follower, which checks as well).
            follower.recheck(models.index.catalog_position)
        index_served = models.index_version
        if serving.is_set() and config.ranking.freeze_heap:
            # The new version's objects out of the collector too (services/common/heap.py);
            # at start-up the freeze before SERVING does it.
            started = time.perf_counter()
            frozen = freeze_heap()
            log.info(
                "%d objects frozen out of garbage collection after the swap (%.0f ms)",
                frozen,
                (time.perf_counter() - started) * 1e3,
            )

    holder = ModelHolder(
        registry,
        load_reranker,
        config.ranking.registry_poll_seconds,
        on_swap=on_swap,
        ef_search=config.ranking.ef_search,
        load_nice=config.ranking.load_nice,
        # The load's objects are frozen after its swap: no full collection walks them while
        # requests wait on it (services/common/heap.py).
        load_scope=full_collections_deferred if config.ranking.freeze_heap else None,
    )
    holder.start()
    if not holder.ready:
        raise FailedPrecondition(
            f"no champion model/index under {config.registry_url or config.registry_dir}: "
            "run `freshrec init` first"
        )
    if isinstance(reader.inner, RedisFeatureReader):
        # Keys and decoded records of the warm set, before SERVING: a user's first request
        # would otherwise build and decode its candidates' (services/features/redis_reader.py).
        started = time.perf_counter()
        found = reader.inner.warm_records(_warm_ids(config, holder.current.index))
        if found:
            log.info(
                "%d item records read and decoded in %.1f s", found, time.perf_counter() - started
            )
    settings = PipelineSettings(
        recall_candidates=config.ranking.recall_candidates,
        popular_candidates=config.ranking.popular_candidates,
        max_k=config.ranking.max_k,
        exploration_slots=config.ranking.exploration_slots,
        exploration_rate=config.ranking.exploration_rate,
        category_weights=dict(config.ranking.category_weights),
        exclude_purchased=config.ranking.exclude_purchased,
    )
    # Every torch call of the request path runs on this one thread (services/ranking/compute.py).
    worker = TorchWorker(threads=config.model.torch_threads or None)
    encoder = WorkerEncoder(
        in_passing_thread(TextEncoder.from_pretrained, config.model.base_model or None), worker
    )
    batcher = RerankBatcher(max(config.ranking.rerank_batch, 1), worker)
    pipeline = RankingPipeline(reader, settings, encoder, cache=reader, batcher=batcher)
    ingestor = EventIngestor(
        reader,
        features,
        dedup,
        OfflineEventLog(config.offline_dir),
        spool=spool,
        breaker=breaker,
        cache=reader,
        hygiene=EventHygiene(
            window=timedelta(seconds=config.ingestion.duplicate_window_seconds),
            max_events_per_minute=config.ingestion.max_events_per_user_per_minute,
        ),
        quarantine=OfflineEventLog(config.offline_dir / "quarantine"),
        ledger=RejectionLedger(config.offline_dir / REJECTIONS_FILE),
        on_profiles=(
            UserSidePreparer(worker, lambda: holder.current.reranker)
            if config.ranking.prepare_user_states
            else None
        ),
    )
    # Warm every model and client with one real request before reporting SERVING.
    pipeline.recommend(RecommendInput(user_id="__warmup__", k=1, query="warm up"), holder.current)
    score_log = ServedScoreLog(
        config.offline_dir / SERVED_SCORES_DIR, config.ranking.score_log_seconds
    )
    score_log.start()
    servicer = RankingServicer(pipeline, holder, ingestor, pseudonyms, score_log)
    stream: ChangeStream = (
        RedisChangeStream(str(online["redis_url"]), config.project)
        if online["kind"] == "redis" and online["redis_url"]
        else InMemoryChangeStream()
    )
    catalog = CatalogServicer(reader, features, stream, config.offline_dir)
    # From the serving index's position: the changes before it are in its base, so a replica
    # neither embeds them again nor searches them as overlay (`freshrec index-rebuild` folds
    # them in).
    position = holder.current.index.catalog_position
    follower = ChangeFollower(
        stream,
        lambda changes: apply_changes(changes, encoder, holder),
        start_after=position,
        offline_root=config.offline_dir if isinstance(stream, RedisChangeStream) else None,
    )
    holder.rewind_catalog = follower.rewind
    metrics.watch_catalog_follower(follower)
    follower.start()
    log.info(
        "following catalogue changes after %s (index %s)", position, holder.current.index_version
    )
    handle = create_server(
        config.ranking.host,
        config.ranking.port if port is None else port,
        [
            (ranking_pb2_grpc.add_RankingServiceServicer_to_server, servicer, SERVICE_NAME),
            (catalog_pb2_grpc.add_CatalogServiceServicer_to_server, catalog, CATALOG_SERVICE_NAME),
        ],
        workers=config.ranking.workers,
        credentials=credentials,
    )
    metrics.watch_reranker_caches(lambda: holder.current.reranker)
    metrics.watch_index(lambda: holder.current.index)
    if isinstance(reader.inner, RedisFeatureReader):
        metrics.watch_item_feature_cache(reader.inner)
    if config.ranking.metrics_port:
        metrics.serve_metrics(config.ranking.metrics_port)

    def report_features(available: bool, _reason: str = "") -> None:
        status = health_pb2.HealthCheckResponse
        handle.health.set(FEATURES_HEALTH_NAME, status.SERVING if available else status.NOT_SERVING)
        metrics.FEATURES_AVAILABLE.set(1 if available else 0)

    breaker.subscribe(report_features)
    report_features(breaker.closed)
    watcher = StoreWatcher(reader, ingestor)
    watcher.start()
    metrics.watch_gc_pauses()
    if config.ranking.freeze_heap:
        log.info("%d objects frozen out of garbage collection", freeze_heap())
    serving.set()
    handle.mark_serving()
    log.info("ranking service on port %d", handle.port)
    # score_log.stop runs after the server stopped: its last flush holds every answer.
    closers = [follower.stop, watcher.stop, dedup.close, score_log.stop, worker.close]
    return RankingApp(handle, holder, closers, ingestor, breaker, worker, pipeline, follower)


def _warm_order(ids: Iterable[str], popular: Sequence[str], limit: int) -> list[str]:
    """The items a loading version and a starting service prepare: the most popular first (the
    serving index's popularity list, if any), then catalogue order, `limit` at most."""
    catalogue = dict.fromkeys(ids)
    head = [i for i in popular if i in catalogue]
    return list(dict.fromkeys([*head, *catalogue]))[:limit]


def _read_item_states(
    config: FreshRecConfig,
    reranker: CrossEncoderReranker,
    fingerprint: str | None,
    texts: list[str],
    path: str,
) -> tuple[ItemStateSnapshot | None, int]:
    """Keep the states of `texts` that the snapshot of `fingerprint` holds
    (model/item_state_snapshot.py); returns the snapshot (None if there is none) and how many
    were read."""
    if fingerprint is None:
        return None, 0
    snapshot = ItemStateSnapshot.open(config.item_state_dir, fingerprint)
    if snapshot is None:
        log.info("re-ranker %s: no item-state snapshot for its item side", path)
        return None, 0
    started = time.perf_counter()
    try:
        read = reranker.load_item_states(snapshot, texts)
    except OSError as exc:  # a disk that fails: the version loads all the same, computing
        log.warning("re-ranker %s: item states not read from %s: %s", path, snapshot.info.path, exc)
        return None, 0
    log.info(
        "re-ranker %s: %d of %d item states read from %s in %.1f s",
        path,
        read,
        len(texts),
        snapshot.info.path,
        time.perf_counter() - started,
    )
    return snapshot, read


def _write_item_states(
    config: FreshRecConfig,
    reranker: CrossEncoderReranker,
    fingerprint: str,
    read_from: ItemStateSnapshot | None,
    path: str,
) -> None:
    """Write the item states `reranker` keeps as its item side's snapshot, and read missing
    texts from it from now on; a failure (a full disk, a read-only volume) is logged and the
    version serves all the same. A snapshot holding more items than the store (one written
    for a whole catalogue, of which this process keeps its warm set) stays as it is."""
    if read_from is not None and len(read_from) > reranker.cached_items():
        log.info(
            "re-ranker %s: the item-state snapshot %s kept (%d items, more than the %d held)",
            path,
            read_from.info.path,
            len(read_from),
            reranker.cached_items(),
        )
        return
    started = time.perf_counter()
    try:
        info = reranker.save_item_states(config.item_state_dir, fingerprint)
    except OSError as exc:
        log.warning("re-ranker %s: item states not written to disk: %s", path, exc)
        return
    if info is not None:
        log.info(
            "re-ranker %s: %d item states (%.0f MiB) written to %s in %.1f s",
            path,
            info.items,
            info.rows * info.width * info.dtype.itemsize / 2**20,
            info.path,
            time.perf_counter() - started,
        )
        reranker.item_state_source = ItemStateSnapshot.open(config.item_state_dir, fingerprint)


def _warm_catalogue(config: FreshRecConfig) -> Path | None:
    """The offline catalogue the warm set is read from; None when there is no warm set (or no
    catalogue)."""
    table = config.offline_dir / ITEM_FEATURES_TABLE
    return table if config.ranking.warm_item_states > 0 and table.exists() else None


def _warm_ids(config: FreshRecConfig, index: RecallIndex | None) -> list[str]:
    """The warm set's item ids (`_warm_order`), from the offline catalogue's id column only."""
    table = _warm_catalogue(config)
    if table is None:
        return []
    ids = pd.read_parquet(table, columns=["item_id"])["item_id"].astype(str)
    return _warm_order(ids, index.popular if index else [], config.ranking.warm_item_states)


def _live_texts(config: FreshRecConfig, serving: CrossEncoderReranker) -> list[str]:
    """The warm set of a version loaded while `serving` serves: the item texts whose states
    it holds, the most recently used first, `ranking.warm_item_states` at most. These are the
    texts requests read now (as the online features make them), and listing them costs
    milliseconds; building them from the offline catalogue (`_warm_texts`) took ~1.5 s of
    conversions that held the GIL, and requests took up to 384 ms behind it at 100k items
    (stop 30). A new item no request has read yet is computed on first use. Empty when
    `serving` holds none (a full cross-encoder)."""
    return serving.cached_item_texts(config.ranking.warm_item_states)


def _warm_texts(config: FreshRecConfig, index: RecallIndex | None) -> list[str]:
    """Item texts to precompute for a split re-ranker: the warm set's (`_warm_order`)."""
    if _warm_catalogue(config) is None:
        return []
    popular = index.popular if index is not None else []
    return catalogue_texts(config, popular, config.ranking.warm_item_states)


def catalogue_texts(config: FreshRecConfig, popular: Sequence[str], limit: int) -> list[str]:
    """The ranking texts of the offline catalogue's items as requests build them now, the
    most popular first (`_warm_order`), `limit` at most; [] without a catalogue."""
    table = config.offline_dir / ITEM_FEATURES_TABLE
    if not table.exists():
        return []
    frame = pd.read_parquet(table)
    order = _warm_order(frame["item_id"].astype(str), popular, limit)
    now = datetime.now(UTC)
    # Record by record, each dropped once its text is built (`iter_item_records`): read at
    # start-up, and for a load beside a version that holds no item texts (`_live_texts`).
    return [ranking_item_text(item, now) for item in iter_item_records(frame, order)]


def _hot_path_reader(
    config: FreshRecConfig, features: FeastFeatureStore, online: dict[str, str | None]
) -> FeatureReader:
    """Reads on the request path: `RedisFeatureReader` on Feast's layout when the online store
    is Redis, one node (one round trip) or a cluster (one pipeline split by shard); same values
    as the SDK, several times cheaper; item features kept in process for
    `ranking.item_cache_seconds` at most. The Feast SDK otherwise (SQLite, Sentinel)."""
    if online["kind"] != "redis":
        return features
    raw = RedisFeatureReader(
        config.feature_repo_dir, item_cache_max_age_s=config.ranking.item_cache_seconds
    )
    try:
        raw.start()
    except FailedPrecondition as exc:  # e.g. a Redis Sentinel repo
        log.info("feature reads through the Feast SDK: %s", exc)
        return features
    return raw
