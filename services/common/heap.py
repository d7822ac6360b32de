"""Keeping Python's cyclic garbage collector off the request path.

A full (generation 2) collection walks every container object the interpreter tracks and holds
the GIL while it does: no request moves. In the ranking service at 100,000 items (~650,000
tracked objects: token ids, item texts, caches, the model's modules) one took ~310 ms (stop 22,
2-core Xeon, `docs/performance-log.md`). CPython starts one whenever the objects promoted since
the last one pass a quarter of the long-lived ones, so a long-running service under load hits
one from time to time, and every request in flight then waits for it.

Almost all of those objects are made at start-up or when a model version loads, and live as
long as the process or the version. `freeze_heap` moves every object alive at that point into
the permanent generation (`gc.freeze`), which collections skip: right after it a full
collection took 0.0 ms in the same process. Frozen objects are still freed by reference
counting when their last reference goes; only a frozen object in a reference cycle is never
freed. A released model version goes by reference counting alone (tested in
tests/unit/test_ranking_pipeline.py); the garbage cycles its load left are collected before
the service freezes again after the swap.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable


def freeze_heap() -> int:
    """Collect garbage (every generation), then freeze every object alive (module
    docstring); returns how many objects this call froze (those tracked since the last).

    The collection must be full: loading a model version leaves garbage in reference cycles
    that has already reached the oldest generation, and frozen it would never be freed (with
    only the young generations collected before each freeze, 12 swaps on MovieLens left ~414
    more objects frozen and ~20 MB more RSS per swap; stop 22). With the earlier objects
    frozen, a full collection walks only what was made since the last freeze.

    The count is of the objects collections still walked, not `gc.get_freeze_count()`: that
    walks every frozen object, under the GIL. With ~400k frozen it took ~70 ms of a ~100 ms
    freeze after a swap (2-core AVX2 EPYC, a 100k-item version), all of it a request's wait."""
    gc.collect()
    count = len(gc.get_objects())
    gc.freeze()
    return count


def watch_pauses(observe: Callable[[int, float], None]) -> Callable[[str, dict[str, int]], None]:
    """Call `observe(generation, seconds)` after every collection of this process (a
    `gc.callbacks` hook; collections run one at a time, under the GIL); returns the hook."""

    started = 0.0

    def hook(phase: str, info: dict[str, int]) -> None:
        nonlocal started
        if phase == "start":
            started = time.perf_counter()
        else:
            observe(info["generation"], time.perf_counter() - started)

    gc.callbacks.append(hook)
    return hook
