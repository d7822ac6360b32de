"""Event hygiene: window duplicates and robot bursts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.ingestion.hygiene import EventHygiene
from services.ingestion.validate import EventRow

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def _row(n: int, user: str = "u", item: str = "i", kind: str = "click", at: float = 0) -> EventRow:
    return EventRow(f"e{n}", user, item, kind, T0 + timedelta(seconds=at))


def test_same_user_item_type_within_the_window_is_dropped_once() -> None:
    hygiene = EventHygiene(window=timedelta(seconds=2))
    result = hygiene.check(
        [
            _row(1, at=0),
            _row(2, at=1),  # double click: dropped
            _row(3, at=2.5),  # outside the window of the kept one: kept
            _row(4, kind="purchase", at=1),  # another type: kept
            _row(5, item="j", at=1),  # another item: kept
            _row(6, user="v", at=1),  # another user: kept
        ]
    )
    assert [r.event_id for r in result.kept] == ["e1", "e4", "e5", "e6", "e3"]
    assert [r.event_id for r in result.duplicates] == ["e2"]
    # State carries across batches.
    assert [r.event_id for r in hygiene.check([_row(7, at=3)]).duplicates] == ["e7"]


def test_bursts_above_the_rate_are_quarantined_and_normal_users_are_not() -> None:
    hygiene = EventHygiene(window=timedelta(0), max_events_per_minute=10)
    bot = [_row(n, user="bot", item=f"i{n}", at=n * 0.1) for n in range(25)]
    human = [_row(100 + n, user="human", item=f"i{n}", at=n * 6.0) for n in range(10)]
    result = hygiene.check(bot + human)
    assert len(result.quarantined) == 15
    assert {r.user_id for r in result.quarantined} == {"bot"}
    assert sum(r.user_id == "human" for r in result.kept) == 10
    # A minute later the bot's budget is back.
    later = hygiene.check([_row(999, user="bot", item="x", at=70)])
    assert len(later.kept) == 1


def test_state_is_bounded_and_settings_are_validated() -> None:
    hygiene = EventHygiene(max_tracked=5)
    hygiene.check([_row(n, user=f"u{n}", at=n) for n in range(50)])
    assert len(hygiene._last) <= 5 and len(hygiene._recent) <= 5
    with pytest.raises(ValueError, match="max_events_per_minute"):
        EventHygiene(max_events_per_minute=0)


def test_a_resent_event_is_left_to_the_id_deduplicator() -> None:
    hygiene = EventHygiene(window=timedelta(seconds=2), max_events_per_minute=3)
    batch = [_row(1, item="a", at=0), _row(2, item="b", at=1), _row(3, item="c", at=2)]
    assert len(hygiene.check(batch).kept) == 3
    again = hygiene.check(batch)  # a client retry: same ids, neither "window" nor "robot"
    assert len(again.kept) == 3 and not again.duplicates and not again.quarantined


def test_a_late_event_is_counted_in_its_own_minute_and_resends_never_quarantine() -> None:
    hygiene = EventHygiene(window=timedelta(0), max_events_per_minute=3)
    burst = [_row(n, item=f"i{n}", at=600 + n) for n in range(3)]  # 3 in minute ten: allowed
    assert len(hygiene.check(burst).kept) == 3
    late = hygiene.check([_row(99, item="x", at=0)])  # ten minutes earlier: its minute is empty
    assert len(late.kept) == 1 and not late.quarantined
    again = hygiene.check([*burst, _row(99, item="x", at=0)])  # all re-sent
    assert len(again.kept) == 4 and not again.quarantined
