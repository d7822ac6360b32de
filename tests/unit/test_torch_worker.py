"""services/ranking/compute.py: the ranking process's one torch thread."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from services.ranking.compute import TorchWorker, WorkerEncoder, in_passing_thread


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


def test_a_thread_cannot_ask_for_a_higher_priority() -> None:
    from services.ranking.compute import lower_thread_priority

    with pytest.raises(ValueError, match="steps must be >= 0"):
        lower_thread_priority(-1)
