"""The ranking pipeline, as verb-noun steps over narrow seams (no gRPC here).

    fetch_user_profile → recall_candidates → fetch_item_features → filter_candidates
      → rerank → apply_weights → add_exploration → top k

A request takes one `ServingModels` snapshot at its start, so a hot swap never mixes versions.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np

from freshrec.errors import FeatureStoreUnavailable, InvalidArgument
from freshrec.records import ItemFeatures, UserProfile
from model.collab import profile_history
from model.embeddings import Embedder, user_vector
from model.index import RecallIndex
from model.reranker import CrossEncoderReranker
from model.text import RankingTextMemo, user_context_text
from services.features.caching import FeatureCache
from services.features.reader import FeatureReader
from services.ranking.batching import RerankBatcher

log = logging.getLogger(__name__)

STAGE_RECALL = "recall"
STAGE_EXPLORATION = "exploration"
STAGE_FALLBACK = "fallback"

MAX_ID_CHARS = 128
MAX_QUERY_CHARS = 512
MAX_EXCLUDE = 1000
MAX_CONTEXT_ENTRIES = 32
MAX_CONTEXT_CHARS = 256


@dataclass(frozen=True)
class ServingModels:
    """The immutable set of versions one request is answered with."""

    reranker: CrossEncoderReranker
    model_version: str
    index: RecallIndex
    index_version: str


@dataclass(frozen=True)
class RecommendInput:
    user_id: str
    k: int
    query: str | None = None
    context: Mapping[str, str] = field(default_factory=dict)
    exclude_item_ids: tuple[str, ...] = ()
    request_id: str = ""


@dataclass(frozen=True)
class ScoredItem:
    item_id: str
    score: float
    relevance: float
    business_weight: float
    stage: str
    title: str = ""
    category: str = ""


@dataclass(frozen=True)
class Recommendation:
    items: list[ScoredItem]
    model_version: str
    index_version: str
    degraded: bool = False
    degraded_reason: str = ""
    cold_start: bool = False
    timings_ms: dict[str, float] = field(default_factory=dict)
    # The re-ranker's relevance for every candidate it scored (not only the k returned), for
    # the served-score log; empty when the answer was not re-ranked (fallback, recall order).
    relevance: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))


@dataclass(frozen=True)
class PipelineSettings:
    recall_candidates: int = 50
    popular_candidates: int = 0  # popular items re-ranked beside the FAISS candidates
    max_k: int = 100
    exploration_slots: int = 1
    exploration_rate: float = 0.1
    category_weights: Mapping[str, float] = field(default_factory=dict)
    exclude_purchased: bool = True


def validate_input(req: RecommendInput, max_k: int) -> None:
    """Reject malformed requests; messages name the field and the allowed range.

    Raises:
        InvalidArgument
    """
    if not req.user_id or not req.user_id.strip():
        raise InvalidArgument("user_id must be a non-empty string")
    if len(req.user_id) > MAX_ID_CHARS:
        raise InvalidArgument(
            f"user_id must be at most {MAX_ID_CHARS} characters, got {len(req.user_id)}"
        )
    if not 1 <= req.k <= max_k:
        raise InvalidArgument(f"k must be in 1..{max_k}, got {req.k}")
    if req.query is not None and len(req.query) > MAX_QUERY_CHARS:
        raise InvalidArgument(
            f"query must be at most {MAX_QUERY_CHARS} characters, got {len(req.query)}"
        )
    if len(req.exclude_item_ids) > MAX_EXCLUDE:
        raise InvalidArgument(
            f"exclude_item_ids must hold at most {MAX_EXCLUDE} ids, got {len(req.exclude_item_ids)}"
        )
    for item_id in req.exclude_item_ids:
        if not item_id or len(item_id) > MAX_ID_CHARS:
            raise InvalidArgument(f"exclude_item_ids entries must be 1..{MAX_ID_CHARS} characters")
    if len(req.context) > MAX_CONTEXT_ENTRIES:
        raise InvalidArgument(
            f"context must hold at most {MAX_CONTEXT_ENTRIES} entries, got {len(req.context)}"
        )
    for key, value in req.context.items():
        if len(key) > MAX_CONTEXT_CHARS or len(value) > MAX_CONTEXT_CHARS:
            raise InvalidArgument(
                f"context keys and values must be at most {MAX_CONTEXT_CHARS} characters"
            )
    if len(req.request_id) > MAX_ID_CHARS:
        raise InvalidArgument(f"request_id must be at most {MAX_ID_CHARS} characters")


class RequestDraws:
    """A request's random draws, fixed by (request id, user id), so a replayed request gets
    the same answer: the exploration coin is read off the hash itself, and a numpy Generator
    (~9 µs to seed, paid on the request thread) is made only for a request that explores."""

    def __init__(self, request_id: str, user_id: str) -> None:
        digest = hashlib.blake2b(f"{request_id}/{user_id}".encode(), digest_size=16).digest()
        self._seed = int.from_bytes(digest[:8])
        self.coin = int.from_bytes(digest[8:]) / 2.0**64  # uniform in [0, 1)

    def generator(self) -> np.random.Generator:
        return np.random.default_rng(self._seed)


class RankingPipeline:
    """Answers one recommendation request from features, an index and a re-ranker."""

    def __init__(
        self,
        features: FeatureReader,
        settings: PipelineSettings,
        query_encoder: Embedder | None = None,
        cache: FeatureCache | None = None,
        batcher: RerankBatcher | None = None,
        now: Callable[[], datetime] | None = None,
    ) -> None:
        """Args:
        cache: last-known features to answer from (degraded) when `features` raises
            FeatureStoreUnavailable; without one, such answers fall back to popular items.
        batcher: runs the re-ranker on one thread, concurrent requests together
            (services/ranking/batching.py); without one, each request scores on its own
            thread (in-process users: the replay evaluation, benchmarks).
        now: the request time the re-ranker's item text is read at ("new arrival");
            default the wall clock (the replay evaluation passes its simulated time).
        """
        self.features = features
        self.settings = settings
        self.query_encoder = query_encoder
        self.cache = cache
        self.batcher = batcher
        self.now = now or (lambda: datetime.now(UTC))
        self._texts = RankingTextMemo()
        # Each answer's step timings, newest last, when a benchmark sets a deque here (the
        # service's per-stage percentiles under load; metrics keep only histogram buckets).
        self.timings_log: deque[dict[str, float]] | None = None

    # -- steps -------------------------------------------------------------------------------
    def fetch_user_profile(self, user_id: str) -> UserProfile | None:
        return self.features.get_user_profile(user_id)

    def recall_candidates(
        self,
        models: ServingModels,
        profile: UserProfile | None,
        query: str | None,
        exclude: frozenset[str],
    ) -> list[tuple[str, float]]:
        recent = profile.recent_items if profile else ()
        query_vec = None
        if query and self.query_encoder is not None:
            query_vec = self.query_encoder.encode([query])[0]
        vec = user_vector(models.index.vectors_of(recent), query_vec)
        if vec is None:
            return []
        found = models.index.search(vec, self.settings.recall_candidates, exclude)
        return found + self.popular_extras(models, found, exclude)

    def popular_extras(
        self, models: ServingModels, found: list[tuple[str, float]], exclude: frozenset[str]
    ) -> list[tuple[str, float]]:
        """The second recall source: up to `popular_candidates` of the index's popular items
        that FAISS did not return, in popularity order, scored just below the last FAISS
        candidate (so recall order, and a recall-only answer, keep FAISS first). Text
        similarity alone never proposes what everyone is buying this week; the re-ranker,
        which reads each item's popularity, decides whether this user should see it."""
        n = self.settings.popular_candidates
        if n <= 0 or not found:
            return []
        have = {i for i, _ in found}
        floor = min(s for _, s in found)
        extras = [i for i in models.index.popular if i not in have and i not in exclude][:n]
        return [(item, floor - 1e-3 * (r + 1)) for r, item in enumerate(extras)]

    def fetch_item_features(self, item_ids: list[str]) -> dict[str, ItemFeatures]:
        return self.features.get_items(item_ids)

    def fetch_item_features_or_cached(
        self, item_ids: list[str], reasons: list[str]
    ) -> dict[str, ItemFeatures]:
        """fetch_item_features; when the store is down, the cached features of those items
        (possibly none), with the reason appended to `reasons`."""
        try:
            return self.fetch_item_features(item_ids)
        except FeatureStoreUnavailable as exc:
            items = self.cache.cached_items(item_ids) if self.cache is not None else {}
            source = "from cache" if items else "unavailable"
            reasons.append(f"item features {source}: {exc}")
            return items

    @staticmethod
    def filter_candidates(
        candidates: list[tuple[str, float]], items: Mapping[str, ItemFeatures]
    ) -> list[tuple[str, float]]:
        """Keep candidates the store knows and that are in stock."""
        return [(i, s) for i, s in candidates if i in items and items[i].in_stock]

    def rerank(
        self,
        models: ServingModels,
        user_text: str,
        candidates: list[ItemFeatures],
        profile: UserProfile | None = None,
    ) -> np.ndarray:
        """Relevance per candidate: the re-ranker on the texts, then, for a version with item
        factors, the blend's collaborative term for this profile (a few µs, here rather than
        on the torch thread)."""
        if not candidates:
            return np.zeros(0, dtype=np.float32)
        now = self.now()
        texts = self._texts.texts(candidates, now)
        if self.batcher is not None:
            relevance = self.batcher.score(models.reranker, user_text, texts)
        else:
            relevance = models.reranker.score(user_text, texts)
        if models.reranker.uses_collab:
            relevance = models.reranker.add_collab(
                relevance, profile_history(profile), [i.item_id for i in candidates]
            )
        return relevance

    def apply_weights(
        self,
        candidates: list[ItemFeatures],
        relevance: np.ndarray,
        stage: str,
        limit: int | None = None,
    ) -> list[ScoredItem]:
        """score = relevance × w_i, w_i from the per-category business weights; best first
        (ties keep candidate order), a weight of 0 filtered out; the first `limit` only when
        given (a request needs its k, not a record for each of its ~70 candidates)."""
        weights = self.settings.category_weights
        w = np.fromiter(
            (weights.get(item.category, 1.0) for item in candidates),
            dtype=np.float64,
            count=len(candidates),
        )
        rel = np.asarray(relevance, dtype=np.float64)
        score = rel * w
        order = np.argsort(-score, kind="stable")
        order = order[w[order] > 0]  # weight 0 = filtered out
        if limit is not None:
            order = order[:limit]
        return [
            ScoredItem(
                item_id=candidates[n].item_id,
                score=float(score[n]),
                relevance=float(rel[n]),
                business_weight=float(w[n]),
                stage=stage,
                title=candidates[n].title,
                category=candidates[n].category,
            )
            for n in order.tolist()
        ]

    def _blocked(self, item: ItemFeatures) -> bool:
        """A category weighted 0 is removed from every stage, not only the re-ranked one."""
        return self.settings.category_weights.get(item.category, 1.0) <= 0

    def add_exploration(
        self,
        ranked: list[ScoredItem],
        k: int,
        models: ServingModels,
        exclude: frozenset[str],
        draws: RequestDraws,
        reasons: list[str] | None = None,
    ) -> list[ScoredItem]:
        """With probability `exploration_rate`, give the last slots to random catalogue items."""
        top = ranked[:k]
        slots = min(self.settings.exploration_slots, k - 1) if k > 1 else 0
        if slots <= 0 or draws.coin >= self.settings.exploration_rate:
            return top
        taken = {s.item_id for s in top} | exclude
        # A few spares, in the same feature read: a drawn item may be out of stock or in a
        # blocked category, and the slot should still be filled.
        chosen = models.index.sample(draws.generator(), 3 * slots + 2, taken)
        if not chosen:
            return top
        features = self.fetch_item_features_or_cached(chosen, [] if reasons is None else reasons)
        explore = [
            ScoredItem(i, 0.0, 0.0, 1.0, STAGE_EXPLORATION, features[i].title, features[i].category)
            for i in chosen
            if i in features and features[i].in_stock and not self._blocked(features[i])
        ][:slots]
        keep = k - len(explore)
        return top[:keep] + explore

    def fallback(
        self,
        models: ServingModels,
        k: int,
        exclude: frozenset[str],
        reasons: list[str] | None = None,
    ) -> list[ScoredItem]:
        """Popular items, in popularity order, for cold start or when a dependency failed.

        With the store down, items are filtered on their cached features where known.
        """
        chosen = [i for i in models.index.popular if i not in exclude][: k * 2]
        features = self.fetch_item_features_or_cached(chosen, [] if reasons is None else reasons)
        out = []
        for rank, item_id in enumerate(chosen):
            item = features.get(item_id)
            if item is not None and (not item.in_stock or self._blocked(item)):
                continue
            score = 1.0 / (rank + 1)
            out.append(
                ScoredItem(
                    item_id,
                    score,
                    score,
                    1.0,
                    STAGE_FALLBACK,
                    item.title if item else "",
                    item.category if item else "",
                )
            )
        return out[:k]

    # -- the whole request -------------------------------------------------------------------
    def recommend(self, req: RecommendInput, models: ServingModels) -> Recommendation:
        """Ranked items for one user. Unknown users get popular items (cold_start=True).

        With the feature store unreachable the answer is `degraded` with the reason: recall
        and re-rank from the cached profile and item features when this process has them,
        otherwise popular items; exclusions known from a cached profile still apply.

        Raises:
            InvalidArgument: a malformed request.
        """
        validate_input(req, self.settings.max_k)
        timings: dict[str, float] = {}
        clock = time.perf_counter
        t0 = clock()
        reasons: list[str] = []  # why the answer is degraded; the first one is reported
        try:
            profile = self.fetch_user_profile(req.user_id)
        except FeatureStoreUnavailable as exc:
            profile = self.cache.cached_profile(req.user_id) if self.cache is not None else None
            source = "from cache" if profile is not None else "unavailable"
            reasons.append(f"user profile {source}: {exc}")
        timings["fetch_user_profile"] = (clock() - t0) * 1e3
        exclude = set(req.exclude_item_ids)
        if profile is not None:
            exclude.update(profile.recent_items)
            if self.settings.exclude_purchased:
                exclude.update(profile.purchased_items)
        frozen_exclude = frozenset(exclude)
        cold = profile is None and not reasons

        def answer(items: list[ScoredItem], relevance: np.ndarray | None = None) -> Recommendation:
            timings["total"] = (clock() - t0) * 1e3
            if self.timings_log is not None:
                self.timings_log.append(timings)
            return Recommendation(
                items,
                models.model_version,
                models.index_version,
                bool(reasons),
                reasons[0] if reasons else "",
                cold,
                timings,
                relevance if relevance is not None else np.zeros(0, dtype=np.float32),
            )

        t = clock()
        candidates = self.recall_candidates(models, profile, req.query, frozen_exclude)
        timings["recall_candidates"] = (clock() - t) * 1e3
        if not candidates:
            return answer(self.fallback(models, req.k, frozen_exclude, reasons))
        t = clock()
        items = self.fetch_item_features_or_cached([i for i, _ in candidates], reasons)
        if not items and reasons:
            # Nothing known about the candidates: recall order, un-reranked.
            ranked = [ScoredItem(i, s, s, 1.0, STAGE_RECALL) for i, s in candidates]
            return answer(ranked[: req.k])
        timings["fetch_item_features"] = (clock() - t) * 1e3
        kept = self.filter_candidates(candidates, items)
        ordered = [items[i] for i, _ in kept]
        t = clock()
        relevance = self.rerank(models, user_context_text(profile, req.query), ordered, profile)
        timings["rerank"] = (clock() - t) * 1e3
        ranked = self.apply_weights(ordered, relevance, STAGE_RECALL, limit=req.k)
        draws = RequestDraws(req.request_id, req.user_id)
        final = self.add_exploration(ranked, req.k, models, frozen_exclude, draws, reasons)
        if len(final) < req.k:  # a thin recall: top up with popular items
            have = frozen_exclude | {s.item_id for s in final}
            final += self.fallback(models, req.k - len(final), have, reasons)
        return answer(final, relevance)
