"""Wires the ranking service: feature store, dedup, offline log, models; then serves gRPC.

`build_ranking` connects everything, loads the champion versions, warms the re-ranker with one
real request, and only then reports SERVING.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from freshrec.config import FreshRecConfig
from freshrec.errors import FailedPrecondition
from freshrec.v1 import ranking_pb2, ranking_pb2_grpc
from model.embeddings import TextEncoder
from model.reranker import CrossEncoderReranker
from services.common import metrics
from services.common.auth import server_credentials
from services.common.privacy import pseudonymizer
from services.common.server import ServerHandle, create_server
from services.features.feast_store import FeastFeatureStore
from services.ingestion.dedup import RedisDeduplicator, SqliteDeduplicator
from services.ingestion.offline_log import OfflineEventLog
from services.ingestion.pipeline import EventIngestor
from services.jobs.bootstrap import read_online_store_choice
from services.ranking.models import ModelHolder
from services.ranking.pipeline import PipelineSettings, RankingPipeline, RecommendInput
from services.ranking.servicer import RankingServicer
from services.registry import ModelRegistry

log = logging.getLogger(__name__)

SERVICE_NAME = ranking_pb2.DESCRIPTOR.services_by_name["RankingService"].full_name
DEDUP_TTL_SECONDS = 31 * 24 * 3600  # longer than the event API's 30-day lateness bound


@dataclass
class RankingApp:
    handle: ServerHandle
    models: ModelHolder
    closers: list[Any] = field(default_factory=list)

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
    dedup = _dedup(config)
    dedup.start()
    ingestor = EventIngestor(features, features, dedup, OfflineEventLog(config.offline_dir))
    registry = ModelRegistry(config.registry_dir)
    holder = ModelHolder(
        registry,
        lambda path: CrossEncoderReranker.from_pretrained(
            path, config.model.max_length, config.model.device, config.model.rerank_dtype
        ),
        config.ranking.registry_poll_seconds,
        on_swap=lambda m: metrics.observe_swap(m.model_version, m.index_version),
    )
    holder.start()
    if not holder.ready:
        raise FailedPrecondition(
            f"no champion model/index under {config.registry_dir}: run `freshrec init` first"
        )
    settings = PipelineSettings(
        recall_candidates=config.ranking.recall_candidates,
        max_k=config.ranking.max_k,
        exploration_slots=config.ranking.exploration_slots,
        exploration_rate=config.ranking.exploration_rate,
        category_weights=dict(config.ranking.category_weights),
        exclude_purchased=config.ranking.exclude_purchased,
    )
    encoder = TextEncoder.from_pretrained(config.model.base_model or None)
    pipeline = RankingPipeline(features, settings, encoder)
    # Warm every model and client with one real request before reporting SERVING.
    pipeline.recommend(RecommendInput(user_id="__warmup__", k=1, query="warm up"), holder.current)
    servicer = RankingServicer(pipeline, holder, ingestor, pseudonyms)
    handle = create_server(
        config.ranking.host,
        config.ranking.port if port is None else port,
        [(ranking_pb2_grpc.add_RankingServiceServicer_to_server, servicer, SERVICE_NAME)],
        workers=config.ranking.workers,
        credentials=credentials,
    )
    if config.ranking.metrics_port:
        metrics.serve_metrics(config.ranking.metrics_port)
    handle.mark_serving()
    log.info("ranking service on port %d", handle.port)
    return RankingApp(handle, holder, [dedup.close])
