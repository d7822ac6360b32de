"""Unit tests of services/ingestion/validate.py: reasons, boundaries and batch limits."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from freshrec.data.schema import EVENT_TYPES
from freshrec.errors import InvalidArgument
from freshrec.v1 import ranking_pb2
from services.ingestion.validate import EventRow, validate_events

NOW = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)


def event(
    event_id: str = "e1",
    user_id: str = "u1",
    item_id: str = "i1",
    type_: int = ranking_pb2.EVENT_TYPE_CLICK,
    at: datetime | None = NOW - timedelta(minutes=1),
    request_id: str = "",
) -> ranking_pb2.Event:
    ev = ranking_pb2.Event(
        event_id=event_id, user_id=user_id, item_id=item_id, type=type_, request_id=request_id
    )
    if at is not None:
        ts = Timestamp()
        ts.FromDatetime(at)
        ev.timestamp.CopyFrom(ts)
    return ev


def test_valid_event_becomes_canonical_row() -> None:
    at = datetime(2024, 6, 1, 11, 59, 30, 123456, tzinfo=UTC)
    result = validate_events([event(at=at, request_id="r9")], now=NOW)
    assert result.accepted == [EventRow("e1", "u1", "i1", "click", at, "r9")]
    assert result.accepted[0].timestamp.tzinfo is not None
    assert result.rejected == Counter()


@pytest.mark.parametrize(
    ("proto_type", "name"),
    [
        (ranking_pb2.EVENT_TYPE_IMPRESSION, "impression"),
        (ranking_pb2.EVENT_TYPE_CLICK, "click"),
        (ranking_pb2.EVENT_TYPE_ADD_TO_CART, "add_to_cart"),
        (ranking_pb2.EVENT_TYPE_PURCHASE, "purchase"),
    ],
)
def test_every_proto_type_maps_to_a_schema_event_type(proto_type: int, name: str) -> None:
    [row] = validate_events([event(type_=proto_type)], now=NOW).accepted
    assert row.event_type == name
    assert name in EVENT_TYPES


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (event(event_id=""), "missing_event_id"),
        (event(user_id=""), "missing_user_id"),
        (event(item_id=""), "missing_item_id"),
        (event(event_id="x" * 129), "id_too_long"),
        (event(user_id="x" * 129), "id_too_long"),
        (event(item_id="x" * 129), "id_too_long"),
        (event(request_id="x" * 129), "id_too_long"),
        (event(type_=ranking_pb2.EVENT_TYPE_UNSPECIFIED), "bad_event_type"),
        (event(type_=99), "bad_event_type"),  # proto3 enums are open
        (event(at=None), "missing_timestamp"),
        (event(at=NOW + timedelta(minutes=5, seconds=1)), "future_timestamp"),
        (event(at=NOW - timedelta(days=30, seconds=1)), "too_old"),
    ],
)
def test_bad_event_is_rejected_with_its_reason(bad: ranking_pb2.Event, reason: str) -> None:
    result = validate_events([bad, event(event_id="ok")], now=NOW)
    assert result.rejected == Counter({reason: 1})
    assert [row.event_id for row in result.accepted] == ["ok"]


def test_ids_of_exactly_128_characters_are_accepted() -> None:
    long_id = "x" * 128
    ev = event(event_id=long_id, user_id=long_id, item_id=long_id, request_id=long_id)
    assert len(validate_events([ev], now=NOW).accepted) == 1


def test_timestamp_window_bounds_are_inclusive() -> None:
    edge_future = event(event_id="f", at=NOW + timedelta(minutes=5))
    edge_old = event(event_id="o", at=NOW - timedelta(days=30))
    result = validate_events([edge_future, edge_old], now=NOW)
    assert [row.event_id for row in result.accepted] == ["f", "o"]


def test_window_limits_are_parameters() -> None:
    ev = event(at=NOW - timedelta(hours=2))
    assert validate_events([ev], now=NOW, max_age=timedelta(hours=1)).rejected == Counter(
        {"too_old": 1}
    )
    ahead = event(at=NOW + timedelta(minutes=2))
    assert validate_events([ahead], now=NOW, max_future=timedelta(minutes=1)).rejected == Counter(
        {"future_timestamp": 1}
    )


def test_absurd_timestamps_are_classified_not_crashing() -> None:
    far_future = event(event_id="a")
    far_future.timestamp.seconds = 10**12  # past year 9999: no datetime can hold it
    far_past = event(event_id="b")
    far_past.timestamp.seconds = -(10**12)
    bad_nanos = event(event_id="c")
    bad_nanos.timestamp.nanos = -1
    result = validate_events([far_future, far_past, bad_nanos], now=NOW)
    assert result.accepted == []
    assert result.rejected == Counter({"future_timestamp": 1, "too_old": 1, "bad_timestamp": 1})


def test_repeated_event_id_keeps_the_first_valid_occurrence() -> None:
    first_invalid = event(event_id="d", user_id="")
    valid = event(event_id="d", item_id="first")
    again = event(event_id="d", item_id="second")
    result = validate_events([first_invalid, valid, again], now=NOW)
    assert [row.item_id for row in result.accepted] == ["first"]
    assert result.rejected == Counter({"missing_user_id": 1, "duplicate_in_batch": 1})


def test_each_event_gets_one_reason_the_first_that_applies() -> None:
    ev = event(event_id="", user_id="", type_=0, at=None)
    assert validate_events([ev], now=NOW).rejected == Counter({"missing_event_id": 1})


def test_counts_add_up_over_a_mixed_batch() -> None:
    batch = [event(event_id=f"e{i}") for i in range(5)] + [event(event_id="e0"), event(item_id="")]
    result = validate_events(batch, now=NOW)
    assert len(result.accepted) == 5
    assert sum(result.rejected.values()) == 2


def test_naive_now_is_read_as_utc() -> None:
    naive = NOW.replace(tzinfo=None)
    assert len(validate_events([event()], now=naive).accepted) == 1


@pytest.mark.parametrize("size", [0, 4])
def test_batch_size_outside_range_is_invalid_argument(size: int) -> None:
    with pytest.raises(InvalidArgument, match=rf"events must hold 1\.\.3 events, got {size}"):
        validate_events([event(event_id=str(i)) for i in range(size)], now=NOW, max_batch=3)


def test_default_batch_limit_is_1000() -> None:
    batch = [event(event_id=str(i)) for i in range(1000)]
    assert len(validate_events(batch, now=NOW).accepted) == 1000
    with pytest.raises(InvalidArgument, match=r"1\.\.1000"):
        validate_events([*batch, event(event_id="one-more")], now=NOW)


def test_input_is_not_modified() -> None:
    batch = [event(event_id="a"), event(event_id="a")]
    before = [ev.SerializeToString() for ev in batch]
    validate_events(batch, now=NOW)
    assert [ev.SerializeToString() for ev in batch] == before
