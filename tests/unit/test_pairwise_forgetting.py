"""Pairwise forgetting (services/evaluation/pairwise.py): pairs, AUC, and the mean."""

from __future__ import annotations

import numpy as np
import pytest

from services.evaluation.pairwise import PairGroup, group_auc, holdout_pairs, mean_auc


def test_group_auc_counts_ordered_pairs_and_half_ties() -> None:
    assert group_auc(np.array([0.9, 0.1, 0.2]), 1) == 1.0
    assert group_auc(np.array([0.0, 0.1, 0.2]), 1) == 0.0
    # positives 0.5, 0.3 vs negatives 0.4, 0.3: (1 + 1) + (0 + 0.5) of 4 pairs
    assert group_auc(np.array([0.5, 0.3, 0.4, 0.3]), 2) == pytest.approx(2.5 / 4)
    with pytest.raises(ValueError):
        group_auc(np.array([0.5]), 1)


def _pairs(negatives: int = 3, seed: int = 0):  # type: ignore[no-untyped-def]
    relevant = {"u1": {"a", "gone"}, "u2": {"b"}, "u3": {"gone"}}
    texts = {i: f"text of {i}" for i in "abcdefgh"}  # "gone" has no text: not in the catalogue
    return holdout_pairs(
        relevant,
        {"u1": "ctx 1", "u2": "ctx 2", "u3": "ctx 3"},
        pool=list("abcdefgh"),
        excluded=lambda u: frozenset({"c"}) if u == "u1" else frozenset(),
        item_text=texts.get,
        negatives=negatives,
        seed=seed,
    )


def test_holdout_pairs_skip_unknown_positives_and_never_sample_excluded_items() -> None:
    groups = _pairs()
    assert [g.user_text for g in groups] == ["ctx 1", "ctx 2"]  # u3 has no known positive
    first, second = groups
    assert first.positives == 1 and first.item_texts[0] == "text of a"
    assert len(first.item_texts) == 4
    negatives = set(first.item_texts[1:])
    assert not negatives & {"text of a", "text of c"}  # own positive and exclusions
    assert "text of b" not in second.item_texts[1:]
    assert _pairs() == groups  # seeded
    assert len(_pairs(negatives=100)[0].item_texts) == 1 + 6  # capped by the pool
    # Ids travel aligned with the texts, with the user's history when one is given.
    assert first.item_ids == tuple(t.removeprefix("text of ") for t in first.item_texts)
    with_history = holdout_pairs(
        {"u2": {"b"}},
        {"u2": "ctx 2"},
        pool=list("abc"),
        excluded=lambda _u: frozenset(),
        item_text=lambda i: f"text of {i}",
        negatives=2,
        seed=0,
        histories={"u2": {"a": 1.0}},
    )
    assert with_history[0].history == (("a", 1.0),)


def test_mean_auc_asks_the_scorer_and_averages_over_users() -> None:
    groups = _pairs()

    def perfect(group: PairGroup) -> np.ndarray:
        return np.array([1.0] + [0.0] * (len(group.item_texts) - 1))

    def backwards(group: PairGroup) -> np.ndarray:
        return np.array([0.0] + [1.0] * (len(group.item_texts) - 1))

    assert mean_auc(perfect, groups) == 1.0
    assert mean_auc(backwards, groups) == 0.0
    assert mean_auc(perfect, []) is None
