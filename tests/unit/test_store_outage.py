"""Unit tests of the Redis-outage pieces: breaker, caching reader, dedup claims, event spool."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from freshrec.errors import FeatureStoreUnavailable
from freshrec.records import ItemFeatures, UserProfile
from freshrec.v1 import ranking_pb2
from services.common.breaker import CircuitBreaker
from services.features.caching import CachingFeatureReader
from services.features.reader import InMemoryFeatureStore
from services.ingestion.dedup import InMemoryDeduplicator, SqliteDeduplicator
from services.ingestion.offline_log import OfflineEventLog
from services.ingestion.pipeline import EventIngestor
from services.ingestion.spool import EventSpool

NOW = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
ITEMS = [ItemFeatures(item_id=f"i{k}", title=f"thing {k}", category="home") for k in range(5)]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FlakyStore(InMemoryFeatureStore):
    """An in-memory store that can be switched off, counting the calls that reached it."""

    def __init__(self) -> None:
        super().__init__(
            [UserProfile(user_id="u1", recent_items=("i1",), purchased_items=("i2",))], ITEMS
        )
        self.down = False
        self.calls = 0

    def _check(self) -> None:
        self.calls += 1
        if self.down:
            raise FeatureStoreUnavailable("connection refused")

    def get_user_profile(self, user_id: str) -> UserProfile | None:
        self._check()
        return super().get_user_profile(user_id)

    def get_items(self, item_ids: Sequence[str]) -> dict[str, ItemFeatures]:
        self._check()
        return super().get_items(item_ids)

    def push_profiles(self, profiles: object) -> None:
        self._check()
        super().push_profiles(profiles)  # type: ignore[arg-type]


def event(event_id: str, user: str = "u1", item: str = "i3") -> ranking_pb2.Event:
    ts = Timestamp()
    ts.FromDatetime(NOW - timedelta(minutes=1))
    return ranking_pb2.Event(
        event_id=event_id,
        user_id=user,
        item_id=item,
        type=ranking_pb2.EVENT_TYPE_PURCHASE,
        timestamp=ts,
    )


def test_breaker_skips_for_the_cooldown_then_probes_and_reports_changes() -> None:
    clock = Clock()
    breaker = CircuitBreaker("store", cooldown_s=1.0, clock=clock)
    changes: list[bool] = []
    breaker.subscribe(lambda ok, _reason: changes.append(ok))

    breaker.failure("down")
    assert not breaker.closed and not breaker.allow() and breaker.reason == "down"
    clock.now = 1.0
    assert breaker.allow()  # a probe
    breaker.success()
    assert breaker.closed and changes == [False, True]


def test_caching_reader_fails_fast_and_serves_the_cache_only_when_asked() -> None:
    store = FlakyStore()
    clock = Clock()
    reader = CachingFeatureReader(store, CircuitBreaker("store", 1.0, clock))
    profile = reader.get_user_profile("u1")
    reader.get_items(["i1", "i2"])

    store.down = True
    with pytest.raises(FeatureStoreUnavailable):
        reader.get_user_profile("u1")
    calls = store.calls
    with pytest.raises(FeatureStoreUnavailable, match="skipped"):
        reader.get_items(["i1"])
    assert store.calls == calls  # the breaker kept the dead store out of the request
    assert reader.cached_profile("u1") == profile
    assert set(reader.cached_items(["i1", "i2", "i4"])) == {"i1", "i2"}

    assert not reader.probe()  # still inside the cooldown
    store.down = False
    clock.now = 2.0
    assert reader.probe() and reader.breaker.closed


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_claims_are_idempotent_per_owner(kind: str, tmp_path: Path) -> None:
    dedup: InMemoryDeduplicator | SqliteDeduplicator = (
        InMemoryDeduplicator() if kind == "memory" else SqliteDeduplicator(tmp_path / "d.sqlite")
    )
    dedup.start()
    assert dedup.claim(["a", "b", "a"], "batch1") == [True, True, False]
    assert dedup.claim(["a", "b"], "batch1") == [True, True]  # the same batch again
    assert dedup.claim(["a", "c"], "batch2") == [False, True]
    assert dedup.first_seen(["c", "d"]) == [False, True]
    assert dedup.claim(["d"], "batch3") == [False]


def test_outage_events_are_spooled_then_delivered_once(tmp_path: Path) -> None:
    store = FlakyStore()
    breaker = CircuitBreaker("store", 1.0, Clock())
    reader = CachingFeatureReader(store, breaker)
    spool = EventSpool(tmp_path / "spool")
    spool.start()
    log = OfflineEventLog(tmp_path / "offline")
    dedup = InMemoryDeduplicator()
    ingestor = EventIngestor(
        reader, store, dedup, log, clock=lambda: NOW, spool=spool, breaker=breaker, cache=reader
    )
    reader.get_user_profile("u1")
    reader.get_items(["i1", "i2", "i3"])
    assert ingestor.ingest([event("e0")]).accepted == 1  # live

    store.down = True

    # The dedup lives in Redis too: make it fail with the store.
    def down(_ids: Sequence[str], _owner: str = "") -> list[bool]:
        raise FeatureStoreUnavailable("connection refused")

    dedup.claim = down  # type: ignore[method-assign]
    first = ingestor.ingest([event("e1"), event("e2", item="i4")])
    retry = ingestor.ingest([event("e2", item="i4"), event("e0")])
    assert (first.accepted, first.spooled) == (2, 2)
    assert retry.accepted == 1 and retry.rejected["duplicate"] == 1  # e2 is in the spool
    assert len(spool) == 2 and list(log.read()["event_id"]) == ["e0"]
    cached = reader.cached_profile("u1")
    assert cached is not None and {"i3", "i4"} <= set(cached.purchased_items)
    assert ingestor.deliver_spooled() == 0  # still down: nothing delivered, nothing lost

    store.down = False
    del dedup.claim
    breaker.success()
    assert ingestor.deliver_spooled() == 2  # e1, e2; the spooled e0 was a duplicate
    assert len(spool) == 0 and not list((tmp_path / "spool").glob("*.json"))
    assert sorted(log.read()["event_id"]) == ["e0", "e1", "e2"]
    profile = store.get_user_profile("u1")
    assert profile is not None and profile.purchases == 3


def test_spool_survives_a_restart(tmp_path: Path) -> None:
    from services.ingestion.validate import EventRow

    spool = EventSpool(tmp_path)
    spool.start()
    spool.put("b1", "pending", [EventRow("e1", "u1", "i1", "click", NOW)])
    again = EventSpool(tmp_path)
    again.start()
    assert len(again) == 1 and again.ids_in_spool(["e1", "e2"]) == {"e1"}
    (batch,) = again.oldest(10)
    assert (batch.batch_id, batch.stage, batch.rows[0].timestamp) == ("b1", "pending", NOW)
