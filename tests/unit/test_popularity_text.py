"""Point-in-time popularity (model/popularity.py) and the re-ranker's item text (model/text.py):
training must read an item as serving knew it *before* the event, never from the labels."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from freshrec.data.schema import EVENT_WEIGHTS
from freshrec.records import Example, ItemFeatures, UserProfile
from model.popularity import PopularityClock
from model.text import RankingTextMemo, item_text, popularity_level, ranking_item_text
from model.training import make_eval_groups, make_pairs

DAY = timedelta(days=1)
T0 = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


def _events(rows: list[tuple[str, str, datetime]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["item_id", "event_type", "timestamp"])


def test_the_clock_counts_the_seven_full_days_before_the_day_of_t() -> None:
    clock = PopularityClock.from_events(
        _events(
            [
                ("a", "click", T0 - 8 * DAY),  # too old on T0's day
                ("a", "purchase", T0 - 7 * DAY),  # first of the 7 days
                ("a", "add_to_cart", T0 - 1 * DAY),
                ("a", "impression", T0 - 1 * DAY),  # weighs 0
                ("a", "click", T0 - timedelta(hours=1)),  # same day as T0: not yet known
                ("a", "click", T0 + DAY),  # the future
                ("b", "click", T0 - 2 * DAY),
            ]
        ),
        EVENT_WEIGHTS,
    )

    assert clock.at("a", T0) == EVENT_WEIGHTS["purchase"] + EVENT_WEIGHTS["add_to_cart"]
    assert clock.at("b", T0) == 1.0
    assert clock.at("unknown", T0) == 0.0
    assert clock.at("a", T0 + 2 * DAY) == 2.0 + 1.0 + 1.0  # the cart, T0's click, T0+1's
    assert clock.at("a", T0 - 30 * DAY) == 0.0


def test_the_clock_agrees_with_a_brute_force_count() -> None:
    rng = np.random.default_rng(4)
    base = pd.Timestamp("2026-01-01", tz="UTC")
    rows = [
        (
            f"i{int(rng.integers(5))}",
            str(rng.choice(list(EVENT_WEIGHTS))),
            base + pd.Timedelta(minutes=int(rng.integers(60 * 24 * 40))),
        )
        for _ in range(400)
    ]
    events = _events(rows)
    clock = PopularityClock.from_events(events, EVENT_WEIGHTS)
    for t in (base + pd.Timedelta(hours=int(h)) for h in rng.integers(0, 24 * 45, size=30)):
        day = t.floor("D")
        for item in ("i0", "i3", "i9"):
            mask = (
                (events["item_id"] == item)
                & (events["timestamp"] >= day - pd.Timedelta(days=7))
                & (events["timestamp"] < day)
            )
            want = float(events.loc[mask, "event_type"].map(EVENT_WEIGHTS).sum())
            assert clock.at(item, t) == pytest.approx(want)


def test_popularity_levels_are_log2_buckets() -> None:
    levels = [popularity_level(p) for p in (0, -1, 0.5, 1, 3, 7, 100, 723, 724, 10**6)]
    assert levels == [0, 0, 1, 2, 4, 6, 13, 18, 19, 19]


def test_ranking_text_leads_with_the_fresh_signals() -> None:
    item = ItemFeatures(
        "i", title="Aurora", text="Light.", category="shoes", popularity_7d=40, created_at=T0
    )

    assert ranking_item_text(item) == "popularity 10. " + item_text(item)
    assert ranking_item_text(item, T0 + 3 * DAY) == "popularity 10. new arrival. " + item_text(item)
    assert ranking_item_text(item, T0 + 15 * DAY) == "popularity 10. " + item_text(item)
    assert ranking_item_text(item, T0 - DAY) == "popularity 10. " + item_text(item)  # not yet


def test_pairs_read_items_as_known_before_the_event() -> None:
    """The positive's own event (and its day) never raises its popularity in its own pair."""
    hit = ItemFeatures("hit", title="Hit")
    other = ItemFeatures("other", title="Other")
    event_at = T0
    clock = PopularityClock.from_events(
        _events(
            [("hit", "purchase", event_at)]  # the label itself
            + [("hit", "click", event_at + timedelta(minutes=m)) for m in range(1, 30)]
            + [("other", "click", event_at - 2 * DAY)] * 7
        ),
        EVENT_WEIGHTS,
    )
    profile = UserProfile("u", recent_items=("x",), recent_text="X")

    pairs = make_pairs(
        [Example(profile, hit, event_at)], [hit, other], 1, np.random.default_rng(0), clock.stamp
    )

    assert pairs[0].item_text == "popularity 0. Hit"
    assert pairs[1].item_text == "popularity 6. Other"  # 7 clicks two days before
    groups = make_eval_groups(
        [Example(profile, hit, event_at + 2 * DAY)],
        [hit, other],
        2,
        np.random.default_rng(0),
        clock.stamp,
    )
    assert groups[0].candidates == ("popularity 10. Hit", "popularity 6. Other")  # 3 + 29 = 32


def test_the_text_memo_gives_ranking_item_text_for_every_case() -> None:
    naive = T0.replace(tzinfo=None)
    items = [
        ItemFeatures("old", "Old", category="c", popularity_7d=3, created_at=T0 - 40 * DAY),
        ItemFeatures("new", "New", popularity_7d=100, created_at=T0 - 2 * DAY),
        ItemFeatures("edge", "Edge", created_at=T0 - 14 * DAY),  # still new (inclusive)
        ItemFeatures("naive", "Naive", created_at=naive - DAY),  # read in now's zone
        ItemFeatures("future", "Future", created_at=T0 + DAY),  # not yet created: not new
        ItemFeatures("undated", "Undated", brand="b", text="desc"),
    ]
    memo = RankingTextMemo()
    for now in (T0, T0 + 13 * DAY, T0 + 30 * DAY, None):
        for _ in range(2):  # built, then from the memo
            assert memo.texts(items, now) == [ranking_item_text(i, now) for i in items]
    assert "new arrival" in memo.texts(items, T0)[1]
    assert "new arrival" not in memo.texts(items, T0 + 30 * DAY)[1]


def test_a_changed_record_gets_a_new_text_and_the_memo_stays_bounded() -> None:
    memo = RankingTextMemo(capacity=3)
    item = ItemFeatures("a", "A", popularity_7d=1)
    assert memo.texts([item], T0) == ["popularity 2. A"]
    # The reader decodes a changed record into a new object.
    moved = ItemFeatures("a", "A", popularity_7d=100)
    assert memo.texts([moved], T0) == ["popularity 13. A"]
    many = [ItemFeatures(str(n), str(n)) for n in range(10)]
    assert memo.texts(many, T0) == [ranking_item_text(i, T0) for i in many]
    assert len(memo._memo) <= 3
