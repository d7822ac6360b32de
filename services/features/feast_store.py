"""FeatureReader and FeatureWriter on Feast (Redis or SQLite online store, per the rendered repo).

Reads go through `FeatureStore.get_online_features` (correct first; a raw Redis pipeline on
Feast's key layout can replace the hot path later), writes through `FeatureStore.push` to the
push sources of `feature_repo/features.py`. Store errors become FeatureStoreUnavailable here.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import redis

from freshrec.errors import FailedPrecondition, FeatureStoreUnavailable
from freshrec.records import ItemFeatures, UserProfile
from services.features.item_generation import ItemGeneration
from services.features.profiles import (
    ITEM_FEATURES,
    USER_PROFILE_FEATURES,
    item_from_row,
    items_frame,
    profile_from_row,
    profiles_frame,
)
from services.features.store import open_feature_store

if TYPE_CHECKING:
    from feast import FeatureStore

USER_PROFILE_VIEW = "user_profile"
ITEM_FEATURES_VIEW = "item_features"
USER_PROFILE_PUSH = "user_profile_push"
ITEM_FEATURES_PUSH = "item_features_push"
# What the online stores raise when they cannot be reached, read or written.
_STORE_ERRORS = (redis.RedisError, sqlite3.Error, OSError)


class FeastFeatureStore:
    """A FeatureReader + FeatureWriter over a rendered Feast repo (`<workdir>/feature_repo`)."""

    def __init__(self, repo_dir: Path) -> None:
        self.repo_dir = Path(repo_dir)
        self._store: FeatureStore | None = None
        self._profile_refs = [f"{USER_PROFILE_VIEW}:{f}" for f in USER_PROFILE_FEATURES]
        self._item_refs = [f"{ITEM_FEATURES_VIEW}:{f}" for f in ITEM_FEATURES]
        self._generation = ItemGeneration(self.repo_dir)

    def start(self) -> None:
        """Open the Feast store and load its registry (imports Feast: about a second).

        Raises:
            FeatureStoreUnavailable: the repo or its registry cannot be read.
        """
        try:
            store = open_feature_store(self.repo_dir)
            # Load the registry now, not on the first request.
            store.get_feature_view(USER_PROFILE_VIEW)
            store.get_feature_view(ITEM_FEATURES_VIEW)
        except (*_STORE_ERRORS, FileNotFoundError) as exc:
            raise FeatureStoreUnavailable(
                f"cannot open the Feast repo at {self.repo_dir}: {exc}"
            ) from exc
        self._store = store

    # FeatureReader ---------------------------------------------------------------------------

    def get_user_profile(self, user_id: str) -> UserProfile | None:
        """The user's profile, or None when the store holds no features for the user."""
        columns = self._read(self._profile_refs, [{"user_id": user_id}])
        row = {name: values[0] for name, values in columns.items()}
        if _all_null(row, USER_PROFILE_FEATURES):
            return None
        return profile_from_row(row)

    def get_items(self, item_ids: Sequence[str]) -> dict[str, ItemFeatures]:
        """Features of the given items (one online read); unknown ids are absent."""
        unique = list(dict.fromkeys(item_ids))
        if not unique:
            return {}
        columns = self._read(self._item_refs, [{"item_id": i} for i in unique])
        out: dict[str, ItemFeatures] = {}
        for index, item_id in enumerate(unique):
            row = {name: values[index] for name, values in columns.items()}
            if not _all_null(row, ITEM_FEATURES):
                out[item_id] = item_from_row(row)
        return out

    # FeatureWriter ---------------------------------------------------------------------------

    def push_profiles(self, profiles: Iterable[UserProfile]) -> None:
        """Write profiles to the online store through `user_profile_push`.

        Each row's event time is the later of the profile's last_seen and now. The Redis store
        keeps a row only if its event time is newer than the stored one; stamping with last_seen
        alone dropped every update made of late events (older than the user's last_seen), e.g.
        events spooled during a Redis outage and delivered after newer ones.
        """
        frame = profiles_frame(profiles)
        if not frame.empty:
            now = pd.Timestamp.now(tz="UTC")
            stamps = frame["event_timestamp"]
            frame["event_timestamp"] = stamps.where(stamps > now, now)
            self._push(USER_PROFILE_PUSH, frame)

    def push_items(self, items: Iterable[ItemFeatures]) -> None:
        """Write catalogue rows to the online store through `item_features_push`, stamped now."""
        frame = items_frame(items, datetime.now(UTC))
        if not frame.empty:
            self._push(ITEM_FEATURES_PUSH, frame)
            # After the write: readers that keep item features drop them (item_generation.py).
            self._generation.bump()

    # Internals -------------------------------------------------------------------------------

    def _started(self) -> FeatureStore:
        if self._store is None:
            raise FailedPrecondition("FeastFeatureStore.start() must be called before use")
        return self._store

    def _read(self, refs: list[str], entity_rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
        store = self._started()
        try:
            return store.get_online_features(features=refs, entity_rows=entity_rows).to_dict()
        except _STORE_ERRORS as exc:
            raise FeatureStoreUnavailable(f"online feature read failed: {exc}") from exc

    def _push(self, push_source: str, frame: pd.DataFrame) -> None:
        from feast.data_source import PushMode

        store = self._started()
        try:
            store.push(push_source, frame, to=PushMode.ONLINE)
        except _STORE_ERRORS as exc:
            raise FeatureStoreUnavailable(f"push to {push_source} failed: {exc}") from exc


def _all_null(row: dict[str, Any], features: Sequence[str]) -> bool:
    return all(row.get(name) is None for name in features)
