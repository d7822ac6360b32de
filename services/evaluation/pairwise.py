"""Forgetting, measured on the re-ranker itself: does it still rank an early holdout's positives
above other items of the catalogue as well as it did?

The replay's headline forgetting figure is NDCG@10 of the whole pipeline on the early holdout.
That is what users see, but it rests on few hits: on the synthetic shop ~11 of 126 users have a
relevant item in their top 10, so one hit moves it by ~9% and a 3% tolerance cannot be checked.
This measure asks the model directly, on many more comparisons: for each holdout user, their
relevant items against `negatives` random catalogue items (existing, in stock, never seen by
that user), scored by the re-ranker with the user's context as of the holdout's start; the
AUC per user (the share of (positive, negative) pairs ordered right), averaged over users.
The pairs, texts and user contexts are fixed once after bootstrap; only the model changes.
Pure: the caller supplies texts and the scoring function.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PairGroup:
    """One user's comparisons: their context, item texts with the positives first."""

    user_text: str
    item_texts: tuple[str, ...]
    positives: int
    item_ids: tuple[str, ...] = ()  # aligned with item_texts
    history: tuple[tuple[str, float], ...] = ()  # the user's fold-in history (model/collab.py)


def holdout_pairs(
    relevant: Mapping[str, set[str]],
    user_texts: Mapping[str, str],
    pool: Sequence[str],
    excluded: Callable[[str], frozenset[str]],
    item_text: Callable[[str], str | None],
    negatives: int,
    seed: int,
    histories: Mapping[str, Mapping[str, float]] | None = None,
) -> list[PairGroup]:
    """A group per user with at least one positive that has a text and `negatives` sampled
    from `pool` minus the user's exclusions and positives (fewer if the pool is small).

    Args:
        item_text: the ranking text of an item as of the holdout's start; None = not in the
            catalogue then (such positives are unreachable and skipped).
    """
    rng = np.random.default_rng(seed)
    groups: list[PairGroup] = []
    for user in sorted(relevant):
        positives = [(i, t) for i in sorted(relevant[user]) if (t := item_text(i)) is not None]
        if not positives:
            continue
        blocked = excluded(user) | relevant[user]
        candidates = [i for i in pool if i not in blocked]
        if not candidates:
            continue
        picks = rng.choice(len(candidates), size=min(negatives, len(candidates)), replace=False)
        drawn = [candidates[int(p)] for p in picks]
        negative = [(i, t) for i in drawn if (t := item_text(i)) is not None]
        if negative:
            both = (*positives, *negative)
            history = tuple((histories or {}).get(user, {}).items())
            groups.append(
                PairGroup(
                    user_texts[user],
                    tuple(t for _, t in both),
                    len(positives),
                    tuple(i for i, _ in both),
                    history,
                )
            )
    return groups


def group_auc(scores: np.ndarray, positives: int) -> float:
    """Share of (positive, negative) pairs with the positive scored higher; ties count half."""
    pos = np.asarray(scores[:positives], dtype=np.float64)[:, None]
    neg = np.asarray(scores[positives:], dtype=np.float64)[None, :]
    if pos.size == 0 or neg.size == 0:
        raise ValueError("a group needs at least one positive and one negative")
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size))


def mean_auc(score: Callable[[PairGroup], np.ndarray], groups: Sequence[PairGroup]) -> float | None:
    """Mean over groups of `group_auc` of `score(group)` (one score per item text); None
    without groups."""
    if not groups:
        return None
    return float(np.mean([group_auc(score(g), g.positives) for g in groups]))
