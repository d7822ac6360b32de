"""The re-rank micro-batcher (services/ranking/batching.py) and `score_many` behind it."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from model.reranker import CrossEncoderReranker
from services.ranking.batching import RerankBatcher

USERS = ["recent: star wars | alien. likes: sci-fi.", "new visitor.", "query: cowboy toys."]
ITEMS = [
    "Toy Story [Animation] by Pixar. A cowboy doll meets a space ranger.",
    "Heat [Crime]. Thieves and detectives in Los Angeles.",
    "Alien [Sci-Fi]. In space no one can hear you scream.",
]


class SlowScorer:
    """Scores = len(user) + index of the item; records the batches it was given."""

    def __init__(self, seconds: float = 0.05, fail: bool = False) -> None:
        self.seconds = seconds
        self.fail = fail
        self.batches: list[int] = []
        self.running = 0
        self.most_at_once = 0

    def score_many(self, requests: Sequence[tuple[str, Sequence[str]]]) -> list[np.ndarray]:
        self.batches.append(len(requests))
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        time.sleep(self.seconds)
        self.running -= 1
        if self.fail:
            raise ValueError("model exploded")
        return [np.arange(len(items), dtype=np.float32) + len(user) for user, items in requests]


@pytest.fixture
def batcher() -> RerankBatcher:
    return RerankBatcher(max_batch=4)


def _concurrently(n: int, fn) -> list[object]:  # type: ignore[no-untyped-def]
    out: list[object] = [None] * n

    def run(i: int) -> None:
        try:
            out[i] = fn(i)
        except Exception as exc:
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return out


def test_concurrent_requests_share_model_calls_and_get_their_own_answers(
    batcher: RerankBatcher,
) -> None:
    scorer = SlowScorer()
    results = _concurrently(10, lambda i: batcher.score(scorer, "u" * i, ITEMS[: 1 + i % 3]))
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result, np.arange(1 + i % 3) + i)  # type: ignore[arg-type]
    assert sum(scorer.batches) == 10
    assert len(scorer.batches) < 10  # requests that waited were scored together
    assert max(scorer.batches) <= 4
    assert scorer.most_at_once == 1  # never two model calls at once


def test_every_model_call_runs_on_the_worker_thread(batcher: RerankBatcher) -> None:
    """One torch thread in the process (services/ranking/compute.py): a request thread never
    runs the model, alone or in a batch."""
    seen: list[str] = []

    class Recorder(SlowScorer):
        def score_many(self, requests):  # type: ignore[no-untyped-def]
            seen.append(threading.current_thread().name)
            return super().score_many(requests)

    scorer = Recorder(seconds=0.01)
    assert batcher.score(scorer, "u", ITEMS).tolist() == [1.0, 2.0, 3.0]
    assert scorer.batches == [1]  # a lone request is scored at once, alone
    _concurrently(6, lambda i: batcher.score(scorer, "u", ITEMS))
    assert sum(scorer.batches) == 7
    assert len(set(seen)) == 1 and seen[0].startswith("freshrec-torch")
    assert seen[0] != threading.current_thread().name


def test_a_failing_batch_raises_in_every_request_of_it(batcher: RerankBatcher) -> None:
    scorer = SlowScorer(fail=True)
    results = _concurrently(5, lambda i: batcher.score(scorer, "u", ITEMS))
    assert all(isinstance(r, ValueError) and "exploded" in str(r) for r in results)
    assert batcher.score(SlowScorer(seconds=0.0), "ok", ITEMS[:1]).tolist() == [2.0]


def test_requests_of_two_versions_are_scored_by_their_own_version(batcher: RerankBatcher) -> None:
    old, new = SlowScorer(), SlowScorer()
    results = _concurrently(
        8, lambda i: (i % 2, batcher.score(old if i % 2 else new, "uu", ITEMS[:2]))
    )
    assert sum(old.batches) == 4 and sum(new.batches) == 4
    assert all(r[1].tolist() == [2.0, 3.0] for r in results)  # type: ignore[index]


def test_max_batch_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        RerankBatcher(max_batch=0)


@pytest.mark.parametrize("joint", [None, 1])
def test_score_many_equals_score_request_by_request(joint: int | None) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = CrossEncoderReranker.tiny(seed=3, max_length=32, joint_layers=joint)
        with torch.no_grad():
            for p in model.model.parameters():
                p.mul_(4.0)
        model.item_state_dtype = torch.float32
        requests = [(USERS[0], ITEMS), (USERS[1], ITEMS[1:]), (USERS[0], ITEMS[:1]), (USERS[2], [])]
        together = model.score_many(requests)
        alone = [
            model.score(u, items, cache=False) if items else np.zeros(0) for u, items in requests
        ]
        for a, b in zip(together, alone, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5)
        assert float(np.ptp(together[0])) > 1e-3
        if joint:  # distinct contexts with items were one user pass, then cache hits
            assert model.user_cache_misses == 2
    finally:
        torch.set_num_threads(threads)
