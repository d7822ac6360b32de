"""services/common/heap.py: freezing the heap out of the garbage collector, timing its pauses."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from services.common.heap import freeze_heap, full_collections_deferred, watch_pauses


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture
def thawed() -> Iterator[None]:
    yield
    gc.unfreeze()


def test_objects_alive_at_the_freeze_leave_the_collector_and_newer_ones_stay(
    thawed: None,
) -> None:
    freeze_heap()
    before = gc.get_freeze_count()
    old = [Node() for _ in range(50)]
    frozen = freeze_heap()
    # What this freeze added: at least the list and its 50 nodes. A thread another test left
    # behind (a gRPC server unwinding its shutdown) may free frozen objects right after,
    # which only lowers the total.
    assert frozen >= 51
    assert frozen < before < gc.get_freeze_count() <= before + frozen
    tracked = {id(o) for o in gc.get_objects()}
    assert id(old) not in tracked  # in the permanent generation: no collection walks it

    # Garbage made after the freeze is still collected, cycles included.
    a, b = Node(), Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    gc.collect()
    assert gone() is None


def test_frozen_objects_are_still_freed_by_reference_counting(thawed: None) -> None:
    data = [Node()]
    freeze_heap()
    ref = weakref.ref(data[0])
    data.clear()
    assert ref() is None


def test_garbage_cycles_that_reached_the_oldest_generation_are_collected_before_a_freeze(
    thawed: None,
) -> None:
    """What a model load leaves in reference cycles may already be in generation 2 when the
    service freezes again after a swap; frozen there, it would never be freed."""
    freeze_heap()
    a, b = Node(), Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    gc.collect(1)  # a young collection moves its survivors into the oldest generation
    del a, b
    freeze_heap()
    assert gone() is None


def test_every_collection_is_reported_with_its_generation() -> None:
    seen: list[tuple[int, float]] = []
    hook = watch_pauses(lambda generation, seconds: seen.append((generation, seconds)))
    try:
        gc.collect(0)
        gc.collect(2)
    finally:
        gc.callbacks.remove(hook)
    assert [g for g, _ in seen[-2:]] == [0, 2]
    assert all(s >= 0 for _, s in seen)


def _full_collections_while_objects_survive(count: int) -> int:
    """How many full collections CPython starts by itself while `count` objects are made and
    kept (far more than the young generations' thresholds, and than a quarter of the
    collector's long-lived objects after a freeze)."""
    full: list[float] = []
    hook = watch_pauses(
        lambda generation, seconds: full.append(seconds) if generation == 2 else None
    )
    try:
        kept = [Node() for _ in range(count)]
    finally:
        gc.callbacks.remove(hook)
    del kept
    return len(full)


def test_no_full_collection_starts_while_deferred(thawed: None) -> None:
    before = gc.get_threshold()
    freeze_heap()  # as the service: what was alive before the load is frozen
    # The same allocations start full collections when nothing defers them.
    assert _full_collections_while_objects_survive(300_000) >= 1
    freeze_heap()
    with full_collections_deferred():
        assert gc.get_threshold()[:2] == before[:2]  # the young generations as before
        assert _full_collections_while_objects_survive(300_000) == 0
    assert gc.get_threshold() == before


def test_the_threshold_comes_back_when_the_load_fails() -> None:
    before = gc.get_threshold()
    with pytest.raises(RuntimeError), full_collections_deferred():
        raise RuntimeError("load failed")
    assert gc.get_threshold() == before
