"""Event-id de-duplication across batches: the `Deduplicator` seam and its backends.

Redis for the served setup, SQLite for the embedded mode without Redis, a set for unit tests.
Every backend marks ids atomically per id, so two ingestors racing on the same event_id agree
on exactly one winner. `claim` records which batch marked an id, so a batch delivered again
after a failure (the ranking service's spool, services/ingestion/spool.py) keeps its own ids.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from freshrec.errors import FailedPrecondition, FeatureStoreUnavailable

DEFAULT_TTL_SECONDS = 7 * 24 * 3600
# Fail fast like the feature store (services/features/store.py): redis-py's default retries for
# seconds, and a LogEvents call must rather spool its batch than hang on a dead Redis.
_SOCKET_TIMEOUT_S = 2.0
_FAIL_FAST_RETRY = Retry(ExponentialBackoff(cap=0.1, base=0.02), retries=1)


class Deduplicator(Protocol):
    """Remembers which event ids have been ingested."""

    def first_seen(self, event_ids: Sequence[str]) -> list[bool]:
        """Mark the ids as seen; True for each id not seen before (in order).

        An id repeated within `event_ids` is True at its first position only.
        """
        ...

    def claim(self, event_ids: Sequence[str], owner: str) -> list[bool]:
        """Mark the ids as seen by batch `owner`; True for each id new or already `owner`'s.

        Re-delivering the same batch (same owner) after a failure half-way is therefore
        idempotent: its ids are not mistaken for duplicates of themselves. An id repeated
        within `event_ids` is True at its first position only.
        """
        ...

    def forget(self, event_ids: Sequence[str]) -> None:
        """Unmark ids, so a batch whose storage failed after `first_seen` can be retried."""
        ...


class InMemoryDeduplicator:
    """A set in this process; for unit tests and single-process demos."""

    def __init__(self) -> None:
        self._seen: dict[str, str] = {}
        self._lock = threading.Lock()

    def start(self) -> None:
        """Nothing to connect; present so every backend is wired the same way."""

    def close(self) -> None:
        """Nothing to release."""

    def first_seen(self, event_ids: Sequence[str]) -> list[bool]:
        with self._lock:
            out = []
            for event_id in event_ids:
                out.append(event_id not in self._seen)
                self._seen.setdefault(event_id, "")
            return out

    def claim(self, event_ids: Sequence[str], owner: str) -> list[bool]:
        with self._lock:
            out, here = [], set()
            for event_id in event_ids:
                out.append(self._seen.setdefault(event_id, owner) == owner and event_id not in here)
                here.add(event_id)
            return out

    def forget(self, event_ids: Sequence[str]) -> None:
        with self._lock:
            for event_id in event_ids:
                self._seen.pop(event_id, None)


class RedisDeduplicator:
    """Seen ids as Redis keys `<key_prefix>:<event_id>` that expire after `ttl_seconds`.

    One pipeline of `SET key 1 NX EX ttl` per batch: one round trip, and each SET NX is atomic,
    so concurrent ingestors never both see an id as new. After the TTL an id is forgotten and a
    re-send is accepted again; the validator's max_age (30 days) is longer than the default TTL
    (7 days), so a client retrying between the two is counted twice. Memory is the trade-off.
    """

    def __init__(
        self, redis_url: str, key_prefix: str, ttl_seconds: int = DEFAULT_TTL_SECONDS
    ) -> None:
        if ttl_seconds < 1:
            raise ValueError(f"ttl_seconds must be >= 1, got {ttl_seconds}")
        if not key_prefix:
            raise ValueError("key_prefix must be non-empty, got ''")
        self._url = redis_url
        self._prefix = key_prefix
        self._ttl = ttl_seconds
        self._client: redis.Redis | None = None

    def start(self) -> None:
        """Connect and ping, so a wrong URL fails here rather than on the first batch.

        Raises:
            FeatureStoreUnavailable: Redis cannot be reached.
        """
        client = redis.Redis.from_url(
            self._url,
            socket_connect_timeout=_SOCKET_TIMEOUT_S,
            socket_timeout=_SOCKET_TIMEOUT_S,
            retry=_FAIL_FAST_RETRY,
        )
        try:
            client.ping()
        except redis.RedisError as exc:
            client.close()
            raise FeatureStoreUnavailable(f"dedup Redis at {self._url} unreachable: {exc}") from exc
        self._client = client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def first_seen(self, event_ids: Sequence[str]) -> list[bool]:
        """See `Deduplicator.first_seen`.

        Raises:
            FailedPrecondition: start() was not called.
            FeatureStoreUnavailable: Redis failed mid-batch.
        """
        if not event_ids:
            return []
        pipe = self._require_client().pipeline(transaction=False)
        for event_id in event_ids:
            pipe.set(self._key(event_id), 1, nx=True, ex=self._ttl)
        try:
            replies = pipe.execute()
        except redis.RedisError as exc:
            raise FeatureStoreUnavailable(f"dedup Redis at {self._url} failed: {exc}") from exc
        # SET NX answers True when it wrote the key and None when the key already existed.
        return [bool(reply) for reply in replies]

    def claim(self, event_ids: Sequence[str], owner: str) -> list[bool]:
        """See `Deduplicator.claim`: one pipeline of `SET key owner NX GET EX ttl`.

        Raises:
            FailedPrecondition: start() was not called.
            FeatureStoreUnavailable: Redis failed mid-batch.
        """
        if not event_ids:
            return []
        pipe = self._require_client().pipeline(transaction=False)
        for event_id in event_ids:
            pipe.set(self._key(event_id), owner, nx=True, ex=self._ttl, get=True)
        try:
            replies = pipe.execute()
        except redis.RedisError as exc:
            raise FeatureStoreUnavailable(f"dedup Redis at {self._url} failed: {exc}") from exc
        # SET NX GET answers None when it wrote the key, else the value already there.
        out, here = [], set()
        for event_id, reply in zip(event_ids, replies, strict=True):
            mine = reply is None or reply == owner.encode()
            out.append(mine and event_id not in here)
            here.add(event_id)
        return out

    def forget(self, event_ids: Sequence[str]) -> None:
        """See `Deduplicator.forget`.

        Raises:
            FailedPrecondition: start() was not called.
            FeatureStoreUnavailable: Redis failed.
        """
        if not event_ids:
            return
        try:
            self._require_client().delete(*(self._key(event_id) for event_id in event_ids))
        except redis.RedisError as exc:
            raise FeatureStoreUnavailable(f"dedup Redis at {self._url} failed: {exc}") from exc

    def _key(self, event_id: str) -> str:
        return f"{self._prefix}:{event_id}"

    def _require_client(self) -> redis.Redis:
        if self._client is None:
            raise FailedPrecondition("RedisDeduplicator used before start()")
        return self._client


class SqliteDeduplicator:
    """Seen ids in a SQLite table, for the embedded mode without Redis. Ids never expire.

    Each batch is one transaction of `INSERT OR IGNORE`; the primary key makes the mark atomic
    across threads and processes sharing the file.
    """

    def __init__(self, path: Path | str) -> None:
        self._path = Path(path)
        self._conn: sqlite3.Connection | None = None
        # One connection shared by the gRPC worker threads; sqlite3 connections are not
        # safe for concurrent use, so calls are serialised here.
        self._lock = threading.Lock()

    def start(self) -> None:
        """Open (and create if needed) the database.

        Raises:
            FeatureStoreUnavailable: the file cannot be opened or created.
        """
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self._path, timeout=30.0, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS seen_events ("
                " event_id TEXT PRIMARY KEY, first_seen_at REAL NOT NULL)"
            )
            # Which batch claimed an id (`claim`); a separate table so older files still open.
            conn.execute(
                "CREATE TABLE IF NOT EXISTS claims (event_id TEXT PRIMARY KEY, owner TEXT NOT NULL)"
            )
        except (sqlite3.Error, OSError) as exc:
            raise FeatureStoreUnavailable(f"dedup database {self._path} unusable: {exc}") from exc
        self._conn = conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def first_seen(self, event_ids: Sequence[str]) -> list[bool]:
        """See `Deduplicator.first_seen`.

        Raises:
            FailedPrecondition: start() was not called.
            FeatureStoreUnavailable: the database is locked or broken.
        """
        if not event_ids:
            return []
        conn = self._require_conn()
        now = time.time()
        with self._transaction(conn):
            return [
                conn.execute(
                    "INSERT OR IGNORE INTO seen_events (event_id, first_seen_at) VALUES (?, ?)",
                    (event_id, now),
                ).rowcount
                == 1
                for event_id in event_ids
            ]

    def claim(self, event_ids: Sequence[str], owner: str) -> list[bool]:
        """See `Deduplicator.claim`.

        Raises:
            FailedPrecondition: start() was not called.
            FeatureStoreUnavailable: the database is locked or broken.
        """
        if not event_ids:
            return []
        conn = self._require_conn()
        now = time.time()
        out, here = [], set()
        with self._transaction(conn):
            for event_id in event_ids:
                inserted = (
                    conn.execute(
                        "INSERT OR IGNORE INTO seen_events (event_id, first_seen_at) VALUES (?, ?)",
                        (event_id, now),
                    ).rowcount
                    == 1
                )
                if inserted:
                    conn.execute(
                        "INSERT OR REPLACE INTO claims (event_id, owner) VALUES (?, ?)",
                        (event_id, owner),
                    )
                    mine = True
                else:
                    row = conn.execute(
                        "SELECT owner FROM claims WHERE event_id = ?", (event_id,)
                    ).fetchone()
                    mine = row is not None and row[0] == owner
                out.append(mine and event_id not in here)
                here.add(event_id)
        return out

    def forget(self, event_ids: Sequence[str]) -> None:
        """See `Deduplicator.forget`.

        Raises:
            FailedPrecondition: start() was not called.
            FeatureStoreUnavailable: the database is locked or broken.
        """
        if not event_ids:
            return
        conn = self._require_conn()
        with self._transaction(conn):
            for table in ("seen_events", "claims"):
                conn.executemany(
                    f"DELETE FROM {table} WHERE event_id = ?",
                    [(event_id,) for event_id in event_ids],
                )

    @contextmanager
    def _transaction(self, conn: sqlite3.Connection) -> Iterator[None]:
        # BEGIN IMMEDIATE takes the write lock up front, so the whole batch is one atomic step
        # even when another process shares the file.
        with self._lock:
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise FeatureStoreUnavailable(f"dedup database {self._path}: {exc}") from exc

    def _require_conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise FailedPrecondition("SqliteDeduplicator used before start()")
        return self._conn
