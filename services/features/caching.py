"""CachingFeatureReader: the ranking service's fallback for an unreachable online store.

It wraps the real FeatureReader (Feast) and

* remembers every profile and item it reads in bounded in-process LRU caches, so that while the
  store is down a known user can still be answered from the last profile and item features
  this process saw (`cached_profile`, `cached_items`; the pipeline marks such answers degraded);
* fails fast: a failed read opens a `CircuitBreaker`, and while it is open reads raise
  FeatureStoreUnavailable at once instead of paying the store's connect timeout; after the
  cooldown the next read (or `probe`) tries the store again.

Reads through it have the FeatureReader contract: they raise FeatureStoreUnavailable when the
store cannot be read. It never serves a cached value from `get_*`: stale data is only ever
returned by the explicit `cached_*` methods, so callers always know when they use it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Generic, Protocol, TypeVar

from freshrec.errors import FeatureStoreUnavailable
from freshrec.records import ItemFeatures, UserProfile
from services.common.breaker import CircuitBreaker
from services.features.reader import FeatureReader

DEFAULT_MAX_PROFILES = 20_000  # ~2 KB each: tens of MB at most
DEFAULT_MAX_ITEMS = 100_000  # every item of a large catalogue
PROBE_USER_ID = "__freshrec_probe__"

K = TypeVar("K")
V = TypeVar("V")


class FeatureCache(Protocol):
    """Last-known features, for answers while the online store is unreachable."""

    def cached_profile(self, user_id: str) -> UserProfile | None:
        """The last profile read or remembered for the user, or None."""
        ...

    def cached_items(self, item_ids: Sequence[str]) -> dict[str, ItemFeatures]:
        """The last features read for those items; unknown ids are absent."""
        ...

    def remember_profiles(self, profiles: Iterable[UserProfile]) -> None:
        """Record profiles this process wrote (or folded locally while the store was down)."""
        ...


class LruCache(Generic[K, V]):
    """A thread-safe dict that forgets its least recently used entries beyond `max_entries`."""

    def __init__(self, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._data: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def put_many(self, pairs: Iterable[tuple[K, V]]) -> None:
        with self._lock:
            for key, value in pairs:
                self._data[key] = value
                self._data.move_to_end(key)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)


class CachingFeatureReader:
    """A FeatureReader + FeatureCache around another reader, with a circuit breaker."""

    def __init__(
        self,
        inner: FeatureReader,
        breaker: CircuitBreaker,
        max_profiles: int = DEFAULT_MAX_PROFILES,
        max_items: int = DEFAULT_MAX_ITEMS,
    ) -> None:
        self.inner = inner
        self.breaker = breaker
        self._profiles: LruCache[str, UserProfile] = LruCache(max_profiles)
        self._items: LruCache[str, ItemFeatures] = LruCache(max_items)

    # FeatureReader ---------------------------------------------------------------------------

    def get_user_profile(self, user_id: str) -> UserProfile | None:
        self._check_breaker()
        try:
            profile = self.inner.get_user_profile(user_id)
        except FeatureStoreUnavailable as exc:
            self.breaker.failure(str(exc))
            raise
        self.breaker.success()
        if profile is not None:
            self._profiles.put_many([(user_id, profile)])
        return profile

    def get_items(self, item_ids: Sequence[str]) -> dict[str, ItemFeatures]:
        if not item_ids:
            return {}
        self._check_breaker()
        try:
            items = self.inner.get_items(item_ids)
        except FeatureStoreUnavailable as exc:
            self.breaker.failure(str(exc))
            raise
        self.breaker.success()
        self._items.put_many(items.items())
        return items

    # FeatureCache ----------------------------------------------------------------------------

    def cached_profile(self, user_id: str) -> UserProfile | None:
        return self._profiles.get(user_id)

    def cached_items(self, item_ids: Sequence[str]) -> dict[str, ItemFeatures]:
        out = {}
        for item_id in item_ids:
            item = self._items.get(item_id)
            if item is not None:
                out[item_id] = item
        return out

    def remember_profiles(self, profiles: Iterable[UserProfile]) -> None:
        self._profiles.put_many((p.user_id, p) for p in profiles)

    # Health ----------------------------------------------------------------------------------

    def probe(self) -> bool:
        """Try the store when the breaker allows it (one real read); True if it is reachable.

        Called by the ranking server's monitor thread, so the breaker closes (and health goes
        back to SERVING) within a cooldown of the store returning even without traffic.
        """
        if self.breaker.closed:
            return True
        if not self.breaker.allow():
            return False
        try:
            self.inner.get_user_profile(PROBE_USER_ID)
        except FeatureStoreUnavailable as exc:
            self.breaker.failure(str(exc))
            return False
        self.breaker.success()
        return True

    def _check_breaker(self) -> None:
        if not self.breaker.allow():
            raise FeatureStoreUnavailable(
                f"online store skipped for up to {self.breaker.cooldown_s:g}s after a failure "
                f"({self.breaker.reason})"
            )
