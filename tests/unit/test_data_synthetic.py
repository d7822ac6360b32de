"""The synthetic shop: canonical frames, determinism per seed, existence and drift."""

from __future__ import annotations

import pandas as pd
import pytest

from freshrec.data import generate_shop, load_dataset
from freshrec.data.schema import EVENT_TYPES, INTERACTION_COLUMNS, ITEM_COLUMNS, Dataset
from freshrec.data.synthetic import START
from freshrec.errors import InvalidArgument

SMALL = {"n_items": 200, "n_users": 60, "days": 30, "events_per_user": 40.0}


@pytest.fixture(scope="module")
def shop() -> Dataset:
    return generate_shop(seed=3, n_items=400, n_users=150, days=60, events_per_user=60.0)


def test_frames_are_canonical() -> None:
    ds = generate_shop(seed=1, **SMALL)
    items, events = ds.items, ds.interactions
    assert list(items.columns) == list(ITEM_COLUMNS)
    assert list(events.columns) == list(INTERACTION_COLUMNS)
    assert len(items) == 200 and items["item_id"].is_unique
    assert str(items["created_at"].dtype) == "datetime64[ns, UTC]"
    assert str(events["timestamp"].dtype) == "datetime64[ns, UTC]"
    assert items["in_stock"].dtype == bool
    assert (items["price"] > 0).all()
    assert (items["title"].str.len() > 10).all() and (items["description"].str.len() > 30).all()
    assert items["category"].nunique() == 12
    assert set(events["event_type"]) == set(EVENT_TYPES)
    assert events["event_id"].is_unique
    assert events["timestamp"].is_monotonic_increasing
    assert events["user_id"].nunique() > 40
    assert events["timestamp"].min() >= START
    assert events["timestamp"].max() < START + pd.Timedelta(days=30)
    # the funnel narrows: impressions > clicks > add_to_cart > purchases
    counts = events["event_type"].value_counts()
    assert counts["impression"] > counts["click"] > counts["add_to_cart"] > counts["purchase"] > 0


def test_same_seed_same_frames_and_other_seed_differs() -> None:
    a, b, c = (
        generate_shop(seed=5, **SMALL),
        generate_shop(seed=5, **SMALL),
        generate_shop(seed=6, **SMALL),
    )
    pd.testing.assert_frame_equal(a.items, b.items)
    pd.testing.assert_frame_equal(a.interactions, b.interactions)
    assert not a.items[["title", "price"]].equals(c.items[["title", "price"]])
    assert len(a.interactions) != len(c.interactions) or not a.interactions.equals(c.interactions)


def test_events_only_touch_items_that_exist(shop: Dataset) -> None:
    created = shop.items.set_index("item_id")["created_at"]
    assert shop.interactions["item_id"].isin(created.index).all()
    assert (shop.interactions["timestamp"] >= shop.interactions["item_id"].map(created)).all()


def test_catalogue_grows_and_new_products_take_a_growing_share(shop: Dataset) -> None:
    created = shop.items["created_at"]
    existing_share = (created < START).mean()
    assert 0.55 < existing_share < 0.75

    events = shop.interactions.merge(shop.items[["item_id", "created_at"]], on="item_id")
    day = (events["timestamp"] - START).dt.days
    launched_late = events["created_at"] >= START + pd.Timedelta(days=30)
    share_by_fortnight = [
        launched_late[(day >= d) & (day < d + 15)].mean() for d in (0, 15, 30, 45)
    ]
    assert share_by_fortnight[0] == 0.0 and share_by_fortnight[1] == 0.0
    assert share_by_fortnight[3] > share_by_fortnight[2] > 0.02


def test_new_products_get_a_launch_boost(shop: Dataset) -> None:
    events = shop.interactions.merge(shop.items[["item_id", "created_at"]], on="item_id")
    new = events[events["created_at"] >= START]
    age_days = (new["timestamp"] - new["created_at"]).dt.total_seconds() / 86400
    # launches in the first 40 days can be seen for at least 20 days
    early = new["created_at"] < START + pd.Timedelta(days=40)
    first_week = ((age_days < 7) & early).sum()
    third_week = ((age_days >= 14) & (age_days < 21) & early).sum()
    assert first_week > 1.3 * third_week


def test_category_popularity_drifts(shop: Dataset) -> None:
    events = shop.interactions.merge(shop.items[["item_id", "category"]], on="item_id")
    day = (events["timestamp"] - START).dt.days
    first = events.loc[day < 15, "category"].value_counts(normalize=True)
    last = events.loc[day >= 45, "category"].value_counts(normalize=True)
    drift = 0.5 * first.sub(last, fill_value=0.0).abs().sum()
    # the same comparison between two interleaved halves of the period: sampling noise only
    odd = day % 2 == 1
    even_share = events.loc[~odd, "category"].value_counts(normalize=True)
    odd_share = events.loc[odd, "category"].value_counts(normalize=True)
    noise = 0.5 * even_share.sub(odd_share, fill_value=0.0).abs().sum()
    assert drift > 0.08
    assert drift > 2 * noise


def test_events_per_user_sets_the_volume() -> None:
    ds = generate_shop(seed=2, n_items=300, n_users=200, days=30, events_per_user=30.0)
    per_user = len(ds.interactions) / 200
    assert 20.0 < per_user < 40.0


@pytest.mark.parametrize(
    ("option", "value"),
    [("n_items", 0), ("n_users", -1), ("days", 0), ("events_per_user", 0.0)],
)
def test_bad_sizes_name_the_argument(option: str, value: float) -> None:
    with pytest.raises(InvalidArgument, match=option):
        generate_shop(**{option: value})


def test_load_dataset_routes_and_validates(tmp_path) -> None:
    ds = load_dataset("synthetic", tmp_path, seed=4, n_items=50, n_users=10, days=5)
    assert ds.name == "synthetic" and len(ds.items) == 50
    with pytest.raises(InvalidArgument, match="colour"):
        load_dataset("synthetic", tmp_path, colour="red")
    with pytest.raises(InvalidArgument, match="ml100k, synthetic"):
        load_dataset("ml1m", tmp_path)
    with pytest.raises(InvalidArgument, match="n_items"):
        load_dataset("ml100k", tmp_path, n_items=3)
