"""The replay evaluation end to end (`freshrec eval replay --quick` through the Python API).

One quick replay (tiny shop, 2 windows, tiny re-ranker, real MiniLM recall encoder) is shared
by the structural and leakage tests; a hand-made dataset checks `popular` against metrics
worked out by hand.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import pandas as pd
import pytest

from freshrec.config import load_config
from freshrec.data.schema import EVENT_WEIGHTS, POSITIVE_EVENT_TYPES, Dataset
from services.evaluation.replay import (
    QUICK_SETTINGS,
    STRATEGIES,
    ReplayResult,
    ReplaySettings,
    quick_dataset,
    run_replay,
)
from services.evaluation.strategies import EvalContext, FeedContext, UpdateStats

pytestmark = pytest.mark.integration


class Oracle:
    """Knows the answer: recommends the evaluated users' relevant items (test only)."""

    name = "oracle"
    trained_on: tuple[str, ...] = ()

    def recommend(self, ctx: EvalContext) -> dict[str, list[str]]:
        return {u: sorted(rel)[: ctx.k] for u, rel in ctx.relevant.items()}

    def update(self, feed: FeedContext) -> UpdateStats:
        return UpdateStats()


@pytest.fixture(scope="module")
def quick() -> Iterator[tuple[Dataset, ReplayResult]]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model gains nothing from threads on a busy box
    try:
        dataset = quick_dataset()
        settings = ReplaySettings(**{**QUICK_SETTINGS.__dict__, "progress": False})
        result = run_replay(dataset, load_config(None), settings, extra_strategies=[Oracle()])
        yield dataset, result
    finally:
        torch.set_num_threads(threads)


def test_json_structure_and_ranges(quick: tuple[Dataset, ReplayResult]) -> None:
    _, result = quick
    summary: dict[str, Any] = json.loads(json.dumps(result.summary()))
    assert set(summary) == {"dataset", "windows", "strategies", "forgetting"}
    assert summary["dataset"] == "synthetic" and summary["windows"] == 2
    assert set(STRATEGIES) <= set(summary["strategies"])
    for name, s in summary["strategies"].items():
        for key in ("ndcg@10", "recall@10", "hit@10", "mrr@10", "coverage", "new_share"):
            assert 0.0 <= s[key] <= 1.0, (name, key, s[key])
        assert s["update_seconds"] >= 0 and s["examples_processed"] >= 0
        assert len(s["per_window"]) == 2
        for row in s["per_window"]:
            assert row["users"] > 0
            assert set(row["update"]) >= {"seconds", "examples_processed", "trainable_params"}
    trained = summary["strategies"]
    assert trained["incremental"]["examples_processed"] > 0
    assert trained["full"]["examples_processed"] > 0
    assert trained["stale"]["examples_processed"] == 0
    assert trained["full"]["per_window"][0]["update"]["trainable_params"] > 0
    forgetting = summary["forgetting"]
    assert forgetting["holdout"]["users"] > 0
    for name in ("stale", "incremental", "full", "recall-only"):
        assert 0.0 <= forgetting[name]["ndcg@10_after_last"] <= 1.0
    assert forgetting["stale"]["ratio"] in (None, 1.0)  # never retrained: nothing forgotten
    # The pairwise measure: fixed pairs scored by each model after bootstrap and at the end.
    assert forgetting["holdout"]["pair_users"] > 0 and forgetting["holdout"]["pairs"] > 0
    for name in ("stale", "incremental", "full"):
        assert 0.0 <= forgetting[name]["auc_after_last"] <= 1.0
    assert forgetting["stale"]["auc_after_last"] == forgetting["stale"]["auc_after_bootstrap"]
    assert forgetting["stale"]["auc_ratio"] == 1.0
    # Every trained strategy starts from the same bootstrap model, so the same AUC.
    starts = {forgetting[n]["auc_after_bootstrap"] for n in ("stale", "incremental", "full")}
    assert len(starts) == 1
    assert "auc_after_last" not in forgetting["recall-only"]  # no re-ranker to ask


def test_oracle_scores_one(quick: tuple[Dataset, ReplayResult]) -> None:
    _, result = quick
    for row in result.strategy_summary("oracle")["per_window"]:
        for key in ("ndcg@10", "recall@10", "hit@10", "mrr@10"):
            assert row[key] == pytest.approx(1.0)


def test_relevant_sets_are_the_windows_new_positives(quick: tuple[Dataset, ReplayResult]) -> None:
    dataset, result = quick
    events = dataset.interactions
    positive = events[events["event_type"].isin(POSITIVE_EVENT_TYPES)]
    for w, period in enumerate(result.split.windows):
        assert period.start is not None
        before = positive[positive["timestamp"] < period.start]
        inside = positive[period.mask(positive["timestamp"])]
        for user, relevant in result.relevant[w].items():
            seen = set(before.loc[before["user_id"] == user, "item_id"])
            mine = set(inside.loc[inside["user_id"] == user, "item_id"])
            assert relevant == mine - seen
            assert relevant


def test_no_future_items_and_no_seen_items(quick: tuple[Dataset, ReplayResult]) -> None:
    dataset, result = quick
    created = dict(zip(dataset.items["item_id"], dataset.items["created_at"], strict=True))
    events = dataset.interactions
    positive = events[events["event_type"].isin(POSITIVE_EVENT_TYPES)]
    for w, period in enumerate(result.split.windows):
        before = positive[positive["timestamp"] < period.start]
        for name, per_window in result.recommendations.items():
            if name == "oracle":  # it reads the answers, future items included
                continue
            for user, items in per_window[w].items():
                assert len(items) <= 10
                seen = set(before.loc[before["user_id"] == user, "item_id"])
                for item in items:
                    assert created[item] <= period.start, (name, item)
                    assert item not in seen, (name, user, item)


def test_models_never_saw_the_window_they_are_evaluated_on(
    quick: tuple[Dataset, ReplayResult],
) -> None:
    _, result = quick
    names = [p.name for p in result.split.windows]
    for strategy, rows in result.per_window.items():
        for w, row in enumerate(rows):
            assert not set(row["model_trained_on"]) & set(names[w:]), (strategy, w)
    assert result.per_window["stale"][1]["model_trained_on"] == ["bootstrap"]
    assert result.per_window["incremental"][1]["model_trained_on"] == ["bootstrap", "w0"]
    assert result.per_window["full"][1]["model_trained_on"] == ["bootstrap", "w0"]
    assert result.per_window["als"][1]["model_trained_on"] == ["bootstrap", "holdout", "w0"]
    assert result.per_window["als-stale"][1]["model_trained_on"] == ["bootstrap"]
    for strategy in ("stale", "incremental", "full"):  # the early holdout is never trained on
        assert all("holdout" not in r["model_trained_on"] for r in result.per_window[strategy])


def test_item_factors_learn_from_trained_history_only(
    quick: tuple[Dataset, ReplayResult],
) -> None:
    """Each re-ranker update refits the collaborative item factors on the positive (user, item)
    cells before the fed window's end, without the early holdout's events; `incremental`
    warm-starts (`collab_incremental_iterations`) from its parent's factors, which also
    scored its training pairs; `full` fits from scratch (`collab_iterations`), after a first
    fit on older events for its pairs."""
    dataset, result = quick
    training = load_config(None).training
    warm, scratch = training.collab_incremental_iterations, training.collab_iterations
    events = dataset.interactions
    weight = events["event_type"].map(EVENT_WEIGHTS)
    holdout = result.split.holdout.mask(events["timestamp"])
    for w, period in enumerate(result.split.windows):
        before = events["timestamp"] < period.end if period.end is not None else True
        learnable = events[before & ~holdout & (weight > 0)]
        cells = len(learnable[["user_id", "item_id"]].drop_duplicates())
        incremental = result.per_window["incremental"][w]["update"]
        full = result.per_window["full"][w]["update"]
        assert incremental["collab_examples"] == cells * warm, (period.name, cells)
        # full also counts the first fit that scored its training pairs (older events only)
        assert cells * scratch < full["collab_examples"] < 2 * cells * scratch, period.name
        assert full["collab_examples"] % scratch == 0
        assert len(incremental["blend"]) == 5  # (bert, popularity, new arrival, bias, collab)
    assert all(r["update"]["collab_examples"] == 0 for r in result.per_window["stale"])


def test_als_stale_is_the_bootstrap_als_never_retrained(
    quick: tuple[Dataset, ReplayResult],
) -> None:
    _, result = quick
    fresh, stale = result.recommendations["als"], result.recommendations["als-stale"]
    assert all(stale[w] for w in range(2))
    assert fresh[1] != stale[1]  # retraining on the holdout and w0 moved the fresh one
    assert [r["update"]["examples_processed"] for r in result.per_window["als-stale"]] == [0, 0]
    assert result.per_window["als"][0]["update"]["examples_processed"] > 0
    fresh_ndcg = result.strategy_summary("als")["ndcg@10"]
    stale_ndcg = result.strategy_summary("als-stale")["ndcg@10"]
    got = result.ratios()["als/als-stale ndcg@10"]
    if stale_ndcg:
        assert got == pytest.approx(fresh_ndcg / stale_ndcg, abs=1e-4)
    else:
        assert got is None


def _crafted() -> Dataset:
    """Six old items, 20 clicks an hour apart: 12 bootstrap, 2 holdout, 6 in window w0."""
    rows = [
        *[("u1", "A"), ("u1", "B"), ("u2", "A"), ("u2", "B"), ("u2", "C"), ("u3", "A")],
        *[("u3", "C"), ("u4", "A"), ("u4", "B"), ("u5", "C"), ("u5", "D"), ("u6", "A")],
        *[("u6", "B"), ("u5", "E")],  # holdout
        *[("u1", "C"), ("u1", "F"), ("u2", "D"), ("u3", "A"), ("u3", "E"), ("u7", "A")],
    ]
    start = pd.Timestamp("2024-02-01", tz="UTC")
    interactions = pd.DataFrame(
        {
            "event_id": [f"e{i}" for i in range(len(rows))],
            "user_id": [u for u, _ in rows],
            "item_id": [i for _, i in rows],
            "event_type": "click",
            "timestamp": [start + pd.Timedelta(hours=h) for h in range(len(rows))],
        }
    )
    ids = list("ABCDEF")
    items = pd.DataFrame(
        {
            "item_id": ids,
            "title": [f"item {i}" for i in ids],
            "description": "",
            "category": "c",
            "brand": "b",
            "price": 1.0,
            "created_at": pd.Timestamp("2024-01-01", tz="UTC"),
            "in_stock": True,
        }
    )
    return Dataset("crafted", items, interactions)


def test_popular_on_a_crafted_dataset_matches_the_hand_computation() -> None:
    settings = ReplaySettings(
        windows=1,
        bootstrap_fraction=0.6,
        holdout_fraction=0.1,
        max_users_per_window=None,
        holdout_users=None,
        progress=False,
    )
    result = run_replay(_crafted(), load_config(None), settings, strategies=("popular",))
    # Popularity at w0's start: A 5, B 4, C 3, D 1, E 1 (id breaks the tie), F 0.
    assert result.relevant[0] == {"u1": {"C", "F"}, "u2": {"D"}, "u3": {"E"}, "u7": {"A"}}
    recs = result.recommendations["popular"][0]
    assert recs == {
        "u1": ["C", "D", "E", "F"],  # A, B seen
        "u2": ["D", "E", "F"],  # A, B, C seen
        "u3": ["B", "D", "E", "F"],  # A, C seen
        "u7": ["A", "B", "C", "D", "E", "F"],  # no history
    }
    row = result.per_window["popular"][0]
    ndcg_u1 = (1 + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
    assert row["ndcg@10"] == pytest.approx((ndcg_u1 + 1 + 0.5 + 1) / 4, abs=1e-6)
    assert row["recall@10"] == pytest.approx(1.0)
    assert row["hit@10"] == pytest.approx(1.0)
    assert row["mrr@10"] == pytest.approx((1 + 1 + 1 / 3 + 1) / 4, abs=1e-6)
    assert row["coverage"] == pytest.approx(1.0)
    assert row["new_share"] == 0.0
