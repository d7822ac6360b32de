"""Automatic updates: a background scheduler that starts an update on a schedule or on drift.

`decide` is the pure rule; `TriggerScheduler` is the thread that applies it. Rules, in order:
    1. an update is running (whoever started it): never start another;
    2. schedule: `update_interval_seconds` > 0 and that long since the last update started
       (any cause, operator included) or since the scheduler started;
    3. drift: a signal crossed its threshold (`UpdaterConfig.*_threshold`, 0 = off), there are
       events newer than the champion's data, and `drift_cooldown_seconds` passed since the
       last drift-triggered update (a rejected challenger leaves the signals where they were).
Operator commands (`TriggerUpdate`) bypass all of this and only obey rule 1.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from freshrec.config import UpdaterConfig
from freshrec.errors import FailedPrecondition

log = logging.getLogger(__name__)

# (signal name, config field): the signal triggers at value >= threshold.
THRESHOLDS = (
    ("new_item_share", "new_item_share_threshold"),
    ("ctr_drop", "ctr_drop_threshold"),
    ("category_psi", "category_psi_threshold"),
    ("score_psi", "score_psi_threshold"),
)


@dataclass(frozen=True)
class Decision:
    trigger: bool
    reason: str  # the update's reason when trigger, else why not
    next_trigger: str  # for GetStatus: what would start the next automatic update


def crossed(signals: Mapping[str, float], config: UpdaterConfig) -> list[str]:
    """`name value >= threshold` for every enabled threshold the signals reach."""
    out = []
    for name, threshold_field in THRESHOLDS:
        threshold = float(getattr(config, threshold_field))
        value = signals.get(name)
        if threshold > 0 and value is not None and value >= threshold:
            out.append(f"{name} {value:.3f} >= {threshold:g}")
    return out


def decide(
    signals: Mapping[str, float],
    config: UpdaterConfig,
    *,
    running: bool,
    now: float,
    last_started: float,
    last_drift_trigger: float | None,
    pending_events: int,
) -> Decision:
    """Whether to start an automatic update now (rules in the module docstring).

    Args:
        now, last_started, last_drift_trigger: monotonic seconds; last_started = when the last
            update (any cause) or the scheduler started.
        pending_events: events newer than the champion's training data.
    """
    schedule = config.update_interval_seconds
    due_in = last_started + schedule - now if schedule > 0 else None
    next_parts = [f"schedule in {max(due_in, 0):.0f} s" if due_in is not None else "no schedule"]
    enabled = [f"{n} >= {getattr(config, f):g}" for n, f in THRESHOLDS if getattr(config, f) > 0]
    next_parts.append(f"drift: {' or '.join(enabled)}" if enabled else "no drift triggers")
    next_trigger = "; ".join(next_parts)
    if running:
        return Decision(False, "an update is running", next_trigger)
    if due_in is not None and due_in <= 0:
        return Decision(True, f"schedule: every {schedule:g} s", next_trigger)
    reasons = crossed(signals, config)
    if not reasons:
        return Decision(False, "no threshold crossed", next_trigger)
    if pending_events <= 0:
        return Decision(False, "drift, but no events newer than the champion", next_trigger)
    if last_drift_trigger is not None and now - last_drift_trigger < config.drift_cooldown_seconds:
        wait = last_drift_trigger + config.drift_cooldown_seconds - now
        return Decision(False, f"drift, cooling down for {wait:.0f} s", next_trigger)
    return Decision(True, "drift: " + ", ".join(reasons), next_trigger)


class UpdateRunner(Protocol):
    """What the scheduler needs from the updater servicer."""

    def is_running(self) -> bool: ...

    def last_started(self) -> float | None: ...

    def drift_signals(self) -> tuple[dict[str, float], int]: ...

    def start_update(self, reason: str) -> object: ...


@dataclass
class Evaluation:
    signals: dict[str, float] = field(default_factory=dict)
    pending_events: int = 0
    decision: Decision | None = None
    at: float = 0.0


class TriggerScheduler:
    """Evaluates `decide` every few seconds in a daemon thread and starts updates.

    Signals are recomputed every `drift_check_seconds` (they read the offline log); the
    schedule is checked at every wake-up.
    """

    def __init__(
        self,
        runner: UpdateRunner,
        config: UpdaterConfig,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runner = runner
        self.config = config
        self.clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._last = Evaluation()
        self._started_at = 0.0
        self._last_drift_trigger: float | None = None

    @property
    def enabled(self) -> bool:
        c = self.config
        return c.update_interval_seconds > 0 or c.drift_check_seconds > 0

    def _tick(self) -> float:
        periods = [
            p for p in (self.config.update_interval_seconds, self.config.drift_check_seconds)
        ]
        return max(min(p for p in periods if p > 0), 0.05)

    def start(self) -> None:
        """Start the thread (no-op when neither a schedule nor drift checks are configured)."""
        if not self.enabled or self._thread is not None:
            return
        self._started_at = self.clock()
        self._thread = threading.Thread(target=self._loop, name="update-triggers", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def last(self) -> Evaluation:
        with self._lock:
            return self._last

    def _loop(self) -> None:
        tick = self._tick()
        while not self._stop.wait(tick):
            try:
                self.check_once()
            except Exception:  # the scheduler must outlive a bad read; the next tick retries
                log.exception("update trigger check failed")

    def check_once(self) -> Decision:
        """Recompute signals if due, decide, and start an update if the decision says so."""
        now = self.clock()
        previous = self.last()
        check_every = self.config.drift_check_seconds
        if check_every > 0 and (previous.decision is None or now - previous.at >= check_every):
            signals, pending = self.runner.drift_signals()
            at = now
        else:
            signals, pending, at = previous.signals, previous.pending_events, previous.at
        last_started = max(self.runner.last_started() or self._started_at, self._started_at)
        decision = decide(
            signals,
            self.config,
            running=self.runner.is_running(),
            now=now,
            last_started=last_started,
            last_drift_trigger=self._last_drift_trigger,
            pending_events=pending,
        )
        with self._lock:
            self._last = Evaluation(signals, pending, decision, at)
        if decision.trigger:
            try:
                self.runner.start_update(f"automatic: {decision.reason}")
            except FailedPrecondition as exc:  # an operator's update got there first
                log.info("automatic update not started: %s", exc)
                return decision
            log.info("automatic update started (%s)", decision.reason)
            if decision.reason.startswith("drift"):
                self._last_drift_trigger = now
        return decision
