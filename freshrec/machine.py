"""What a benchmark reports about the machine beyond its CPU model: how much slower the same
work runs right after the cores sat idle.

A request on a service at concurrency 1 starts after a wait (the client's round trip, a hand-off
between threads), and its stage floors are timed hot, back to back. On some virtual machines an
idle vCPU is handed back to the host (the guest halts, and here the guest's halt polling is off:
`haltpoll.guest_halt_poll_ns=0` on a nested Firecracker VM), and the work that follows runs on
cold caches. Measured in stop 38 on such a VM (2 vCPUs, Xeon with AMX): a 2 MiB sum and a
64×384×1536 product took 668–670 µs back to back and 896–929 µs after 3 ms of sleep (1.34–1.39×);
with two `nice 19` busy loops keeping the vCPUs from halting, 671 and 712 µs (1.06×). The same
machine served `Recommend` at p50 20.23 ms alone and 10.66 ms beside the busy loops. Half an
hour later it read 0.95–1.03 and served at p50 5.62 ms alone: what the host does while the guest
idles comes and goes. Figures from runs whose `after_idle.ratio` differ are not comparable,
whatever their CPU model.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np


def _probe_work() -> Callable[[], None]:
    buf = np.ones(512 * 1024, dtype=np.float32)  # 2 MiB: a request's working set, roughly
    x = np.ones((64, 384), dtype=np.float32)
    w = np.ones((384, 1536), dtype=np.float32)  # one BERT feed-forward product's shape

    def work() -> None:
        buf.sum()
        x @ w

    return work


def after_idle(
    idle_s: float = 0.003,
    rounds: int = 200,
    work: Callable[[], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """The median time of a fixed piece of work run back to back (`hot_us`) and right after
    `idle_s` of sleep (`after_idle_us`), and their ratio (module docstring).

    Raises:
        ValueError: `rounds` < 1 or `idle_s` <= 0.
    """
    if rounds < 1 or not idle_s > 0:
        raise ValueError(f"need rounds >= 1 and idle_s > 0, got {rounds} and {idle_s}")
    run = work or _probe_work()
    run()  # first touch

    def timed(pause: float) -> float:
        samples = []
        for _ in range(rounds):
            if pause:
                sleep(pause)
            start = clock()
            run()
            samples.append(clock() - start)
        return statistics.median(samples) * 1e6

    hot = round(timed(0.0), 1)
    cold = round(timed(idle_s), 1)
    return {
        "hot_us": hot,
        "after_idle_us": cold,
        "ratio": round(cold / hot, 2) if hot > 0 else float("nan"),
        "idle_ms": round(idle_s * 1e3, 3),
    }
