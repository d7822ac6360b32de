"""Ranking metrics of the replay evaluation, against values worked out by hand."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from model.evaluation import (
    catalogue_coverage,
    mean_metrics,
    paired_ratio_interval,
    share_of,
    user_metrics,
)
from services.evaluation.protocol import relevant_sets, sample_users, split_periods


def test_user_metrics_hand_computed() -> None:
    # Relevant b (rank 1) and d (rank 3, outside k=3): one hit at 0-based rank 1.
    m = user_metrics(["a", "b", "c", "d"], {"b", "d"}, k=3)
    idcg = 1.0 + 1.0 / math.log2(3)
    assert m["ndcg@3"] == pytest.approx((1.0 / math.log2(3)) / idcg)  # 0.38685
    assert m["ndcg@3"] == pytest.approx(0.386853, abs=1e-6)
    assert m["recall@3"] == pytest.approx(0.5)  # 1 hit / min(3, 2)
    assert m["hit@3"] == 1.0
    assert m["mrr@3"] == pytest.approx(0.5)


def test_perfect_and_empty_lists() -> None:
    perfect = user_metrics(["x", "y"], {"x", "y"}, k=10)
    assert perfect == {"ndcg@10": 1.0, "recall@10": 1.0, "hit@10": 1.0, "mrr@10": 1.0}
    # More relevant items than k: a list of k relevant items is still perfect.
    many = user_metrics(["a", "b"], {"a", "b", "c", "d"}, k=2)
    assert many["ndcg@2"] == pytest.approx(1.0) and many["recall@2"] == pytest.approx(1.0)
    none = user_metrics([], {"x"}, k=10)
    assert none == {"ndcg@10": 0.0, "recall@10": 0.0, "hit@10": 0.0, "mrr@10": 0.0}


def test_repeats_count_once_and_bad_arguments() -> None:
    m = user_metrics(["a", "a", "b"], {"b"}, k=2)
    assert m["mrr@2"] == pytest.approx(0.5)  # the repeat of "a" does not push "b" out
    with pytest.raises(ValueError, match="k must be >= 1"):
        user_metrics(["a"], {"a"}, k=0)
    with pytest.raises(ValueError, match="relevant"):
        user_metrics(["a"], set(), k=1)


def test_mean_metrics_missing_user_scores_zero() -> None:
    out = mean_metrics({"u1": ["a"]}, {"u1": {"a"}, "u2": {"b"}, "u3": set()}, k=10)
    assert out["users"] == 2.0  # u3 has nothing relevant: not scored
    assert out["ndcg@10"] == pytest.approx(0.5)
    assert out["hit@10"] == pytest.approx(0.5)


def test_coverage_and_share() -> None:
    recs = [["a", "b"], ["b", "c"]]
    assert catalogue_coverage(recs, 10) == pytest.approx(0.3)
    assert catalogue_coverage(recs, 0) == 0.0
    assert share_of(recs, {"b"}) == pytest.approx(0.5)
    assert share_of([], {"b"}) == 0.0


def _events(rows: list[tuple[str, str, str]]) -> pd.DataFrame:
    start = pd.Timestamp("2024-01-01", tz="UTC")
    return pd.DataFrame(
        {
            "event_id": [f"e{i}" for i in range(len(rows))],
            "user_id": [r[0] for r in rows],
            "item_id": [r[1] for r in rows],
            "event_type": [r[2] for r in rows],
            "timestamp": [start + pd.Timedelta(hours=i) for i in range(len(rows))],
        }
    )


def test_relevant_sets_exclude_seen_and_non_positive() -> None:
    window = _events([("u1", "a", "click"), ("u1", "b", "impression"), ("u2", "c", "purchase")])
    assert relevant_sets(window, {"u1": set(), "u2": {"c"}}) == {"u1": {"a"}}


def test_split_periods_are_contiguous_and_chronological() -> None:
    events = _events([("u", f"i{i}", "click") for i in range(100)])
    split = split_periods(events, windows=4, bootstrap_fraction=0.6, holdout_fraction=0.05)
    periods = split.all
    assert [p.name for p in periods] == ["bootstrap", "holdout", "w0", "w1", "w2", "w3"]
    for before, after in itertools.pairwise(periods):
        assert before.end == after.start
    counts = [int(p.mask(events["timestamp"]).sum()) for p in periods]
    assert counts == [60, 5, 9, 9, 8, 9]
    with pytest.raises(ValueError, match="too few"):
        split_periods(events.head(3), windows=4, bootstrap_fraction=0.6, holdout_fraction=0.05)


def test_sample_users_is_seeded_and_capped() -> None:
    users = [f"u{i}" for i in range(50)]
    a = sample_users(users, 10, seed=3)
    assert a == sample_users(list(reversed(users)), 10, seed=3)
    assert len(a) == 10 and a == sorted(a)
    assert sample_users(users, None, seed=3) == sorted(users)


def test_paired_ratio_interval_brackets_the_ratio_and_knows_exact_cases() -> None:
    rng = np.random.default_rng(1)
    reference = rng.uniform(0.0, 1.0, size=200)
    served = np.clip(reference + rng.normal(0.0, 0.2, size=200), 0.0, 1.0)

    low, high = paired_ratio_interval(served, reference)
    point = served.mean() / reference.mean()
    assert low < point < high
    assert high - low < 0.3
    # Deterministic for a seed; a wider level gives a wider interval.
    assert paired_ratio_interval(served, reference) == (low, high)
    wide = paired_ratio_interval(served, reference, level=0.99)
    assert wide[0] < low and wide[1] > high
    # Exact cases: a constant ratio has no spread, whichever users are drawn.
    assert paired_ratio_interval(reference, reference) == pytest.approx((1.0, 1.0))
    assert paired_ratio_interval(2 * reference, reference) == pytest.approx((2.0, 2.0))


def test_paired_ratio_interval_rejects_unpaired_or_empty_input() -> None:
    with pytest.raises(ValueError, match="pair one value per user"):
        paired_ratio_interval([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="pair one value per user"):
        paired_ratio_interval([], [])
    with pytest.raises(ValueError, match="level must be in"):
        paired_ratio_interval([0.1], [0.1], level=1.0)
