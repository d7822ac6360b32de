"""The item-feature generation: a key every FreshRec writer of online item features sets to a
new value after it writes, so that a reader keeping item features in memory knows when to
drop them.

The ranking service reads the features of ~70 candidates per request. Item features change
rarely (catalogue edits, a materialisation), so `RedisFeatureReader` can keep them in process
(`item_cache_max_age_s`). Each read still asks Redis for the generation, in the same round
trip as the items it does not hold; a changed generation drops everything it holds. So an
edit is visible to the first request that starts after the writer bumped the generation, as
it is without the cache.

Writers that bump it: `FeastFeatureStore.push_items` (the catalogue service, the bootstrap),
`store.materialize` and `fast_materialize`. A writer outside FreshRec (e.g. `feast materialize`
run by hand) does not: for it the reader's maximum age bounds how long an old value is served.

Key: `freshrec:<feast project>:item_generation` in the online store's Redis (one node or a
cluster). Its value is a random token, new at every bump, not a counter: a Redis that lost its
data and was loaded again must not come back to a value a reader saw before the loss. Where
the online store is not Redis (SQLite, Sentinel) `bump` does nothing: no reader caches item
features there.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import redis
import yaml
from redis.cluster import RedisCluster

from freshrec.errors import FeatureStoreUnavailable


def item_generation_key(project: str) -> bytes:
    return f"freshrec:{project}:item_generation".encode()


def redis_online_store(repo_dir: Path) -> tuple[str, dict[str, Any]] | None:
    """(Feast project, the `online_store:` mapping) when the repo's online store is one Redis
    node or a Redis Cluster; None otherwise (SQLite, Sentinel: no reader caches items there)."""
    config = yaml.safe_load((Path(repo_dir) / "feature_store.yaml").read_text())
    online = config.get("online_store", {})
    if online.get("type") != "redis":
        return None
    if online.get("redis_type", "redis") not in ("redis", "redis_cluster"):
        return None
    return str(config["project"]), online


def new_generation() -> str:
    """A value no reader has seen before."""
    return uuid.uuid4().hex


class ItemGeneration:
    """Bumps the generation of one Feast repo's online store (a no-op when it is not Redis)."""

    def __init__(self, repo_dir: Path, socket_timeout: float = 5.0) -> None:
        self.repo_dir = Path(repo_dir)
        self.socket_timeout = socket_timeout
        self._client: redis.Redis | RedisCluster | None = None
        self._key = b""
        self._checked = False

    def _connect(self) -> redis.Redis | RedisCluster | None:
        if not self._checked:
            from services.features.redis_reader import online_client

            store = redis_online_store(self.repo_dir)
            if store is not None:
                project, online = store
                self._key = item_generation_key(project)
                self._client = online_client(online, self.socket_timeout)
            self._checked = True
        return self._client

    def forget(self) -> None:
        """Delete the key (with the project's other online keys: a start over, a test's
        clean-up). Readers see the change like a bump."""
        client = self._connect()
        if client is not None:
            client.delete(self._key)

    def bump(self) -> None:
        """Tell caching readers that item features changed (call after the write).

        Raises:
            FeatureStoreUnavailable: Redis did not take it (the write before it may have
                landed; readers then serve what they hold until their maximum age).
        """
        client = self._connect()
        if client is None:
            return
        try:
            client.set(self._key, new_generation())
        except redis.RedisError as exc:
            raise FeatureStoreUnavailable(f"item generation bump failed: {exc}") from exc

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
