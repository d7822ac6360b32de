"""RankingService over gRPC: converts protos to pipeline inputs and back. No logic of its own."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from freshrec.v1 import ranking_pb2, ranking_pb2_grpc
from services.common import metrics
from services.common.privacy import Pseudonymizer
from services.common.served_scores import ServedScoreLog
from services.ingestion.pipeline import EventIngestor, to_response
from services.ranking.models import ModelHolder
from services.ranking.pipeline import (
    STAGE_EXPLORATION,
    STAGE_FALLBACK,
    STAGE_RECALL,
    RankingPipeline,
    RecommendInput,
)

log = logging.getLogger(__name__)
_RECOMMEND_OK = metrics.REQUESTS.labels(method="Recommend", outcome="ok")

_STAGES = {
    STAGE_RECALL: ranking_pb2.STAGE_RECALL,
    STAGE_EXPLORATION: ranking_pb2.STAGE_EXPLORATION,
    STAGE_FALLBACK: ranking_pb2.STAGE_FALLBACK,
}


class RankingServicer(ranking_pb2_grpc.RankingServiceServicer):
    """Recommend and LogEvents, wired to a pipeline, a model holder and an event ingestor.

    With `pseudonyms` (services/common/privacy.py) every user id (and event id) is mapped here,
    at the edge, before features, logs, the offline log or training see it. With `score_log`
    every answer's re-ranked relevance goes to the served-score log (the updater's score_psi).
    """

    def __init__(
        self,
        pipeline: RankingPipeline,
        models: ModelHolder,
        ingestor: EventIngestor,
        pseudonyms: Pseudonymizer | None = None,
        score_log: ServedScoreLog | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.models = models
        self.ingestor = ingestor
        self.pseudonyms = pseudonyms
        self.score_log = score_log

    def Recommend(
        self, request: ranking_pb2.RecommendRequest, context: Any
    ) -> ranking_pb2.RecommendResponse:
        request_id = request.request_id or uuid.uuid4().hex
        user_id = self.pseudonyms.user_id(request.user_id) if self.pseudonyms else request.user_id
        result = self.pipeline.recommend(
            RecommendInput(
                user_id=user_id,
                k=request.k,
                query=request.query if request.HasField("query") else None,
                context=dict(request.context),
                exclude_item_ids=tuple(request.exclude_item_ids),
                request_id=request_id,
            ),
            self.models.current,
        )
        for stage, ms in result.timings_ms.items():
            metrics.stage_seconds(stage).observe(ms / 1e3)
        _RECOMMEND_OK.inc()
        metrics.observe_relevance(result.relevance)
        if self.score_log is not None:
            self.score_log.observe(result.model_version, result.relevance)
        if result.degraded:
            metrics.DEGRADED.labels(reason=result.degraded_reason.split(":")[0]).inc()
        if result.cold_start:
            metrics.COLD_START.inc()
        total_ms = result.timings_ms.get("total", 0.0)
        log.info(
            "recommend request_id=%s user=%s k=%d model=%s degraded=%s total_ms=%.1f",
            request_id,
            user_id,
            request.k,
            result.model_version,
            result.degraded,
            total_ms,
            # Fields of the record too: with FRESHREC_LOG_FORMAT=json, of its JSON object.
            extra={
                "request_id": request_id,
                "user": user_id,
                "k": request.k,
                "model": result.model_version,
                "degraded": result.degraded,
                "total_ms": round(total_ms, 3),
            },
        )
        return ranking_pb2.RecommendResponse(
            items=[
                ranking_pb2.RankedItem(
                    item_id=s.item_id,
                    score=s.score,
                    relevance=s.relevance,
                    business_weight=s.business_weight,
                    stage=_STAGES[s.stage],
                    title=s.title,
                    category=s.category,
                )
                for s in result.items
            ],
            model_version=result.model_version,
            index_version=result.index_version,
            degraded=result.degraded,
            degraded_reason=result.degraded_reason,
            cold_start=result.cold_start,
            request_id=request_id,
        )

    def LogEvents(
        self, request: ranking_pb2.LogEventsRequest, context: Any
    ) -> ranking_pb2.LogEventsResponse:
        events = list(request.events)
        if self.pseudonyms is not None:
            events = [_pseudonymized(e, self.pseudonyms) for e in events]
        result = self.ingestor.ingest(events)
        metrics.EVENTS.labels(outcome="accepted").inc(result.accepted)
        for reason, n in result.rejected.items():
            metrics.EVENTS.labels(outcome=reason).inc(n)
        rejected = dict(result.rejected)
        log.info(
            "log_events accepted=%d rejected=%s",
            result.accepted,
            rejected,
            extra={"accepted": result.accepted, "rejected": rejected},
        )
        return to_response(result)


def _pseudonymized(event: ranking_pb2.Event, pseudonyms: Pseudonymizer) -> ranking_pb2.Event:
    """A copy of `event` with pseudonymous user and event ids (the request stays as received)."""
    copy = ranking_pb2.Event()
    copy.CopyFrom(event)
    copy.user_id = pseudonyms.user_id(event.user_id)
    copy.event_id = pseudonyms.event_id(event.event_id)
    return copy
