"""The pure profile / item feature builders: batch correctness, streaming ≡ batch, converters."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from freshrec.data.schema import EVENT_TYPES
from freshrec.records import ItemFeatures, UserProfile
from services.features.profiles import (
    ITEM_FEATURE_COLUMNS,
    MAX_CATEGORIES,
    MAX_RECENT_ITEMS,
    MAX_RECENT_TEXT_CHARS,
    USER_PROFILE_COLUMNS,
    build_item_features,
    build_user_profiles,
    item_from_row,
    item_to_row,
    items_frame,
    iter_item_records,
    profile_from_row,
    profile_to_row,
    profiles_frame,
    read_item_catalog,
    update_profile,
)

T0 = datetime(2024, 3, 1, tzinfo=UTC)
AS_OF = T0 + timedelta(days=10)


def _items() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "item_id": ["i1", "i2", "i3", "i4", "i5"],
            "title": ["Red shoe", "Blue hat", "Green sock", "Lamp", "Mystery"],
            "description": ["A red shoe.", "A blue hat.", "A green sock.", "A lamp.", ""],
            "category": ["shoes", "hats", "shoes", "home", ""],
            "brand": ["acme", "acme", "sox", "lumo", "none"],
            "price": [50.0, 20.0, 5.0, 80.0, 1.0],
            "created_at": pd.to_datetime(["2023-01-01"] * 5, utc=True),
            "in_stock": [True, True, False, True, True],
        }
    )


def _interactions(rows: list[tuple[str, str, str, datetime]]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "event_id": [f"e{n}" for n in range(len(rows))],
            "user_id": [r[0] for r in rows],
            "item_id": [r[1] for r in rows],
            "event_type": [r[2] for r in rows],
            "timestamp": pd.to_datetime([r[3] for r in rows], utc=True),
        }
    )


def _hours(n: float) -> datetime:
    return T0 + timedelta(hours=n)


HAND_BUILT = [
    ("u1", "i1", "impression", _hours(0)),
    ("u1", "i1", "click", _hours(1)),
    ("u1", "i2", "click", _hours(2)),
    ("u1", "i1", "add_to_cart", _hours(3)),
    ("u1", "i3", "purchase", _hours(4)),
    ("u1", "i5", "click", _hours(5)),  # no category: counts in the total only
    ("u1", "x9", "click", _hours(6)),  # not in the catalogue
    ("u2", "i4", "impression", _hours(1)),
    ("u1", "i4", "purchase", AS_OF + timedelta(seconds=1)),  # after as_of: ignored
]


def _item_records(items: pd.DataFrame) -> dict[str, ItemFeatures]:
    return {
        row.item_id: ItemFeatures(item_id=row.item_id, title=row.title, category=row.category)
        for row in items.itertuples()
    }


def test_batch_profile_of_hand_built_history() -> None:
    frame = build_user_profiles(_interactions(HAND_BUILT), _items(), AS_OF)

    assert list(frame.columns) == list(USER_PROFILE_COLUMNS)
    assert list(frame["user_id"]) == ["u1", "u2"]
    u1 = profile_from_row(frame.iloc[0])
    # weights: click 1, add_to_cart 2, purchase 3. shoes = 1 (i1 click) + 2 (i1 cart) + 3 (i3
    # purchase) = 6, hats = 1, uncategorised i5 + unknown x9 = 2; total 9.
    assert u1 == UserProfile(
        user_id="u1",
        recent_items=("x9", "i5", "i3", "i1", "i2"),
        recent_text="Mystery | Green sock | Red shoe | Blue hat",
        top_categories=("shoes", "hats"),
        category_scores=(6 / 9, 1 / 9),
        purchased_items=("i3",),
        clicks=4,
        add_to_carts=1,
        purchases=1,
        events_total=7,
        last_seen=_hours(6),
    )
    u2 = profile_from_row(frame.iloc[1])
    assert u2 == UserProfile(user_id="u2", events_total=1, last_seen=_hours(1))
    assert frame["event_timestamp"].tolist() == frame["last_seen"].tolist()


def test_batch_profile_caps_lists_and_text() -> None:
    n_items = 30
    items = pd.DataFrame(
        {
            "item_id": [f"i{k}" for k in range(n_items)],
            "title": [f"A fairly long product title number {k:02d}" for k in range(n_items)],
            "description": [""] * n_items,
            "category": [f"c{k % 10}" for k in range(n_items)],
            "brand": [""] * n_items,
            "price": [1.0] * n_items,
            "created_at": pd.to_datetime(["2023-01-01"] * n_items, utc=True),
            "in_stock": [True] * n_items,
        }
    )
    rows = [("u", f"i{k}", "click", _hours(k)) for k in range(n_items)]
    profile = profile_from_row(build_user_profiles(_interactions(rows), items, AS_OF).iloc[0])

    assert len(profile.recent_items) == MAX_RECENT_ITEMS
    assert profile.recent_items[:2] == ("i29", "i28")
    assert len(profile.recent_text) <= MAX_RECENT_TEXT_CHARS
    assert profile.recent_text.startswith("A fairly long product title number 29 | ")
    assert profile.recent_text.split(" | ")[-1].startswith("A fairly")  # whole titles only
    assert len(profile.top_categories) == MAX_CATEGORIES
    # 10 categories × 3 clicks each: ties break by name, scores are shares of the total.
    assert profile.top_categories == tuple(f"c{k}" for k in range(8))
    assert profile.category_scores == pytest.approx([3 / 30] * 8)


def test_batch_rejects_unknown_event_type() -> None:
    rows = [("u1", "i1", "like", _hours(1))]
    with pytest.raises(ValueError, match="event_type must be one of"):
        build_user_profiles(_interactions(rows), _items(), AS_OF)


def test_batch_of_no_events_is_empty_with_columns() -> None:
    frame = build_user_profiles(_interactions([]), _items(), AS_OF)
    assert frame.empty
    assert list(frame.columns) == list(USER_PROFILE_COLUMNS)


def test_item_features_popularity_windows() -> None:
    rows = [
        ("u1", "i1", "purchase", AS_OF - timedelta(days=1)),  # 7d and 30d
        ("u2", "i1", "click", AS_OF - timedelta(days=7)),  # exactly 7 days back: 30d only
        ("u2", "i1", "add_to_cart", AS_OF - timedelta(days=20)),  # 30d only
        ("u3", "i1", "click", AS_OF - timedelta(days=31)),  # neither
        ("u3", "i2", "impression", AS_OF - timedelta(days=1)),  # weight 0
        ("u3", "i2", "click", AS_OF + timedelta(hours=1)),  # after as_of
    ]
    frame = build_item_features(_items(), _interactions(rows), AS_OF)

    assert list(frame.columns) == list(ITEM_FEATURE_COLUMNS)
    by_id = {row["item_id"]: item_from_row(row) for _, row in frame.iterrows()}
    assert by_id["i1"].popularity_7d == 3.0
    assert by_id["i1"].popularity_30d == 6.0
    assert by_id["i2"].popularity_7d == 0.0
    assert by_id["i3"] == ItemFeatures(
        item_id="i3",
        title="Green sock",
        text="A green sock.",
        category="shoes",
        brand="sox",
        price=5.0,
        created_at=datetime(2023, 1, 1, tzinfo=UTC),
        in_stock=False,
    )
    assert (frame["event_timestamp"] == pd.Timestamp(AS_OF)).all()


def _random_history(seed: int, n_users: int, n_events: int, n_categories: int) -> pd.DataFrame:
    rng = random.Random(seed)
    rows = []
    for _ in range(n_events):
        rows.append(
            (
                f"u{rng.randrange(n_users)}",
                f"i{rng.randrange(40)}",
                rng.choice(EVENT_TYPES),
                # Whole minutes over two days: many equal timestamps, so tie order matters.
                T0 + timedelta(minutes=rng.randrange(2 * 24 * 6) * 10),
            )
        )
    return _interactions(rows)


def _random_items(n_categories: int) -> pd.DataFrame:
    n = 40
    return pd.DataFrame(
        {
            "item_id": [f"i{k}" for k in range(n)],
            "title": [f"Item {k}" for k in range(n)],
            "description": [""] * n,
            "category": ["" if k % 13 == 0 else f"c{k % n_categories}" for k in range(n)],
            "brand": [""] * n,
            "price": [1.0] * n,
            "created_at": pd.to_datetime(["2023-01-01"] * n, utc=True),
            "in_stock": [True] * n,
        }
    )


def _events_of(interactions: pd.DataFrame, user_id: str) -> list[tuple[str, str, datetime]]:
    mine = interactions[interactions["user_id"] == user_id]
    return [
        (row.item_id, row.event_type, row.timestamp.to_pydatetime()) for row in mine.itertuples()
    ]


def _assert_same_profile(streamed: UserProfile, batch: UserProfile) -> None:
    assert streamed.category_scores == pytest.approx(batch.category_scores, rel=1e-12)
    assert streamed == UserProfile(
        **{**batch.__dict__, "category_scores": streamed.category_scores}
    )


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_streaming_update_from_nothing_equals_batch(seed: int) -> None:
    items = _random_items(n_categories=12)  # more than MAX_CATEGORIES: exercises the cut
    history = _random_history(seed, n_users=6, n_events=400, n_categories=12)
    batch = build_user_profiles(history, items, AS_OF)
    records = _item_records(items)

    for _, row in batch.iterrows():
        # The history is not in time order: the update sorts by time, keeping tie order.
        streamed = update_profile(
            None, row["user_id"], _events_of(history, row["user_id"]), records
        )
        _assert_same_profile(streamed, profile_from_row(row))


@pytest.mark.parametrize("seed", [4, 5])
def test_streaming_update_on_batch_profile_equals_batch_of_all(seed: int) -> None:
    items = _random_items(n_categories=MAX_CATEGORIES)  # exact while no category is cut
    history = _random_history(seed, n_users=5, n_events=300, n_categories=MAX_CATEGORIES)
    ordered = history.sort_values("timestamp", kind="stable")
    cut = ordered["timestamp"].iloc[len(ordered) // 2]
    older, newer = ordered[ordered["timestamp"] <= cut], ordered[ordered["timestamp"] > cut]
    records = _item_records(items)

    before = {
        r["user_id"]: profile_from_row(r)
        for _, r in build_user_profiles(older, items, AS_OF).iterrows()
    }
    full = build_user_profiles(history, items, AS_OF)
    for _, row in full.iterrows():
        user_id = row["user_id"]
        streamed = update_profile(before.get(user_id), user_id, _events_of(newer, user_id), records)
        _assert_same_profile(streamed, profile_from_row(row))


def test_update_profile_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="user_id must match"):
        update_profile(UserProfile(user_id="a"), "b", [], {})
    with pytest.raises(ValueError, match="event_type must be one of"):
        update_profile(None, "a", [("i1", "like", T0)], {})


def test_pure_functions_do_not_mutate_inputs() -> None:
    items, history = _items(), _interactions(HAND_BUILT)
    items_before, history_before = items.copy(deep=True), history.copy(deep=True)
    build_user_profiles(history, items, AS_OF)
    build_item_features(items, history, AS_OF)
    pd.testing.assert_frame_equal(items, items_before)
    pd.testing.assert_frame_equal(history, history_before)

    profile = UserProfile(user_id="u1", recent_items=("i1",), clicks=1, events_total=1)
    events = [("i2", "click", _hours(2)), ("i1", "purchase", _hours(1))]
    events_before = list(events)
    records = _item_records(items)
    records_before = dict(records)
    updated = update_profile(profile, "u1", events, records)
    assert events == events_before
    assert records == records_before
    assert profile == UserProfile(user_id="u1", recent_items=("i1",), clicks=1, events_total=1)
    assert updated.recent_items == ("i2", "i1")


def test_profile_converters_round_trip() -> None:
    profile = UserProfile(
        user_id="u1",
        recent_items=("i2", "i1"),
        recent_text="Blue hat | Red shoe",
        top_categories=("shoes", "hats"),
        category_scores=(0.75, 0.25),
        purchased_items=("i1",),
        clicks=3,
        add_to_carts=1,
        purchases=1,
        events_total=9,
        last_seen=_hours(5),
    )
    assert profile_from_row(profile_to_row(profile)) == profile
    assert profile_to_row(profile)["event_timestamp"] == _hours(5)
    frame = profiles_frame([profile, UserProfile(user_id="u2")])
    assert list(frame.columns) == list(USER_PROFILE_COLUMNS)
    assert profile_from_row(frame.iloc[0]) == profile
    assert profile_from_row(frame.iloc[1]) == UserProfile(user_id="u2")


def test_item_converters_round_trip() -> None:
    item = ItemFeatures(
        item_id="i1",
        title="Red shoe",
        text="A red shoe.",
        category="shoes",
        brand="acme",
        price=49.5,
        popularity_7d=3.0,
        popularity_30d=7.0,
        created_at=datetime(2023, 1, 1, tzinfo=UTC),
        in_stock=False,
    )
    assert item_from_row(item_to_row(item, T0)) == item
    assert item_to_row(item, T0)["event_timestamp"] == T0
    frame = items_frame([item], T0)
    assert list(frame.columns) == list(ITEM_FEATURE_COLUMNS)
    assert item_from_row(frame.iloc[0]) == item
    # Feast answers None for every feature of an unknown row; defaults fill in.
    assert item_from_row({"item_id": "x", "in_stock": None, "price": None}) == ItemFeatures("x")


def test_item_records_made_a_chunk_at_a_time_equal_the_whole_catalogues(tmp_path: Path) -> None:
    items = [
        ItemFeatures(
            f"i{n}", f"Item {n}", f"Text {n}.", "c", "b", 1.5 * n, n, 2.0 * n, T0, n % 2 == 0
        )
        for n in range(7)
    ]
    changed = ItemFeatures("i3", "Item 3, renamed", price=9.25)  # a later row of i3 wins
    table = tmp_path / "items.parquet"
    pd.concat([items_frame(items, T0), items_frame([changed], T0)]).to_parquet(table)
    whole = read_item_catalog(table)
    wanted = ["i5", "i3", "missing", "i0", "i6", "i1"]
    got = list(iter_item_records(pd.read_parquet(table), wanted, chunk=2))
    assert got == [whole[i] for i in wanted if i in whole]
    assert got[1] == changed
