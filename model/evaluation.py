"""Top-k ranking metrics with binary relevance over a full ranking (no sampled negatives).

Pure functions used by the replay evaluation (`services/evaluation`). Conventions:
    - NDCG@k: DCG = sum over hits at 0-based rank r of 1 / log2(r + 2); the ideal DCG puts
      min(k, |relevant|) hits at the top, so a perfect list scores 1.
    - Recall@k: hits / min(k, |relevant|) (Liang et al., 2018), so a perfect list scores 1
      even when a user has more than k relevant items.
    - HitRate@k: 1 if any of the top k is relevant.
    - MRR@k: 1 / (rank of the first hit + 1), 0 without a hit in the top k.
Users without relevant items are not scored (callers skip them).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence

METRIC_NAMES = ("ndcg", "recall", "hit", "mrr")


def user_metrics(
    recommended: Sequence[str], relevant: Collection[str], k: int = 10
) -> dict[str, float]:
    """NDCG@k, Recall@k, HitRate@k and MRR@k of one ranked list.

    Args:
        recommended: item ids, best first; only the first k count; repeats count once.
        relevant: the user's relevant item ids; must not be empty.
        k: cut-off, >= 1.

    Returns:
        {"ndcg@k", "recall@k", "hit@k", "mrr@k"}, each in [0, 1].

    Raises:
        ValueError: k < 1 or no relevant items.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not relevant:
        raise ValueError("relevant must hold at least one item")
    relevant_set = set(relevant)
    top: list[str] = []
    for item in recommended:
        if item not in top:
            top.append(item)
        if len(top) == k:
            break
    hits = [r for r, item in enumerate(top) if item in relevant_set]
    ideal = min(k, len(relevant_set))
    dcg = sum(1.0 / math.log2(r + 2.0) for r in hits)
    idcg = sum(1.0 / math.log2(r + 2.0) for r in range(ideal))
    return {
        f"ndcg@{k}": dcg / idcg,
        f"recall@{k}": len(hits) / ideal,
        f"hit@{k}": 1.0 if hits else 0.0,
        f"mrr@{k}": 1.0 / (hits[0] + 1.0) if hits else 0.0,
    }


def mean_metrics(
    recommendations: Mapping[str, Sequence[str]],
    relevant: Mapping[str, Collection[str]],
    k: int = 10,
) -> dict[str, float]:
    """User-averaged `user_metrics` over the users of `relevant` that have relevant items.

    A user of `relevant` missing from `recommendations` got an empty list (scores 0).

    Returns:
        The four metrics averaged, plus "users" (how many were scored); zeros if none.
    """
    names = [f"{m}@{k}" for m in METRIC_NAMES]
    totals = dict.fromkeys(names, 0.0)
    users = 0
    for user, rel in relevant.items():
        if not rel:
            continue
        scores = user_metrics(recommendations.get(user, ()), rel, k)
        for name in names:
            totals[name] += scores[name]
        users += 1
    out = {name: (total / users if users else 0.0) for name, total in totals.items()}
    out["users"] = float(users)
    return out


def catalogue_coverage(recommendations: Iterable[Sequence[str]], catalogue_size: int) -> float:
    """Distinct recommended items / catalogue size (0 for an empty catalogue)."""
    if catalogue_size <= 0:
        return 0.0
    distinct = {item for items in recommendations for item in items}
    return len(distinct) / catalogue_size


def share_of(recommendations: Iterable[Sequence[str]], subset: Collection[str]) -> float:
    """Share of all recommended slots holding an item of `subset` (0 with no slots)."""
    slots = 0
    inside = 0
    for items in recommendations:
        for item in items:
            slots += 1
            inside += item in subset
    return inside / slots if slots else 0.0
