"""A FeatureReader that reads Feast's Redis layout with one pipelined round trip.

Feast's SDK `get_online_features` costs ~11 ms for 1 user + 100 items here, most of it Python
around the read; the same HMGETs in one redis-py pipeline plus protobuf decoding cost ~3 ms
(../shared/MACHINE_FLOORS.md). This reader keeps Feast's layout and Feast's own key encoding
and value decoding (`serialize_entity_key`, `_mmh3`, `feast_value_type_to_python_type`), so it
returns exactly what the SDK returns; writes still go through Feast (`FeastFeatureStore`).

Layout: one hash per entity, key = serialized EntityKey (v3) + project; fields =
mmh3("<view>:<feature>") and "_ts:<view>"; values = serialized `feast.types.Value`.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
import yaml
from feast.type_map import NULL_TIMESTAMP_INT_VALUE
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

from freshrec.errors import FailedPrecondition, FeatureStoreUnavailable
from freshrec.records import ItemFeatures, UserProfile
from services.features.item_generation import item_generation_key
from services.features.profiles import (
    ITEM_FEATURES,
    USER_PROFILE_FEATURES,
    item_from_row,
    profile_from_row,
)

KEY_CACHE_SIZE = 500_000  # entity keys (~40 bytes each)
DECODED_CACHE_SIZE = 200_000  # decoded item records by their raw bytes (~1 KB each)
ITEM_CACHE_SIZE = 200_000  # items kept by `item_cache_max_age_s` (records shared with the above)
# How long the item generation read with a profile may stand in for reading it again before
# the items (`get_items` on the same thread): a request reads its items well under a
# millisecond after its profile; anything older is read again.
PROFILE_GENERATION_MAX_AGE_S = 0.05
# HMGET of the same fields on every key, in one call (EVALSHA; redis-py loads it on NOSCRIPT).
HMGET_MANY = (
    "local out = {} "
    "for i, key in ipairs(KEYS) do out[i] = redis.call('HMGET', key, unpack(ARGV)) end "
    "return out"
)
# The same after a GET of KEYS[1] (the item generation), read atomically with the items.
GET_THEN_HMGET_MANY = (
    "local out = {redis.call('GET', KEYS[1])} "
    "for i = 2, #KEYS do out[i] = redis.call('HMGET', KEYS[i], unpack(ARGV)) end "
    "return out"
)
_SCALARS = frozenset(
    ("string_val", "int64_val", "int32_val", "double_val", "float_val", "bool_val", "bytes_val")
)
_LISTS = frozenset(
    (
        "string_list_val",
        "int64_list_val",
        "int32_list_val",
        "double_list_val",
        "float_list_val",
        "bool_list_val",
        "bytes_list_val",
    )
)


def decode_value(proto: Any) -> Any:
    """`feast.type_map.feast_value_type_to_python_type` for a decoded `feast.types.Value`,
    with a fast path for the scalar, list and timestamp types FreshRec's views use (the
    general function cost ~40% of a 50-item read); every other type goes to Feast's own."""
    kind = proto.WhichOneof("val")
    if kind is None:
        return None
    if kind in _SCALARS:
        return getattr(proto, kind)
    if kind in _LISTS:
        return list(getattr(proto, kind).val)
    if kind == "unix_timestamp_val":
        stamp = proto.unix_timestamp_val
        return None if stamp == NULL_TIMESTAMP_INT_VALUE else datetime.fromtimestamp(stamp, UTC)
    from feast.type_map import feast_value_type_to_python_type

    return feast_value_type_to_python_type(proto)


USER_PROFILE_VIEW = "user_profile"
ITEM_FEATURES_VIEW = "item_features"


def connection_kwargs(connection_string: str) -> dict[str, Any]:
    """redis-py kwargs from Feast's `host:port,db=N,password=..` connection string."""
    kwargs: dict[str, Any] = {}
    for part in connection_string.split(","):
        if "=" in part:
            key, value = part.split("=", 1)
            if key == "db":
                kwargs["db"] = int(value)
            elif key in ("password", "username"):
                kwargs[key] = value
            elif key == "ssl":
                kwargs["ssl"] = value.lower() == "true"
            elif key == "socket_connect_timeout":
                kwargs["socket_connect_timeout"] = float(value)
        else:
            host, _, port = part.partition(":")
            kwargs["host"], kwargs["port"] = host, int(port or 6379)
    return kwargs


def online_client(
    online: Mapping[str, Any], socket_timeout: float = 2.0
) -> redis.Redis | RedisCluster:
    """A redis-py client for a Feast Redis online store (the `online_store:` mapping of
    feature_store.yaml): one node, or a cluster found from its startup nodes, as Feast's own
    client connects (`RedisOnlineStore._get_client`).

    Raises:
        FailedPrecondition: a redis_type other than redis and redis_cluster (sentinel).
    """
    kind = str(online.get("redis_type", "redis"))
    connection = str(online["connection_string"])
    if kind == "redis":
        # redis-py's default retries connection errors 3 times with exponential backoff
        # (1 s base, 10 s cap): during an outage one request would stall for seconds instead
        # of failing over to the degraded path (seen as a 10 s DEADLINE_EXCEEDED in
        # test_redis_outage). One immediate retry covers a dropped idle connection.
        return redis.Redis(
            socket_timeout=socket_timeout,
            retry=Retry(NoBackoff(), 1),
            **connection_kwargs(connection),
        )
    if kind == "redis_cluster":
        parts = connection.split(",")
        options = [p for p in parts if "=" in p]
        kwargs = connection_kwargs(",".join(options)) if options else {}
        kwargs.pop("db", None)  # a cluster has database 0 only
        nodes = []
        for part in parts:
            if part and "=" not in part:
                host, _, port = part.partition(":")
                nodes.append(ClusterNode(host, int(port or 6379)))
        return RedisCluster(startup_nodes=nodes, socket_timeout=socket_timeout, **kwargs)
    raise FailedPrecondition(
        f"RedisFeatureReader reads redis_type redis or redis_cluster, the repo's online store "
        f"is {kind!r}; use FeastFeatureStore"
    )


class RedisFeatureReader:
    """FeatureReader over a rendered Feast repo whose online store is Redis (one node or a
    Redis Cluster).

    On one node a read is one round trip: a server-side script HMGETs every key. A cluster
    spreads the keys over its shards and a script may not touch keys of several slots, so
    there a read is one pipeline of HMGETs, which redis-py splits by shard and sends to every
    shard before it reads any reply.

    With `item_cache_max_age_s` > 0 it keeps the item features it read in process and asks
    Redis only for the item generation (services/features/item_generation.py) plus the items it
    does not hold, in one round trip: a changed generation drops them all (FreshRec's own
    writers bump it after each write), and an item read longer ago than the maximum age is read
    again (a writer that does not bump it). Profiles are always read: they change with every
    event. The generation is read in the profile's round trip too, and the next `get_items`
    on the same thread (the same request's) uses it, so a request whose items are all held
    makes one round trip to Redis, not two.
    """

    def __init__(
        self, repo_dir: Path, socket_timeout: float = 2.0, item_cache_max_age_s: float = 0.0
    ) -> None:
        self.repo_dir = Path(repo_dir)
        self.socket_timeout = socket_timeout
        self.item_cache_max_age_s = item_cache_max_age_s
        self._client: redis.Redis | RedisCluster | None = None
        self._project = b""
        self._keys: dict[tuple[str, str], bytes] = {}
        self._cluster = False
        self._hmget_many: Any = None
        self._get_then_hmget_many: Any = None
        self._decoded: dict[tuple[Any, ...], ItemFeatures] = {}
        # item id -> record, and item id -> monotonic time read, all read under generation
        # `_generation`. Two maps, not one of (record, time) pairs: a pair is a new object the
        # garbage collector tracks at every re-read, ~100,000 of them at 100k items alive
        # between the ranking service's freezes (services/common/heap.py), where a re-read of an
        # unchanged record (the same object, `_items_from`) and its float time add none.
        self._item_cache: OrderedDict[str, ItemFeatures] = OrderedDict()
        self._item_read_at: dict[str, float] = {}
        self._generation: bytes | None = None
        self._item_lock = threading.Lock()
        # This thread's last profile read's (generation, monotonic time), taken by `get_items`.
        self._with_profile = threading.local()
        self.item_cache_hits = 0
        self.item_cache_misses = 0

    def start(self) -> None:
        """Read feature_store.yaml and connect (one PING).

        Raises:
            FailedPrecondition: the repo's online store is not Redis, or is a Redis Sentinel.
            FeatureStoreUnavailable: Redis does not answer.
        """
        from feast.infra.online_stores.helpers import _mmh3

        config = yaml.safe_load((self.repo_dir / "feature_store.yaml").read_text())
        online = config.get("online_store", {})
        if online.get("type") != "redis":
            raise FailedPrecondition(
                f"RedisFeatureReader needs a Redis online store, the repo has {online.get('type')!r}"
            )
        self._project = str(config["project"]).encode()
        self._version = int(config.get("entity_key_serialization_version", 3))
        self._profile_fields = [_mmh3(f"{USER_PROFILE_VIEW}:{f}") for f in USER_PROFILE_FEATURES]
        self._item_fields = [_mmh3(f"{ITEM_FEATURES_VIEW}:{f}") for f in ITEM_FEATURES]
        try:
            client = online_client(online, self.socket_timeout)  # a cluster connects here
            client.ping()
        except redis.RedisError as exc:
            raise FeatureStoreUnavailable(f"online store Redis did not answer: {exc}") from exc
        self._client = client
        self._cluster = isinstance(client, RedisCluster)
        if isinstance(client, redis.Redis):
            self._hmget_many = client.register_script(HMGET_MANY)
            self._get_then_hmget_many = client.register_script(GET_THEN_HMGET_MANY)
        self._generation_key = item_generation_key(self._project.decode())

    def _key(self, join_key: str, value: str) -> bytes:
        """Feast's Redis key of one entity, cached (ids repeat across requests; building and
        serialising the EntityKey proto cost ~30% of a 50-item read)."""
        cached = self._keys.get((join_key, value))
        if cached is not None:
            return cached
        from feast.infra.key_encoding_utils import serialize_entity_key
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        entity = EntityKey(join_keys=[join_key], entity_values=[Value(string_val=value)])
        key = (
            serialize_entity_key(entity, entity_key_serialization_version=self._version)
            + self._project
        )
        if len(self._keys) >= KEY_CACHE_SIZE:
            self._keys.clear()
        self._keys[(join_key, value)] = key
        return key

    def _read(self, keys: list[bytes], fields: list[bytes]) -> list[list[bytes | None]]:
        """HMGET `fields` of every key in one round trip: one HMGET for one key, else one
        server-side script over all keys (one command to pack and one reply to parse instead
        of a pipeline of N: ~0.4 ms saved on 50 keys here)."""
        if self._client is None:
            raise FailedPrecondition("RedisFeatureReader.start() must be called before use")
        try:
            if len(keys) == 1:
                return [self._client.hmget(keys[0], fields)]  # type: ignore[list-item,arg-type]
            if self._cluster:
                pipe = self._client.pipeline()
                for key in keys:
                    pipe.hmget(key, fields)  # type: ignore[arg-type]
                return list(pipe.execute())
            return list(self._hmget_many(keys=keys, args=fields))
        except redis.RedisError as exc:
            raise FeatureStoreUnavailable(f"online feature read failed: {exc}") from exc

    @staticmethod
    def _decode(names: Sequence[str], values: Sequence[bytes | None]) -> dict[str, Any] | None:
        from feast.protos.feast.types.Value_pb2 import Value

        row: dict[str, Any] = {}
        for name, raw in zip(names, values, strict=True):
            if raw is None:
                row[name] = None
                continue
            row[name] = decode_value(Value.FromString(raw))
        if all(v is None for v in row.values()):
            return None
        return row

    def get_user_profile(self, user_id: str) -> UserProfile | None:
        key = self._key("user_id", user_id)
        if self.item_cache_max_age_s > 0:
            values = self._read_profile_and_generation(key)
        else:
            (values,) = self._read([key], self._profile_fields)
        row = self._decode(USER_PROFILE_FEATURES, values)
        return None if row is None else profile_from_row({"user_id": user_id, **row})

    def _read_profile_and_generation(self, key: bytes) -> list[bytes | None]:
        """A profile's values, with the item generation read in the same round trip and left
        for this thread's next `get_items`."""
        if self._client is None:
            raise FailedPrecondition("RedisFeatureReader.start() must be called before use")
        self._with_profile.generation = None
        try:
            if self._cluster:
                pipe = self._client.pipeline()
                pipe.get(self._generation_key)
                pipe.hmget(key, self._profile_fields)  # type: ignore[arg-type]
                generation, values = pipe.execute()
            else:
                generation, values = self._get_then_hmget_many(
                    keys=[self._generation_key, key], args=self._profile_fields
                )
        except redis.RedisError as exc:
            raise FeatureStoreUnavailable(f"online feature read failed: {exc}") from exc
        self._with_profile.generation = (generation, time.monotonic())
        return list(values)

    def _generation_from_profile(self, now: float) -> tuple[bool, bytes | None]:
        """(whether this thread's last profile read left a generation young enough to use,
        that generation); taken either way, so it serves one `get_items` at most."""
        left = getattr(self._with_profile, "generation", None)
        self._with_profile.generation = None
        if left is None or now - left[1] > PROFILE_GENERATION_MAX_AGE_S:
            return False, None
        return True, left[0]

    @property
    def item_cache_hit_rate(self) -> float:
        """Share of item reads answered from the item cache since start (0 with none)."""
        total = self.item_cache_hits + self.item_cache_misses
        return self.item_cache_hits / total if total else 0.0

    def get_items(self, item_ids: Sequence[str]) -> dict[str, ItemFeatures]:
        unique = list(dict.fromkeys(item_ids))
        if self.item_cache_max_age_s <= 0 or not unique:
            return self._read_items(unique)
        now = time.monotonic()
        oldest = now - self.item_cache_max_age_s
        held: dict[str, ItemFeatures] = {}
        with self._item_lock:
            seen = self._generation
            for item_id in unique:
                item = self._item_cache.get(item_id)
                if item is not None and self._item_read_at[item_id] >= oldest:
                    held[item_id] = item
                    self._item_cache.move_to_end(item_id)
        missing = [i for i in unique if i not in held]
        fresh, generation = self._generation_from_profile(now)
        if fresh and not missing:
            fetched: dict[str, ItemFeatures] = {}  # everything held: no round trip
        else:
            generation, fetched = self._read_items_and_generation(missing)
        if generation != seen and held:
            # A writer bumped it after `held` was read: those may be old, so read them again.
            fetched.update(self._read_items(list(held)))
            missing += list(held)
            held = {}
        with self._item_lock:
            # Every entry kept was read under `_generation` (a reader that read an older one
            # than the last stored resets it, and the next read resets it back: a lost clear,
            # never a mislabelled entry).
            if generation != self._generation:
                self._item_cache.clear()
                self._item_read_at.clear()
                self._generation = generation
            for item_id, item in fetched.items():
                self._item_cache[item_id] = item
                self._item_cache.move_to_end(item_id)
                self._item_read_at[item_id] = now
            while len(self._item_cache) > ITEM_CACHE_SIZE:
                del self._item_read_at[self._item_cache.popitem(last=False)[0]]
            self.item_cache_hits += len(held)
            self.item_cache_misses += len(missing)
        found = {**held, **fetched}
        return {i: found[i] for i in unique if i in found}

    def _read_items_and_generation(
        self, item_ids: list[str]
    ) -> tuple[bytes | None, dict[str, ItemFeatures]]:
        """(the item generation, the features of `item_ids`): on one node read atomically, in
        one round trip; on a cluster the generation first, then the items (a cross-shard
        pipeline has no order, and items read before the generation could be older than it)."""
        if self._client is None:
            raise FailedPrecondition("RedisFeatureReader.start() must be called before use")
        try:
            if not item_ids:
                return self._client.get(self._generation_key), {}  # type: ignore[return-value]
            if self._cluster:
                generation = self._client.get(self._generation_key)
                return generation, self._read_items(item_ids)  # type: ignore[return-value]
            keys = [self._generation_key, *(self._key("item_id", i) for i in item_ids)]
            reply = list(self._get_then_hmget_many(keys=keys, args=self._item_fields))
        except redis.RedisError as exc:
            raise FeatureStoreUnavailable(f"online feature read failed: {exc}") from exc
        return reply[0], self._items_from(item_ids, reply[1:])

    def warm_records(self, item_ids: Sequence[str], chunk: int = 512) -> int:
        """Read `item_ids` once, `chunk` at a time, so their Redis keys and decoded records
        are memoised before requests need them; returns how many records were found.

        A first read of 70 items that were never read costs ~3x a repeat (at 100k items:
        1.88 ms against 0.63-0.71, stop 22): building the keys and decoding the protobuf
        values is most of it. The memo is keyed by the bytes read, so a record that changes
        later is decoded again; what this warms is never served stale. The item cache
        (`item_cache_max_age_s`) is left as it was."""
        unique = list(dict.fromkeys(item_ids))
        found = 0
        for start in range(0, len(unique), chunk):
            found += len(self._read_items(unique[start : start + chunk]))
        return found

    def _read_items(self, unique: list[str]) -> dict[str, ItemFeatures]:
        if not unique:
            return {}
        replies = self._read([self._key("item_id", i) for i in unique], self._item_fields)
        return self._items_from(unique, replies)

    def _items_from(
        self, unique: list[str], replies: Sequence[Sequence[bytes | None]]
    ) -> dict[str, ItemFeatures]:
        out: dict[str, ItemFeatures] = {}
        for item_id, values in zip(unique, replies, strict=True):
            # Decoding is a pure function of the bytes just read: the same bytes give the same
            # (immutable) record, so repeat reads of an unchanged item skip protobuf decoding
            # and conversion (~60% of a 50-item read). A changed item has new bytes.
            memo_key = (item_id, *values)
            item = self._decoded.get(memo_key)
            if item is None:
                row = self._decode(ITEM_FEATURES, values)
                if row is None:
                    continue
                item = item_from_row({"item_id": item_id, **row})
                if len(self._decoded) >= DECODED_CACHE_SIZE:
                    self._decoded.clear()
                self._decoded[memo_key] = item
            out[item_id] = item
        return out

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
