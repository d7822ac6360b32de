"""services/ranking/compute.py: the ranking process's one torch thread."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from model.reranker import CrossEncoderReranker
from services.ranking.compute import (
    FIRST_SLICE,
    TorchWorker,
    WorkerEncoder,
    in_passing_thread,
    warm_between_requests,
)


def test_the_worker_runs_calls_in_order_on_one_thread_and_returns_their_results() -> None:
    worker = TorchWorker()
    try:
        names = [worker.call(lambda: threading.current_thread().name) for _ in range(5)]
        assert len(set(names)) == 1 and names[0] != threading.current_thread().name
        order: list[int] = []
        futures = [worker.submit(order.append, i) for i in range(20)]
        for f in futures:
            f.result()
        assert order == list(range(20))
        assert worker.call(lambda a, b=0: a + b, 2, b=3) == 5
    finally:
        worker.close()


def test_the_worker_hands_errors_to_the_caller_and_keeps_working() -> None:
    worker = TorchWorker()
    try:
        with pytest.raises(ZeroDivisionError):
            worker.call(lambda: 1 / 0)
        assert worker.call(lambda: "still here") == "still here"
    finally:
        worker.close()


def test_the_worker_sets_its_torch_threads() -> None:
    import torch

    worker = TorchWorker(threads=1)
    try:
        assert worker.call(torch.get_num_threads) == 1
    finally:
        worker.close()


def test_a_worker_encoder_encodes_on_the_worker() -> None:
    class Encoder:
        dim = 3

        def __init__(self) -> None:
            self.threads: list[str] = []

        def encode(self, texts, batch_size=128):  # type: ignore[no-untyped-def]
            self.threads.append(threading.current_thread().name)
            return np.full((len(texts), self.dim), float(batch_size), dtype=np.float32)

    inner, worker = Encoder(), TorchWorker()
    try:
        encoder = WorkerEncoder(inner, worker)
        out = encoder.encode(["a", "b"], batch_size=4)
        assert out.shape == (2, 3) and float(out[0, 0]) == 4.0
        assert encoder.dim == 3
        assert inner.threads == [worker.call(lambda: threading.current_thread().name)]
    finally:
        worker.close()


def test_in_passing_thread_returns_raises_and_ends_its_thread() -> None:
    seen: list[threading.Thread] = []

    def work(x: int) -> int:
        seen.append(threading.current_thread())
        return x * 2

    assert in_passing_thread(work, 21) == 42
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()

    def fail() -> None:
        raise ValueError("bad version")

    with pytest.raises(ValueError, match="bad version"):
        in_passing_thread(fail)


def _split_reranker() -> CrossEncoderReranker:
    import torch

    reranker = CrossEncoderReranker.tiny(seed=3, max_length=32, joint_layers=1)
    with torch.no_grad():  # random tiny BERTs score everything alike: spread the weights
        for p in reranker.model.parameters():
            p.mul_(4.0)
    reranker.item_state_dtype = torch.float32
    return reranker


TEXTS = [
    f"Item {i} [{'Toys' if i % 2 else 'Books'}]. {'A red ball. ' * (i % 4)}" for i in range(12)
]


@pytest.mark.parametrize(("slice_s", "calls"), [(1e-9, 1 + len(TEXTS) - FIRST_SLICE), (60.0, 2)])
def test_a_warm_up_between_requests_computes_what_one_at_once_does(
    slice_s: float, calls: int
) -> None:
    at_once, sliced = _split_reranker(), _split_reranker()
    at_once.warm_items(TEXTS)
    worker = TorchWorker()
    try:
        # Slices sized from the time per item: one item each when any item takes longer than
        # the slice, else as many as MAX_SLICE; the first is FIRST_SLICE either way.
        assert warm_between_requests(sliced, TEXTS + TEXTS[:3], worker, slice_s) == (
            len(TEXTS),
            calls,
        )
        assert warm_between_requests(sliced, TEXTS, worker, slice_s) == (0, 0)
    finally:
        worker.close()
    assert sliced.cached_items() == len(TEXTS)
    user = "recent: star wars | alien. likes: sci-fi."
    np.testing.assert_allclose(sliced.score(user, TEXTS), at_once.score(user, TEXTS), atol=1e-6)


def test_a_request_that_arrives_during_a_slice_runs_before_the_next_one() -> None:
    reranker = _split_reranker()
    entered, release = threading.Event(), threading.Event()
    warm = reranker.warm_items

    def held(texts: list[str], *args: object) -> int:
        entered.set()
        release.wait(10)
        return warm(texts)

    reranker.warm_items = held  # type: ignore[method-assign]
    worker = TorchWorker()
    got: list[tuple[int, int]] = []
    try:
        loader = threading.Thread(
            target=lambda: got.append(warm_between_requests(reranker, TEXTS, worker, 1e-9))
        )
        loader.start()
        assert entered.wait(10)
        request = worker.submit(reranker.cached_items)  # a "request" queued behind slice one
        release.set()
        loader.join(10)
        # It ran after the first slice and before the second, not after the whole warm-up.
        assert request.result(10) == FIRST_SLICE
        assert got == [(len(TEXTS), 1 + len(TEXTS) - FIRST_SLICE)]
    finally:
        release.set()
        worker.close()
