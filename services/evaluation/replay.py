"""Replay evaluation: bootstrap on the first ~60% of events, then for each later window evaluate
every strategy on it and feed it in. See docs/evaluation.md for the protocol.

`run_replay` is the Python API (the CLI's `freshrec eval replay` calls it); it returns a
`ReplayResult` whose `summary()` is the JSON object the CLI prints last.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from freshrec.config import FreshRecConfig
from freshrec.data.schema import EVENT_WEIGHTS, Dataset
from model.collab import profile_history
from model.evaluation import METRIC_NAMES, catalogue_coverage, mean_metrics, share_of
from model.index import RecallIndex
from model.popularity import PopularityClock
from model.reranker import CrossEncoderReranker, pretrained_path
from model.text import item_text, ranking_item_text, user_context_text
from services.evaluation.pairwise import PairGroup, holdout_pairs, mean_auc
from services.evaluation.protocol import (
    FeatureState,
    Period,
    ReplaySplit,
    item_catalogue,
    recent_popularity,
    relevant_sets,
    sample_users,
    split_periods,
)
from services.evaluation.strategies import (
    ALSStrategy,
    EvalContext,
    FeedContext,
    FullStrategy,
    IncrementalStrategy,
    PopularStrategy,
    RecallOnlyStrategy,
    RerankerTrainer,
    StaleALSStrategy,
    StaleStrategy,
    Strategy,
    UpdateStats,
    strategy_models,
    with_popular,
)
from services.features.reader import InMemoryFeatureStore
from services.ranking.pipeline import PipelineSettings, RankingPipeline
from services.updater.examples import positives_in_windows

STRATEGIES = ("stale", "incremental", "full", "popular", "recall-only", "als", "als-stale")
RERANKED = ("stale", "incremental", "full")
FORGETTING_STRATEGIES = ("stale", "incremental", "full", "recall-only")


@dataclass(frozen=True)
class ReplaySettings:
    """Knobs of one replay run; validated on construction."""

    windows: int = 8
    bootstrap_fraction: float = 0.6
    holdout_fraction: float = 0.05  # share of all events: the early holdout slice
    k: int = 10
    recall_candidates: int = 50  # the serving default (RankingConfig.recall_candidates)
    popular_candidates: int = 20  # the serving default (RankingConfig.popular_candidates)
    max_users_per_window: int | None = 60  # seeded sample of active users; None = all
    holdout_users: int | None = 60
    holdout_negatives: int = 50  # random catalogue items per holdout user (pairwise forgetting)
    train_examples: int | None = None  # pairs per training run; None = config's max_examples
    # pairs per incremental update; None = config's training.incremental_max_examples
    incremental_examples: int | None = None
    popularity_days: float = 7.0
    als_factors: int = 64
    als_iterations: int = 15
    tiny_model: bool = False  # CrossEncoderReranker.tiny() instead of MiniLM (--quick only)
    torch_threads: int = 0  # torch intra-op threads; 0 = config.model.torch_threads, else default
    seed: int = 7
    progress: bool = True

    def __post_init__(self) -> None:
        if self.windows < 1:
            raise ValueError(f"windows must be >= 1, got {self.windows}")
        if not 1 <= self.k <= 100:
            raise ValueError(f"k must be in 1..100, got {self.k}")
        if self.recall_candidates < self.k:
            raise ValueError(
                f"recall_candidates must be >= k ({self.k}), got {self.recall_candidates}"
            )
        for name in (
            "max_users_per_window",
            "holdout_users",
            "train_examples",
            "incremental_examples",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        if self.popular_candidates < 0:
            raise ValueError(f"popular_candidates must be >= 0, got {self.popular_candidates}")
        if self.holdout_negatives < 1:
            raise ValueError(f"holdout_negatives must be >= 1, got {self.holdout_negatives}")
        if self.popularity_days <= 0:
            raise ValueError(f"popularity_days must be > 0, got {self.popularity_days}")


@dataclass
class ReplayResult:
    """Everything one replay measured. `summary()` is the CLI's JSON object."""

    dataset: str
    split: ReplaySplit
    settings: ReplaySettings
    per_window: dict[str, list[dict[str, Any]]]  # strategy → one entry per window
    recommendations: dict[str, list[dict[str, list[str]]]]  # strategy → window → user → items
    relevant: list[dict[str, set[str]]]  # window → evaluated user → relevant items
    forgetting: dict[str, Any]
    bootstrap: dict[str, Any]
    wall_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def strategy_summary(self, name: str) -> dict[str, Any]:
        rows = self.per_window[name]
        k = self.settings.k
        out: dict[str, Any] = {}
        for metric in (*(f"{m}@{k}" for m in METRIC_NAMES), "coverage", "new_share"):
            out[metric] = float(np.mean([r[metric] for r in rows])) if rows else 0.0
        updates = [r["update"] for r in rows]
        out["update_seconds"] = round(sum(u["seconds"] for u in updates), 3)
        out["examples_processed"] = int(sum(u["examples_processed"] for u in updates))
        out["trainable_params"] = max((u["trainable_params"] for u in updates), default=0)
        out["peak_rss_mb"] = max((u["peak_rss_mb"] for u in updates), default=0.0)
        out["eval_seconds"] = round(sum(r["eval_seconds"] for r in rows), 3)
        out["per_window"] = rows
        return out

    def summary(self) -> dict[str, Any]:
        """{"dataset", "windows", "strategies": {name: {...}}, "forgetting": {...}}."""
        return {
            "dataset": self.dataset,
            "windows": self.settings.windows,
            "strategies": {name: self.strategy_summary(name) for name in self.per_window},
            "forgetting": self.forgetting,
        }

    def ratios(self) -> dict[str, float | None]:
        """The issue's comparisons on mean NDCG@k and on update cost (None if undefined)."""
        k = self.settings.k
        s = {n: self.strategy_summary(n) for n in self.per_window}

        def ratio(a: str, b: str, key: str) -> float | None:
            if a not in s or b not in s or not s[b][key]:
                return None
            return round(s[a][key] / s[b][key], 4)

        metric = f"ndcg@{k}"
        return {
            f"incremental/full {metric}": ratio("incremental", "full", metric),
            f"incremental/stale {metric}": ratio("incremental", "stale", metric),
            f"incremental/recall-only {metric}": ratio("incremental", "recall-only", metric),
            f"full/recall-only {metric}": ratio("full", "recall-only", metric),
            f"incremental/als {metric}": ratio("incremental", "als", metric),
            f"incremental/popular {metric}": ratio("incremental", "popular", metric),
            # what retraining buys a model that learns only from interactions (a gauge)
            f"als/als-stale {metric}": ratio("als", "als-stale", metric),
            f"full/stale {metric}": ratio("full", "stale", metric),
            "incremental/full examples": ratio("incremental", "full", "examples_processed"),
            "incremental/full update seconds": ratio("incremental", "full", "update_seconds"),
        }

    def details(self) -> dict[str, Any]:
        """The summary plus run metadata (settings, wall time, bootstrap cost, ratios)."""
        return {
            **self.summary(),
            "settings": self.settings.__dict__,
            "periods": [_period_json(p) for p in self.split.all],
            "bootstrap": self.bootstrap,
            "ratios": self.ratios(),
            "wall_seconds": round(self.wall_seconds, 1),
            **self.extra,
        }


def _pair_scorer(model: CrossEncoderReranker) -> Callable[[PairGroup], np.ndarray]:
    """The model's relevance for a forgetting group, its collaborative term included (what
    serving applies), so the measure covers everything a version learnt."""

    def score(group: PairGroup) -> np.ndarray:
        relevance = model.score(group.user_text, group.item_texts)
        return model.add_collab(relevance, dict(group.history), group.item_ids)

    return score


def _iso(ts: pd.Timestamp | None) -> str | None:
    return None if ts is None else ts.isoformat()


def _period_json(p: Period) -> dict[str, Any]:
    return {"name": p.name, "start": _iso(p.start), "end": _iso(p.end)}


def _default_loader(config: FreshRecConfig, tiny: bool, seed: int) -> Callable[[str], Any]:
    backbone = str(pretrained_path(config.model.base_model))

    def load(path: str) -> CrossEncoderReranker:
        if tiny:
            if path == backbone:  # "from the pretrained backbone" = a fresh tiny model
                return CrossEncoderReranker.tiny(seed=seed, joint_layers=config.model.joint_layers)
            return CrossEncoderReranker.from_pretrained(path, max_length=32, device="cpu")
        return CrossEncoderReranker.from_pretrained(
            path,
            config.model.max_length,
            config.model.device,
            config.model.rerank_dtype,
            joint_layers=config.model.joint_layers,
            seed=config.training.seed,
        )

    return load


class _Bar:
    def __init__(self, enabled: bool, total: int, desc: str) -> None:
        self.bar = tqdm(total=total, desc=desc, unit="step", disable=not enabled, leave=False)

    def step(self, label: str) -> None:
        self.bar.set_postfix_str(label)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def run_replay(
    dataset: Dataset,
    config: FreshRecConfig,
    settings: ReplaySettings,
    strategies: Sequence[str] = STRATEGIES,
    extra_strategies: Sequence[Strategy] = (),
    encoder: Any = None,
    loader: Callable[[str], CrossEncoderReranker] | None = None,
    say: Callable[[str], None] = lambda _m: None,
) -> ReplayResult:
    """Run the replay protocol on `dataset` for the named strategies (plus injected ones).

    Args:
        config: the FreshRec config; its `training` section sets the re-ranker's training
            (`settings.train_examples`, when given, replaces `max_examples`).
        strategies: names out of STRATEGIES, in report order.
        extra_strategies: more strategies (tests inject an oracle).
        encoder: the recall TextEncoder; default: the pretrained MiniLM.
        loader: path → re-ranker; default: MiniLM from the package (tiny in --quick).
        say: one-line progress messages.

    Raises:
        ValueError: an unknown strategy name, or too few events to split.
    """
    import torch

    threads = settings.torch_threads or config.model.torch_threads
    before = torch.get_num_threads()
    if threads:
        # On a shared 2-core box one thread is several times faster than two that spin
        # waiting for each other (measured 1.0 s vs 2.4-5.4 s for 50 pairs under load 10).
        torch.set_num_threads(threads)
    try:
        return _run_replay(
            dataset, config, settings, strategies, extra_strategies, encoder, loader, say
        )
    finally:
        torch.set_num_threads(before)


def _run_replay(
    dataset: Dataset,
    config: FreshRecConfig,
    settings: ReplaySettings,
    strategies: Sequence[str] = STRATEGIES,
    extra_strategies: Sequence[Strategy] = (),
    encoder: Any = None,
    loader: Callable[[str], CrossEncoderReranker] | None = None,
    say: Callable[[str], None] = lambda _m: None,
) -> ReplayResult:
    """`run_replay` without the thread setting."""
    started = time.perf_counter()
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise ValueError(f"strategies must be among {', '.join(STRATEGIES)}, got {unknown}")
    budgets: dict[str, int] = {}
    if settings.train_examples is not None:
        budgets["max_examples"] = settings.train_examples
    if settings.incremental_examples is not None:
        budgets["incremental_max_examples"] = settings.incremental_examples
    if budgets:
        training = config.training.model_copy(update=budgets)
        config = config.model_copy(update={"training": training})
    events = dataset.interactions.sort_values("timestamp", kind="stable").reset_index(drop=True)
    split = split_periods(
        events, settings.windows, settings.bootstrap_fraction, settings.holdout_fraction
    )
    items = item_catalogue(dataset)
    # popularity_7d as the daily batch would have materialised it at any instant
    clock = PopularityClock.from_events(events, EVENT_WEIGHTS)
    created = {i: pd.Timestamp(f.created_at) if f.created_at else None for i, f in items.items()}
    item_ids = list(items)
    needs_recall = any(s in (*RERANKED, "recall-only") for s in strategies)
    needs_reranker = any(s in RERANKED for s in strategies)

    def exists_at(t: pd.Timestamp) -> list[str]:
        return [i for i in item_ids if (c := created[i]) is None or c <= t]

    # -- bootstrap ---------------------------------------------------------------------------
    boot_end = split.bootstrap.end
    assert boot_end is not None
    say(f"bootstrap: {int((events['timestamp'] < boot_end).sum())} events before {boot_end}")
    state = FeatureState.bootstrap(events, dataset.items, boot_end)
    bootstrap: dict[str, Any] = {"end": _iso(boot_end)}
    vectors: dict[str, np.ndarray] = {}
    index: RecallIndex | None = None
    if needs_recall:
        t0 = time.perf_counter()
        if encoder is None:
            from model.embeddings import TextEncoder

            encoder = TextEncoder.from_pretrained(config.model.base_model or None)
        texts = [item_text(items[i]) for i in item_ids]
        with tqdm(
            total=len(texts), desc="embed items", unit="item", disable=not settings.progress
        ) as bar:
            matrix = encoder.encode(texts, progress=bar.update)
        vectors = {i: matrix[n] for n, i in enumerate(item_ids)}
        live = exists_at(boot_end)
        index = RecallIndex.build(np.stack([vectors[i] for i in live]), live)
        bootstrap["embed_seconds"] = round(time.perf_counter() - t0, 2)
    positives: dict[str, list[Any]] = {}
    trainer: RerankerTrainer | None = None
    boot_model: CrossEncoderReranker | None = None
    if needs_reranker:
        t0 = time.perf_counter()
        positives = positives_in_windows(events, items, {p.name: p.window for p in split.all})
        bootstrap["positives_seconds"] = round(time.perf_counter() - t0, 2)
        trainer = RerankerTrainer(
            config,
            loader or _default_loader(config, settings.tiny_model, settings.seed),
            clock.stamp,
            events,
            index,
        )
        existing = {i: items[i] for i in exists_at(boot_end)}
        say("bootstrap: training the first re-ranker (services.updater.job.run_training)")
        boot_model, stats, message = trainer.bootstrap(events, existing, boot_end)
        bootstrap["reranker"] = {**stats.to_dict(), "message": message}

    active: list[Strategy] = []
    for name in strategies:
        if name == "stale":
            assert boot_model is not None
            active.append(StaleStrategy(boot_model))
        elif name == "incremental":
            assert boot_model is not None and trainer is not None
            active.append(IncrementalStrategy(boot_model, trainer))
        elif name == "full":
            assert boot_model is not None and trainer is not None
            active.append(FullStrategy(boot_model, trainer))
        elif name == "popular":
            active.append(PopularStrategy())
        elif name == "recall-only":
            active.append(RecallOnlyStrategy())
        elif name in ("als", "als-stale"):
            kind = ALSStrategy if name == "als" else StaleALSStrategy
            als = kind(
                sorted(events["user_id"].astype(str).unique()),
                item_ids,
                settings.als_factors,
                settings.als_iterations,
                settings.seed,
            )
            twin = next((s for s in active if isinstance(s, ALSStrategy)), None)
            if twin is not None:  # one bootstrap fit for both: they differ only in updates
                assert twin.user_factors is not None and twin.item_factors is not None
                als.user_factors = twin.user_factors.copy()
                als.item_factors = twin.item_factors.copy()
            else:
                bootstrap["als"] = als.fit(events[events["timestamp"] < boot_end]).to_dict()
            als.trained_on = ("bootstrap",)
            active.append(als)
    active.extend(extra_strategies)

    def context(period: Period, previous: pd.Timestamp | None, cap: int | None) -> EvalContext:
        nonlocal index
        start = period.start
        assert start is not None
        period_events = events[period.mask(events["timestamp"])]
        relevant_all = relevant_sets(period_events, state.seen)
        users = sample_users(
            list(relevant_all), cap, settings.seed + zlib.crc32(period.name.encode())
        )
        existing = exists_at(start)
        popular = recent_popularity(
            events,
            start,
            settings.popularity_days,
            [i for i in existing if items[i].in_stock],
        )
        pipeline = None
        if index is not None:
            new_ids = [i for i in existing if i not in index]
            if new_ids:  # items created since the last point: recallable from their text now
                index = index.with_changes(upserts={i: vectors[i] for i in new_ids})
            index = with_popular(index, popular)
            if trainer is not None:
                trainer.index = index  # hard negatives come from what serving recalls now
            now = start.to_pydatetime()
            pipeline = RankingPipeline(
                InMemoryFeatureStore(
                    state.profiles.values(), (clock.stamp(items[i], start) for i in existing)
                ),
                PipelineSettings(
                    recall_candidates=settings.recall_candidates,
                    popular_candidates=settings.popular_candidates,
                    max_k=max(100, settings.k),
                    exploration_slots=0,
                    exploration_rate=0.0,
                ),
                now=lambda: now,
            )
        new_items = frozenset(
            i
            for i in existing
            if (c := created[i]) is not None and (previous is None or c > previous)
        )
        return EvalContext(
            period=period,
            relevant={u: relevant_all[u] for u in users},
            profiles=dict(state.profiles),
            seen={u: set(state.seen.get(u, set())) for u in users},
            recommendable=popular,
            catalogue_size=len(existing),
            new_items=new_items,
            index=index,
            pipeline=pipeline,
            k=settings.k,
        )

    def score(ctx: EvalContext, recs: dict[str, list[str]]) -> dict[str, Any]:
        metrics = mean_metrics(recs, ctx.relevant, ctx.k)
        all_relevant = [i for rel in ctx.relevant.values() for i in rel]
        unreachable = [
            i
            for i in all_relevant
            if (c := created[i]) is not None
            and ctx.period.start is not None
            and c > ctx.period.start
        ]
        return {
            **{k: round(v, 6) for k, v in metrics.items() if k != "users"},
            "users": int(metrics["users"]),
            "coverage": round(catalogue_coverage(recs.values(), ctx.catalogue_size), 6),
            "new_share": round(share_of(recs.values(), ctx.new_items), 6),
            "unreachable_share": round(len(unreachable) / len(all_relevant), 6)
            if all_relevant
            else 0.0,
        }

    # -- the early holdout, right after bootstrap -------------------------------------------
    holdout_ctx = context(split.holdout, None, settings.holdout_users)
    forgetting: dict[str, Any] = {
        "holdout": {**_period_json(split.holdout), "users": len(holdout_ctx.relevant)}
    }
    k = settings.k
    forget_before: dict[str, dict[str, Any]] = {}
    for strategy in active:
        if strategy.name in FORGETTING_STRATEGIES:
            forget_before[strategy.name] = score(holdout_ctx, strategy.recommend(holdout_ctx))
    # The same question asked of the re-ranker alone, on many more comparisons
    # (services/evaluation/pairwise.py): fixed pairs, texts and contexts; only models change.
    holdout_start = split.holdout.start
    assert holdout_start is not None
    holdout_now = holdout_start.to_pydatetime()

    def holdout_text(item_id: str) -> str | None:
        c = created.get(item_id)
        if item_id not in items or (c is not None and c > holdout_start):
            return None
        return ranking_item_text(clock.stamp(items[item_id], holdout_start), holdout_now)

    pair_groups = holdout_pairs(
        holdout_ctx.relevant,
        {u: user_context_text(holdout_ctx.profiles.get(u)) for u in holdout_ctx.relevant},
        holdout_ctx.recommendable,
        holdout_ctx.exclusions,
        holdout_text,
        settings.holdout_negatives,
        settings.seed,
        {u: profile_history(holdout_ctx.profiles.get(u)) for u in holdout_ctx.relevant},
    )
    forgetting["holdout"]["pair_users"] = len(pair_groups)
    forgetting["holdout"]["pairs"] = sum(
        g.positives * (len(g.item_texts) - g.positives) for g in pair_groups
    )
    auc_before = {
        name: mean_auc(_pair_scorer(model), pair_groups)
        for name, model in strategy_models(active).items()
        if name in FORGETTING_STRATEGIES
    }

    def feed(
        period: Period, trainable: bool, history: tuple[str, ...], seed: int
    ) -> list[UpdateStats]:
        period_events = events[period.mask(events["timestamp"])]
        state.feed(period_events, items, period.end)
        if period.end is None:
            so_far, end = events, pd.Timestamp(events["timestamp"].max())
        else:
            so_far, end = events[events["timestamp"] < period.end], period.end
        catalog = tuple(items[i] for i in exists_at(end))
        learnable = so_far[~split.holdout.mask(so_far["timestamp"])]
        fc = FeedContext(period, trainable, so_far, positives, history, catalog, seed, learnable)
        return [s.update(fc) for s in active]

    boot_feed = feed(split.holdout, False, ("bootstrap",), settings.seed)
    bootstrap["holdout_feed_seconds"] = {
        s.name: round(u.seconds, 3) for s, u in zip(active, boot_feed, strict=True)
    }

    # -- windows: evaluate, then feed --------------------------------------------------------
    per_window: dict[str, list[dict[str, Any]]] = {s.name: [] for s in active}
    recommendations: dict[str, list[dict[str, list[str]]]] = {s.name: [] for s in active}
    relevant: list[dict[str, set[str]]] = []
    history: tuple[str, ...] = ("bootstrap",)
    previous = split.holdout.start
    windows_bar = tqdm(split.windows, desc="windows", unit="window", disable=not settings.progress)
    for w, period in enumerate(windows_bar):
        ctx = context(period, previous, settings.max_users_per_window)
        relevant.append(ctx.relevant)
        bar = _Bar(settings.progress, 2 * len(active), period.name)
        rows: dict[str, dict[str, Any]] = {}
        for strategy in active:
            t0 = time.perf_counter()
            recs = strategy.recommend(ctx)
            recommendations[strategy.name].append(recs)
            rows[strategy.name] = {
                "window": period.name,
                "start": _iso(period.start),
                "end": _iso(period.end),
                **score(ctx, recs),
                "eval_seconds": round(time.perf_counter() - t0, 3),
                "model_trained_on": list(strategy.trained_on),
            }
            bar.step(f"eval {strategy.name}")
        for strategy, stats in zip(
            active, feed(period, True, history, settings.seed + 1 + w), strict=True
        ):
            rows[strategy.name]["update"] = stats.to_dict()
            per_window[strategy.name].append(rows[strategy.name])
            bar.step(f"update {strategy.name}")
        bar.close()
        history = (*history, period.name)
        previous = period.start
        say(
            f"{period.name}: {len(ctx.relevant)} users; "
            + ", ".join(f"{n} {rows[n][f'ndcg@{k}']:.4f}" for n in rows)
        )
    windows_bar.close()

    # -- forgetting: the same holdout context, the models as they are now ---------------------
    holdout_ctx._served.clear()
    models_now = strategy_models(active)
    for strategy in active:
        if strategy.name not in forget_before:
            continue
        after = score(holdout_ctx, strategy.recommend(holdout_ctx))
        before = forget_before[strategy.name]
        metric = f"ndcg@{k}"
        forgetting[strategy.name] = {
            f"{metric}_after_bootstrap": before[metric],
            f"{metric}_after_last": after[metric],
            f"hit@{k}_after_bootstrap": before[f"hit@{k}"],
            f"hit@{k}_after_last": after[f"hit@{k}"],
            "ratio": round(after[metric] / before[metric], 4) if before[metric] else None,
            "has_model": strategy.name in models_now,
        }
        model_now = models_now.get(strategy.name)
        auc_then = auc_before.get(strategy.name)
        if model_now is not None and auc_then is not None:
            auc_now = mean_auc(_pair_scorer(model_now), pair_groups)
            assert auc_now is not None
            forgetting[strategy.name].update(
                auc_after_bootstrap=round(auc_then, 6),
                auc_after_last=round(auc_now, 6),
                auc_ratio=round(auc_now / auc_then, 4) if auc_then else None,
                # Above chance (0.5): how much of what the model knew about these users it kept.
                auc_lift_ratio=round((auc_now - 0.5) / (auc_then - 0.5), 4)
                if auc_then != 0.5
                else None,
            )
    return ReplayResult(
        dataset=dataset.name,
        split=split,
        settings=settings,
        per_window=per_window,
        recommendations=recommendations,
        relevant=relevant,
        forgetting=forgetting,
        bootstrap=bootstrap,
        wall_seconds=time.perf_counter() - started,
    )


def quick_dataset(seed: int = 7) -> Dataset:
    """The small synthetic shop `--quick` replays (seconds, for `make test`)."""
    from freshrec.data import generate_shop

    return generate_shop(seed=seed, n_items=150, n_users=60, days=20, events_per_user=40.0)


QUICK_SETTINGS = ReplaySettings(
    windows=2,
    holdout_fraction=0.1,
    max_users_per_window=20,
    holdout_users=20,
    train_examples=64,
    incremental_examples=16,
    als_factors=8,
    als_iterations=3,
    tiny_model=True,
    recall_candidates=20,
    popular_candidates=10,
    torch_threads=1,
)
