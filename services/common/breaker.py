"""A circuit breaker for one dependency (the Redis behind Feast, dedup and pushes).

After a failure the dependency is skipped for `cooldown_s`, so requests answer from their
fallback at once instead of each paying a connect timeout; after the cooldown, calls are let
through again as probes, and the first success closes the breaker. Listeners hear every change
(the ranking server turns them into the features health status).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

Listener = Callable[[bool, str], None]


class CircuitBreaker:
    """Closed (use the dependency) or open (skip it until the cooldown ends). Thread-safe."""

    def __init__(
        self, name: str, cooldown_s: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if cooldown_s <= 0:
            raise ValueError(f"cooldown_s must be > 0, got {cooldown_s}")
        self.name = name
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._lock = threading.Lock()
        self._open = False
        self._retry_at = 0.0
        self._reason = ""
        self._listeners: list[Listener] = []

    @property
    def closed(self) -> bool:
        """True while the dependency is believed to work."""
        return not self._open

    @property
    def reason(self) -> str:
        """Why the breaker opened (the last failure's message); "" while closed."""
        return self._reason

    def subscribe(self, listener: Listener) -> None:
        """Call `listener(closed, reason)` on every change from closed to open and back."""
        with self._lock:
            self._listeners.append(listener)

    def allow(self) -> bool:
        """Whether to call the dependency now: closed, or open with the cooldown over (a probe)."""
        return not self._open or self._clock() >= self._retry_at

    def success(self) -> None:
        """Record a call that worked; closes the breaker."""
        if not self._open:  # the hot path: no lock while healthy
            return
        with self._lock:
            changed, self._open, self._reason = self._open, False, ""
            listeners = list(self._listeners)
        if changed:
            log.warning("%s: reachable again, breaker closed", self.name)
            for listener in listeners:
                listener(True, "")

    def failure(self, reason: str) -> None:
        """Record a failed call; opens the breaker (or restarts its cooldown)."""
        with self._lock:
            changed = not self._open
            self._open, self._reason = True, reason
            self._retry_at = self._clock() + self.cooldown_s
            listeners = list(self._listeners)
        if changed:
            log.warning(
                "%s: unreachable (%s); skipped for %.1fs", self.name, reason, self.cooldown_s
            )
            for listener in listeners:
                listener(False, reason)
