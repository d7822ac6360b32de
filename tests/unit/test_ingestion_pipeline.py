"""Unit tests of the ingestion path: EventIngestor, OfflineEventLog and the local deduplicators.

In-memory feature store and deduplicator, a real OfflineEventLog and SQLite file in tmp_path.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from freshrec.data.schema import INTERACTION_COLUMNS
from freshrec.errors import FailedPrecondition, FeatureStoreUnavailable, InvalidArgument
from freshrec.records import ItemFeatures, UserProfile
from freshrec.v1 import ranking_pb2
from services.features.profiles import update_profile
from services.features.reader import InMemoryFeatureStore
from services.ingestion.dedup import InMemoryDeduplicator, SqliteDeduplicator
from services.ingestion.offline_log import COLUMNS, OfflineEventLog
from services.ingestion.pipeline import EventIngestor, IngestResult, to_response
from services.ingestion.validate import EventRow

NOW = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
T0 = NOW - timedelta(hours=1)

CLICK = ranking_pb2.EVENT_TYPE_CLICK
PURCHASE = ranking_pb2.EVENT_TYPE_PURCHASE
IMPRESSION = ranking_pb2.EVENT_TYPE_IMPRESSION

ITEMS = [
    ItemFeatures("i1", title="Red shoe", category="shoes"),
    ItemFeatures("i2", title="Blue hat", category="hats"),
    ItemFeatures("i3", title="Green sock", category="socks"),
]


def event(
    event_id: str,
    user_id: str = "u1",
    item_id: str = "i1",
    type_: int = CLICK,
    at: datetime = T0,
    request_id: str = "",
) -> ranking_pb2.Event:
    ts = Timestamp()
    ts.FromDatetime(at)
    return ranking_pb2.Event(
        event_id=event_id,
        user_id=user_id,
        item_id=item_id,
        type=type_,
        timestamp=ts,
        request_id=request_id,
    )


class RaisingWriter:
    """A FeatureWriter whose store is down."""

    def __init__(self) -> None:
        self.calls = 0

    def push_profiles(self, profiles: Iterable[UserProfile]) -> None:
        self.calls += 1
        raise FeatureStoreUnavailable("online store down")

    def push_items(self, items: Iterable[ItemFeatures]) -> None:
        raise FeatureStoreUnavailable("online store down")


class CountingStore(InMemoryFeatureStore):
    """Counts pushes and item reads, to check one of each per batch."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.pushes = 0
        self.item_reads: list[list[str]] = []

    def get_items(self, item_ids: Sequence[str]) -> dict[str, ItemFeatures]:
        self.item_reads.append(list(item_ids))
        return super().get_items(item_ids)

    def push_profiles(self, profiles: Iterable[UserProfile]) -> None:
        self.pushes += 1
        super().push_profiles(profiles)


class FailingLog(OfflineEventLog):
    def append(
        self,
        rows: Sequence[EventRow],
        ingested_at: datetime | None = None,
        batch_id: str | None = None,
    ) -> list[Path]:
        raise OSError("disk full")


@pytest.fixture
def store() -> CountingStore:
    return CountingStore(items=ITEMS)


@pytest.fixture
def log(tmp_path: Path) -> OfflineEventLog:
    return OfflineEventLog(tmp_path / "offline")


@pytest.fixture
def ingestor(store: CountingStore, log: OfflineEventLog) -> EventIngestor:
    return EventIngestor(store, store, InMemoryDeduplicator(), log, clock=lambda: NOW)


# --- EventIngestor --------------------------------------------------------------------------


def test_counts_are_exact_for_a_mixed_batch(ingestor: EventIngestor) -> None:
    batch = [
        event("e1"),
        event("e2", item_id="i2", type_=PURCHASE),
        event("e1"),  # repeated in the batch
        event("e3", user_id=""),
        event("e4", at=NOW + timedelta(hours=1)),
        event("e5", type_=0),
    ]
    result = ingestor.ingest(batch)
    assert result == IngestResult(
        accepted=2,
        rejected=Counter(
            {
                "duplicate_in_batch": 1,
                "missing_user_id": 1,
                "future_timestamp": 1,
                "bad_event_type": 1,
            }
        ),
    )


def test_duplicates_across_batches_are_dropped_once(
    ingestor: EventIngestor, log: OfflineEventLog, store: CountingStore
) -> None:
    first = ingestor.ingest([event("e1"), event("e2", item_id="i2")])
    second = ingestor.ingest([event("e2", item_id="i2"), event("e3", item_id="i3")])
    third = ingestor.ingest([event("e1"), event("e2", item_id="i2"), event("e3", item_id="i3")])
    assert (first.accepted, first.rejected) == (2, Counter())
    assert (second.accepted, second.rejected) == (1, Counter({"duplicate": 1}))
    assert (third.accepted, third.rejected) == (0, Counter({"duplicate": 3}))
    assert sorted(log.read()["event_id"]) == ["e1", "e2", "e3"]
    assert store.profiles["u1"].clicks == 3  # each event counted once online too
    assert store.pushes == 2  # nothing new in the third batch: nothing pushed


def test_offline_log_holds_exactly_the_accepted_events(
    ingestor: EventIngestor, log: OfflineEventLog
) -> None:
    batch = [
        event("e1", at=T0 + timedelta(seconds=2), request_id="r1"),
        event("e2", user_id="u2", item_id="i2", type_=PURCHASE, at=T0),
        event("e3", item_id="i3", type_=IMPRESSION, at=T0 + timedelta(seconds=1)),
        event("bad", item_id=""),
    ]
    ingestor.ingest(batch)
    frame = log.read()
    assert list(frame.columns) == list(COLUMNS)
    assert frame[[*INTERACTION_COLUMNS, "request_id"]].to_dict("records") == [
        {
            "event_id": "e2",
            "user_id": "u2",
            "item_id": "i2",
            "event_type": "purchase",
            "timestamp": pd.Timestamp(T0),
            "request_id": "",
        },
        {
            "event_id": "e3",
            "user_id": "u1",
            "item_id": "i3",
            "event_type": "impression",
            "timestamp": pd.Timestamp(T0 + timedelta(seconds=1)),
            "request_id": "",
        },
        {
            "event_id": "e1",
            "user_id": "u1",
            "item_id": "i1",
            "event_type": "click",
            "timestamp": pd.Timestamp(T0 + timedelta(seconds=2)),
            "request_id": "r1",
        },
    ]
    assert (frame["ingested_at"] == pd.Timestamp(NOW)).all()


def test_profiles_are_updated_with_one_push_and_one_item_read(
    ingestor: EventIngestor, store: CountingStore
) -> None:
    ingestor.ingest(
        [
            event("e1", item_id="i1", at=T0),
            event("e2", item_id="i2", type_=PURCHASE, at=T0 + timedelta(seconds=1)),
            event("e3", item_id="i3", type_=IMPRESSION, at=T0 + timedelta(seconds=2)),
            event("e4", user_id="u2", item_id="i3", at=T0),
        ]
    )
    u1 = store.profiles["u1"]
    assert u1.recent_items == ("i2", "i1")  # the impression is stored but is no positive
    assert u1.purchased_items == ("i2",)
    assert (u1.clicks, u1.purchases, u1.events_total) == (1, 1, 3)
    assert u1.last_seen == T0 + timedelta(seconds=2)
    assert store.profiles["u2"].recent_items == ("i3",)
    assert store.pushes == 1
    assert len(store.item_reads) == 1


def test_profile_equals_update_profile_applied_to_the_stored_profile(
    log: OfflineEventLog,
) -> None:
    old = update_profile(None, "u1", [("i3", "click", T0 - timedelta(hours=1))], {})
    store = CountingStore(profiles=[old], items=ITEMS)
    ingestor = EventIngestor(store, store, InMemoryDeduplicator(), log, clock=lambda: NOW)
    ingestor.ingest([event("e1", item_id="i1", at=T0)])
    items = {i.item_id: i for i in ITEMS}
    assert store.profiles["u1"] == update_profile(old, "u1", [("i1", "click", T0)], items)
    # The old profile's recent items were read too: their titles rebuild recent_text.
    assert store.profiles["u1"].recent_text == "Red shoe | Green sock"
    assert store.item_reads == [["i1", "i3"]]


def test_on_profiles_is_told_what_was_pushed_and_its_failure_is_not_the_batchs(
    store: CountingStore, log: OfflineEventLog, caplog: pytest.LogCaptureFixture
) -> None:
    told: list[list[str]] = []

    def on_profiles(profiles: Sequence[UserProfile]) -> None:
        told.append([p.user_id for p in profiles])
        if len(told) == 2:
            raise RuntimeError("model gone")

    ingestor = EventIngestor(
        store, store, InMemoryDeduplicator(), log, clock=lambda: NOW, on_profiles=on_profiles
    )
    ingestor.ingest([event("e1"), event("e2", user_id="u2", item_id="i2")])
    assert told == [["u1", "u2"]]
    assert store.profiles["u2"].recent_items == ("i2",)  # pushed before it was told
    second = ingestor.ingest([event("e3", item_id="i3")])
    assert told[-1] == ["u1"] and second.accepted == 1  # its error only logged
    assert store.profiles["u1"].recent_items[0] == "i3"
    assert "on_profiles failed for 1 profiles" in caplog.text
    ingestor.ingest([event("e3", item_id="i3")])  # a duplicate: nothing pushed, nobody told
    assert len(told) == 2


def test_online_push_failure_keeps_events_offline_and_propagates(
    store: CountingStore, log: OfflineEventLog
) -> None:
    writer = RaisingWriter()
    ingestor = EventIngestor(store, writer, InMemoryDeduplicator(), log, clock=lambda: NOW)
    with pytest.raises(FeatureStoreUnavailable):
        ingestor.ingest([event("e1"), event("e2", item_id="i2")])
    assert writer.calls == 1
    assert sorted(log.read()["event_id"]) == ["e1", "e2"]
    # Stored offline, so a retry is a duplicate rather than a second copy in the log.
    with pytest.raises(FeatureStoreUnavailable):
        ingestor.ingest([event("e1"), event("e3")])
    assert sorted(log.read()["event_id"]) == ["e1", "e2", "e3"]


def test_offline_append_failure_unmarks_the_ids_so_a_retry_is_ingested(
    store: CountingStore, tmp_path: Path
) -> None:
    dedup = InMemoryDeduplicator()
    failing = EventIngestor(store, store, dedup, FailingLog(tmp_path / "x"), clock=lambda: NOW)
    with pytest.raises(OSError, match="disk full"):
        failing.ingest([event("e1")])
    assert store.pushes == 0  # nothing online that the offline log does not have
    log = OfflineEventLog(tmp_path / "offline")
    retry = EventIngestor(store, store, dedup, log, clock=lambda: NOW)
    assert retry.ingest([event("e1")]).accepted == 1
    assert list(log.read()["event_id"]) == ["e1"]


def test_a_batch_with_nothing_valid_touches_no_store(
    ingestor: EventIngestor, store: CountingStore, log: OfflineEventLog
) -> None:
    with pytest.raises(
        InvalidArgument, match=r"events: no valid event.*event_id must be a non-empty"
    ):
        ingestor.ingest([event("", item_id="i1")])
    assert store.pushes == 0 and store.item_reads == []
    assert log.count() == 0
    assert not log.events_dir.exists()


def test_empty_batch_is_invalid_argument(ingestor: EventIngestor) -> None:
    with pytest.raises(InvalidArgument, match=r"events must hold 1\.\.1000 events, got 0"):
        ingestor.ingest([])


def test_to_response_sums_the_reasons() -> None:
    response = to_response(IngestResult(3, Counter({"duplicate": 2, "too_old": 1})))
    assert response.accepted == 3
    assert response.rejected == 3
    assert dict(response.rejected_by_reason) == {"duplicate": 2, "too_old": 1}
    assert to_response(IngestResult(1, Counter())).rejected == 0


# --- OfflineEventLog -----------------------------------------------------------------------


def row(event_id: str, at: datetime, event_type: str = "click") -> EventRow:
    return EventRow(event_id, "u1", "i1", event_type, at, "")


def test_read_filters_by_time_half_open(log: OfflineEventLog) -> None:
    days = [datetime(2024, 5, d, 10, tzinfo=UTC) for d in (1, 2, 3)]
    log.append([row(f"e{i}", at) for i, at in enumerate(days)], ingested_at=NOW)
    assert list(log.read()["event_id"]) == ["e0", "e1", "e2"]
    assert list(log.read(since=days[1])["event_id"]) == ["e1", "e2"]
    assert list(log.read(until=days[1])["event_id"]) == ["e0"]
    assert list(log.read(since=days[0], until=days[2])["event_id"]) == ["e0", "e1"]
    assert list(log.read(since=days[1].replace(tzinfo=None))["event_id"]) == ["e1", "e2"]
    assert log.read(since=days[2] + timedelta(seconds=1)).empty
    assert (log.count(), log.count(since=days[1]), log.count(since=NOW)) == (3, 2, 0)


def test_read_skips_partitions_outside_the_range(log: OfflineEventLog) -> None:
    log.append([row("may", datetime(2024, 5, 2, 10, tzinfo=UTC))], ingested_at=NOW)
    # A file the reader cannot parse, in a partition outside the asked range: never opened.
    junk = log.events_dir / "date=2024-04-01"
    junk.mkdir(parents=True)
    (junk / "0-junk.parquet").write_bytes(b"not parquet")
    since = datetime(2024, 5, 1, tzinfo=UTC)
    assert list(log.read(since=since)["event_id"]) == ["may"]
    assert log.count(since=since) == 1
    with pytest.raises(pa.ArrowInvalid):  # the full read does open it
        log.read()


def test_one_file_per_event_date_and_never_rewritten(log: OfflineEventLog) -> None:
    late, early = datetime(2024, 5, 2, 0, 1, tzinfo=UTC), datetime(2024, 5, 1, 23, 59, tzinfo=UTC)
    first = log.append([row("a", late), row("b", early)], ingested_at=NOW)
    assert [p.parent.name for p in first] == ["date=2024-05-01", "date=2024-05-02"]
    assert all(p.suffix == ".parquet" and p.exists() for p in first)
    before = {p: p.read_bytes() for p in first}
    second = log.append([row("c", late)], ingested_at=NOW)
    assert second[0] not in first and second[0].parent == first[1].parent
    assert {p: p.read_bytes() for p in first} == before
    assert list(log.read()["event_id"]) == ["b", "a", "c"]
    assert not [p for p in log.events_dir.rglob("*") if p.name.endswith(".tmp")]
    assert log.append([]) == []


def test_events_of_one_instant_are_read_in_arrival_order_whatever_their_file_names(
    log: OfflineEventLog,
) -> None:
    # Two batches whose events share a timestamp; the later batch's file name sorts first.
    at = datetime(2024, 5, 1, 10, tzinfo=UTC)
    log.append([row("first", at)], ingested_at=NOW, batch_id="ffff")
    log.append([row("second", at)], ingested_at=NOW + timedelta(seconds=1), batch_id="0000")
    assert sorted(p.name for p in log.events_dir.rglob("*.parquet")) == [
        "batch-0000.parquet",
        "batch-ffff.parquet",
    ]
    assert list(log.read()["event_id"]) == ["first", "second"]


def test_append_frame_seeds_the_log(log: OfflineEventLog) -> None:
    history = pd.DataFrame(
        {
            "event_id": ["h1", "h2"],
            "user_id": ["u1", "u2"],
            "item_id": ["i1", "i2"],
            "event_type": ["purchase", "impression"],
            "timestamp": pd.to_datetime(["2024-01-02 08:00", "2024-01-01 09:00"]),  # naive
        }
    )
    snapshot = history.copy()
    paths = log.append_frame(history, ingested_at=NOW)
    pd.testing.assert_frame_equal(history, snapshot)  # the argument is left alone
    assert len(paths) == 2
    frame = log.read()
    assert list(frame["event_id"]) == ["h2", "h1"]
    assert list(frame["request_id"]) == ["", ""]
    assert frame["timestamp"].iloc[0] == pd.Timestamp("2024-01-01 09:00", tz="UTC")


def test_append_frame_rejects_bad_frames(log: OfflineEventLog) -> None:
    good = {
        "event_id": ["h1"],
        "user_id": ["u1"],
        "item_id": ["i1"],
        "event_type": ["click"],
        "timestamp": [NOW],
    }
    with pytest.raises(InvalidArgument, match="missing \\['timestamp'\\]"):
        log.append_frame(pd.DataFrame({k: v for k, v in good.items() if k != "timestamp"}))
    with pytest.raises(InvalidArgument, match="event_type must be one of"):
        log.append_frame(pd.DataFrame({**good, "event_type": ["like"]}))
    assert log.count() == 0


def test_reading_an_empty_log_gives_typed_empty_frame(log: OfflineEventLog) -> None:
    frame = log.read()
    assert frame.empty and list(frame.columns) == list(COLUMNS)
    assert str(frame["timestamp"].dtype) == "datetime64[ns, UTC]"


# --- local deduplicators -------------------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite"])
def dedup(request: pytest.FixtureRequest, tmp_path: Path) -> Iterable[object]:
    backend = (
        InMemoryDeduplicator()
        if request.param == "memory"
        else SqliteDeduplicator(tmp_path / "dedup" / "seen.sqlite")
    )
    backend.start()
    yield backend
    backend.close()


def test_first_seen_marks_ids(dedup: InMemoryDeduplicator | SqliteDeduplicator) -> None:
    assert dedup.first_seen(["a", "b", "a"]) == [True, True, False]
    assert dedup.first_seen(["b", "c"]) == [False, True]
    assert dedup.first_seen([]) == []
    dedup.forget(["b"])
    assert dedup.first_seen(["a", "b"]) == [False, True]


def test_sqlite_marks_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "seen.sqlite"
    first = SqliteDeduplicator(path)
    first.start()
    assert first.first_seen(["a"]) == [True]
    first.close()
    second = SqliteDeduplicator(path)
    second.start()
    assert second.first_seen(["a", "b"]) == [False, True]
    second.close()


def test_sqlite_needs_start_and_does_no_io_before(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "seen.sqlite"
    dedup = SqliteDeduplicator(path)
    assert not path.parent.exists()
    with pytest.raises(FailedPrecondition, match="before start"):
        dedup.first_seen(["a"])


def test_sqlite_unusable_path_is_feature_store_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(FeatureStoreUnavailable):
        SqliteDeduplicator(blocker / "seen.sqlite").start()


def test_hygiene_drops_window_duplicates_quarantines_bursts_and_ledgers_them(
    store: CountingStore, log: OfflineEventLog, tmp_path: Path
) -> None:
    from services.ingestion.hygiene import EventHygiene
    from services.ingestion.ledger import RejectionLedger

    quarantine = OfflineEventLog(tmp_path / "quarantine")
    ledger = RejectionLedger(tmp_path / "rejections.jsonl")
    ingestor = EventIngestor(
        store,
        store,
        InMemoryDeduplicator(),
        log,
        clock=lambda: NOW,
        hygiene=EventHygiene(window=timedelta(seconds=2), max_events_per_minute=5),
        quarantine=quarantine,
        ledger=ledger,
    )
    double_click = [event("d1", at=T0), event("d2", at=T0 + timedelta(seconds=1))]
    burst = [
        event(f"b{n}", user_id="bot", item_id="i2", at=T0 + timedelta(seconds=3 * n))
        for n in range(8)
    ]
    result = ingestor.ingest(double_click + burst)
    assert result.accepted == 1 + 5
    assert dict(result.rejected) == {"duplicate_window": 1, "quarantined_rate": 3}
    # Training reads the log: no duplicate, no robot excess; the quarantine keeps the excess.
    assert sorted(log.read()["event_id"]) == ["b0", "b1", "b2", "b3", "b4", "d1"]
    assert sorted(quarantine.read()["event_id"]) == ["b5", "b6", "b7"]
    assert ledger.totals() == {
        NOW.date().isoformat(): {"duplicate_window": 1, "quarantined_rate": 3}
    }
