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

While a new version loads, its objects are not frozen yet, and the collector walks them at
every full collection it starts, while requests wait: at 100,000 items, a load that computes
the item states ran 23–25 full collections of up to 140 ms each (stop 33). The load ends in a
full collection anyway (the freeze after the swap), so `full_collections_deferred` keeps
CPython from starting any while a load runs; the young generations are still collected as
usual, so short-lived garbage cycles go as before.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable, Iterator


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


# Generation-1 collections before CPython starts a full one, while a load runs: out of reach.
DEFERRED_THRESHOLD = 2**30


@contextlib.contextmanager
def full_collections_deferred() -> Iterator[None]:
    """No automatic full (generation 2) collection while the block runs (module docstring);
    generations 0 and 1 are collected as before, and `gc.collect()` still collects all. The
    oldest generation's threshold is process-wide: one block at a time (the model watcher's
    loads are serialized). What reaches the oldest generation meanwhile waits for the next
    full collection: the freeze after a swap, or CPython's own once the block has ended.
    """
    young, middle, oldest = gc.get_threshold()
    gc.set_threshold(young, middle, DEFERRED_THRESHOLD)
    try:
        yield
    finally:
        now_young, now_middle, _ = gc.get_threshold()
        gc.set_threshold(now_young, now_middle, oldest)


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
