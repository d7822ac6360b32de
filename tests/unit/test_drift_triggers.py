"""Drift signals on crafted frames, the trigger rule, and the scheduler with a fake runner."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from freshrec.config import UpdaterConfig
from freshrec.errors import FailedPrecondition
from services.updater.drift import (
    category_psi,
    champion_score_psi,
    ctr,
    ctr_by_version,
    drift_signals,
    new_item_share,
    score_psi,
)
from services.updater.triggers import Decision, TriggerScheduler, crossed, decide

T0 = datetime(2024, 5, 1, tzinfo=UTC)


def _events(
    rows: list[tuple[str, str, float]], ingested_hours: float | None = None
) -> pd.DataFrame:
    """(item_id, event_type, hours after T0) rows."""
    stamps = [T0 + timedelta(hours=h) for _, _, h in rows]
    return pd.DataFrame(
        {
            "item_id": [r[0] for r in rows],
            "event_type": [r[1] for r in rows],
            "timestamp": pd.to_datetime(stamps, utc=True),
            "ingested_at": pd.to_datetime(
                [
                    T0 + timedelta(hours=ingested_hours) if ingested_hours is not None else s
                    for s in stamps
                ],
                utc=True,
            ),
        }
    )


CREATED = {
    "old": pd.Timestamp("2024-01-01", tz="UTC"),
    "new": pd.Timestamp("2024-05-02T06:00", tz="UTC"),  # after T0 + 24 h
}
CATEGORY = {"old": "shoes", "new": "hats"}


def test_ctr_counts_clicks_per_impression() -> None:
    frame = _events([("old", "impression", 1), ("old", "impression", 2), ("old", "click", 3)])
    assert ctr(frame) == 0.5
    assert ctr(_events([("old", "click", 1)])) is None


def test_new_item_share_counts_items_created_after_the_champion() -> None:
    frame = _events([("old", "click", 1), ("new", "click", 2), ("new", "impression", 3)])
    assert new_item_share(frame, CREATED, T0 + timedelta(days=1)) == pytest.approx(2 / 3)
    assert new_item_share(frame, CREATED, T0 + timedelta(days=2)) == 0.0
    assert new_item_share(frame.iloc[0:0], CREATED, T0) is None
    unknown = _events([("ghost", "click", 1)])  # an item without a created_at is not new
    assert new_item_share(unknown, CREATED, T0) == 0.0


def test_category_psi_is_zero_for_the_same_mix_and_grows_with_shift() -> None:
    ref = _events([("old", "click", 1), ("new", "click", 2)])
    assert category_psi(ref, ref, CATEGORY) == pytest.approx(0.0)
    shifted = _events([("new", "click", 1)] * 9 + [("old", "click", 2)])
    assert category_psi(shifted, ref, CATEGORY) > 0.25
    assert category_psi(ref.iloc[0:0], ref, CATEGORY) is None


def test_ctr_by_version_uses_ingestion_time_and_the_champion_periods() -> None:
    a = _events([("old", "impression", 0), ("old", "click", 0)], ingested_hours=1)
    b = _events([("old", "impression", 0), ("old", "impression", 0)], ingested_hours=5)
    c = _events([("old", "impression", 0), ("old", "click", 0)], ingested_hours=9)
    periods = [
        (T0, "v0001"),
        (T0 + timedelta(hours=4), "v0002"),
        (T0 + timedelta(hours=8), "v0001"),
    ]
    got = ctr_by_version(pd.concat([a, b, c]), periods)
    assert got == {"v0001": 1.0, "v0002": 0.0}
    assert ctr_by_version(a, []) == {}


def test_drift_signals_compare_the_recent_window_with_the_champions() -> None:
    # Champion trained up to T0 + 24 h; reference window = the 24 h before; recent = last 24 h.
    reference = [("old", "impression", h) for h in range(2, 22)] + [("old", "click", 3)] * 4
    recent = [("new", "impression", 40 + h) for h in range(10)] + [("new", "click", 45)]
    frame = _events(reference + recent)
    signals = drift_signals(frame, T0 + timedelta(hours=24), timedelta(hours=24), CREATED, CATEGORY)
    assert signals["new_item_share"] == 1.0
    assert signals["ctr_reference"] == pytest.approx(4 / 20)
    assert signals["ctr_recent"] == pytest.approx(1 / 10)
    assert signals["ctr_drop"] == pytest.approx(0.5)
    assert signals["category_psi"] > 1
    assert all(math.isfinite(v) for v in signals.values())
    assert drift_signals(frame.iloc[0:0], None, timedelta(hours=1), {}, {}) == {}
    no_champion = drift_signals(frame, None, timedelta(hours=24), CREATED, CATEGORY)
    assert "new_item_share" not in no_champion and "ctr_recent" in no_champion


def test_drift_signals_do_not_mutate_their_input() -> None:
    frame = _events([("old", "impression", 1), ("new", "click", 30)])
    before = frame.copy()
    drift_signals(frame, T0 + timedelta(hours=2), timedelta(hours=24), CREATED, CATEGORY)
    pd.testing.assert_frame_equal(frame, before)


# -- score_psi: the champion's served relevance, recent vs earlier ---------------------------

CALM = np.array([0, 1, 3, 6, 10, 14, 16, 14, 10, 6, 3, 1, 0, 0, 0, 0, 0, 0, 0, 0])  # low scores
SHIFTED = CALM[::-1].copy()  # the same shape, at the top of [0, 1]


def _minute(at: datetime) -> int:
    return int(at.timestamp() // 60)


def _served(start: datetime, minutes: int, counts: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """One histogram line per minute from `start` on."""
    return [(_minute(start) + i, counts.copy()) for i in range(minutes)]


def test_score_psi_is_zero_for_the_same_distribution_and_large_for_a_shift() -> None:
    assert score_psi(CALM, CALM) == pytest.approx(0.0)
    assert score_psi(CALM * 7, CALM) == pytest.approx(0.0)  # proportions, not totals
    assert score_psi(SHIFTED, CALM) > 5
    half = np.where(np.arange(20) % 2 == 0, CALM, 0)
    assert 0.25 < (score_psi(half, CALM) or 0) < (score_psi(SHIFTED, CALM) or 0)
    assert score_psi(np.zeros(20), CALM) is None
    with pytest.raises(ValueError, match="same bins"):
        score_psi(CALM[:10], CALM)


def test_champion_score_psi_compares_the_last_window_with_the_time_before() -> None:
    since, now, window = T0, T0 + timedelta(hours=3), timedelta(hours=1)
    reference = _served(since, 120, CALM)  # T0 .. T0 + 2 h, 84 scores a minute
    same = _served(now - window, 60, CALM)
    assert champion_score_psi(reference + same, since, now, window) == pytest.approx(0.0)
    shifted = _served(now - window, 60, SHIFTED)
    psi = champion_score_psi(shifted + reference, since, now, window)  # order does not matter
    assert psi is not None and psi > 5
    # Served by the same version before `since` (an earlier stint as champion): ignored.
    earlier = _served(since - timedelta(hours=5), 60, SHIFTED)
    assert champion_score_psi(earlier + reference + same, since, now, window) == pytest.approx(0)
    # The minute holding `now - window` is recent: a shifted one there is counted as recent.
    boundary = [(_minute(now - window), SHIFTED * 1000)]
    assert (champion_score_psi(reference + same + boundary, since, now, window) or 0) > 1


def test_champion_score_psi_needs_enough_scores_and_serving_time() -> None:
    since, now, window = T0, T0 + timedelta(hours=3), timedelta(hours=1)
    reference, recent = _served(since, 120, CALM), _served(now - window, 60, SHIFTED)
    assert int(CALM.sum()) * 60 == 5040  # scores in the recent hour
    assert champion_score_psi(reference + recent, since, now, window, min_count=5040) is not None
    assert champion_score_psi(reference + recent, since, now, window, min_count=5041) is None
    assert champion_score_psi(reference + recent[:5], since, now, window) is None  # 420 < 500
    assert champion_score_psi(reference[:4] + recent, since, now, window) is None
    assert champion_score_psi([], since, now, window) is None
    # Promoted 30 minutes ago with a 60-minute window: nothing served before the window.
    young = now - timedelta(minutes=30)
    assert champion_score_psi(_served(young, 30, SHIFTED), young, now, window) is None
    assert champion_score_psi(reference + recent, now - window, now, window) is None


def test_drift_signals_report_score_psi_when_given() -> None:
    frame = _events([("old", "impression", 1), ("new", "click", 30)])
    args = (frame, T0 + timedelta(hours=2), timedelta(hours=24), CREATED, CATEGORY)
    assert "score_psi" not in drift_signals(*args)
    assert drift_signals(*args, served_score_psi=0.4)["score_psi"] == 0.4
    empty = drift_signals(frame.iloc[0:0], None, timedelta(hours=1), {}, {}, (), 0.1)
    assert empty == {"score_psi": 0.1}  # served scores need no events


# -- the trigger rule ------------------------------------------------------------------------

CONFIG = UpdaterConfig(
    new_item_share_threshold=0.3,
    ctr_drop_threshold=0.2,
    category_psi_threshold=0,  # off
    update_interval_seconds=0,
    drift_cooldown_seconds=100,
)


def _decide(signals: dict[str, float], **kw: object) -> Decision:
    args: dict = {
        "running": False,
        "now": 1000.0,
        "last_started": 0.0,
        "last_drift_trigger": None,
        "pending_events": 10,
        "config": CONFIG,
    }
    args.update(kw)
    config = args.pop("config")
    return decide(signals, config, **args)


def test_threshold_crossed_triggers() -> None:
    decision = _decide({"new_item_share": 0.5, "ctr_drop": 0.1})
    assert decision.trigger
    assert decision.reason == "drift: new_item_share 0.500 >= 0.3"
    assert not _decide({"new_item_share": 0.29, "ctr_drop": 0.19}).trigger
    assert _decide({"ctr_drop": 0.2}).trigger  # at the threshold counts


def test_score_psi_crossing_its_threshold_triggers() -> None:
    decision = _decide({"score_psi": 0.31})
    assert decision.trigger and decision.reason == "drift: score_psi 0.310 >= 0.25"
    assert "score_psi >= 0.25" in decision.next_trigger
    assert not _decide({"score_psi": 0.2}).trigger
    off = CONFIG.model_copy(update={"score_psi_threshold": 0})
    assert not _decide({"score_psi": 9.0}, config=off).trigger


def test_disabled_threshold_never_triggers() -> None:
    assert crossed({"category_psi": 50.0}, CONFIG) == []
    assert not _decide({"category_psi": 50.0}).trigger


def test_running_update_blocks_every_trigger() -> None:
    config = CONFIG.model_copy(update={"update_interval_seconds": 10})
    decision = _decide({"new_item_share": 0.9}, running=True, config=config)
    assert (decision.trigger, decision.reason) == (False, "an update is running")


def test_drift_needs_new_events_and_respects_the_cooldown() -> None:
    assert not _decide({"new_item_share": 0.9}, pending_events=0).trigger
    cooling = _decide({"new_item_share": 0.9}, last_drift_trigger=950.0)
    assert not cooling.trigger and "cooling down for 50 s" in cooling.reason
    assert _decide({"new_item_share": 0.9}, last_drift_trigger=899.0).trigger


def test_schedule_triggers_when_due() -> None:
    config = CONFIG.model_copy(update={"update_interval_seconds": 600})
    early = _decide({}, now=500.0, last_started=0.0, config=config)
    assert not early.trigger and early.next_trigger.startswith("schedule in 100 s")
    due = _decide({}, now=600.0, last_started=0.0, config=config)
    assert due.trigger and due.reason == "schedule: every 600 s"
    assert _decide({}, pending_events=0, now=700.0, config=config).trigger  # no data needed


def test_next_trigger_says_when_everything_is_off() -> None:
    off = UpdaterConfig(
        new_item_share_threshold=0,
        ctr_drop_threshold=0,
        category_psi_threshold=0,
        score_psi_threshold=0,
    )
    assert _decide({}, config=off).next_trigger == "no schedule; no drift triggers"


# -- the scheduler, with a fake runner and a fake clock -----------------------------------


class FakeRunner:
    def __init__(self, signals: dict[str, float], pending: int = 5) -> None:
        self.signals, self.pending = signals, pending
        self.running = False
        self.started: list[str] = []
        self.reads = 0
        self.started_at: float | None = None
        self.clock = 0.0

    def is_running(self) -> bool:
        return self.running

    def last_started(self) -> float | None:
        return self.started_at

    def drift_signals(self) -> tuple[dict[str, float], int]:
        self.reads += 1
        return dict(self.signals), self.pending

    def start_update(self, reason: str) -> object:
        if self.running:
            raise FailedPrecondition("update x is already running")
        self.started.append(reason)
        self.running, self.started_at = True, self.clock
        return object()


def _scheduler(runner: FakeRunner, **config: float) -> TriggerScheduler:
    scheduler = TriggerScheduler(
        runner, CONFIG.model_copy(update=config), clock=lambda: runner.clock
    )
    scheduler._started_at = 0.0  # as start() would, without the thread
    return scheduler


def test_scheduler_starts_one_update_on_drift_and_none_while_it_runs() -> None:
    runner = FakeRunner({"new_item_share": 0.6})
    scheduler = _scheduler(runner, drift_check_seconds=10)
    runner.clock = 10.0
    assert scheduler.check_once().trigger
    assert runner.started == ["automatic: drift: new_item_share 0.600 >= 0.3"]
    runner.clock = 25.0
    assert scheduler.check_once().reason == "an update is running"
    runner.running = False
    runner.clock = 40.0  # finished, signals still high: the cooldown holds
    assert "cooling down" in scheduler.check_once().reason
    runner.clock = 111.0
    assert scheduler.check_once().trigger
    assert len(runner.started) == 2


def test_scheduler_reads_signals_only_every_drift_check_seconds() -> None:
    runner = FakeRunner({})
    scheduler = _scheduler(runner, drift_check_seconds=60, update_interval_seconds=5)
    for t in (1.0, 2.0, 3.0):
        runner.clock = t
        scheduler.check_once()
    assert runner.reads == 1
    runner.clock = 62.0
    scheduler.check_once()
    assert runner.reads == 2


def test_scheduler_schedule_counts_from_the_last_update_of_any_cause() -> None:
    runner = FakeRunner({}, pending=0)
    scheduler = _scheduler(runner, update_interval_seconds=100, drift_check_seconds=0)
    runner.started_at = 80.0  # an operator's update started at t=80
    runner.clock = 150.0
    assert not scheduler.check_once().trigger
    runner.clock = 180.0
    decision = scheduler.check_once()
    assert decision.trigger and runner.started == ["automatic: schedule: every 100 s"]
    assert scheduler.last().decision == decision


def test_scheduler_is_a_no_op_when_off() -> None:
    scheduler = TriggerScheduler(FakeRunner({}), UpdaterConfig())
    assert not scheduler.enabled
    scheduler.start()
    assert scheduler._thread is None
    scheduler.stop()
