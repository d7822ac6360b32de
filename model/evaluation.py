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

import numpy as np

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


def paired_ratio_interval(
    numerator: Sequence[float],
    denominator: Sequence[float],
    level: float = 0.9,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(numerator) / mean(denominator) over users.

    The two sequences are paired (one entry per user, the same users in the same order):
    resampling users together keeps what the two rankers share, so the interval is about the
    ratio, not about which users happened to be held out.

    Raises:
        ValueError: unpaired or empty inputs, or a level outside (0, 1).
    """
    if len(numerator) != len(denominator) or not len(numerator):
        raise ValueError(
            f"numerator and denominator must pair one value per user, got {len(numerator)} "
            f"and {len(denominator)}"
        )
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    a = np.asarray(numerator, dtype=np.float64)
    b = np.asarray(denominator, dtype=np.float64)
    picks = np.random.default_rng(seed).integers(0, len(a), size=(resamples, len(a)))
    ratios = a[picks].mean(axis=1) / np.maximum(b[picks].mean(axis=1), 1e-12)
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(ratios, [tail, 100.0 - tail])
    return float(low), float(high)


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
