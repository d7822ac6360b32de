"""Helpers shared by the Spark-engine and Redis Cluster tests: a small shop and SDK read-backs."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pandas as pd

from freshrec.config import FreshRecConfig
from freshrec.data.synthetic import generate_shop
from services.features.profiles import (
    ITEM_FEATURES,
    USER_PROFILE_FEATURES,
    build_item_features,
    build_user_profiles,
)
from services.features.store import (
    OnlineStoreChoice,
    apply_feature_repo,
    materialize,
    open_feature_store,
    render_feature_store_yaml,
    write_offline_tables,
)

# The views' feature names, as the code that builds and reads them defines them.
USER_FEATURES = USER_PROFILE_FEATURES


def small_shop() -> tuple[pd.DataFrame, pd.DataFrame, datetime]:
    """(profiles, item features, as_of) of a 40-user, 60-item synthetic shop."""
    shop = generate_shop(seed=3, n_items=60, n_users=40, days=10, events_per_user=12)
    as_of = shop.interactions["timestamp"].max().to_pydatetime()
    profiles = build_user_profiles(shop.interactions, shop.items, as_of)
    items = build_item_features(shop.items, shop.interactions, as_of)
    return profiles, items, as_of


def materialize_shop(
    config: FreshRecConfig,
    choice: OnlineStoreChoice,
    profiles: pd.DataFrame,
    items: pd.DataFrame,
    as_of: datetime,
) -> dict[str, Any]:
    """Render, write the tables, apply and materialise; return materialize's report."""
    render_feature_store_yaml(config, choice)
    write_offline_tables(config, profiles, items)
    store = open_feature_store(config.feature_repo_dir)
    apply_feature_repo(config, store)
    return materialize(config, as_of, store)


def read_back(config: FreshRecConfig, user_ids: list[str], item_ids: list[str]) -> dict[str, Any]:
    """Every feature of every given user and item, read through the Feast SDK."""
    store = open_feature_store(config.feature_repo_dir)
    users = store.get_online_features(
        features=[f"user_profile:{f}" for f in USER_FEATURES],
        entity_rows=[{"user_id": u} for u in user_ids],
    ).to_dict()
    items = store.get_online_features(
        features=[f"item_features:{f}" for f in ITEM_FEATURES],
        entity_rows=[{"item_id": i} for i in item_ids],
    ).to_dict()
    return {"users": users, "items": items}
