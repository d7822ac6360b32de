"""Event hygiene after validation and id de-duplication: repeated clicks and robots.

- A repeat of the same (user, item, type) within `window` of the last one kept is dropped
  ("duplicate_window"): double-clicks and client retries with fresh event ids.
- A user sending more than `max_events_per_minute` events in a sliding minute is presumed a
  robot: the excess events are quarantined ("quarantined_rate") — stored apart, never trained
  on and never folded into the profile.

State is in process and bounded (LRU), per ranking replica: a storefront's gRPC connection
sticks to one replica, so a session's events meet the same state. Pure logic, no I/O.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from services.ingestion.validate import EventRow

DUPLICATE_WINDOW = "duplicate_window"
QUARANTINED_RATE = "quarantined_rate"


@dataclass(frozen=True)
class HygieneResult:
    kept: list[EventRow]
    duplicates: list[EventRow]
    quarantined: list[EventRow]


class EventHygiene:
    """Drops near-duplicates and quarantines bursts; see the module docstring."""

    def __init__(
        self,
        window: timedelta = timedelta(seconds=2),
        max_events_per_minute: int = 120,
        max_tracked: int = 200_000,
    ) -> None:
        if window < timedelta(0):
            raise ValueError(f"window must be >= 0, got {window}")
        if max_events_per_minute < 1:
            raise ValueError(f"max_events_per_minute must be >= 1, got {max_events_per_minute}")
        self.window = window
        self.max_events_per_minute = max_events_per_minute
        self.max_tracked = max_tracked
        self._last: OrderedDict[tuple[str, str, str], tuple[datetime, str]] = OrderedDict()
        self._recent: OrderedDict[str, deque[tuple[datetime, str]]] = OrderedDict()

    def _touch(self, store: OrderedDict, key: object) -> None:  # type: ignore[type-arg]
        store.move_to_end(key)
        while len(store) > self.max_tracked:
            store.popitem(last=False)

    def check(self, rows: Sequence[EventRow]) -> HygieneResult:
        """Sort the batch's rows into kept, window duplicates and quarantined (time order)."""
        kept: list[EventRow] = []
        duplicates: list[EventRow] = []
        quarantined: list[EventRow] = []
        minute = timedelta(minutes=1)
        for row in sorted(rows, key=lambda r: r.timestamp):
            recent = self._recent.setdefault(row.user_id, deque())
            self._touch(self._recent, row.user_id)
            while recent and row.timestamp - recent[0][0] >= minute:
                recent.popleft()
            # A re-sent event (same id) is the id de-duplicator's business, not a new event:
            # it neither counts towards the rate nor is quarantined.
            resent = any(event_id == row.event_id for _, event_id in recent)
            if not resent:
                recent.append((row.timestamp, row.event_id))
                in_minute = sum(
                    1 for ts, _ in recent if row.timestamp - minute < ts <= row.timestamp
                )
                if in_minute > self.max_events_per_minute:
                    quarantined.append(row)
                    continue
            key = (row.user_id, row.item_id, row.event_type)
            last = self._last.get(key)
            if (
                last is not None
                and last[1] != row.event_id
                and abs(row.timestamp - last[0]) < self.window
            ):
                duplicates.append(row)
                continue
            self._last[key] = (row.timestamp, row.event_id)
            self._touch(self._last, key)
            kept.append(row)
        return HygieneResult(kept, duplicates, quarantined)
