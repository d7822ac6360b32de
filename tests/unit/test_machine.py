"""The bench's after-idle probe (freshrec/machine.py), on a fake clock."""

from __future__ import annotations

import pytest

from freshrec.machine import after_idle


class FakeMachine:
    """Work takes 100 µs, or 150 µs when it follows a sleep (a machine whose caches go cold
    while it idles)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept = False
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        self.slept = True

    def work(self) -> None:
        self.now += 150e-6 if self.slept else 100e-6
        self.slept = False


def test_after_idle_times_the_work_back_to_back_and_after_each_sleep() -> None:
    fake = FakeMachine()

    got = after_idle(0.003, 20, fake.work, fake.sleep, fake.clock)

    assert got == {"hot_us": 100.0, "after_idle_us": 150.0, "ratio": 1.5, "idle_ms": 3.0}
    assert fake.sleeps == [0.003] * 20  # one sleep before each timed run of the second half


def test_the_real_probe_runs_and_reports_a_ratio_of_its_own_medians() -> None:
    got = after_idle(0.001, 5)
    assert got["hot_us"] > 0 and got["after_idle_us"] > 0
    assert got["ratio"] == round(got["after_idle_us"] / got["hot_us"], 2)


@pytest.mark.parametrize(("idle_s", "rounds"), [(0.0, 5), (0.001, 0)])
def test_after_idle_refuses_what_it_cannot_measure(idle_s: float, rounds: int) -> None:
    with pytest.raises(ValueError, match="need rounds >= 1 and idle_s > 0"):
        after_idle(idle_s, rounds)
