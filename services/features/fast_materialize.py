"""Bulk materialisation straight into Feast's Redis layout: same bytes, a fraction of the time.

Stock `FeatureStore.materialize` loads ~3.5k rows/s here (../shared/MACHINE_FLOORS.md): most of
it is Python per value and per row around the protobufs. This path reads the offline parquet
tables itself, encodes each column at once (fixed-width types with numpy, repeated values from a
memo) and writes batches of `batch_size` entities as pipelined HSETs.

What it keeps identical to Feast 0.67's Redis online store (`online_write_batch`):
    - key = serialize_entity_key(EntityKey v3) + project; fields = _mmh3("<view>:<feature>")
      and "_ts:<view>"; values = serialized `feast.types.Value`, byte for byte what
      `python_values_to_proto_values` gives for the column (tested type by type);
    - `_ts:<view>` = a `google.protobuf.Timestamp` of the row's event time at microsecond
      precision (Feast goes through `datetime`);
    - the rows: per entity the latest row with start <= event_timestamp <= end (inclusive, as
      the file offline store's `pull_latest_from_table_or_query`);
    - staleness: by default a row is written only if it is newer than the stored `_ts:<view>`
      (an equal instant is skipped, as in Feast). This costs one extra pipelined HMGET per batch
      and is what keeps a re-materialisation from an older offline table from clobbering a
      fresher profile that ingestion pushed since. `overwrite=True` (or Feast's own
      `skip_dedup: true` in feature_store.yaml) writes every row in one round trip per batch,
      for a first load into an empty project;
    - `key_ttl_seconds`: an EXPIRE per key in the same pipeline when it is configured;
    - the registry records the materialised interval, so the next `materialize` (either engine)
      starts where this one ended.

It refuses (FastMaterializeUnsupported) what it does not mirror: a non-Redis online store,
Redis Cluster or Sentinel, feature view versioning, a view whose features are not plain columns
of its offline table. The caller (`store.materialize(engine="fast")`) falls back to the SDK.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import redis
import yaml

from freshrec.config import FreshRecConfig
from freshrec.errors import FailedPrecondition, FeatureStoreUnavailable, InvalidArgument
from services.features.item_generation import item_generation_key, new_generation
from services.features.redis_reader import connection_kwargs

if TYPE_CHECKING:
    from feast import FeatureStore, FeatureView

DEFAULT_BATCH_SIZE = 1000
# A batch of 1,000 wide hashes is a few MB on the wire: allow more than a read's 2 s.
_WRITE_SOCKET_TIMEOUT_S = 30.0
# View name -> offline table (the same tables `store.write_offline_tables` writes).
VIEW_TABLES = {"user_profile": "user_profile.parquet", "item_features": "item_features.parquet"}


class FastMaterializeUnsupported(FailedPrecondition):
    """The repo's online store or a view is outside what the fast path mirrors; use the SDK."""


Encoder = Callable[[np.ndarray], list[bytes]]


# ---------------------------------------------------------------------------------------------
# Value encoders: one column of `table.column(c).to_numpy(zero_copy_only=False)` -> bytes
# ---------------------------------------------------------------------------------------------


def _is_null(value: Any) -> bool:
    if value is None:
        return True
    return isinstance(value, float) and value != value  # NaN


def _memo_encoder(make: Callable[[Any], bytes]) -> Encoder:
    """Encode value by value, each distinct value once (categories, counts, flags repeat)."""

    def encode(values: np.ndarray) -> list[bytes]:
        memo: dict[Any, bytes] = {}
        out: list[bytes] = []
        for value in values.tolist():
            if _is_null(value):
                out.append(b"")
                continue
            raw = memo.get(value)
            if raw is None:
                raw = memo[value] = make(value)
            out.append(raw)
        return out

    return encode


def _fixed_width(tag: bytes, fmt: str) -> Encoder:
    """Scalars of one wire width: tag + little-endian value, built as one numpy buffer."""
    width = 1 + np.dtype(fmt).itemsize

    def encode(values: np.ndarray) -> list[bytes]:
        if values.dtype == object:
            nulls = np.fromiter((_is_null(v) for v in values), dtype=bool, count=len(values))
            filled = np.where(nulls, 0, values).astype(fmt)
        else:
            nulls = np.isnan(values) if values.dtype.kind == "f" else np.zeros(len(values), bool)
            filled = values.astype(fmt)
        record = np.empty(len(values), dtype=[("tag", "u1"), ("value", fmt)])
        record["tag"] = tag[0]
        record["value"] = filled
        buf = record.tobytes()
        out = [buf[i : i + width] for i in range(0, len(buf), width)]
        for i in np.flatnonzero(nulls):  # Feast writes an empty Value for a null
            out[i] = b""
        return out

    return encode


def _encode_bool(values: np.ndarray) -> list[bytes]:
    return [b"" if _is_null(v) else (b"8\x01" if v else b"8\x00") for v in values.tolist()]


def _encode_unix_timestamp(values: np.ndarray) -> list[bytes]:
    from feast.protos.feast.types.Value_pb2 import Value

    # Feast: each np.datetime64 -> astype("datetime64[s]") -> int (NaT becomes int64 min).
    seconds = values.astype("datetime64[s]").astype(np.int64)
    memo: dict[int, bytes] = {}
    out = []
    for s in seconds.tolist():
        raw = memo.get(s)
        if raw is None:
            raw = memo[s] = Value(unix_timestamp_val=s).SerializeToString()
        out.append(raw)
    return out


def _list_encoder(field: str, list_type: Callable[..., Any]) -> Encoder:
    from feast.protos.feast.types.Value_pb2 import Value

    def encode(values: np.ndarray) -> list[bytes]:
        out: list[bytes] = []
        for value in values:
            if value is None:
                out.append(b"")
                continue
            items = value.tolist() if isinstance(value, np.ndarray) else list(value)
            out.append(Value(**{field: list_type(val=items)}).SerializeToString())
        return out

    return encode


@functools.cache
def value_encoders() -> dict[Any, Encoder]:
    """The fast encoder for each Feast ValueType FreshRec's views use (others: Feast's own)."""
    from feast.protos.feast.types.Value_pb2 import FloatList, Int64List, StringList, Value
    from feast.value_type import ValueType

    return {
        ValueType.STRING: _memo_encoder(lambda v: Value(string_val=v).SerializeToString()),
        ValueType.INT64: _memo_encoder(lambda v: Value(int64_val=int(v)).SerializeToString()),
        ValueType.FLOAT: _fixed_width(b"5", "<f4"),  # field 6, wire type 5 (fixed32)
        ValueType.DOUBLE: _fixed_width(b")", "<f8"),  # field 5, wire type 1 (fixed64)
        ValueType.BOOL: _encode_bool,
        ValueType.UNIX_TIMESTAMP: _encode_unix_timestamp,
        ValueType.STRING_LIST: _list_encoder("string_list_val", StringList),
        ValueType.FLOAT_LIST: _list_encoder("float_list_val", FloatList),
        ValueType.INT64_LIST: _list_encoder("int64_list_val", Int64List),
    }


def encode_column(values: np.ndarray, value_type: Any) -> list[bytes]:
    """Serialized `feast.types.Value`s for one column, byte-identical to Feast's conversion.

    Args:
        values: the column as `pyarrow.Array.to_numpy(zero_copy_only=False)` gives it (what
            Feast's materialisation feeds `python_values_to_proto_values`).
        value_type: the feature's `feast.ValueType`.
    """
    encoder = value_encoders().get(value_type)
    if encoder is not None:
        return encoder(values)
    from feast.type_map import python_values_to_proto_values

    protos = python_values_to_proto_values(values, value_type)  # type: ignore[arg-type]
    return [p.SerializeToString() for p in protos]


def encode_event_timestamps(stamps: np.ndarray) -> list[bytes]:
    """Serialized `google.protobuf.Timestamp`s for `_ts:<view>` (microseconds, as Feast).

    Args:
        stamps: datetime64[ns] event times in UTC.
    """
    from google.protobuf.timestamp_pb2 import Timestamp

    micros = stamps.astype("datetime64[us]").astype(np.int64)
    memo: dict[int, bytes] = {}
    out = []
    for us in micros.tolist():
        raw = memo.get(us)
        if raw is None:
            seconds, rest = divmod(us, 1_000_000)
            raw = memo[us] = Timestamp(seconds=seconds, nanos=rest * 1000).SerializeToString()
        out.append(raw)
    return out


def _nanos(raw: bytes | None) -> int:
    if not raw:
        return 0
    from google.protobuf.timestamp_pb2 import Timestamp

    ts = Timestamp()
    ts.ParseFromString(raw)
    return int(ts.seconds) * 1_000_000_000 + int(ts.nanos)


# ---------------------------------------------------------------------------------------------
# Rows, keys, writes
# ---------------------------------------------------------------------------------------------


def latest_rows_in_window(
    table: pa.Table, join_key: str, timestamp_field: str, start: datetime, end: datetime
) -> pa.Table:
    """Per entity, the newest row with start <= timestamp <= end (Feast's materialisation rows)."""
    frame = pd.DataFrame(
        {
            "key": table.column(join_key).to_pandas(),
            "ts": pd.to_datetime(table.column(timestamp_field).to_pandas(), utc=True),
        }
    )
    frame["pos"] = np.arange(len(frame))
    window = frame[(frame["ts"] >= pd.Timestamp(start)) & (frame["ts"] <= pd.Timestamp(end))]
    latest = window.sort_values(["ts", "pos"], kind="stable").drop_duplicates("key", keep="last")
    return table.take(pa.array(np.sort(latest["pos"].to_numpy())))


def entity_keys(project: str, join_key: str, ids: Sequence[str], version: int) -> list[bytes]:
    """Feast's Redis keys (`_redis_key`) for string entity ids."""
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    suffix = project.encode("utf-8")
    return [
        serialize_entity_key(
            EntityKey(join_keys=[join_key], entity_values=[Value(string_val=str(i))]),
            entity_key_serialization_version=version,
        )
        + suffix
        for i in ids
    ]


def _check_rendered_repo(repo_dir: Path) -> None:
    online = yaml.safe_load((repo_dir / "feature_store.yaml").read_text()).get("online_store", {})
    kind, redis_type = online.get("type"), online.get("redis_type", "redis")
    if kind != "redis":
        raise FastMaterializeUnsupported(
            f"fast materialisation writes Feast's Redis layout; this repo's online store is {kind!r}"
        )
    if redis_type != "redis":
        raise FastMaterializeUnsupported(
            f"fast materialisation supports redis_type 'redis' only, got {redis_type!r} "
            "(a cluster spreads one batch over nodes; use the SDK path)"
        )


def _redis_client(store: FeatureStore) -> tuple[redis.Redis, Any]:
    online = store.config.online_store
    if getattr(online, "type", None) != "redis":
        raise FastMaterializeUnsupported(
            f"fast materialisation writes Feast's Redis layout; this repo's online store is "
            f"{getattr(online, 'type', online)!r}"
        )
    redis_type = str(getattr(online.redis_type, "value", online.redis_type))
    if redis_type != "redis":
        raise FastMaterializeUnsupported(
            f"fast materialisation supports redis_type 'redis' only, got {redis_type!r} "
            "(a cluster spreads one batch over nodes; use the SDK path)"
        )
    if getattr(store.config.registry, "enable_online_feature_view_versioning", False):
        raise FastMaterializeUnsupported("online feature view versioning is not mirrored")
    kwargs = connection_kwargs(online.connection_string)
    return redis.Redis(socket_timeout=_WRITE_SOCKET_TIMEOUT_S, **kwargs), online


def _write_view(
    client: redis.Redis,
    store: FeatureStore,
    view: FeatureView,
    table: pa.Table,
    overwrite: bool,
    key_ttl_seconds: int | None,
    batch_size: int,
) -> tuple[int, int]:
    from feast.infra.online_stores.helpers import _mmh3

    join_key = view.entity_columns[0].name
    columns = [table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names]
    by_name = dict(zip(table.column_names, columns, strict=True))
    fields = [_mmh3(f"{view.name}:{f.name}") for f in view.features]
    encoded = [encode_column(by_name[f.name], f.dtype.to_value_type()) for f in view.features]
    ts_field = f"_ts:{view.name}".encode()
    # Arrow hands a tz-aware column over as UTC datetime64 (what Feast converts too).
    stamp_values = np.asarray(by_name[_source(view).timestamp_field]).astype("datetime64[ns]")
    ts_bytes = encode_event_timestamps(stamp_values)
    keys = entity_keys(
        store.project,
        join_key,
        [str(v) for v in by_name[join_key].tolist()],
        store.config.entity_key_serialization_version,
    )
    new_nanos = stamp_values.astype("datetime64[us]").astype(np.int64) * 1000

    written = skipped = 0
    for lo in range(0, len(keys), batch_size):
        hi = min(lo + batch_size, len(keys))
        rows: Sequence[int] = range(lo, hi)
        if not overwrite:
            # Feast's rule: write only rows newer than the stored _ts (one extra round trip).
            read = client.pipeline(transaction=False)
            for i in rows:
                read.hget(keys[i], ts_field)  # type: ignore[arg-type]  # bytes are fine
            stored = read.execute()
            rows = [i for i, prev in zip(rows, stored, strict=True) if new_nanos[i] > _nanos(prev)]
            skipped += (hi - lo) - len(rows)
        pipe = client.pipeline(transaction=False)
        for i in rows:
            mapping = {ts_field: ts_bytes[i]}
            for field, values in zip(fields, encoded, strict=True):
                mapping[field] = values[i]
            pipe.hset(keys[i], mapping=mapping)  # type: ignore[arg-type]  # bytes fields
            if key_ttl_seconds:
                pipe.expire(keys[i], key_ttl_seconds)
        pipe.execute()
        written += len(rows)
    return written, skipped


def fast_materialize(
    config: FreshRecConfig,
    end: datetime,
    store: FeatureStore | None = None,
    *,
    overwrite: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    views: Sequence[str] = tuple(VIEW_TABLES),
    start: datetime | None = None,
    full: bool = False,
) -> dict[str, Any]:
    """Load the offline tables into the Redis online store in Feast's layout, up to `end`.

    The window of each view is the one `store.materialize` uses: from the view's last
    materialised end (or `end - ttl` the first time) to `end`, inclusive.

    Args:
        config: names the rendered repo and the offline tables.
        end: materialise rows up to this instant (naive = UTC).
        store: an open FeatureStore for the rendered repo (opened here if None).
        overwrite: write every row even if the stored `_ts:<view>` is as new or newer (one round
            trip per batch instead of two); Feast's `skip_dedup: true` implies it.
        batch_size: entities per pipelined round trip, >= 1.
        views: which views to load.
        start: load from this instant instead of the view's last materialised end (a backfill;
            the staleness rule still protects newer stored rows unless `overwrite`).
        full: load each view's whole window (`end - ttl`, or everything without a TTL) as the
            first run did, whatever ran before: after the online store lost its data.

    Returns:
        {"engine": "fast", "views": {name: {"rows": written, "skipped": n, "seconds": s,
        "start": iso, "end": iso}}, "rows": total written, "seconds": total}.

    Raises:
        FastMaterializeUnsupported: the online store or a view is outside what this mirrors.
        FeatureStoreUnavailable: Redis could not be written.
        InvalidArgument: batch_size < 1.
    """
    from services.features.store import open_feature_store

    if batch_size < 1:
        raise InvalidArgument(f"batch_size must be >= 1, got {batch_size}")
    if store is None:
        _check_rendered_repo(config.feature_repo_dir)  # refuse before Feast connects anywhere
        store = open_feature_store(config.feature_repo_dir)
    client, online = _redis_client(store)
    overwrite = overwrite or bool(getattr(online, "skip_dedup", False))
    key_ttl = getattr(online, "key_ttl_seconds", None)
    end = end.replace(tzinfo=UTC) if end.tzinfo is None else end.astimezone(UTC)
    report: dict[str, Any] = {"engine": "fast", "views": {}}
    started = time.perf_counter()
    try:
        for view_name in views:
            t0 = time.perf_counter()
            view = store.get_feature_view(view_name)
            if len(view.entity_columns) != 1:
                raise FastMaterializeUnsupported(f"{view_name}: only single-key entities")
            since = start or (None if full else view.most_recent_end_time)
            if since is None:
                since = end - view.ttl if view.ttl else datetime(1970, 1, 1, tzinfo=UTC)
            since = since.replace(tzinfo=UTC) if since.tzinfo is None else since
            table = _read_table(config.offline_dir / VIEW_TABLES[view_name], view)
            table = latest_rows_in_window(
                table, view.entity_columns[0].name, _source(view).timestamp_field, since, end
            )
            written, skipped = _write_view(
                client, store, view, table, overwrite, key_ttl, batch_size
            )
            store.registry.apply_materialization(view, store.project, since, end)
            if view_name == "item_features" and written:
                # After the write: caching readers drop what they hold (item_generation.py).
                client.set(item_generation_key(store.project), new_generation())
            report["views"][view_name] = {
                "rows": written,
                "skipped": skipped,
                "seconds": round(time.perf_counter() - t0, 3),
                "start": since.isoformat(),
                "end": end.isoformat(),
            }
    except (redis.RedisError, OSError) as exc:
        raise FeatureStoreUnavailable(f"fast materialize failed: {exc}") from exc
    finally:
        client.close()
    report["rows"] = sum(v["rows"] for v in report["views"].values())
    report["seconds"] = round(time.perf_counter() - started, 3)
    return report


def _source(view: FeatureView) -> Any:
    if view.batch_source is None:
        raise FastMaterializeUnsupported(f"{view.name} has no batch source")
    return view.batch_source


def compare_materialize(config: FreshRecConfig, n_users: int, n_items: int) -> dict[str, Any]:
    """Stock SDK vs fast rows/s on the same generated data and Redis (`materialize_bench`)."""
    from services.features.materialize_bench import compare_materialize as compare

    return compare(config, n_users, n_items)


def _read_table(path: Path, view: FeatureView) -> pa.Table:
    columns = [
        view.entity_columns[0].name,
        *(f.name for f in view.features),
        _source(view).timestamp_field,
    ]
    if _source(view).field_mapping:
        raise FastMaterializeUnsupported(f"{view.name}: field_mapping is not mirrored")
    table = pq.read_table(path)
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise FastMaterializeUnsupported(f"{view.name}: {path} lacks columns {missing}")
    return table.select(columns).combine_chunks()
