"""Item-side states on disk (model/item_state_snapshot.py): what a process reads back is what
another one held, found by text, under the fingerprint of the item side that computed it."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import split_reranker

from model.item_state_snapshot import (
    INDEX,
    META,
    ROWS,
    ItemStateSnapshot,
    _groups,
    prune,
    write_snapshot,
)
from model.item_states import PagedItemStates
from model.reranker import CrossEncoderReranker

ITEMS = [
    "red running shoes, sports, popular",
    "blue denim jacket, fashion",
    "espresso machine with milk frother, kitchen, new arrival",
    "paperback novel, books",
    "wireless earbuds, electronics, popular",
]
USER = "recently viewed: running shoes, earbuds"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _store(
    lengths: list[int], dtype: torch.dtype = torch.float16
) -> tuple[PagedItemStates, list[str]]:
    g = torch.Generator().manual_seed(7)
    states = torch.randn((len(lengths), max(lengths), 6), generator=g) + 10.0
    store = PagedItemStates(dtype, capacity=1000)
    texts = [f"item {i}: {'x' * i}" for i in range(len(lengths))]
    store.put(texts, states, lengths)
    return store, texts


def _gathered(store: PagedItemStates, texts: list[str]) -> torch.Tensor:
    got = store.gather(texts, torch.float32)
    assert got is not None
    return got[0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_states_read_back_are_the_states_written_found_by_text(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    lengths = [3, 17, 1, 8, 9, 24, 2, 11]
    held, texts = _store(lengths, dtype)
    # Small chunks on both sides: several writes and several reads, reassembled in order.
    info = write_snapshot(tmp_path, "fp", held.export(max_rows=10))
    assert info is not None and (info.items, info.rows, info.width) == (8, sum(lengths), 6)
    snapshot = ItemStateSnapshot.open(tmp_path, "fp")
    assert snapshot is not None and len(snapshot) == 8 and snapshot.info.dtype == dtype
    wanted = [texts[5], "never written", texts[0], texts[3], texts[7]]
    assert (snapshot.find(wanted) >= 0).tolist() == [True, False, True, True, True]
    assert sorted(snapshot.lengths(wanted).tolist()) == sorted([24, 3, 8, 11])
    fresh = PagedItemStates(dtype, capacity=1000)
    for names, rows, counts in snapshot.read(wanted, chunk_bytes=5 * 6 * 4):
        assert rows.dtype == dtype and rows.shape == (sum(counts), 6)
        fresh.put_rows(names, rows, counts)
    assert fresh.missing(wanted) == ["never written"]
    found = [t for t in wanted if t != "never written"]
    assert torch.equal(_gathered(fresh, found), _gathered(held, found))


def test_export_leaves_the_recency_order_alone(tmp_path: Path) -> None:
    held, texts = _store([2, 3, 4])
    held.gather([texts[0]], torch.float32)  # texts[0] now the most recently used
    before = held.recent(3)
    list(held.export(max_rows=1))
    assert held.recent(3) == before == [texts[0], texts[2], texts[1]]


def test_a_snapshot_that_does_not_read_whole_is_not_used(tmp_path: Path) -> None:
    held, _ = _store([4, 5, 6])
    write_snapshot(tmp_path, "fp", held.export(max_rows=100))
    assert ItemStateSnapshot.open(tmp_path, "other") is None  # none written for it
    rows = tmp_path / "fp" / ROWS
    data = rows.read_bytes()
    rows.write_bytes(data[:-2])  # a torn file
    assert ItemStateSnapshot.open(tmp_path, "fp") is None
    rows.write_bytes(data)
    meta = json.loads((tmp_path / "fp" / META).read_text())
    (tmp_path / "fp" / META).write_text(json.dumps({**meta, "format": 99}))
    assert ItemStateSnapshot.open(tmp_path, "fp") is None
    (tmp_path / "fp" / META).write_text(json.dumps(meta))
    assert ItemStateSnapshot.open(tmp_path, "fp") is not None


def test_a_text_whose_64_bit_key_matches_but_whose_digest_does_not_is_not_found(
    tmp_path: Path,
) -> None:
    held, texts = _store([4, 5])
    write_snapshot(tmp_path, "fp", held.export(max_rows=100))
    index = np.load(tmp_path / "fp" / INDEX)
    index["check"][0] ^= 1  # as if another text shared the first 64 bits
    np.save(tmp_path / "fp" / INDEX, index)
    snapshot = ItemStateSnapshot.open(tmp_path, "fp")
    assert snapshot is not None
    assert sorted(snapshot.find(texts).tolist()) == [-1, 1]


def test_writing_again_replaces_the_snapshot_and_only_the_newest_are_kept(
    tmp_path: Path,
) -> None:
    held, _ = _store([4, 5, 6])
    write_snapshot(tmp_path, "a", held.export(max_rows=100))
    smaller, _ = _store([4])
    write_snapshot(tmp_path, "a", smaller.export(max_rows=100))
    snapshot = ItemStateSnapshot.open(tmp_path, "a")
    assert snapshot is not None and len(snapshot) == 1
    for name in ("b", "c"):
        time.sleep(0.01)  # distinct modification times
        write_snapshot(tmp_path, name, held.export(max_rows=100), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "c"]
    stale = tmp_path / ".c.123.456"
    stale.mkdir()
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    assert stale in prune(tmp_path, keep=2) and not stale.exists()
    assert write_snapshot(tmp_path, "d", PagedItemStates(torch.float16, 10).export(10)) is None
    assert not (tmp_path / "d").exists()


def _split(seed: int = 3) -> CrossEncoderReranker:
    return split_reranker(1, seed)


def _written(root: Path) -> tuple[CrossEncoderReranker, str]:
    """A re-ranker that computed the states of ITEMS and wrote them under `root`, and its
    item side's fingerprint."""
    first = _split()
    first.warm_items(ITEMS)
    fingerprint = first.item_side_fingerprint()
    assert fingerprint is not None
    first.save_item_states(root)
    return first, fingerprint


def test_a_reranker_that_reads_the_states_back_scores_as_the_one_that_computed_them(
    tmp_path: Path,
) -> None:
    first = _split()
    assert first.warm_items(ITEMS) == len(ITEMS)
    fingerprint = first.item_side_fingerprint()
    assert fingerprint is not None
    info = first.save_item_states(tmp_path)
    assert info is not None and info.items == len(ITEMS) and info.fingerprint == fingerprint
    second = _split()  # a restart: the same weights, nothing cached
    assert second.item_side_fingerprint() == fingerprint
    snapshot = ItemStateSnapshot.open(tmp_path, fingerprint)
    assert snapshot is not None
    assert second.load_item_states(snapshot, [*ITEMS, "a text nobody wrote"]) == len(ITEMS)
    assert second.load_item_states(snapshot, ITEMS) == 0  # kept already
    assert second.warm_items(ITEMS) == 0  # nothing left to compute
    np.testing.assert_array_equal(
        second.score(USER, ITEMS, cache=False), first.score(USER, ITEMS, cache=False)
    )
    assert second.warm_items([*ITEMS, "a text nobody wrote"]) == 1


def test_the_fingerprint_follows_the_text_budget_not_the_joint_layer_or_the_head() -> None:
    # The item side's weights changing or not: tests/unit/test_split_encoder.py.
    base = _split()
    tuned = _split()
    with torch.no_grad():
        next(tuned.model.bert.encoder.layer[1].parameters()).add_(1e-3)
        next(tuned.model.classifier.parameters()).add_(1e-3)
    assert tuned.item_side_fingerprint() == base.item_side_fingerprint()
    short = CrossEncoderReranker.tiny(seed=3, max_length=32, joint_layers=1)
    longer = CrossEncoderReranker.tiny(seed=3, max_length=48, joint_layers=1)
    assert short.item_side_fingerprint() != longer.item_side_fingerprint()


def test_int8_states_and_a_full_cross_encoder_have_no_snapshot(tmp_path: Path) -> None:
    cross = CrossEncoderReranker.tiny(seed=3, max_length=32)
    assert cross.item_side_fingerprint() is None and cross.save_item_states(tmp_path) is None
    int8 = _split()
    int8.quantize_item_states()
    int8.warm_items(ITEMS)
    assert int8.item_side_fingerprint() is None and int8.save_item_states(tmp_path) is None
    assert not list(tmp_path.iterdir())


def test_items_are_read_together_when_near_and_apart_when_far() -> None:
    # Rows [0,4) [4,9) [9,12) then a gap of 100 rows, [112,140) (longer than a chunk), [140,143).
    starts = np.array([0, 4, 9, 112, 140])
    ends = np.array([4, 9, 12, 140, 143])
    assert _groups(starts, ends, most_rows=10, gap_rows=50) == [(0, 2), (2, 3), (3, 4), (4, 5)]
    assert _groups(starts, ends, most_rows=200, gap_rows=50) == [(0, 3), (3, 5)]
    assert _groups(starts, ends, most_rows=200, gap_rows=100) == [(0, 5)]
    # A warm-up's whole file in order: contiguous, so only the chunk size splits it.
    assert _groups(np.arange(0, 100, 10), np.arange(10, 110, 10), 30, 0) == [
        (0, 3),
        (3, 6),
        (6, 9),
        (9, 10),
    ]


def test_an_open_snapshot_reads_its_own_rows_after_another_process_replaces_it(
    tmp_path: Path,
) -> None:
    held, texts = _store([4, 5, 6])
    write_snapshot(tmp_path, "fp", held.export(max_rows=100))
    opened = ItemStateSnapshot.open(tmp_path, "fp")
    assert opened is not None
    other, _ = _store([9, 2, 7, 3, 1])  # other lengths: another layout of rows.bin
    write_snapshot(tmp_path, "fp", other.export(max_rows=100))
    fresh = PagedItemStates(torch.float16, capacity=100)
    for names, rows, counts in opened.read(texts):
        fresh.put_rows(names, rows, counts)
    assert torch.equal(_gathered(fresh, texts), _gathered(held, texts))
    opened.close()


def test_a_request_reads_a_missing_items_states_from_the_source_instead_of_computing(
    tmp_path: Path,
) -> None:
    first, fingerprint = _written(tmp_path)
    serving = _split()
    serving.item_state_source = ItemStateSnapshot.open(tmp_path, fingerprint)
    # Nothing warmed: the request's candidates come from disk, and only the new text is
    # computed (the forward pass of its states would otherwise run for all of them).
    new_text = "a text nobody wrote"
    scores = serving.score(USER, [*ITEMS, new_text], cache=False)
    assert serving.item_states_read == len(ITEMS) and serving.cached_items() == len(ITEMS) + 1
    np.testing.assert_array_equal(scores, first.score(USER, [*ITEMS, new_text], cache=False))
    # Weights that change (training) drop the source with the states; copies start without.
    assert serving.__getstate__()["item_state_source"] is None
    serving.clear_item_states()
    assert serving.item_state_source is None
    assert serving.warm_items(ITEMS) == len(ITEMS)


def test_a_source_that_cannot_be_read_is_dropped_and_the_states_computed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, fingerprint = _written(tmp_path)
    serving = _split()
    source = ItemStateSnapshot.open(tmp_path, fingerprint)
    assert source is not None
    with open(tmp_path / fingerprint / ROWS, "r+b") as rows:
        rows.truncate(10)  # as a lost disk reads
    serving.item_state_source = source
    assert serving.warm_items(ITEMS) == len(ITEMS)
    assert serving.item_state_source is None and "no longer read from" in caplog.text


def test_a_snapshot_replaced_while_it_is_opened_is_never_read_half_old_half_new(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import model.item_state_snapshot as snapshots

    held, texts = _store([4, 5, 6])
    write_snapshot(tmp_path, "fp", held.export(max_rows=100))
    other, _ = _store([6, 5, 4])  # the same texts and rows in all, laid out otherwise
    opened = snapshots._opened
    replaced = []

    def replace_first(name: str, directory: int) -> object:
        if not replaced:  # another process writes its snapshot after the rows file is open
            replaced.append(write_snapshot(tmp_path, "fp", other.export(max_rows=100)))
        return opened(name, directory)

    monkeypatch.setattr(snapshots, "_opened", replace_first)
    snapshot = ItemStateSnapshot.open(tmp_path, "fp")
    assert replaced
    if snapshot is not None:  # whichever it opened, its rows are its own index's
        fresh = PagedItemStates(torch.float16, capacity=100)
        for names, rows, counts in snapshot.read(texts):
            fresh.put_rows(names, rows, counts)
        got = _gathered(fresh, texts)
        assert torch.equal(got, _gathered(held, texts)) or torch.equal(got, _gathered(other, texts))
