"""One training run, start to finish: positives → pairs → fine-tune → gate → publish.

Used for the first version (from the pretrained backbone) and for every incremental update
(from the champion). The challenger and the champion are scored on the same held-out groups,
which the challenger never trained on; the challenger is promoted only if it reaches the
champion's NDCG@10 plus `gate_margin`. Every challenger is published (sealed, immutable) so
the decision and its metrics stay inspectable; rejected ones are recorded as such.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from freshrec.config import FreshRecConfig, TrainingConfig
from freshrec.data.schema import EVENT_WEIGHTS, POSITIVE_EVENT_TYPES
from freshrec.records import Example, ItemFeatures
from model.artifacts import Manifest
from model.blend import ScoreBlend
from model.collab import CollabFactors, CollabFit, fit_collab
from model.index import RecallIndex
from model.negatives import ServingLikeNegatives
from model.popularity import PopularityClock
from model.reranker import CrossEncoderReranker, pretrained_path
from model.training import TrainParams, evaluate, make_eval_groups, make_pairs, train
from services.registry import ModelRegistry
from services.updater.examples import Window, positives_in_windows, sample, sample_mix

log = logging.getLogger(__name__)

GATE_METRIC = "ndcg@10"
EVAL_GROUPS = 150
EVAL_CANDIDATES = 10

RerankerFactory = Callable[[str], CrossEncoderReranker]


@dataclass
class JobOutcome:
    state: str  # promoted | rejected | skipped
    challenger_version: str = ""
    champion_version: str = ""
    challenger_metric: float = 0.0
    champion_metric: float = 0.0
    message: str = ""
    examples: int = 0
    seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)


def train_params(
    tcfg: TrainingConfig,
    from_parent: bool,
    seed: int | None = None,
    item_side_layers: int | None = None,
) -> TrainParams:
    """The fine-tuning hyper-parameters of `training.*`: `incremental_learning_rate` and
    `incremental_freeze_layers` when starting from a parent version, `learning_rate` and
    `freeze_layers` from the pretrained backbone.

    Args:
        item_side_layers: the model's layers below its joint layers
            (`CrossEncoderReranker.item_side_layers`; None: a full cross-encoder). Unless
            `incremental_freeze_layers` is set, an update freezes at least these: it keeps its
            parent's item states, and a swap to it computes none.
    """
    frozen = tcfg.freeze_layers
    if from_parent:
        if tcfg.incremental_freeze_layers is not None:
            frozen = tcfg.incremental_freeze_layers
        elif item_side_layers is not None:
            frozen = max(frozen, item_side_layers)
    return TrainParams(
        learning_rate=tcfg.incremental_learning_rate if from_parent else tcfg.learning_rate,
        epochs=tcfg.epochs,
        batch_size=tcfg.batch_size,
        freeze_layers=frozen,
        frozen_eval=tcfg.frozen_eval,
        cpu_dtype=tcfg.cpu_dtype,
        seed=tcfg.seed if seed is None else seed,
    )


def serving_like_negatives(
    config: FreshRecConfig,
    catalog: Sequence[ItemFeatures],
    index: RecallIndex | None,
    events: pd.DataFrame,
) -> ServingLikeNegatives:
    """The negatives every re-ranker training run draws: the user's own recall candidates,
    popular and random items (`model.negatives`). `freshrec bench quality` draws them with
    this too, so it measures the recipe that serves."""
    return ServingLikeNegatives.from_events(
        catalog, index, events, POSITIVE_EVENT_TYPES, config.ranking.recall_candidates
    )


def collab_features(
    tcfg: TrainingConfig,
    events: pd.DataFrame,
    positives: Sequence[Example],
    parent: CollabFactors | None,
) -> tuple[CollabFactors | None, CollabFit | None]:
    """Item factors to score a run's training pairs with (`make_pairs(collab=...)`), never
    fitted on the events they score, and the cost of any fit made for them: the parent's
    factors for an update (fitted before its window; no cost); from scratch, a fit on events
    before the newest `collab_feature_share` of the positives' times, which then score only
    those newest pairs. None when the collaborative term is off or nothing is early enough
    to fit on."""
    if tcfg.collab_factors == 0:
        return None, None
    if parent is not None and parent.k == tcfg.collab_factors:
        return parent, None
    times = sorted(pd.Timestamp(p[2]) for p in positives if p[2] is not None)
    if len(times) < 2:
        return None, None
    cut = times[min(len(times) - 1, int(len(times) * (1.0 - tcfg.collab_feature_share)))]
    try:
        return fit_collab(
            events,
            cut.to_pydatetime(),
            tcfg.collab_factors,
            tcfg.collab_iterations,
            tcfg.collab_regularization,
            tcfg.seed,
        )
    except ValueError:  # no positive event before the cut
        return None, None


def collab_refit(
    tcfg: TrainingConfig,
    events: pd.DataFrame,
    until: datetime | None,
    parent: CollabFactors | None,
) -> tuple[CollabFactors | None, CollabFit | None]:
    """The new version's item factors: every positive event before `until` (the training
    window's end; never the gate's holdout), warm-started from the parent's factors with
    `collab_incremental_iterations`, or from scratch with `collab_iterations`."""
    if tcfg.collab_factors == 0:
        return None, None
    warm = parent if parent is not None and parent.k == tcfg.collab_factors else None
    if until is not None:
        end = until
    else:  # every event: one microsecond past the newest
        end = (
            pd.Timestamp(events["timestamp"].max()) + pd.Timedelta(microseconds=1)
        ).to_pydatetime()
    try:
        return fit_collab(
            events,
            end,
            tcfg.collab_factors,
            tcfg.collab_incremental_iterations if warm is not None else tcfg.collab_iterations,
            tcfg.collab_regularization,
            tcfg.seed,
            parent=warm,
        )
    except ValueError:
        return None, None


def _collab_record(
    factors: CollabFactors | None, cost: CollabFit | None, features_cost: CollabFit | None
) -> dict | None:
    if factors is None or cost is None:
        return None
    return {
        # a from-scratch run's first fit, which scored the training pairs (0: the parent's)
        "feature_fit_examples": features_cost.examples_processed if features_cost else 0,
        "items": len(factors.item_ids),
        "factors": factors.k,
        "fitted_until": _iso(factors.fitted_until),
        "interactions": cost.interactions,
        "iterations": cost.iterations,
        "warm_start": cost.warm_start,
        "seconds": round(cost.seconds, 3),
    }


def _iso(ts: datetime | pd.Timestamp | None) -> str:
    return "" if ts is None else pd.Timestamp(ts).isoformat()


def run_training(
    config: FreshRecConfig,
    registry: ModelRegistry,
    events: pd.DataFrame,
    items: Mapping[str, ItemFeatures],
    train_window: Window,
    holdout_window: Window,
    replay_window: Window | None,
    parent: str | None,
    reason: str,
    load_reranker: RerankerFactory | None = None,
    force_promote: bool = False,
    progress: bool = True,
    index: RecallIndex | None = None,
) -> JobOutcome:
    """Train a challenger on `train_window` (+ replay), gate it on `holdout_window`, publish.

    Args:
        events: canonical interactions, all history up to the holdout's end (context).
        items: every item's features; negatives are sampled from them.
        parent: the champion version to start from; None = the pretrained backbone.
        load_reranker: path -> re-ranker (tests pass a tiny-model factory).
        force_promote: promote even if the gate says no (operator override; recorded).
        index: the recall index hard negatives come from; default the registry's champion
            index (none: negatives are popular and random only).
    """
    started = time.perf_counter()
    tcfg = config.training
    load = load_reranker or (
        lambda path: CrossEncoderReranker.from_pretrained(
            path,
            config.model.max_length,
            config.model.device,
            config.model.rerank_dtype,
            joint_layers=config.model.joint_layers,
            seed=tcfg.seed,
        )
    )
    rng = np.random.default_rng(tcfg.seed)
    windows = {"train": train_window, "holdout": holdout_window}
    if replay_window is not None:
        windows["replay"] = replay_window
    positives = positives_in_windows(events, items, windows)
    train_pos, replay_pos = sample_mix(
        positives["train"],
        positives["replay"] if replay_window is not None else None,
        tcfg.incremental_max_examples if parent is not None else tcfg.max_examples,
        tcfg.negatives_per_positive,
        tcfg.replay_fraction,
        rng,
    )
    holdout_pos = sample(positives["holdout"], EVAL_GROUPS, rng)
    if len(train_pos) < config.updater.min_new_events and parent is not None:
        return JobOutcome(
            "skipped",
            champion_version=parent or "",
            message=f"only {len(train_pos)} new positives (< {config.updater.min_new_events})",
            seconds=time.perf_counter() - started,
        )
    if not holdout_pos or not train_pos:
        return JobOutcome(
            "skipped",
            champion_version=parent or "",
            message=(
                f"not enough positive events to train and evaluate: {len(train_pos)} in the "
                f"training window, {len(holdout_pos)} held out; no version published"
            ),
        )
    catalog: Sequence[ItemFeatures] = list(items.values())
    # Items as known before each event (popularity_7d), never from the labels' own events;
    # negatives drawn like serving's candidates (FAISS neighbours, popular, random), for the
    # training pairs and for the gate's groups alike.
    clock = PopularityClock.from_events(events, EVENT_WEIGHTS)
    if index is None and (index_version := registry.champion("index")) is not None:
        index = RecallIndex.load(registry.path("index", index_version))
    sampler = serving_like_negatives(config, catalog, index, events)
    source = (
        str(registry.path("reranker", parent))
        if parent
        else str(pretrained_path(config.model.base_model))
    )
    challenger = load(source)
    features, features_cost = collab_features(tcfg, events, train_pos, challenger.collab)
    pairs = make_pairs(
        train_pos + replay_pos,
        catalog,
        tcfg.negatives_per_positive,
        rng,
        clock.stamp,
        sampler,
        collab=features,
    )
    negatives_drawn = dict(sampler.drawn)
    groups = make_eval_groups(
        holdout_pos,
        catalog,
        EVAL_CANDIDATES,
        np.random.default_rng(tcfg.seed + 1),
        clock.stamp,
        sampler,
    )
    champion_metrics: dict[str, float] = {}
    if parent is not None:
        champion = load(source)
        champion_metrics = evaluate(champion, groups)
        del champion
    params = train_params(
        tcfg, from_parent=parent is not None, item_side_layers=challenger.item_side_layers
    )
    with tqdm(
        total=len(pairs) * params.epochs, desc="fine-tune", unit="pair", disable=not progress
    ) as bar:

        def on_step(n: int, loss: float) -> None:
            bar.update(n)
            bar.set_postfix(loss=f"{loss:.3f}")

        report = train(challenger, pairs, params, on_step)
    challenger.collab, collab_cost = collab_refit(tcfg, events, train_window.end, challenger.collab)
    metrics = evaluate(challenger, groups)
    sealed = registry.publish_written(
        "reranker",
        challenger.save,
        Manifest(
            kind="reranker",
            version="",
            parent=parent,
            data_window={
                "start": _iso(train_window.start),
                "end": _iso(train_window.end),
                "holdout_end": _iso(holdout_window.end),
            },
            metrics={**metrics, **{f"champion_{k}": v for k, v in champion_metrics.items()}},
            training={
                "examples": report.examples_processed,
                "positives": len(train_pos),
                "replay_positives": len(replay_pos),
                "seconds": round(report.seconds, 2),
                "trainable_params": report.trainable_params,
                "device": report.device,
                "final_loss": report.final_loss,
                "learning_rate": params.learning_rate,
                "freeze_layers": params.freeze_layers,
                "frozen_eval": params.frozen_eval,
                "negatives": negatives_drawn,
                "blend": _blend_record(challenger.blend),
                "collab": _collab_record(challenger.collab, collab_cost, features_cost),
            },
            reason=reason,
        ),
    )
    challenger_metric = metrics[GATE_METRIC]
    champion_metric = champion_metrics.get(GATE_METRIC, float("-inf"))
    passes = parent is None or challenger_metric >= champion_metric + tcfg.gate_margin
    detail = {
        "challenger_metric": challenger_metric,
        "champion_metric": champion_metric if parent else None,
        "margin": tcfg.gate_margin,
        "parent": parent,
        "forced": force_promote and not passes,
    }
    if passes or force_promote:
        registry.promote("reranker", sealed.version, reason=reason)
        registry.record_decision("reranker", sealed.version, "promoted", detail)
        state = "promoted"
        message = (
            f"{sealed.version} promoted: {GATE_METRIC} {challenger_metric:.4f}"
            + (f" vs champion {champion_metric:.4f}" if parent else " (first version)")
            + (" (forced by operator)" if not passes else "")
        )
    else:
        registry.record_decision("reranker", sealed.version, "rejected", detail)
        state = "rejected"
        message = (
            f"{sealed.version} rejected: {GATE_METRIC} {challenger_metric:.4f} < champion "
            f"{champion_metric:.4f} + margin {tcfg.gate_margin}; {parent} keeps serving"
        )
    log.info(message)
    return JobOutcome(
        state=state,
        challenger_version=sealed.version,
        champion_version=registry.champion("reranker") or "",
        challenger_metric=challenger_metric,
        champion_metric=champion_metric if parent else 0.0,
        message=message,
        examples=report.examples_processed,
        seconds=time.perf_counter() - started,
        metrics=metrics,
    )


def _blend_record(blend: ScoreBlend | None) -> dict[str, Any] | None:
    """The blend's weights for the manifest; its precision matrix stays in blend.json."""
    if blend is None:
        return None
    return {k: v for k, v in asdict(blend).items() if k != "precision"}
