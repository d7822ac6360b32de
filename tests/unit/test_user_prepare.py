"""UserSidePreparer (services/ranking/user_prepare.py): contexts queued off the request path,
prepared a chunk at a time, each chunk behind the model calls queued meanwhile."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest

from freshrec.records import UserProfile
from model.text import user_context_text
from services.ranking import user_prepare
from services.ranking.user_prepare import CHUNK, UserSidePreparer


class QueueWorker:
    """A TorchWorker that only queues: the test runs the jobs, in order."""

    def __init__(self) -> None:
        self.jobs: list[Callable[[], Any]] = []

    def submit(self, fn: Callable[[], Any]) -> None:
        self.jobs.append(fn)

    def run_next(self) -> None:
        self.jobs.pop(0)()


class RecordingReranker:
    def __init__(self, fail_first: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.fail_first = fail_first

    def prepare_users(self, texts: Sequence[str]) -> int:
        self.calls.append(list(texts))
        if self.fail_first and len(self.calls) == 1:
            raise RuntimeError("no model")
        return len(texts)


def _profiles(n: int, start: int = 0) -> list[UserProfile]:
    return [
        UserProfile(f"u{i}", recent_items=(f"i{i}",), recent_text=f"Item {i}")
        for i in range(start, start + n)
    ]


def _preparer(reranker: RecordingReranker) -> tuple[UserSidePreparer, QueueWorker]:
    worker = QueueWorker()
    return UserSidePreparer(worker, lambda: reranker), worker  # type: ignore[arg-type]


def test_contexts_go_a_chunk_at_a_time_each_behind_what_was_queued_meanwhile() -> None:
    reranker = RecordingReranker()
    preparer, worker = _preparer(reranker)
    preparer(_profiles(CHUNK * 2 + 3))
    preparer(_profiles(2, start=100))  # a run is queued already: no second one
    assert len(worker.jobs) == 1 and preparer.waiting == CHUNK * 2 + 5

    worker.submit(lambda: reranker.calls.append(["a request"]))
    worker.run_next()
    # Oldest first, CHUNK of them; the next chunk queued behind the request.
    assert reranker.calls == [[user_context_text(p) for p in _profiles(CHUNK)]]
    worker.run_next()
    assert reranker.calls[-1] == ["a request"]
    worker.run_next()
    worker.run_next()
    assert [len(c) for c in reranker.calls] == [CHUNK, 1, CHUNK, 5]
    assert reranker.calls[-1][-1] == user_context_text(_profiles(1, start=101)[0])
    assert worker.jobs == [] and preparer.waiting == 0

    preparer(_profiles(1, start=200))  # idle again: a new run
    assert len(worker.jobs) == 1


def test_a_context_queued_again_waits_once_at_its_newest_place() -> None:
    reranker = RecordingReranker()
    preparer, worker = _preparer(reranker)
    preparer(_profiles(3))
    preparer(_profiles(1))  # u0 again, same context
    assert preparer.waiting == 3
    worker.run_next()
    assert reranker.calls == [[user_context_text(p) for p in _profiles(3)[1:] + _profiles(1)]]


def test_a_failed_chunk_is_logged_and_the_rest_still_prepared(
    caplog: pytest.LogCaptureFixture,
) -> None:
    reranker = RecordingReranker(fail_first=True)
    preparer, worker = _preparer(reranker)
    preparer(_profiles(CHUNK + 1))
    worker.run_next()
    assert f"could not prepare the user side of {CHUNK} contexts" in caplog.text
    worker.run_next()
    assert len(reranker.calls) == 2 and worker.jobs == []


def test_past_the_cap_the_oldest_contexts_are_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(user_prepare, "MAX_WAITING", 4)
    reranker = RecordingReranker()
    preparer, worker = _preparer(reranker)
    preparer(_profiles(6))
    assert preparer.waiting == 4
    worker.run_next()
    assert reranker.calls == [[user_context_text(p) for p in _profiles(4, start=2)]]
