"""`freshrec bench quality`: does the fast re-ranker keep the full cross-encoder's quality?

Both models are fine-tuned from the same pretrained backbone on the same pairs with the same
hyper-parameters (the updater's own pair recipe: `sample_mix` + `make_pairs` with its
serving-like negatives, `model.negatives.ServingLikeNegatives`), then re-rank the same recall
candidates for held-out users:

- reference: the full cross-encoder (every layer joint), run in fp32 with plain transformers;
- served: the configured architecture (`model.joint_layers`) through its serving path, at the
  serving precision (int8 user side when `model.user_side_int8`).

Protocol: the workdir's offline event log in time order; positives of the window
[`train_start`, `holdout_start`) train, later interactions are held out. For each held-out user
with history, the candidates are what serving recalls (FAISS, the champion index, the profile
as it stood at the start of the hold-out, seen items excluded); relevant = the user's held-out
positive items among them. NDCG@10 over users with at least one relevant candidate (binary
relevance; the recall order's NDCG on the same candidates is reported for context).
`ndcg_ratio_ci90` is a 90% paired bootstrap interval of the served/reference ratio over those
users: with ~150 held-out users the point estimate alone says little about a 2% margin.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from freshrec.config import load_config
from freshrec.errors import FailedPrecondition


def bench_quality(
    workdir: Path,
    candidates: int = 50,
    max_users: int = 300,
    train_fraction: float = 0.5,
    holdout_fraction: float = 0.15,
    say: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Train both models and compare them; returns the JSON-able result."""
    from freshrec.data.schema import EVENT_WEIGHTS
    from freshrec.records import UserProfile
    from model.embeddings import user_vector
    from model.evaluation import paired_ratio_interval, user_metrics
    from model.index import RecallIndex
    from model.popularity import PopularityClock
    from model.reranker import CrossEncoderReranker, pretrained_path
    from model.text import ranking_item_text, user_context_text
    from model.training import make_pairs, train
    from services.features.profiles import read_item_catalog
    from services.features.store import ITEM_FEATURES_TABLE
    from services.ingestion.offline_log import OfflineEventLog
    from services.registry import open_registry
    from services.updater.examples import Window, positives_in_windows, sample_mix
    from services.updater.job import serving_like_negatives, train_params

    config = load_config(workdir)
    registry = open_registry(config)
    index_version = registry.champion("index")
    if index_version is None:
        raise FailedPrecondition(
            f"no index in {workdir}: run `freshrec init --workdir {workdir}` first"
        )
    index = RecallIndex.load(registry.path("index", index_version))
    items = read_item_catalog(config.offline_dir / ITEM_FEATURES_TABLE)
    events = OfflineEventLog(config.offline_dir).read()
    stamps = events["timestamp"]
    # Cut points on real event times (a quantile may fall between two events).
    train_start = pd.Timestamp(stamps.iloc[int(len(stamps) * train_fraction)])
    holdout_start = pd.Timestamp(stamps.iloc[int(len(stamps) * (1 - holdout_fraction))])
    windows = {
        "train": Window(train_start, holdout_start),
        "holdout": Window(holdout_start, None),
    }
    positives = positives_in_windows(events, items, windows)
    tcfg = config.training
    rng = np.random.default_rng(tcfg.seed)
    train_pos, _ = sample_mix(
        positives["train"], None, tcfg.max_examples, tcfg.negatives_per_positive, 0.0, rng
    )
    clock = PopularityClock.from_events(events, EVENT_WEIGHTS)
    catalog = list(items.values())
    # Negatives drawn as the updater draws them (services/updater/job.py): the user's own
    # recall candidates, popular items and random ones. Until stop 19 this benchmark drew
    # uniform random negatives only, a recipe nothing served.
    sampler = serving_like_negatives(config, catalog, index, events)
    pairs = make_pairs(train_pos, catalog, tcfg.negatives_per_positive, rng, clock.stamp, sampler)
    start = holdout_start.to_pydatetime()  # candidates are read as serving had them then
    params = train_params(tcfg, from_parent=False)
    backbone = pretrained_path(config.model.base_model)
    joint = config.model.joint_layers

    def trained(joint_layers: int | None, dtype: Any) -> tuple[CrossEncoderReranker, float]:
        model = CrossEncoderReranker.from_pretrained(
            backbone, config.model.max_length, "cpu", dtype, joint_layers=joint_layers
        )
        started = time.perf_counter()
        train(model, pairs, params)
        return model, time.perf_counter() - started

    say(f"training the reference cross-encoder on {len(pairs):,} pairs")
    reference, reference_s = trained(None, "fp32")
    say(f"training the served architecture ({'split-' + str(joint) if joint else 'cross'})")
    served, served_s = trained(joint, config.model.rerank_dtype)
    served.prepare_serving(config.model.user_side_int8, config.model.item_states_int8)

    # Held-out users: the profile before a user's first held-out positive is the one serving
    # held at the hold-out start; relevant = their held-out positives.
    profiles: dict[str, UserProfile] = {}
    relevant: dict[str, set[str]] = {}
    for profile, item, _at in positives["holdout"]:
        if profile is not None:
            profiles.setdefault(profile.user_id, profile)
            relevant.setdefault(profile.user_id, set()).add(item.item_id)
    ranked: dict[str, dict[str, list[str]]] = {"served": {}, "reference": {}, "recall": {}}
    scored: dict[str, set[str]] = {}
    users = sorted(relevant)
    order = np.random.default_rng(tcfg.seed).permutation(len(users))
    for pick in order:
        if len(scored) >= max_users:
            break
        user = users[int(pick)]
        profile = profiles[user]
        vec = user_vector(index.vectors_of(profile.recent_items))
        if vec is None:
            continue
        seen = set(profile.recent_items) | set(profile.purchased_items)
        found = index.search(vec, candidates, frozenset(seen))
        ids = [i for i, _ in found if i in items and items[i].in_stock]
        hits = (relevant[user] - seen) & set(ids)
        if not hits:  # nothing to re-rank into place: the same for every re-ranker
            continue
        texts = [ranking_item_text(clock.stamp(items[i], start), start) for i in ids]
        context = user_context_text(profile)
        for name, model in (("served", served), ("reference", reference)):
            scores = model.score(context, texts)
            ranked[name][user] = [ids[j] for j in np.argsort(-scores, kind="stable")]
        ranked["recall"][user] = ids
        scored[user] = hits
    # NDCG@10 per scored user, then averaged as `mean_metrics` does (the interval needs both).
    per_user = {
        name: [user_metrics(lists[u], scored[u])["ndcg@10"] for u in scored]
        for name, lists in ranked.items()
    }
    ndcg = {name: sum(v) / len(v) if v else 0.0 for name, v in per_user.items()}
    ref = ndcg["reference"]
    interval = (
        paired_ratio_interval(per_user["served"], per_user["reference"], seed=tcfg.seed)
        if ref > 0
        else None
    )
    return {
        "ndcg@10_served": round(ndcg["served"], 4),
        "ndcg@10_reference": round(ref, 4),
        "ndcg@10_recall_order": round(ndcg["recall"], 4),
        "ndcg_ratio_vs_reference": (round(ndcg["served"] / ref, 4) if ref > 0 else None),
        # 90% paired bootstrap interval over the held-out users (model/evaluation.py).
        "ndcg_ratio_ci90": [round(v, 4) for v in interval] if interval else None,
        "users": len(scored),
        "candidates": candidates,
        "training_pairs": len(pairs),
        "negatives_drawn": dict(sampler.drawn),
        "architecture": served.architecture,
        "item_states_int8": served.item_states_int8,
        "served_dtype": config.model.rerank_dtype,
        "train_seconds": {"served": round(served_s, 1), "reference": round(reference_s, 1)},
        "holdout_start": holdout_start.isoformat(),
    }
