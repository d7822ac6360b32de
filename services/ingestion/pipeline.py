"""The LogEvents path: validate, de-duplicate, store offline, then refresh online profiles."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from freshrec.errors import FeatureStoreUnavailable, InvalidArgument
from freshrec.records import UserProfile
from freshrec.v1 import ranking_pb2
from services.features.profiles import update_profile
from services.features.reader import FeatureReader, FeatureWriter
from services.ingestion.dedup import Deduplicator
from services.ingestion.offline_log import OfflineEventLog
from services.ingestion.validate import EventRow, validate_events

_log = logging.getLogger(__name__)


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class IngestResult:
    """How many events of a batch were stored, and why the others were not."""

    accepted: int = 0
    rejected: Counter[str] = field(default_factory=Counter)


class EventIngestor:
    """Takes a batch of storefront events through to the offline log and the online profiles.

    Steps, in this order: `validate_events` -> `Deduplicator.first_seen` (events seen in an
    earlier batch are rejected as "duplicate") -> `OfflineEventLog.append` -> per user,
    `update_profile` on the stored profile and the items' features -> one
    `FeatureWriter.push_profiles` for the batch.

    The offline log is written before the online store is touched, so the log, which training
    and feature rebuilds read, never misses an accepted event:
      * if the offline append fails, the batch's ids are unmarked in the deduplicator and the
        error propagates; the client's retry is then ingested normally;
      * if reading features or the online push fails (FeatureStoreUnavailable), the events are
        already stored offline and the error propagates. They stay marked as seen, so a retry
        of the same events is dropped as "duplicate" and the online profile catches up with
        them only at the next profile rebuild from the offline log.
    """

    def __init__(
        self,
        reader: FeatureReader,
        writer: FeatureWriter,
        dedup: Deduplicator,
        log: OfflineEventLog,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._dedup = dedup
        self._log = log
        self._clock = clock

    def ingest(self, events: Sequence[ranking_pb2.Event]) -> IngestResult:
        """Ingest one LogEvents batch.

        Args:
            events: 1..1000 proto events.

        Returns:
            The number of events stored and the rejections by reason (the validator's reasons
            plus "duplicate" for ids already ingested by an earlier batch).

        Raises:
            InvalidArgument: the batch is empty or too large, or not one event in it is valid
                (a client bug; nothing was stored). A batch with some valid events is accepted
                in part, with the others counted by reason.
            FeatureStoreUnavailable: the deduplicator, feature read or profile push failed;
                see the class docstring for what was stored by then.
            OSError: the offline log could not be written; nothing of the batch was kept.
        """
        now = self._clock()
        validated = validate_events(events, now=now)
        if not validated.accepted:
            raise InvalidArgument(_no_valid_event_message(validated.rejected))
        rejected = Counter(validated.rejected)
        rows = self._drop_seen(validated.accepted, rejected)
        if rows:
            self._store_offline(rows, now)
            self._refresh_profiles(rows)
        return IngestResult(accepted=len(rows), rejected=rejected)

    def _drop_seen(self, rows: list[EventRow], rejected: Counter[str]) -> list[EventRow]:
        if not rows:
            return []
        fresh = self._dedup.first_seen([row.event_id for row in rows])
        kept = [row for row, is_new in zip(rows, fresh, strict=True) if is_new]
        if len(kept) < len(rows):
            rejected["duplicate"] += len(rows) - len(kept)
        return kept

    def _store_offline(self, rows: list[EventRow], now: datetime) -> None:
        try:
            self._log.append(rows, ingested_at=now)
        except BaseException:
            # Not stored anywhere: unmark, or the client's retry would be dropped as a duplicate.
            # If unmarking fails too, the append's error is the one the caller needs to see.
            try:
                self._dedup.forget([row.event_id for row in rows])
            except FeatureStoreUnavailable:
                _log.exception("could not unmark %d event ids after a failed append", len(rows))
            raise

    def _refresh_profiles(self, rows: list[EventRow]) -> None:
        by_user: dict[str, list[tuple[str, str, datetime]]] = {}
        for row in rows:  # update_profile orders by timestamp; ties keep request order
            by_user.setdefault(row.user_id, []).append((row.item_id, row.event_type, row.timestamp))
        # The reader has no batched profile read: one lookup per distinct user.
        current = {user_id: self._reader.get_user_profile(user_id) for user_id in by_user}
        # update_profile rebuilds recent_text from titles, so it needs the features of the
        # profiles' recent items as well as the new events' items: one read for all of them.
        item_ids = {row.item_id for row in rows}
        for profile in current.values():
            if profile is not None:
                item_ids.update(profile.recent_items)
        items = self._reader.get_items(sorted(item_ids))
        profiles: list[UserProfile] = [
            update_profile(current[user_id], user_id, user_events, items)
            for user_id, user_events in by_user.items()
        ]
        self._writer.push_profiles(profiles)


def to_response(result: IngestResult) -> ranking_pb2.LogEventsResponse:
    """The LogEventsResponse for an ingest result."""
    return ranking_pb2.LogEventsResponse(
        accepted=result.accepted,
        rejected=sum(result.rejected.values()),
        rejected_by_reason=dict(result.rejected),
    )


# What each validation reason says about the offending field, for INVALID_ARGUMENT messages.
_REASON_MESSAGES = {
    "missing_event_id": "event_id must be a non-empty string",
    "missing_user_id": "user_id must be a non-empty string",
    "missing_item_id": "item_id must be a non-empty string",
    "id_too_long": "event_id, user_id, item_id and request_id must be at most 128 characters",
    "bad_event_type": "type must be IMPRESSION, CLICK, ADD_TO_CART or PURCHASE",
    "missing_timestamp": "timestamp is required",
    "bad_timestamp": "timestamp nanos must be in 0..999999999",
    "future_timestamp": "timestamp must not be more than 5 minutes in the future",
    "too_old": "timestamp must be within the last 30 days",
    "duplicate_in_batch": "event_id must be unique within a batch",
}


def _no_valid_event_message(rejected: Counter[str]) -> str:
    reasons = "; ".join(
        f"{n} x {_REASON_MESSAGES.get(reason, reason)} ({reason})"
        for reason, n in rejected.most_common()
    )
    return f"events: no valid event in the batch: {reasons}"
