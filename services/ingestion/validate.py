"""Validation of incoming storefront events: proto `Event`s in, canonical `EventRow`s out.

Pure: no I/O, no clock (the caller passes `now`), arguments never mutated. A malformed batch
(empty or too large) is the caller's error and raises; a malformed event is counted as a
rejection with a reason, so one bad event never costs the rest of the batch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from freshrec.errors import InvalidArgument
from freshrec.v1 import ranking_pb2

MAX_ID_LENGTH = 128

# Proto enum -> canonical event type (schema.EVENT_TYPES). UNSPECIFIED and values this build does
# not know (proto3 enums are open) are absent and rejected as "bad_event_type".
_EVENT_TYPE_NAMES: dict[int, str] = {
    ranking_pb2.EVENT_TYPE_IMPRESSION: "impression",
    ranking_pb2.EVENT_TYPE_CLICK: "click",
    ranking_pb2.EVENT_TYPE_ADD_TO_CART: "add_to_cart",
    ranking_pb2.EVENT_TYPE_PURCHASE: "purchase",
}

REJECTION_REASONS = (
    "missing_event_id",
    "missing_user_id",
    "missing_item_id",
    "id_too_long",
    "bad_event_type",
    "missing_timestamp",
    "bad_timestamp",
    "future_timestamp",
    "too_old",
    "duplicate_in_batch",
)

_NANOS_PER_SECOND = 1_000_000_000


@dataclass(frozen=True)
class EventRow:
    """One validated event in the canonical interaction columns (plus its request id)."""

    event_id: str
    user_id: str
    item_id: str
    event_type: str  # one of freshrec.data.schema.EVENT_TYPES
    timestamp: datetime  # timezone-aware, UTC
    request_id: str = ""


@dataclass(frozen=True)
class ValidationResult:
    """Accepted rows in request order, and how many events were rejected for each reason."""

    accepted: list[EventRow] = field(default_factory=list)
    rejected: Counter[str] = field(default_factory=Counter)


def validate_events(
    events: Sequence[ranking_pb2.Event],
    now: datetime,
    max_batch: int = 1000,
    max_future: timedelta = timedelta(minutes=5),
    max_age: timedelta = timedelta(days=30),
) -> ValidationResult:
    """Check a batch of events and turn the good ones into `EventRow`s.

    Each event gets at most one rejection reason, the first that applies, in this order:
    missing_event_id, missing_user_id, missing_item_id, id_too_long (event, user, item or
    request id longer than 128 characters), bad_event_type (unspecified or unknown enum value),
    missing_timestamp, bad_timestamp (nanos outside 0..999999999), future_timestamp (later than
    now + max_future), too_old (earlier than now - max_age), duplicate_in_batch (an event_id
    already accepted earlier in this batch; the first valid occurrence wins).

    Args:
        events: the request's events, 1..max_batch of them.
        now: the ingestion time; a naive datetime is read as UTC.
        max_batch: the largest batch accepted.
        max_future: how far ahead of `now` a timestamp may be (client clock skew).
        max_age: how far behind `now` a timestamp may be.

    Returns:
        The accepted rows (timestamps as UTC datetimes, microsecond precision) and the
        rejection counts by reason.

    Raises:
        InvalidArgument: the batch is empty or holds more than max_batch events.
    """
    if max_batch < 1:
        raise InvalidArgument(f"max_batch must be >= 1, got {max_batch}")
    if not 1 <= len(events) <= max_batch:
        raise InvalidArgument(f"events must hold 1..{max_batch} events, got {len(events)}")
    now = now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)
    # Compared in float seconds, before any datetime is built, so absurd timestamps
    # (year 10000, negative seconds) are classified instead of overflowing datetime.
    latest = (now + max_future).timestamp()
    earliest = (now - max_age).timestamp()

    accepted: list[EventRow] = []
    rejected: Counter[str] = Counter()
    seen_ids: set[str] = set()
    for event in events:
        reason = _rejection_reason(event, latest, earliest)
        if reason is None and event.event_id in seen_ids:
            reason = "duplicate_in_batch"
        if reason is not None:
            rejected[reason] += 1
            continue
        seen_ids.add(event.event_id)
        accepted.append(
            EventRow(
                event_id=event.event_id,
                user_id=event.user_id,
                item_id=event.item_id,
                event_type=_EVENT_TYPE_NAMES[event.type],
                timestamp=_to_datetime(event.timestamp.seconds, event.timestamp.nanos),
                request_id=event.request_id,
            )
        )
    return ValidationResult(accepted=accepted, rejected=rejected)


def _rejection_reason(event: ranking_pb2.Event, latest: float, earliest: float) -> str | None:
    if not event.event_id:
        return "missing_event_id"
    if not event.user_id:
        return "missing_user_id"
    if not event.item_id:
        return "missing_item_id"
    ids = (event.event_id, event.user_id, event.item_id, event.request_id)
    if any(len(value) > MAX_ID_LENGTH for value in ids):
        return "id_too_long"
    if event.type not in _EVENT_TYPE_NAMES:
        return "bad_event_type"
    if not event.HasField("timestamp"):
        return "missing_timestamp"
    seconds, nanos = event.timestamp.seconds, event.timestamp.nanos
    if not 0 <= nanos < _NANOS_PER_SECOND:
        return "bad_timestamp"
    when = seconds + nanos / _NANOS_PER_SECOND
    if when > latest:
        return "future_timestamp"
    if when < earliest:
        return "too_old"
    return None


def _to_datetime(seconds: int, nanos: int) -> datetime:
    # Exact integer arithmetic (no float rounding); sub-microsecond digits are dropped.
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=seconds, microseconds=nanos // 1000)
