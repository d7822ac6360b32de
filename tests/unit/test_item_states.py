"""The paged item-state arena (model/item_states.py): what a request gathers is what was put."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch.nn.utils.rnn import pad_sequence

from model.item_states import PAGE_TOKENS, Int8ItemStates, PagedItemStates, release_pages


def _batch(lengths: list[int], width: int = 6, seed: int = 0) -> torch.Tensor:
    """(B, max length, width) random states; rows past each length are garbage on purpose
    (a padded warm-up batch), so a gather that read them would show."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((len(lengths), max(lengths), width), generator=g) + 100.0


def test_a_gather_is_the_padded_stack_of_the_rows_put() -> None:
    store = PagedItemStates(torch.float32, capacity=100)
    lengths = [3, 17, 1, 8, 9]
    states = _batch(lengths)
    texts = [f"item {i}" for i in range(len(lengths))]
    store.put(texts, states, lengths)
    order = [3, 0, 4, 1]  # any subset, any order
    got = store.gather([texts[i] for i in order], torch.float32)
    assert got is not None
    items, got_lengths = got
    want = pad_sequence([states[i, : lengths[i]] for i in order], batch_first=True)
    assert torch.equal(items, want)  # zeros past each length, not the batch's garbage
    assert got_lengths.tolist() == [lengths[i] for i in order]
    assert store.gather(["item 0", "never put"], torch.float32) is None


def test_states_are_kept_in_the_store_dtype_and_gathered_in_the_asked_one() -> None:
    store = PagedItemStates(torch.bfloat16, capacity=10)
    states = _batch([4, 2])
    store.put(["a", "b"], states, [4, 2])
    got = store.gather(["b", "a"], torch.float32)
    assert got is not None and got[0].dtype == torch.float32
    assert store.nbytes() == store.pages * PAGE_TOKENS * 6 * 2  # 2 bytes a value
    torch.testing.assert_close(got[0][1], states[0].to(torch.bfloat16).float())


def test_state_bytes_count_the_pages_items_hold() -> None:
    store = PagedItemStates(torch.bfloat16, capacity=2)
    assert store.state_bytes() == 0
    store.put(["a", "b"], _batch([PAGE_TOKENS, PAGE_TOKENS + 1]), [PAGE_TOKENS, PAGE_TOKENS + 1])
    page = PAGE_TOKENS * 6 * 2  # 6 values a row, 2 bytes a value
    assert store.state_bytes() == 3 * page  # one page, then two
    assert store.nbytes() > store.state_bytes()  # the arena keeps spare pages
    store.put(["c"], _batch([1]), [1])  # evicts "a" (least recently used)
    assert "a" not in store and store.state_bytes() == 3 * page
    store.put(["d"], _batch([1]), [1])  # evicts "b": its two pages back to the free list
    assert store.state_bytes() == 2 * page
    int8 = Int8ItemStates(block=3, capacity=10)
    int8.put(["a"], _batch([5]), [5])
    assert int8.state_bytes() == 5 * 6 + 5 * 2 * 4  # int8 values, two fp32 scales a row


def test_the_oldest_items_go_at_capacity_and_their_pages_are_reused() -> None:
    store = PagedItemStates(torch.float32, capacity=4)
    for i in range(4):
        store.put([f"t{i}"], _batch([PAGE_TOKENS + 1], seed=i), [PAGE_TOKENS + 1])
    pages = store.pages
    for i in range(4, 400):  # a long stream of new items through a full store
        store.put([f"t{i}"], _batch([PAGE_TOKENS + 1], seed=i), [PAGE_TOKENS + 1])
    assert len(store) == 4
    assert "t395" not in store and all(f"t{i}" in store for i in range(396, 400))
    assert store.pages == pages  # freed pages were handed out again: no growth
    got = store.gather(["t399", "t396"], torch.float32)
    assert got is not None
    assert torch.equal(got[0][0], _batch([PAGE_TOKENS + 1], seed=399)[0])
    assert torch.equal(got[0][1], _batch([PAGE_TOKENS + 1], seed=396)[0])


@pytest.mark.parametrize("int8", [False, True])
def test_what_requests_read_stays_and_the_least_recently_read_goes(int8: bool) -> None:
    """A warm-up puts the popular head first; evicting first-in would evict it."""
    store = Int8ItemStates(3, capacity=3) if int8 else PagedItemStates(torch.float32, capacity=3)
    for text in ("head", "b", "c"):
        store.put([text], _batch([2]), [2])
    assert store.gather(["head"], torch.float32) is not None  # read: now the most recent
    store.put(["d"], _batch([2]), [2])
    assert "head" in store and "b" not in store and {"c", "d"} <= set(store._entries)
    store.put(["e"], _batch([2]), [2])
    assert "head" in store and "c" not in store


@pytest.mark.parametrize("int8", [False, True])
def test_the_recent_texts_come_most_recently_used_first(int8: bool) -> None:
    # A version loaded beside this one warms these (services/ranking/server.py).
    store = Int8ItemStates(3, capacity=10) if int8 else PagedItemStates(torch.float32, capacity=10)
    store.put(["a", "b", "c", "d"], _batch([2, 3, 1, 2]), [2, 3, 1, 2])
    assert store.gather(["b"], torch.float32) is not None  # read: now the most recent
    assert store.recent(10) == ["b", "d", "c", "a"]
    assert store.recent(2) == ["b", "d"] and store.recent(0) == []


def test_growing_the_arena_keeps_what_it_held() -> None:
    store = PagedItemStates(torch.float32, capacity=10_000)
    first = _batch([5, 30], seed=1)
    store.put(["x", "y"], first, [5, 30])
    before = store.pages
    many = [PAGE_TOKENS * 3] * 200
    store.put([f"m{i}" for i in range(200)], _batch(many, seed=2), many)
    assert store.pages > before
    got = store.gather(["y", "x"], torch.float32)
    assert got is not None
    assert torch.equal(got[0][0], first[1]) and torch.equal(got[0][1, :5], first[0, :5])


def test_an_announced_warm_up_is_allocated_once() -> None:
    lengths = [PAGE_TOKENS * 3, 5, 1] * 100  # 500 pages
    announced = PagedItemStates(torch.float32, capacity=len(lengths))
    announced.expect(lengths)
    states = _batch(lengths, seed=4)
    texts = [f"w{i}" for i in range(len(lengths))]
    announced.put(texts[:3], states[:3], lengths[:3])
    assert announced.pages == 501  # all of it (and the zero page) at the first put
    for start in range(3, len(lengths), 50):  # the rest arrives batch by batch: no growth
        stop = start + 50
        announced.put(texts[start:stop], states[start:stop], lengths[start:stop])
    assert announced.pages == 501
    got = announced.gather([texts[-1], texts[0]], torch.float32)
    assert got is not None and torch.equal(got[0][1], states[0])


def test_a_warm_up_below_capacity_reserves_room_for_the_rest() -> None:
    """Room for `capacity` items of the warm-up's average size, in one allocation (untouched
    pages are address space, not resident memory): later items do not grow the arena."""
    lengths = [PAGE_TOKENS * 3, 5, 1] * 100  # 300 items, 500 pages
    store = PagedItemStates(torch.float32, capacity=600)
    store.expect(lengths)
    store.put([f"w{i}" for i in range(300)], _batch(lengths, seed=7), lengths)
    assert store.pages == 1 + 500 + 500  # the zero page, the warm-up, 300 more alike
    later = [PAGE_TOKENS * 3, 5, 1] * 90
    store.put([f"later{i}" for i in range(270)], _batch(later, seed=8), later)
    assert store.pages == 1001 and len(store) == 570


def test_putting_a_text_again_replaces_its_states() -> None:
    store = PagedItemStates(torch.float32, capacity=10)
    store.put(["a"], _batch([9], seed=1), [9])
    pages = store.pages
    store.put(["a"], _batch([3], seed=2), [3])
    got = store.gather(["a"], torch.float32)
    assert got is not None and got[1].tolist() == [3]
    assert torch.equal(got[0][0], _batch([3], seed=2)[0])
    assert len(store) == 1 and store.pages == pages


@pytest.mark.parametrize("clear", [True, False])
def test_copies_and_cleared_stores_hold_nothing(clear: bool) -> None:
    store = PagedItemStates(torch.float16, capacity=7)
    store.put(["a"], _batch([2]), [2])
    other = store if clear else copy.deepcopy(store)
    if clear:
        store.clear()
    assert len(other) == 0 and other.nbytes() == 0 and other.gather(["a"], torch.float32) is None
    assert other.dtype == torch.float16 and other.capacity == 7
    other.put(["b"], _batch([2]), [2])  # and work afterwards
    assert "b" in other


def test_a_new_text_in_a_full_warmed_store_takes_the_pages_of_the_one_it_evicts() -> None:
    """A warmed catalogue fills the arena to its capacity; an item whose text changes then
    arrives as a new text. Growing the arena by half for it held the old and the new arena at
    once (the 100k service peaked at 11.0 GB RSS against 6.4 GB in steady state)."""
    lengths = [PAGE_TOKENS] * 100  # one page each: 100 pages, above the arena's minimum
    store = PagedItemStates(torch.float32, capacity=100)
    store.expect(lengths)
    store.put([f"w{i}" for i in range(100)], _batch(lengths, seed=5), lengths)
    assert store.pages == 101
    fresh = _batch([PAGE_TOKENS, PAGE_TOKENS], seed=6)
    store.put(["w3 changed", "new"], fresh, [PAGE_TOKENS, PAGE_TOKENS])
    assert store.pages == 101 and len(store) == 100
    assert "w0" not in store and "w1" not in store and "w2" in store  # least recently used
    got = store.gather(["new", "w3 changed"], torch.float32)
    assert got is not None
    assert torch.equal(got[0][0], fresh[1]) and torch.equal(got[0][1], fresh[0])


@pytest.mark.parametrize("kind", ["paged", "int8"])
def test_missing_lists_each_text_not_kept_once_in_order(kind: str) -> None:
    store = (
        PagedItemStates(torch.float32, capacity=10) if kind == "paged" else Int8ItemStates(2, 10)
    )
    store.put(["a", "c"], _batch([2, 3]), [2, 3])
    assert store.missing(["d", "a", "b", "d", "c", "e"]) == ["d", "b", "e"]
    assert store.missing(["a", "c"]) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise is Linux's")
def test_release_pages_gives_a_tensor_s_whole_pages_back_chunk_by_chunk() -> None:
    tensor = torch.full((3 << 20,), 7.0)  # 12 MiB: allocated by mmap, page-aligned inside
    released = release_pages(tensor, chunk=1 << 20)
    assert released >= tensor.numel() * 4 - 2 * 4096  # all but the partial pages at the ends
    assert released % 4096 == 0
    assert int((tensor == 0).sum()) * 4 >= released  # the pages given back read as zeros


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise is Linux's")
def test_a_store_that_goes_gives_its_arena_back_and_a_shared_one_keeps_it() -> None:
    """A swapped-out version's arena is one allocation of GBs; freed at once it is one long
    unmap that stops every thread mapping memory meanwhile (stop 34)."""
    store = PagedItemStates(torch.float32, capacity=100)
    store.expect([8] * 40_000)  # an arena of ~320,000 rows of 6: ~7 MiB
    lengths = [5, 8, 3]
    store.put([f"item {i}" for i in range(3)], _batch(lengths), lengths)
    arena = store._arena
    assert arena is not None and arena.numel() * 4 > 4 << 20
    arena.fill_(1.0)  # every page written, as a warmed arena's are
    also = store  # a newer version sharing the store (`share_item_states`)
    del store
    assert int((arena != 0).sum()) == arena.numel()  # still in use: untouched
    del also
    # Given back: only the partial pages at the allocation's two ends still hold values.
    assert int((arena != 0).sum()) * 4 <= 2 * 4096
