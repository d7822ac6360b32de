"""The LogEvents path: validate, de-duplicate, store offline, then refresh online profiles.

With a spool (the ranking service always has one), a batch that cannot reach Redis is kept on
local disk instead and delivered later by `deliver_spooled`; see `EventIngestor`.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from freshrec.errors import FeatureStoreUnavailable, InvalidArgument
from freshrec.records import UserProfile
from freshrec.v1 import ranking_pb2
from services.common import metrics
from services.common.breaker import CircuitBreaker
from services.features.caching import FeatureCache
from services.features.profiles import update_profile
from services.features.reader import FeatureReader, FeatureWriter
from services.ingestion.dedup import Deduplicator
from services.ingestion.hygiene import DUPLICATE_WINDOW, QUARANTINED_RATE, EventHygiene
from services.ingestion.ledger import RejectionLedger
from services.ingestion.offline_log import OfflineEventLog
from services.ingestion.spool import EventSpool, SpooledBatch, Stage, new_batch_id
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
    spooled: int = 0  # of `accepted`, kept in the spool for later delivery (Redis unreachable)


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
        spool: EventSpool | None = None,
        breaker: CircuitBreaker | None = None,
        cache: FeatureCache | None = None,
        hygiene: EventHygiene | None = None,
        quarantine: OfflineEventLog | None = None,
        ledger: RejectionLedger | None = None,
        on_profiles: Callable[[Sequence[UserProfile]], None] | None = None,
    ) -> None:
        """Args:
        hygiene: drops window duplicates and flags robot bursts right after validation.
        quarantine: where flagged bursts are stored (never trained on); dropped if None.
        ledger: where every batch's rejection counts are appended (`freshrec data report`).
        on_profiles: told the profiles each batch stored online, after the push (the ranking
            service computes their next request's user side ahead of it); what it raises is
            logged, never the batch's error.
        spool: where batches go while Redis is unreachable; None propagates the error instead.
        breaker: the online store's breaker (shared with the ranking reads): while it is open,
            batches go straight to the spool without trying Redis.
        cache: the ranking reads' cache; spooled events are folded into cached profiles, so
            degraded answers already exclude what a user just bought.
        """
        self._reader = reader
        self._writer = writer
        self._dedup = dedup
        self._log = log
        self._clock = clock
        self._spool = spool
        self._breaker = breaker
        self._cache = cache
        self._hygiene = hygiene
        self._quarantine = quarantine
        self._ledger = ledger
        self.on_profiles = on_profiles
        self._profile_lock = threading.Lock()
        self._drain_lock = threading.Lock()
        self._drain_limit = 0  # 0: as many batches per round as asked; 1: isolating a bad batch

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
            FeatureStoreUnavailable: (without a spool) the deduplicator, feature read or profile
                push failed; see the class docstring for what was stored by then.
            OSError: the offline log (or the spool) could not be written; nothing of the batch
                was kept.
        """
        now = self._clock()
        validated = validate_events(events, now=now)
        if not validated.accepted:
            raise InvalidArgument(_no_valid_event_message(validated.rejected))
        rejected = Counter(validated.rejected)
        result = self._ingest_valid(self._clean(validated.accepted, rejected, now), rejected, now)
        if self._ledger is not None and result.rejected:
            self._ledger.record(now, result.rejected)
        return result

    def _clean(self, rows: list[EventRow], rejected: Counter[str], now: datetime) -> list[EventRow]:
        """Hygiene: window duplicates dropped, robot bursts quarantined, both counted."""
        if self._hygiene is None or not rows:
            return rows
        checked = self._hygiene.check(rows)
        if checked.duplicates:
            rejected[DUPLICATE_WINDOW] += len(checked.duplicates)
        if checked.quarantined:
            rejected[QUARANTINED_RATE] += len(checked.quarantined)
            if self._quarantine is not None:
                self._quarantine.append(checked.quarantined, ingested_at=now)
        return checked.kept

    def _ingest_valid(
        self, accepted: list[EventRow], rejected: Counter[str], now: datetime
    ) -> IngestResult:
        if not accepted:
            return IngestResult(accepted=0, rejected=rejected)
        batch_id = new_batch_id()
        if self._spool is not None and (
            len(self._spool) > 0 or (self._breaker is not None and not self._breaker.allow())
        ):
            return self._to_spool(batch_id, "pending", accepted, rejected)
        try:
            rows = self._drop_seen(accepted, rejected, batch_id)
        except FeatureStoreUnavailable as exc:
            if self._spool is None:
                raise
            self._store_failed(exc)
            return self._to_spool(batch_id, "pending", accepted, rejected)
        self._store_answered()
        if rows:
            self._store_offline(rows, now, batch_id)
            try:
                self._refresh_profiles(rows)
            except FeatureStoreUnavailable as exc:
                if self._spool is None:
                    raise
                self._store_failed(exc)
                return self._to_spool(batch_id, "logged", rows, rejected)
        return IngestResult(accepted=len(rows), rejected=rejected)

    def deliver_spooled(self, max_batches: int = 100) -> int:
        """Deliver up to `max_batches` spooled batches, oldest first; the drainer's one round.

        Dedup claims and offline appends go batch by batch; the profile update is one read and
        one push for all of them. Files are deleted only after that push succeeded. A store
        outage ends the round quietly (the batches stay for the next one); a batch that cannot
        be delivered for any other reason is isolated and set aside under `spool/failed/`.

        Returns:
            The number of events delivered to the profiles this round.
        """
        if self._spool is None or len(self._spool) == 0:
            return 0
        if self._breaker is not None and not self._breaker.allow():
            return 0
        with self._drain_lock:
            limit = self._drain_limit or max_batches
            batches = self._spool.oldest(limit)
            done: list[tuple[SpooledBatch, int, int]] = []  # batch, delivered, duplicates
            rows: list[EventRow] = []
            try:
                for batch in batches:
                    kept = self._prepare_spooled(batch)
                    done.append((batch, len(kept), len(batch.rows) - len(kept)))
                    rows.extend(kept)
                if rows:
                    self._refresh_profiles(rows)
            except FeatureStoreUnavailable as exc:
                self._store_failed(exc)
                _log.info("spool delivery paused, store unavailable: %s", exc)
                return 0
            except (ValueError, KeyError, TypeError) as exc:
                if len(batches) > 1:
                    self._drain_limit = 1  # find the bad batch: one per round for a while
                    _log.warning("spool delivery failed (%s); retrying batch by batch", exc)
                    return 0
                self._spool.set_aside(batches[0], f"{type(exc).__name__}: {exc}")
                metrics.SPOOL_EVENTS.labels(direction="failed").inc(len(batches[0].rows))
                return 0
            self._store_answered()
            for batch, delivered, duplicates in done:
                self._spool.remove(batch)
                metrics.SPOOL_EVENTS.labels(direction="delivered").inc(delivered)
                metrics.SPOOL_EVENTS.labels(direction="duplicate").inc(duplicates)
            if self._drain_limit and len(self._spool) == 0:
                self._drain_limit = 0
            total = sum(delivered for _, delivered, _ in done)
            _log.info("spool: delivered %d events from %d batches", total, len(done))
            return total

    # Internals -------------------------------------------------------------------------------

    def _prepare_spooled(self, batch: SpooledBatch) -> list[EventRow]:
        """Dedup and log a pending batch (idempotent: its own claims, its own file name)."""
        if batch.stage == "logged":
            return list(batch.rows)
        fresh = self._dedup.claim([row.event_id for row in batch.rows], batch.batch_id)
        kept = [row for row, is_new in zip(batch.rows, fresh, strict=True) if is_new]
        if kept:
            self._log.append(kept, ingested_at=self._clock(), batch_id=batch.batch_id)
        return kept

    def _to_spool(
        self, batch_id: str, stage: Stage, rows: list[EventRow], rejected: Counter[str]
    ) -> IngestResult:
        assert self._spool is not None
        if stage == "pending":  # a client retrying during the outage: answer duplicate now
            held = self._spool.ids_in_spool([row.event_id for row in rows])
            if held:
                rows = [row for row in rows if row.event_id not in held]
                rejected["duplicate"] += len(held)
        if rows:
            self._spool.put(batch_id, stage, rows)
            metrics.SPOOL_EVENTS.labels(direction="in").inc(len(rows))
            self._fold_into_cache(rows)
        return IngestResult(accepted=len(rows), rejected=rejected, spooled=len(rows))

    def _fold_into_cache(self, rows: list[EventRow]) -> None:
        """Apply spooled events to the cached profiles (local only; Redis gets them later)."""
        if self._cache is None:
            return
        cache = self._cache
        updated = []
        for user_id, user_events in _by_user(rows).items():
            profile = cache.cached_profile(user_id)
            if profile is None:
                continue  # an unknown user: nothing to answer from anyway
            item_ids = {item_id for item_id, _, _ in user_events} | set(profile.recent_items)
            items = cache.cached_items(sorted(item_ids))
            updated.append(update_profile(profile, user_id, user_events, items))
        cache.remember_profiles(updated)

    def _store_failed(self, exc: Exception) -> None:
        if self._breaker is not None:
            self._breaker.failure(str(exc))

    def _store_answered(self) -> None:
        if self._breaker is not None:
            self._breaker.success()

    def _drop_seen(
        self, rows: list[EventRow], rejected: Counter[str], batch_id: str
    ) -> list[EventRow]:
        if not rows:
            return []
        fresh = self._dedup.claim([row.event_id for row in rows], batch_id)
        kept = [row for row, is_new in zip(rows, fresh, strict=True) if is_new]
        if len(kept) < len(rows):
            rejected["duplicate"] += len(rows) - len(kept)
        return kept

    def _store_offline(self, rows: list[EventRow], now: datetime, batch_id: str) -> None:
        try:
            self._log.append(rows, ingested_at=now, batch_id=batch_id)
        except BaseException:
            # Not stored anywhere: unmark, or the client's retry would be dropped as a duplicate.
            # If unmarking fails too, the append's error is the one the caller needs to see.
            try:
                self._dedup.forget([row.event_id for row in rows])
            except FeatureStoreUnavailable:
                _log.exception("could not unmark %d event ids after a failed append", len(rows))
            raise

    def _refresh_profiles(self, rows: list[EventRow]) -> None:
        # Read-modify-write: serialised, or two batches of one user would lose counts.
        with self._profile_lock:
            self._refresh_profiles_locked(rows)

    def _refresh_profiles_locked(self, rows: list[EventRow]) -> None:
        by_user = _by_user(rows)
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
        if self._cache is not None:
            self._cache.remember_profiles(profiles)
        told = self.on_profiles
        if told is not None:
            try:
                told(profiles)
            except Exception:  # stored already: a hint's failure is not the batch's
                _log.exception("on_profiles failed for %d profiles", len(profiles))


def _by_user(rows: Sequence[EventRow]) -> dict[str, list[tuple[str, str, datetime]]]:
    by_user: dict[str, list[tuple[str, str, datetime]]] = {}
    for row in rows:  # update_profile orders by timestamp; ties keep request order
        by_user.setdefault(row.user_id, []).append((row.item_id, row.event_type, row.timestamp))
    return by_user


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
