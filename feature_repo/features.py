"""FreshRec's Feast definitions: the source of truth for the online features.

`services/features/store.py` copies this file next to a rendered `feature_store.yaml` in
`<workdir>/feature_repo/` and applies it from there.

Offline table paths are relative on purpose. Feast's file offline store resolves a relative
`FileSource` path against the repo path of the `FeatureStore` reading it (`repo_path` in
`FeatureStore(repo_path=...)`, or the directory `feast` runs in), never against the process's
working directory. The rendered repo is `<workdir>/feature_repo/` and the tables live in
`<workdir>/offline/` (`FreshRecConfig.offline_dir`), so `../offline/<table>.parquet` finds them
from any cwd, and the registry records no machine-specific absolute path.
"""

from __future__ import annotations

from datetime import timedelta

from feast import Entity, FeatureView, Field, FileSource, PushSource, ValueType
from feast.types import Array, Bool, Float32, Int64, String, UnixTimestamp

OFFLINE_DIR = "../offline"  # relative to the rendered repo; see the module docstring
USER_PROFILE_TABLE = "user_profile.parquet"
ITEM_FEATURES_TABLE = "item_features.parquet"

user = Entity(
    name="user",
    join_keys=["user_id"],
    value_type=ValueType.STRING,
    description="A shopper, keyed by the canonical interactions' user_id.",
)

item = Entity(
    name="item",
    join_keys=["item_id"],
    value_type=ValueType.STRING,
    description="A catalogue product, keyed by the canonical items' item_id.",
)

user_profile_source = FileSource(
    name="user_profile_source",
    path=f"{OFFLINE_DIR}/{USER_PROFILE_TABLE}",
    timestamp_field="event_timestamp",
    description="Batch-built user profiles (services/features/profiles.py).",
)

item_features_source = FileSource(
    name="item_features_source",
    path=f"{OFFLINE_DIR}/{ITEM_FEATURES_TABLE}",
    timestamp_field="event_timestamp",
    description="Catalogue rows with popularity counts (services/features/profiles.py).",
)

# Streaming updates: ingestion pushes fresh profile rows straight to the online store.
user_profile_push = PushSource(name="user_profile_push", batch_source=user_profile_source)
item_features_push = PushSource(name="item_features_push", batch_source=item_features_source)

user_profile = FeatureView(
    name="user_profile",
    entities=[user],
    # 365 days: shoppers come back seasonally (a user last seen before last winter's sale is
    # still better served by their history than by a cold start), and a year bounds Redis
    # memory for users who are gone. Feast uses the TTL as the look-back of the first
    # materialisation and of point-in-time joins; online reads do not expire rows. (90 days
    # was tried first: on MovieLens-100k it dropped 46% of users' profiles to cold start.)
    ttl=timedelta(days=365),
    schema=[
        Field(name="recent_items", dtype=Array(String)),
        Field(name="recent_text", dtype=String),
        Field(name="top_categories", dtype=Array(String)),
        Field(name="category_scores", dtype=Array(Float32)),
        Field(name="purchased_items", dtype=Array(String)),
        Field(name="clicks", dtype=Int64),
        Field(name="add_to_carts", dtype=Int64),
        Field(name="purchases", dtype=Int64),
        Field(name="events_total", dtype=Int64),
        Field(name="last_seen", dtype=UnixTimestamp),
    ],
    online=True,
    source=user_profile_push,
    description="What a user recently wanted; read once per ranking request.",
)

item_features = FeatureView(
    name="item_features",
    entities=[item],
    # 365 days: catalogue rows change rarely (a product listed a year ago and never edited is
    # still sellable), so a short TTL would drop long-lived items from the first materialisation.
    ttl=timedelta(days=365),
    schema=[
        Field(name="title", dtype=String),
        Field(name="text", dtype=String),
        Field(name="category", dtype=String),
        Field(name="brand", dtype=String),
        Field(name="price", dtype=Float32),
        Field(name="popularity_7d", dtype=Float32),
        Field(name="popularity_30d", dtype=Float32),
        Field(name="created_at", dtype=UnixTimestamp),
        Field(name="in_stock", dtype=Bool),
    ],
    online=True,
    source=item_features_push,
    description="Catalogue features of the re-ranked candidates.",
)
