"""Setting up the Feast feature store: choose the online store, render, apply, materialise.

`prepare_feature_store` is the whole sequence the demo and the CLI run. The rendered Feast repo
is `<workdir>/feature_repo/` (feature_store.yaml + a copy of the repo-root
`feature_repo/features.py`); the offline parquet tables live in `<workdir>/offline/`, which
`features.py` names relative to the rendered repo (`../offline/...`), so every process that
opens `FeatureStore(repo_path=<workdir>/feature_repo)` finds them whatever its cwd.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote, urlparse

import pandas as pd
import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from freshrec.config import FreshRecConfig
from freshrec.errors import FailedPrecondition, FeatureStoreUnavailable
from services.features.item_generation import ItemGeneration

if TYPE_CHECKING:
    from feast import FeatureStore

logger = logging.getLogger(__name__)

FEATURE_DEFINITIONS = Path(__file__).resolve().parents[2] / "feature_repo" / "features.py"
USER_PROFILE_TABLE = "user_profile.parquet"
ITEM_FEATURES_TABLE = "item_features.parquet"
REDIS_PID_FILE = "redis.pid"
REDIS_PORT_FILE = "redis.port"
_REDIS_START_TIMEOUT_S = 5.0
# Fail fast when Redis is down instead of hanging a ranking request on a dead socket; the read
# timeout also bounds a Redis that accepts connections but does not answer (paused, overloaded).
_REDIS_CONNECT_TIMEOUT_S = 2
_REDIS_SOCKET_TIMEOUT_S = 2
_FAIL_FAST_RETRY = Retry(ExponentialBackoff(cap=0.1, base=0.02), retries=1)
# What the online stores raise when they cannot be reached or written.
_STORE_ERRORS = (redis.RedisError, sqlite3.Error, OSError)


@dataclass(frozen=True)
class OnlineStoreChoice:
    """Which online store Feast will use, and why."""

    kind: Literal["redis", "sqlite"]
    redis_url: str | None
    description: str
    process: subprocess.Popen[bytes] | None = None  # set when this process started redis-server

    def stop(self) -> None:
        """Stop the redis-server this process started (no-op otherwise)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


# ---------------------------------------------------------------------------------------------
# Online store choice
# ---------------------------------------------------------------------------------------------


def resolve_online_store(config: FreshRecConfig) -> OnlineStoreChoice:
    """Pick the online store for `config.online_store`.

    auto: Redis at config.redis_url if it answers PING; else a redis-server this workdir started
    earlier (`<workdir>/redis.pid` + `redis.port`) if it still answers; else start `redis-server`
    from PATH on a free loopback port (no persistence, dir `<workdir>/redis/`); else SQLite.
    redis: config.redis_url must answer. sqlite: `<workdir>/feature_repo/online.db`.
    With redis_type "redis_cluster" the node at redis_url must answer (whatever online_store).

    Raises:
        FeatureStoreUnavailable: online_store is "redis" (or redis_type "redis_cluster") and
            Redis does not answer.
    """
    if config.online_store == "sqlite":
        return OnlineStoreChoice("sqlite", None, "SQLite online store (configured)")
    if _redis_answers(config.redis_url):
        if config.redis_type == "redis_cluster":
            return OnlineStoreChoice(
                "redis", config.redis_url, f"Redis Cluster with node {config.redis_url}"
            )
        return OnlineStoreChoice("redis", config.redis_url, f"Redis at {config.redis_url}")
    if config.redis_type == "redis_cluster":
        # Starting a single redis-server in place of a cluster would silently change the
        # topology (and the reader that works); a cluster must be there.
        raise FeatureStoreUnavailable(
            f"redis_type is 'redis_cluster' but {config.redis_url} does not answer PING"
        )
    if config.online_store == "redis":
        raise FeatureStoreUnavailable(
            f"online_store is 'redis' but {config.redis_url} does not answer PING"
        )
    reused = _reuse_started_redis(config.workdir)
    if reused is not None:
        return OnlineStoreChoice(
            "redis", reused, f"Redis at {reused} (redis-server started earlier for this workdir)"
        )
    binary = shutil.which("redis-server")
    if binary is None:
        return OnlineStoreChoice(
            "sqlite", None, f"SQLite online store ({config.redis_url} unreachable, no redis-server)"
        )
    url, process = start_redis_server(binary, config.workdir)
    return OnlineStoreChoice(
        "redis",
        url,
        f"Redis at {url} (started redis-server pid {process.pid}; {config.redis_url} unreachable)",
        process,
    )


def start_redis_server(
    binary: str, workdir: Path, port: int | None = None
) -> tuple[str, subprocess.Popen[bytes]]:
    """Start a persistence-free redis-server on loopback and wait until it answers.

    Writes `<workdir>/redis.pid` and `<workdir>/redis.port` so a later process can reuse it.
    The server runs in its own session so it outlives this process (the demo's services share
    it); stop it with `OnlineStoreChoice.stop()` or by the pid in the file.

    Returns:
        (redis_url, process).

    Raises:
        FeatureStoreUnavailable: it did not answer within a few seconds.
    """
    data_dir = workdir / "redis"
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or _free_port()
    # fmt: off
    args = [
        binary, "--port", str(port), "--bind", "127.0.0.1",
        "--save", "", "--appendonly", "no", "--dir", str(data_dir.resolve()),
        "--logfile", str((data_dir / "redis.log").resolve()),
    ]
    # fmt: on
    process = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + _REDIS_START_TIMEOUT_S
    while not _redis_answers(url):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise FeatureStoreUnavailable(
                f"redis-server on port {port} did not answer within {_REDIS_START_TIMEOUT_S}s; "
                f"see {data_dir / 'redis.log'}"
            )
        time.sleep(0.05)
    (workdir / REDIS_PID_FILE).write_text(f"{process.pid}\n")
    (workdir / REDIS_PORT_FILE).write_text(f"{port}\n")
    return url, process


def _reuse_started_redis(workdir: Path) -> str | None:
    pid_file, port_file = workdir / REDIS_PID_FILE, workdir / REDIS_PORT_FILE
    try:
        pid = int(pid_file.read_text())
        port = int(port_file.read_text())
        os.kill(pid, 0)  # raises if no such process
    except (OSError, ValueError):
        return None
    url = f"redis://127.0.0.1:{port}/0"
    return url if _redis_answers(url) else None


def _redis_answers(url: str) -> bool:
    try:
        client = redis.Redis.from_url(
            url, socket_connect_timeout=0.5, socket_timeout=0.5, retry=Retry(NoBackoff(), 0)
        )
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------------------------------------
# Rendering and applying the Feast repo
# ---------------------------------------------------------------------------------------------


def redis_connection_string(url: str, cluster_nodes: Sequence[str] | None = None) -> str:
    """Feast's Redis connection string (`host:port,db=N[,password=..]`) for a redis:// URL.

    Args:
        cluster_nodes: None for one Redis node; for a Redis Cluster, the `host:port` startup
            nodes besides the URL's (may be empty); the string then lists every node and no
            `db` (cluster nodes have only database 0).

    Raises:
        ValueError: not a redis:// or rediss:// URL, a cluster URL names a database other
            than 0, or a node is not host:port.
    """
    parsed = urlparse(url)
    if parsed.scheme not in ("redis", "rediss"):
        raise ValueError(f"redis_url must start with redis:// or rediss://, got {url!r}")
    db = parsed.path.lstrip("/") or "0"
    parts = [f"{parsed.hostname or '127.0.0.1'}:{parsed.port or 6379}"]
    if cluster_nodes is not None:
        if int(db) != 0:
            raise ValueError(f"a Redis Cluster has only database 0, redis_url names {db}")
        for node in cluster_nodes:
            host, _, port = node.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"redis_cluster_nodes entries must be host:port, got {node!r}")
            parts.append(node)
    else:
        parts.append(f"db={int(db)}")
    if parsed.username:
        parts.append(f"username={unquote(parsed.username)}")
    if parsed.password:
        parts.append(f"password={unquote(parsed.password)}")
    if parsed.scheme == "rediss":
        parts.append("ssl=true")
    parts.append(f"socket_connect_timeout={_REDIS_CONNECT_TIMEOUT_S}")
    parts.append(f"socket_timeout={_REDIS_SOCKET_TIMEOUT_S}")
    return ",".join(parts)


def render_feature_store_yaml(config: FreshRecConfig, choice: OnlineStoreChoice) -> Path:
    """Write `<workdir>/feature_repo/feature_store.yaml` and copy `features.py` beside it.

    Returns:
        The rendered repo directory (what Feast applies and reads).
    """
    repo_dir = config.feature_repo_dir
    repo_dir.mkdir(parents=True, exist_ok=True)
    if choice.kind == "redis":
        assert choice.redis_url is not None
        if config.redis_type == "redis_cluster":
            # Every node given is a startup node; the client discovers the rest from them.
            nodes = config.redis_cluster_nodes
            online = (
                "online_store:\n"
                "  type: redis\n"
                "  redis_type: redis_cluster\n"
                f'  connection_string: "{redis_connection_string(choice.redis_url, nodes)}"\n'
            )
        else:
            online = (
                "online_store:\n"
                "  type: redis\n"
                f'  connection_string: "{redis_connection_string(choice.redis_url)}"\n'
            )
    else:
        online = f"online_store:\n  type: sqlite\n  path: {(repo_dir / 'online.db').resolve()}\n"
    text = (
        f"# Rendered by services/features/store.py ({choice.description}); do not edit.\n"
        f"project: {config.project}\n"
        "provider: local\n"
        f"registry: {(repo_dir / 'registry.db').resolve()}\n"
        f"{online}"
        "offline_store:\n"
        "  type: file\n"
        f"{_batch_engine_yaml(config)}"
        "entity_key_serialization_version: 3\n"
    )
    _atomic_write_text(repo_dir / "feature_store.yaml", text)
    shutil.copyfile(FEATURE_DEFINITIONS, repo_dir / "features.py")
    return repo_dir


# Spark settings FreshRec starts from (config.materialize.spark_conf wins): no web UI or
# event log to leave behind, few shuffle partitions for feature-sized data, Arrow transfers.
SPARK_DEFAULT_CONF = {
    "spark.ui.enabled": "false",
    "spark.sql.shuffle.partitions": "8",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.session.timeZone": "UTC",
}


def _batch_engine_yaml(config: FreshRecConfig) -> str:
    """The `batch_engine:` block: Feast's local engine, or its Spark compute engine.

    With the Spark engine the offline store stays Feast's file store: the engine reads each
    view's parquet window through it, turns it into a Spark DataFrame and writes the online
    store from the Spark executors (`mapInArrow`, one Redis pipeline per Arrow batch).
    """
    engine = config.materialize
    if engine.engine == "local":
        return "batch_engine:\n  type: local\n"
    conf = {**SPARK_DEFAULT_CONF, "spark.master": engine.spark_master}
    conf.update(engine.spark_conf)
    lines = ["batch_engine:", "  type: spark.engine", f"  partitions: {engine.partitions}"]
    lines.append("  spark_conf:")
    lines += [f"    {json.dumps(key)}: {json.dumps(value)}" for key, value in sorted(conf.items())]
    return "\n".join(lines) + "\n"


def feast_objects(repo_dir: Path) -> list[Any]:
    """The Feast objects (entities, sources, feature views) defined in `<repo_dir>/features.py`."""
    from feast import Entity, FeatureView
    from feast.data_source import DataSource

    module = _import_definitions(repo_dir / "features.py")
    kinds = (Entity, DataSource, FeatureView)
    return [value for value in vars(module).values() if isinstance(value, kinds)]


def apply_feature_repo(config: FreshRecConfig, store: FeatureStore | None = None) -> None:
    """`feast apply` through the SDK (the CLI costs ~10 s of start-up) on the rendered repo.

    Raises:
        FeatureStoreUnavailable: the online store could not be set up.
    """
    store = store or open_feature_store(config.feature_repo_dir)
    try:
        store.apply(feast_objects(config.feature_repo_dir))
    except _STORE_ERRORS as exc:
        raise FeatureStoreUnavailable(f"feast apply failed on the online store: {exc}") from exc


def open_feature_store(repo_dir: Path) -> FeatureStore:
    """`feast.FeatureStore` for a rendered repo (imports Feast lazily: ~1 s), failing fast.

    redis-py's default policy retries a failed command 3 times with up to 10 s of backoff, so a
    read against a Redis that is down would hang for seconds; we allow one quick retry instead.
    """
    from feast import FeatureStore

    store = FeatureStore(repo_path=str(repo_dir.resolve()))
    _limit_redis_retries(store)
    return store


def _limit_redis_retries(store: FeatureStore) -> None:
    online_config = store.config.online_store
    if getattr(online_config, "type", None) != "redis":
        return
    redis_type = getattr(online_config, "redis_type", "redis")
    if getattr(redis_type, "value", redis_type) != "redis":
        # A RedisCluster client connects (fetches the slot map) when created: leave it to
        # Feast to create on first use, with redis-py's cluster retry policy.
        return
    try:
        # Feast exposes no retry setting; its client is created lazily without connecting.
        client = store._get_provider().online_store._get_client(online_config)  # type: ignore[attr-defined]
    except AttributeError:  # a Feast upgrade moved the internals: keep redis-py's default
        logger.warning("cannot bound Feast's Redis retries; reads may block while Redis is down")
        return
    client.set_retry(_FAIL_FAST_RETRY)


# ---------------------------------------------------------------------------------------------
# Offline tables and materialisation
# ---------------------------------------------------------------------------------------------


def write_offline_tables(
    config: FreshRecConfig, profiles: pd.DataFrame, items: pd.DataFrame
) -> dict[str, Path]:
    """Write the offline parquet tables (atomic replace: readers never see half a file).

    Args:
        profiles: rows of `build_user_profiles` (USER_PROFILE_COLUMNS).
        items: rows of `build_item_features` (ITEM_FEATURE_COLUMNS).

    Returns:
        {"user_profile": path, "item_features": path}.
    """
    config.offline_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "user_profile": config.offline_dir / USER_PROFILE_TABLE,
        "item_features": config.offline_dir / ITEM_FEATURES_TABLE,
    }
    for name, frame in (("user_profile", profiles), ("item_features", items)):
        path = paths[name]
        _replace_parquet(frame, path)
    return paths


def _replace_parquet(frame: pd.DataFrame, path: Path) -> None:
    """Write `frame` to `path` whole, atomically: a reader sees the old table or the new one."""
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    frame.to_parquet(tmp, index=False)
    tmp.replace(path)


def refresh_popularity(config: FreshRecConfig, as_of: datetime) -> dict[str, Any]:
    """Recompute every item's popularity_7d/30d from the offline event log as of `as_of` and
    rewrite the offline item table (atomic replace), rows stamped `as_of`; the next
    `materialize` loads them. The re-ranker reads popularity, so a scheduled materialisation
    must carry fresh values or serving drifts from what training saw (point-in-time values).

    Returns:
        {"items": rows rewritten, "events": events read, "seconds": s}.

    Raises:
        FailedPrecondition: no offline item table (run `freshrec init` first).
    """
    from services.features.profiles import refresh_item_popularity
    from services.ingestion.offline_log import OfflineEventLog

    started = time.perf_counter()
    path = config.offline_dir / ITEM_FEATURES_TABLE
    if not path.exists():
        raise FailedPrecondition(f"no offline item table at {path}: run `freshrec init` first")
    as_of = as_of.replace(tzinfo=UTC) if as_of.tzinfo is None else as_of.astimezone(UTC)
    events = OfflineEventLog(config.offline_dir).read(since=as_of - timedelta(days=31))
    rows = refresh_item_popularity(pd.read_parquet(path), events, as_of)
    _replace_parquet(rows, path)
    return {
        "items": len(rows),
        "events": len(events),
        "seconds": round(time.perf_counter() - started, 3),
    }


def refresh_profiles(config: FreshRecConfig, as_of: datetime) -> dict[str, Any]:
    """Fold the offline event log into the offline profile table (a new row per user it
    changes, appended; atomic replace): each user's logged events after their newest row's
    `last_seen`, up to `as_of`, with `update_profile` (what LogEvents does to the online
    profile). The table holds the profiles as `freshrec init` built them; LogEvents pushes its
    updates to the online store only, so after the store lost its data (a Redis restart
    without persistence) this, then a `--full` materialisation, brings the profiles back as
    they were served.

    Returns:
        {"users": distinct users in the table, "updated": users given a new row (new users
        included), "events": events folded in, "seconds": s}.

    Raises:
        FailedPrecondition: no offline profile or item table (run `freshrec init` first).
    """
    from services.features.profiles import (
        iter_item_records,
        profile_from_row,
        profiles_frame,
        update_profile,
    )
    from services.ingestion.offline_log import OfflineEventLog

    started = time.perf_counter()
    path = config.offline_dir / USER_PROFILE_TABLE
    item_path = config.offline_dir / ITEM_FEATURES_TABLE
    for table in (path, item_path):
        if not table.exists():
            raise FailedPrecondition(f"no offline table at {table}: run `freshrec init` first")
    as_of = as_of.replace(tzinfo=UTC) if as_of.tzinfo is None else as_of.astimezone(UTC)
    rows = pd.read_parquet(path)
    # The table is a history of profile states (a Feast source): each user's newest row counts.
    latest = rows.assign(_at=pd.to_datetime(rows["last_seen"], utc=True))
    latest = latest.sort_values("_at", kind="stable").drop_duplicates("user_id", keep="last")
    last_seen = pd.Series(latest["_at"].to_numpy(), index=latest["user_id"].astype(str))
    events = OfflineEventLog(config.offline_dir).read()
    events = events[events["timestamp"] <= pd.Timestamp(as_of)]
    # Each user's events after the row's state (the history it was built from is in the log
    # too), in the log's order: by time, ties as they arrived. NaT: a user without a row.
    seen = pd.to_datetime(events["user_id"].astype(str).map(last_seen), utc=True)
    fresh = events[seen.isna().to_numpy() | (events["timestamp"] > seen).to_numpy()]
    by_user: dict[str, list[tuple[str, str, datetime]]] = {}
    for user, item, kind, ts in zip(
        fresh["user_id"], fresh["item_id"], fresh["event_type"], fresh["timestamp"], strict=True
    ):
        by_user.setdefault(str(user), []).append((str(item), str(kind), ts.to_pydatetime()))
    known = latest.drop(columns="_at")[latest["user_id"].astype(str).isin(by_user)]
    records: list[dict[str, Any]] = known.to_dict("records")  # type: ignore[assignment]
    current = {str(r["user_id"]): profile_from_row(r) for r in records}
    needed = set(fresh["item_id"].astype(str))
    for profile in current.values():
        needed.update(profile.recent_items)
    items = {i.item_id: i for i in iter_item_records(pd.read_parquet(item_path), sorted(needed))}
    updated = [update_profile(current.get(u), u, evs, items) for u, evs in by_user.items()]
    # Appended: the rows before stay, as the states the users had then (materialisation takes
    # each user's newest row).
    frame = pd.concat([rows, profiles_frame(updated)], ignore_index=True) if updated else rows
    _replace_parquet(frame, path)
    return {
        "users": int(frame["user_id"].nunique()),
        "updated": len(updated),
        "events": len(fresh),
        "seconds": round(time.perf_counter() - started, 3),
    }


def materialize(
    config: FreshRecConfig,
    end: datetime,
    store: FeatureStore | None = None,
    fast: bool = False,
    full: bool = False,
) -> dict[str, Any]:
    """Load the offline tables into the online store, up to `end` (inclusive).

    Each view's window starts where its previous materialisation ended, or at `end - ttl`
    the first time. (Feast's `materialize_incremental` starts at *now* - ttl, which loads nothing
    for a historical data set whose `end` is long past.)

    Args:
        fast: write Feast's Redis layout directly (`fast_materialize.py`, same values, several
            times the rows/s); falls back to the SDK where that path does not apply (SQLite,
            Redis Cluster), with a log line saying why.
        full: load each view's whole window (`end - ttl`) as the first run did, not only what
            changed since the previous run: after the online store lost its data (a Redis
            restart without persistence), which an incremental run would not bring back.

    Returns:
        {"views": {name: {"rows": n, "seconds": s, "start": iso, "end": iso}}, "seconds": total};
        rows = distinct entities in the window, i.e. what was written to the online store.
        The fast path adds "engine": "fast" and per view "skipped" (rows not newer than stored).

    Raises:
        FeatureStoreUnavailable: the online store could not be written.
        FailedPrecondition: Feast's registry lacks the feature views (never applied, or torn
            down): nothing to materialise into.
    """
    store = store or open_feature_store(config.feature_repo_dir)
    _require_feature_views(store, config)
    if fast:
        fast_report = _materialize_fast(config, end, store, full)
        if fast_report is not None:
            return fast_report
    if config.materialize.engine == "spark" and config.materialize.spark_master.startswith("local"):
        # PySpark starts its Python workers with $PYSPARK_PYTHON (default: `python3` on PATH,
        # which may lack Feast); locally they must run this interpreter. On a cluster the
        # executors' Python is the image's, set by the operator.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    end = end.replace(tzinfo=UTC) if end.tzinfo is None else end.astimezone(UTC)
    report: dict[str, Any] = {"views": {}}
    started = time.perf_counter()
    tables = {"user_profile": USER_PROFILE_TABLE, "item_features": ITEM_FEATURES_TABLE}
    for view_name, table in tables.items():
        view = store.get_feature_view(view_name)
        start = None if full else view.most_recent_end_time
        if start is None:
            start = end - view.ttl if view.ttl else datetime(1970, 1, 1, tzinfo=UTC)
        start = start.replace(tzinfo=UTC) if start.tzinfo is None else start
        t0 = time.perf_counter()
        try:
            store.materialize(start_date=start, end_date=end, feature_views=[view_name])
        except _STORE_ERRORS as exc:
            raise FeatureStoreUnavailable(f"materialize {view_name} failed: {exc}") from exc
        join_key = view.entity_columns[0].name
        report["views"][view_name] = {
            "rows": _entities_in_window(config.offline_dir / table, join_key, start, end),
            "seconds": round(time.perf_counter() - t0, 3),
            "start": start.isoformat(),
            "end": end.isoformat(),
        }
    # After the write: readers that keep item features drop them (item_generation.py).
    generation = ItemGeneration(config.feature_repo_dir)
    try:
        generation.bump()
    finally:
        generation.close()
    report["seconds"] = round(time.perf_counter() - started, 3)
    return report


def _require_feature_views(store: FeatureStore, config: FreshRecConfig) -> None:
    """Raises FailedPrecondition naming the first of the two feature views Feast's registry
    lacks (a repository never applied, or torn down), rather than Feast's error deep inside a
    materialisation."""
    from feast.errors import FeatureViewNotFoundException

    for name in ("user_profile", "item_features"):
        try:
            store.get_feature_view(name)
        except FeatureViewNotFoundException as exc:
            raise FailedPrecondition(
                f"feature view {name!r} is not in the Feast registry of project "
                f"{config.project} ({config.feature_repo_dir}): initialise the workdir "
                "(`freshrec init`) or apply its feature repository (`feast apply`) first"
            ) from exc


def _materialize_fast(
    config: FreshRecConfig, end: datetime, store: FeatureStore, full: bool = False
) -> dict[str, Any] | None:
    """The fast path's report, or None when it does not apply to this repo (use the SDK)."""
    from services.features.fast_materialize import FastMaterializeUnsupported, fast_materialize

    try:
        return fast_materialize(config, end, store, full=full)
    except FastMaterializeUnsupported as exc:
        logger.warning("fast materialisation does not apply (%s); using the Feast SDK", exc)
        return None


def prepare_feature_store(
    config: FreshRecConfig,
    profiles_df: pd.DataFrame,
    items_df: pd.DataFrame,
    end: datetime,
) -> OnlineStoreChoice:
    """Resolve the online store, render the repo, write the tables, apply and materialise.

    Returns:
        The online store used (its `process` is set when redis-server was started here).

    Raises:
        FeatureStoreUnavailable: online_store is "redis" and Redis is down, or a step failed.
    """
    choice = resolve_online_store(config)
    logger.info("feature store: %s", choice.description)
    render_feature_store_yaml(config, choice)
    write_offline_tables(config, profiles_df, items_df)
    store = open_feature_store(config.feature_repo_dir)
    apply_feature_repo(config, store)
    report = materialize(config, end, store)
    logger.info("materialized: %s", report)
    return choice


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _import_definitions(path: Path) -> ModuleType:
    """Import a features.py by path under a unique name (two workdirs never share a module)."""
    name = f"_freshrec_feature_repo_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"no Feast definitions at {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(name, None)
    return module


def _entities_in_window(path: Path, join_key: str, start: datetime, end: datetime) -> int:
    frame = pd.read_parquet(path, columns=[join_key, "event_timestamp"])
    stamps = pd.to_datetime(frame["event_timestamp"], utc=True)
    in_window = (stamps >= pd.Timestamp(start)) & (stamps <= pd.Timestamp(end))
    return int(frame.loc[in_window, join_key].nunique())


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(f"{path.suffix}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
