"""Serving-like negatives (model/negatives.py): the re-ranker trains against the candidates it
will have to order — the user's FAISS neighbours and what is popular — not only random items."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd

from freshrec.records import Example, ItemFeatures, UserProfile
from model.index import RecallIndex
from model.negatives import ServingLikeNegatives

T = datetime(2026, 4, 1, 12, tzinfo=UTC)
N = 40
CATALOG = [
    ItemFeatures(f"i{n:02d}", title=f"Item {n}", created_at=T - timedelta(days=60))
    for n in range(N)
]


def _index() -> RecallIndex:
    """Two clusters: items 0-19 near e0, items 20-39 near e1."""
    rng = np.random.default_rng(0)
    rows = np.zeros((N, 8), dtype=np.float32)
    rows[:20, 0] = 1.0
    rows[20:, 1] = 1.0
    rows += 0.05 * rng.normal(size=rows.shape).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return RecallIndex.build(rows, [i.item_id for i in CATALOG])


def _events(rows: list[tuple[str, str, datetime]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["item_id", "event_type", "timestamp"])


def test_negatives_cycle_hard_popular_random_and_respect_time() -> None:
    events = _events(
        [("i30", "click", T - timedelta(days=2))] * 5  # popular just before: i30
        + [("i31", "click", T + timedelta(hours=1))] * 50  # after the event: never drawn
        + [("i32", "click", T - timedelta(days=9))] * 50  # too old
        + [("i33", "impression", T - timedelta(days=1))] * 50  # not a positive type
    )
    sampler = ServingLikeNegatives.from_events(
        CATALOG, _index(), events, ("click", "add_to_cart", "purchase"), recall_k=5
    )
    profile = UserProfile("u", recent_items=("i00", "i01"), recent_text="Item 0 | Item 1")
    rng = np.random.default_rng(1)

    hard_ids, popular_ids = set(), set()
    for _ in range(30):
        negs = sampler(Example(profile, CATALOG[2], T), 3, rng)
        assert len(negs) == 3 == len({n.item_id for n in negs})
        assert not {"i00", "i01", "i02"} & {n.item_id for n in negs}
        hard_ids.add(negs[0].item_id)
        popular_ids.add(negs[1].item_id)

    assert hard_ids <= {f"i{n:02d}" for n in range(3, 20)}  # the user's own cluster
    assert popular_ids == {"i30"}
    assert sampler.drawn == {"hard": 30, "popular": 30, "random": 30}


def test_a_cold_user_without_recent_events_gets_random_negatives() -> None:
    sampler = ServingLikeNegatives.from_events(
        CATALOG, _index(), _events([]), ("click",), recall_k=5
    )

    negs = sampler(Example(None, CATALOG[0], T), 3, np.random.default_rng(2))

    assert len(negs) == 3 and CATALOG[0] not in negs
    assert sampler.drawn == {"hard": 0, "popular": 0, "random": 3}


def test_items_created_after_the_event_are_never_negatives() -> None:
    late = [
        ItemFeatures(f"n{n}", title=f"New {n}", created_at=T + timedelta(days=1)) for n in range(5)
    ]
    sampler = ServingLikeNegatives.from_events(
        [*CATALOG[:3], *late],
        None,
        _events([("n0", "click", T - timedelta(days=1))] * 10),
        ("click",),
    )

    for seed in range(10):
        negs = sampler(Example(None, CATALOG[0], T), 2, np.random.default_rng(seed))
        assert {n.item_id for n in negs} == {"i01", "i02"}  # n0 was popular, but not yet born
