"""The strategies a replay compares, behind one small interface: `recommend` on an evaluation
context, then `update` when a period is fed.

Re-ranked strategies (`stale`, `incremental`, `full`) answer through the serving pipeline's
steps (`RankingPipeline.recommend`: recall_candidates → fetch_item_features →
filter_candidates → rerank → apply_weights, exploration off); `recall-only` stops after the
FAISS stage; `popular` ranks by recent popularity; `als` is implicit's ALS on everything so far.
Every strategy sees the same exclusions (the user's previously seen items) and the same
catalogue (items that exist by the evaluation point and are in stock).
"""

from __future__ import annotations

import copy
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import pandas as pd
import psutil

from freshrec.config import FreshRecConfig, TrainingConfig
from freshrec.data.schema import EVENT_WEIGHTS, POSITIVE_EVENT_TYPES
from freshrec.records import ItemFeatures, UserProfile
from model.index import RecallIndex
from model.negatives import ServingLikeNegatives
from model.reranker import CrossEncoderReranker, pretrained_path
from model.training import ItemAsOf, make_pairs, train
from services.evaluation.protocol import Period
from services.ranking.pipeline import (
    MAX_EXCLUDE,
    RankingPipeline,
    RecommendInput,
    ServingModels,
)
from services.registry import ModelRegistry
from services.updater.examples import Positive, Window, sample_mix
from services.updater.job import collab_features, collab_refit, run_training, train_params

RerankerLoader = Callable[[str], CrossEncoderReranker]


@dataclass(frozen=True)
class UpdateStats:
    """Cost of one model update (zeros for strategies with nothing to train)."""

    seconds: float = 0.0
    examples_processed: int = 0
    trainable_params: int = 0
    peak_rss_mb: float = 0.0
    positives: int = 0
    replay_positives: int = 0
    blend: tuple[float, ...] = ()  # the blend after the update (bert, pop, new, bias, collab)
    collab_examples: int = 0  # ALS matrix cells × iterations of the item-factor fits

    def to_dict(self) -> dict[str, Any]:
        return {
            "blend": list(self.blend),
            "collab_examples": self.collab_examples,
            "seconds": round(self.seconds, 3),
            "examples_processed": self.examples_processed,
            "trainable_params": self.trainable_params,
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "positives": self.positives,
            "replay_positives": self.replay_positives,
        }


@dataclass
class EvalContext:
    """Everything known at one evaluation point (a period's start), and the users to rank for."""

    period: Period
    relevant: dict[str, set[str]]  # the evaluated users → their relevant items in the period
    profiles: dict[str, UserProfile]  # online profiles as of the period start
    seen: Mapping[str, set[str]]  # user → items with a positive event before the start
    recommendable: list[str]  # existing (created_at <= start) and in stock, most popular first
    catalogue_size: int  # items that exist at the start
    new_items: frozenset[str]  # created since the previous evaluation point
    index: RecallIndex | None
    pipeline: RankingPipeline | None
    k: int = 10
    _served: dict[int, dict[str, list[str]]] = field(default_factory=dict)

    @property
    def users(self) -> list[str]:
        return sorted(self.relevant)

    def exclusions(self, user: str) -> frozenset[str]:
        """What serving never recommends to this user: seen, recent and purchased items."""
        profile = self.profiles.get(user)
        extra = set(profile.recent_items) | set(profile.purchased_items) if profile else set()
        return frozenset(self.seen.get(user, set()) | extra)

    def popular_for(self, user: str, n: int, exclude: frozenset[str] = frozenset()) -> list[str]:
        blocked = self.exclusions(user) | exclude
        out: list[str] = []
        for item in self.recommendable:
            if item not in blocked:
                out.append(item)
                if len(out) == n:
                    break
        return out

    def _models(self, reranker: CrossEncoderReranker | None) -> ServingModels:
        assert self.index is not None, "a re-ranked or recall strategy needs the recall index"
        return ServingModels(cast(CrossEncoderReranker, reranker), "replay", self.index, "replay")

    def serve(self, reranker: CrossEncoderReranker) -> dict[str, list[str]]:
        """Top-k per user from the serving pipeline with this re-ranker (memoised per model:
        strategies sharing one model object, e.g. all three before their first update, are
        scored once)."""
        key = id(reranker)
        if key not in self._served:
            assert self.pipeline is not None
            models = self._models(reranker)
            out = {}
            for user in self.users:
                profile = self.profiles.get(user)
                own = set(profile.recent_items) | set(profile.purchased_items) if profile else set()
                # The pipeline excludes recent and purchased items itself; pass the rest.
                extra = sorted(self.seen.get(user, set()) - own)[:MAX_EXCLUDE]
                answer = self.pipeline.recommend(
                    RecommendInput(user_id=user, k=self.k, exclude_item_ids=tuple(extra)), models
                )
                out[user] = [s.item_id for s in answer.items]
            self._served[key] = out
        return self._served[key]

    def recall_only(self) -> dict[str, list[str]]:
        """Top-k per user from the FAISS stage alone (in-stock filter, popular top-up)."""
        assert self.pipeline is not None
        models = self._models(None)
        out = {}
        for user in self.users:
            exclude = self.exclusions(user)
            candidates = self.pipeline.recall_candidates(
                models, self.profiles.get(user), None, exclude
            )
            features = self.pipeline.fetch_item_features([i for i, _ in candidates])
            kept = [i for i, _ in self.pipeline.filter_candidates(candidates, features)][: self.k]
            if len(kept) < self.k:
                kept += self.popular_for(user, self.k - len(kept), frozenset(kept))
            out[user] = kept
        return out


@dataclass(frozen=True)
class FeedContext:
    """A period being fed to a strategy after its evaluation."""

    period: Period
    trainable: bool  # False for the early holdout: never a re-ranker training example
    events: pd.DataFrame  # every event before the period's end
    positives: Mapping[str, list[Positive]]  # period name → (profile before, item) positives
    history: tuple[str, ...]  # trainable periods fed before this one, oldest first
    catalog: tuple[ItemFeatures, ...]  # items that exist by the period's end
    seed: int
    # `events` without the early holdout's: what a model may learn item factors from
    training_events: pd.DataFrame | None = None


class Strategy(Protocol):
    name: str
    trained_on: tuple[str, ...]  # periods whose events the current model learnt from

    def recommend(self, ctx: EvalContext) -> dict[str, list[str]]: ...

    def update(self, feed: FeedContext) -> UpdateStats: ...


# -- re-ranker training ----------------------------------------------------------------------


class _PeakRss:
    """Peak resident memory sampled at each optimiser step (torch tensors included)."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        self.peak = self._process.memory_info().rss

    def sample(self) -> None:
        self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def mb(self) -> float:
        return self.peak / 2**20


@dataclass
class RerankerTrainer:
    """Fine-tunes re-rankers with the updater's example selection and hyper-parameters.

    The selection mirrors `services.updater.job.run_training`: at most
    `budget // (1 + negatives_per_positive)` positives (budget: `max_examples` from the
    backbone, `incremental_max_examples` from a parent), of which `replay_fraction` come from
    older history when there is a replay set, each with sampled catalogue negatives, every item
    read as known before the positive's event (`as_of`); `learning_rate` from the backbone,
    `incremental_learning_rate` from a parent model.
    """

    config: FreshRecConfig
    load: RerankerLoader
    as_of: ItemAsOf | None = None
    events: pd.DataFrame | None = None  # for popular negatives (all events; drawn before `at`)
    index: RecallIndex | None = None  # the current recall index, for hard negatives

    @property
    def tcfg(self) -> TrainingConfig:
        return self.config.training

    def pretrained(self) -> CrossEncoderReranker:
        return self.load(str(pretrained_path(self.config.model.base_model)))

    def fit(
        self,
        reranker: CrossEncoderReranker,
        new: Sequence[Positive],
        replay: Sequence[Positive] | None,
        catalog: Sequence[ItemFeatures],
        from_parent: bool,
        seed: int,
        events: pd.DataFrame | None = None,
        until: pd.Timestamp | None = None,
    ) -> UpdateStats:
        """One update of `reranker` in place. `events` (every event before `until`, the fed
        period's end) fit the collaborative item factors when the config has them."""
        started = time.perf_counter()
        tcfg = self.tcfg
        rng = np.random.default_rng(seed)
        train_pos, replay_pos = sample_mix(
            list(new),
            list(replay) if replay is not None else None,
            tcfg.incremental_max_examples if from_parent else tcfg.max_examples,
            tcfg.negatives_per_positive,
            tcfg.replay_fraction,
            rng,
        )
        if not train_pos:
            return UpdateStats(seconds=time.perf_counter() - started)
        sampler = self.negatives(catalog)
        features, features_cost = (
            collab_features(tcfg, events, train_pos, reranker.collab if from_parent else None)
            if events is not None
            else (None, None)
        )
        pairs = make_pairs(
            train_pos + replay_pos,
            catalog,
            tcfg.negatives_per_positive,
            rng,
            self.as_of,
            sampler,
            collab=features,
        )
        params = train_params(tcfg, from_parent, seed, reranker.item_side_layers)
        memory = _PeakRss()
        report = train(reranker, pairs, params, lambda _n, _loss: memory.sample())
        collab_examples = 0
        if events is not None:
            reranker.collab, cost = collab_refit(
                tcfg,
                events,
                until.to_pydatetime() if until is not None else None,
                reranker.collab if from_parent else None,
            )
            collab_examples = sum(c.examples_processed for c in (cost, features_cost) if c)
        memory.sample()
        return UpdateStats(
            seconds=time.perf_counter() - started,
            examples_processed=report.examples_processed,
            collab_examples=collab_examples,
            trainable_params=report.trainable_params,
            peak_rss_mb=memory.mb,
            positives=len(train_pos),
            replay_positives=len(replay_pos),
            blend=_blend_tuple(reranker),
        )

    def negatives(self, catalog: Sequence[ItemFeatures]) -> ServingLikeNegatives:
        """The updater's negative sampler over the replay's current index and events."""
        events = (
            self.events
            if self.events is not None
            else pd.DataFrame(columns=["item_id", "event_type", "timestamp"])
        )
        return ServingLikeNegatives.from_events(
            catalog,
            self.index,
            events,
            POSITIVE_EVENT_TYPES,
            self.config.ranking.recall_candidates,
        )

    def bootstrap(
        self, events: pd.DataFrame, items: Mapping[str, ItemFeatures], end: pd.Timestamp
    ) -> tuple[CrossEncoderReranker, UpdateStats, str]:
        """The first re-ranker, through the production `run_training` (parent None) with a
        registry in a temporary directory; the gate's holdout is the newest
        `holdout_fraction` of the bootstrap events, as in the updater service.

        Returns:
            (model, cost, run_training's message).
        """
        started = time.perf_counter()
        memory = _PeakRss()
        before = events[events["timestamp"] < end]
        quantile = before["timestamp"].quantile(1.0 - self.tcfg.holdout_fraction)
        cut = pd.Timestamp(cast(Any, quantile)).floor("us")
        with tempfile.TemporaryDirectory(prefix="freshrec-replay-") as tmp:
            registry = ModelRegistry(Path(tmp))
            outcome = run_training(
                self.config,
                registry,
                before,
                items,
                train_window=Window(None, cut.to_pydatetime()),
                holdout_window=Window(cut.to_pydatetime(), end.to_pydatetime()),
                replay_window=None,
                parent=None,
                reason="replay evaluation bootstrap",
                load_reranker=self.load,
                progress=False,
                index=self.index,
            )
            if outcome.state != "promoted":
                raise ValueError(f"bootstrap training did not produce a model: {outcome.message}")
            model = self.load(str(registry.path("reranker", outcome.challenger_version)))
            trainable = int(
                registry.manifest("reranker", outcome.challenger_version).training[
                    "trainable_params"
                ]
            )
        memory.sample()
        stats = UpdateStats(
            seconds=time.perf_counter() - started,
            examples_processed=outcome.examples,
            trainable_params=trainable,
            peak_rss_mb=memory.mb,
            blend=_blend_tuple(model),
        )
        return model, stats, outcome.message


def _blend_tuple(reranker: CrossEncoderReranker) -> tuple[float, ...]:
    """(bert, popularity, new_arrival, bias, collab) of the model's blend; () without one."""
    blend = reranker.blend
    if blend is None:
        return ()
    return tuple(float(v) for v in blend.all_weights)


def _joined(positives: Mapping[str, list[Positive]], names: Sequence[str]) -> list[Positive]:
    return [p for name in names for p in positives.get(name, [])]


class StaleStrategy:
    """The bootstrap re-ranker, never retrained; profiles and the index still update."""

    name = "stale"

    def __init__(self, reranker: CrossEncoderReranker) -> None:
        self.reranker = reranker
        self.trained_on: tuple[str, ...] = ("bootstrap",)

    def recommend(self, ctx: EvalContext) -> dict[str, list[str]]:
        return ctx.serve(self.reranker)

    def update(self, feed: FeedContext) -> UpdateStats:
        return UpdateStats()


class IncrementalStrategy:
    """Fine-tunes the previous incremental model on the fed window plus a replay sample of all
    earlier trainable history (the updater's design; incremental learning rate)."""

    name = "incremental"

    def __init__(self, reranker: CrossEncoderReranker, trainer: RerankerTrainer) -> None:
        self.reranker = reranker
        self.trainer = trainer
        self.trained_on: tuple[str, ...] = ("bootstrap",)
        self._owned = False

    def recommend(self, ctx: EvalContext) -> dict[str, list[str]]:
        return ctx.serve(self.reranker)

    def update(self, feed: FeedContext) -> UpdateStats:
        if not feed.trainable:
            return UpdateStats()
        if not self._owned:  # the bootstrap model is shared with `stale` until now
            self.reranker = copy.deepcopy(self.reranker)
            self._owned = True
        stats = self.trainer.fit(
            self.reranker,
            feed.positives.get(feed.period.name, []),
            _joined(feed.positives, feed.history),
            feed.catalog,
            from_parent=True,
            seed=feed.seed,
            events=feed.training_events,
            until=feed.period.end,
        )
        self.trained_on = (*self.trained_on, feed.period.name)
        return stats


class FullStrategy:
    """Retrains from the pretrained backbone on everything so far (same pair budget and
    sampling as the bootstrap run: `max_examples` pairs drawn from all trainable history)."""

    name = "full"

    def __init__(self, reranker: CrossEncoderReranker, trainer: RerankerTrainer) -> None:
        self.reranker = reranker
        self.trainer = trainer
        self.trained_on: tuple[str, ...] = ("bootstrap",)

    def recommend(self, ctx: EvalContext) -> dict[str, list[str]]:
        return ctx.serve(self.reranker)

    def update(self, feed: FeedContext) -> UpdateStats:
        if not feed.trainable:
            return UpdateStats()
        names = (*feed.history, feed.period.name)
        fresh = self.trainer.pretrained()
        stats = self.trainer.fit(
            fresh,
            _joined(feed.positives, names),
            None,
            feed.catalog,
            False,
            feed.seed,
            events=feed.training_events,
            until=feed.period.end,
        )
        self.reranker = fresh
        self.trained_on = names
        return stats


class PopularStrategy:
    """Recent popularity (weighted events over the last `popularity_days` before the point)."""

    name = "popular"

    def __init__(self) -> None:
        self.trained_on: tuple[str, ...] = ("bootstrap",)

    def recommend(self, ctx: EvalContext) -> dict[str, list[str]]:
        return {user: ctx.popular_for(user, ctx.k) for user in ctx.users}

    def update(self, feed: FeedContext) -> UpdateStats:
        self.trained_on = (*self.trained_on, feed.period.name)
        return UpdateStats()


class RecallOnlyStrategy:
    """The FAISS recall stage alone: the user's profile vector against item text embeddings."""

    name = "recall-only"

    def __init__(self) -> None:
        self.trained_on: tuple[str, ...] = ("bootstrap",)

    def recommend(self, ctx: EvalContext) -> dict[str, list[str]]:
        return ctx.recall_only()

    def update(self, feed: FeedContext) -> UpdateStats:
        self.trained_on = (*self.trained_on, feed.period.name)
        return UpdateStats()


class ALSStrategy:
    """`implicit`'s ALS (Hu, Koren & Volinsky 2008) on every event so far, confidence =
    EVENT_WEIGHTS mass per (user, item); retrained from scratch at every feed. Users without
    a positive event fall back to recent popularity, as the serving pipeline's cold start does."""

    name = "als"

    def __init__(
        self, users: Sequence[str], items: Sequence[str], factors: int, iterations: int, seed: int
    ) -> None:
        self.users = list(users)
        self.items = list(items)
        self._user_pos = {u: i for i, u in enumerate(self.users)}
        self._item_pos = {i: n for n, i in enumerate(self.items)}
        self.factors = factors
        self.iterations = iterations
        self.seed = seed
        self.user_factors: np.ndarray | None = None
        self.item_factors: np.ndarray | None = None
        self.trained_on: tuple[str, ...] = ()

    def fit(self, events: pd.DataFrame) -> UpdateStats:
        from implicit.cpu.als import AlternatingLeastSquares
        from scipy.sparse import csr_matrix
        from threadpoolctl import threadpool_limits

        started = time.perf_counter()
        memory = _PeakRss()
        weight = events["event_type"].map(EVENT_WEIGHTS).astype("float32")
        keep = (weight > 0).to_numpy()
        rows = events["user_id"].astype(str).map(self._user_pos).to_numpy()[keep]
        cols = events["item_id"].astype(str).map(self._item_pos).to_numpy()[keep]
        matrix = csr_matrix(
            (weight.to_numpy()[keep], (rows, cols)), shape=(len(self.users), len(self.items))
        )
        matrix.sum_duplicates()
        with threadpool_limits(1, "blas"):  # implicit's advice: its own threads, serial BLAS
            model = AlternatingLeastSquares(
                factors=self.factors,
                iterations=self.iterations,
                random_state=self.seed,
                num_threads=0,
            )
            model.fit(matrix, show_progress=False)
        memory.sample()
        self.user_factors = np.asarray(model.user_factors)
        self.item_factors = np.asarray(model.item_factors)
        return UpdateStats(
            seconds=time.perf_counter() - started,
            examples_processed=int(matrix.nnz) * self.iterations,
            trainable_params=int(self.user_factors.size + self.item_factors.size),
            peak_rss_mb=memory.mb,
        )

    def recommend(self, ctx: EvalContext) -> dict[str, list[str]]:
        assert self.user_factors is not None and self.item_factors is not None
        allowed = np.array([self._item_pos[i] for i in ctx.recommendable], dtype=np.int64)
        out: dict[str, list[str]] = {}
        for user in ctx.users:
            seen = ctx.seen.get(user, set())
            row = self._user_pos.get(user)
            if row is None or not seen or len(allowed) == 0:
                out[user] = ctx.popular_for(user, ctx.k)
                continue
            scores = self.item_factors[allowed] @ self.user_factors[row]
            exclude = ctx.exclusions(user)
            order = np.argsort(-scores, kind="stable")
            picks: list[str] = []
            for pos in order:
                item = self.items[int(allowed[pos])]
                if item not in exclude:
                    picks.append(item)
                    if len(picks) == ctx.k:
                        break
            out[user] = picks
        return out

    def update(self, feed: FeedContext) -> UpdateStats:
        stats = self.fit(feed.events)
        self.trained_on = (*self.trained_on, feed.period.name)
        return stats


class StaleALSStrategy(ALSStrategy):
    """The same ALS, fitted once on the bootstrap history and never again. `als` / `als-stale`
    is what retraining buys a model that learns everything it knows from interactions (ids,
    no text, no fresh features): a gauge of how much a data set rewards updating weights at
    all, beside what `incremental` / `stale` shows for the re-ranker.

    Users keep the factors of the bootstrap fit. A user without events at bootstrap has a zero
    factor vector there (ALS's solution for an empty row), so every item scores 0 and the
    stable sort returns the recommendable list, most popular first: recent popularity, as a
    model that was never retrained would serve them."""

    name = "als-stale"

    def update(self, feed: FeedContext) -> UpdateStats:
        return UpdateStats()


def with_popular(index: RecallIndex, popular: list[str], n: int = 200) -> RecallIndex:
    """The index with its cold-start list replaced (the pipeline's fallback)."""
    return replace(index, popular=popular[:n])


def strategy_models(strategies: Sequence[Any]) -> dict[str, CrossEncoderReranker]:
    """name → current re-ranker of the strategies that have one."""
    return {
        s.name: s.reranker
        for s in strategies
        if isinstance(getattr(s, "reranker", None), CrossEncoderReranker)
    }
