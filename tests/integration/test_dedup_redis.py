"""RedisDeduplicator against a real redis-server started by the test run."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from google.protobuf.timestamp_pb2 import Timestamp

from freshrec.errors import FailedPrecondition, FeatureStoreUnavailable
from freshrec.v1 import ranking_pb2
from services.features.reader import InMemoryFeatureStore
from services.ingestion.dedup import RedisDeduplicator
from services.ingestion.offline_log import OfflineEventLog
from services.ingestion.pipeline import EventIngestor

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def _redis_server() -> Iterator[str]:
    """A throwaway redis-server on a free port, without persistence."""
    port = _free_port()
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        client.close()
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def dedup_redis_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """The session's `redis_url` from tests/conftest.py when it exists, else a local server."""
    try:
        shared = request.getfixturevalue("redis_url")
    except pytest.FixtureLookupError:
        shared = None
    if shared is not None:
        yield str(shared)
        return
    with _redis_server() as url:
        yield url


@pytest.fixture
def prefix() -> str:
    return f"test:dedup:{uuid.uuid4().hex}"  # unique per test: no flushing, no cross-talk


@pytest.fixture
def dedup(dedup_redis_url: str, prefix: str) -> Iterator[RedisDeduplicator]:
    backend = RedisDeduplicator(dedup_redis_url, prefix, ttl_seconds=60)
    backend.start()
    yield backend
    backend.close()


def test_first_seen_marks_ids_once(dedup: RedisDeduplicator) -> None:
    assert dedup.first_seen(["a", "b", "a"]) == [True, True, False]
    assert dedup.first_seen(["b", "c"]) == [False, True]
    assert dedup.first_seen([]) == []


def test_keys_carry_the_prefix_and_the_ttl(
    dedup: RedisDeduplicator, dedup_redis_url: str, prefix: str
) -> None:
    dedup.first_seen(["a"])
    client = redis.Redis.from_url(dedup_redis_url)
    try:
        assert client.get(f"{prefix}:a") == b"1"
        assert 0 < client.ttl(f"{prefix}:a") <= 60
    finally:
        client.close()


def test_a_batch_is_one_round_trip(
    dedup: RedisDeduplicator, monkeypatch: pytest.MonkeyPatch
) -> None:
    sends = 0
    original = redis.connection.Connection.send_packed_command

    def counting(self: redis.connection.Connection, *args: object, **kwargs: object) -> None:
        nonlocal sends
        sends += 1
        original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(redis.connection.Connection, "send_packed_command", counting)
    assert dedup.first_seen([f"e{i}" for i in range(200)]) == [True] * 200
    assert sends == 1


def test_forget_lets_an_id_in_again(dedup: RedisDeduplicator) -> None:
    dedup.first_seen(["a", "b"])
    dedup.forget(["a"])
    dedup.forget([])
    assert dedup.first_seen(["a", "b"]) == [True, False]


def test_concurrent_deduplicators_agree_on_one_winner(dedup_redis_url: str, prefix: str) -> None:
    ids = [f"e{i}" for i in range(300)]
    results: list[list[bool]] = []
    lock = threading.Lock()

    def worker() -> None:
        backend = RedisDeduplicator(dedup_redis_url, prefix)
        backend.start()
        try:
            out = backend.first_seen(ids)
        finally:
            backend.close()
        with lock:
            results.append(out)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [sum(column) for column in zip(*results, strict=True)] == [1] * len(ids)


def test_replicas_sharing_redis_drop_each_others_duplicates(
    dedup_redis_url: str, prefix: str, tmp_path: Path
) -> None:
    now = datetime(2024, 6, 1, 12, tzinfo=UTC)
    ts = Timestamp()
    ts.FromDatetime(now - timedelta(minutes=1))
    batch = [
        ranking_pb2.Event(
            event_id="e1",
            user_id="u1",
            item_id="i1",
            type=ranking_pb2.EVENT_TYPE_CLICK,
            timestamp=ts,
        )
    ]
    log = OfflineEventLog(tmp_path)
    replicas = []
    for _ in range(2):
        store = InMemoryFeatureStore()
        backend = RedisDeduplicator(dedup_redis_url, prefix)
        backend.start()
        replicas.append((EventIngestor(store, store, backend, log, clock=lambda: now), backend))
    try:
        assert replicas[0][0].ingest(batch).accepted == 1
        assert replicas[1][0].ingest(batch).rejected == {"duplicate": 1}
    finally:
        for _, backend in replicas:
            backend.close()
    assert log.count() == 1


def test_no_io_before_start_and_use_before_start_fails() -> None:
    backend = RedisDeduplicator("redis://127.0.0.1:1/0", "p")  # nothing listens there
    with pytest.raises(FailedPrecondition, match="before start"):
        backend.first_seen(["a"])


def test_unreachable_redis_is_feature_store_unavailable() -> None:
    backend = RedisDeduplicator(f"redis://127.0.0.1:{_free_port()}/0", "p")
    with pytest.raises(FeatureStoreUnavailable, match="unreachable"):
        backend.start()


def test_redis_dying_mid_session_is_feature_store_unavailable(prefix: str) -> None:
    with _redis_server() as url:
        backend = RedisDeduplicator(url, prefix)
        backend.start()
        assert backend.first_seen(["a"]) == [True]
    try:
        with pytest.raises(FeatureStoreUnavailable):
            backend.first_seen(["b"])
        with pytest.raises(FeatureStoreUnavailable):
            backend.forget(["a"])
    finally:
        backend.close()


def test_constructor_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="ttl_seconds must be >= 1, got 0"):
        RedisDeduplicator("redis://127.0.0.1:6379/0", "p", ttl_seconds=0)
    with pytest.raises(ValueError, match="key_prefix must be non-empty"):
        RedisDeduplicator("redis://127.0.0.1:6379/0", "")
