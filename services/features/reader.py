"""The seams between services and the online feature store, and small in-memory twins.

Services depend on these Protocols; `feast_store.py` implements them on Feast (Redis or SQLite),
the in-memory classes serve unit tests of pure logic.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from freshrec.records import ItemFeatures, UserProfile


class FeatureReader(Protocol):
    """Reads online features. Raises FeatureStoreUnavailable when the store cannot be read."""

    def get_user_profile(self, user_id: str) -> UserProfile | None:
        """The user's profile, or None for a user the store has never seen."""
        ...

    def get_items(self, item_ids: Sequence[str]) -> dict[str, ItemFeatures]:
        """Features of the given items; unknown ids are absent from the result."""
        ...


class FeatureWriter(Protocol):
    """Writes fresh rows to the online store (Feast push). Raises FeatureStoreUnavailable."""

    def push_profiles(self, profiles: Iterable[UserProfile]) -> None: ...

    def push_items(self, items: Iterable[ItemFeatures]) -> None: ...


class InMemoryFeatureStore:
    """A dict-backed FeatureReader + FeatureWriter for unit tests of pure logic."""

    def __init__(
        self,
        profiles: Iterable[UserProfile] = (),
        items: Iterable[ItemFeatures] = (),
    ) -> None:
        self.profiles = {p.user_id: p for p in profiles}
        self.items = {i.item_id: i for i in items}

    def get_user_profile(self, user_id: str) -> UserProfile | None:
        return self.profiles.get(user_id)

    def get_items(self, item_ids: Sequence[str]) -> dict[str, ItemFeatures]:
        return {i: self.items[i] for i in item_ids if i in self.items}

    def push_profiles(self, profiles: Iterable[UserProfile]) -> None:
        for p in profiles:
            self.profiles[p.user_id] = p

    def push_items(self, items: Iterable[ItemFeatures]) -> None:
        for i in items:
            self.items[i.item_id] = i
