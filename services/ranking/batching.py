"""Micro-batching of the re-rank stage: concurrent requests share one model call.

gRPC answers each request on its own worker thread. Left alone, eight of them run the
re-ranker at once on two cores: each forward pass spreads over torch's intra-op threads, the
threads oversubscribe the cores, and throughput falls below what one client gets (measured:
26 req/s at concurrency 8 vs 37 at concurrency 1). Here one thread runs the model: a request
hands its (user text, item texts) over and waits; the thread takes whatever requests are
waiting (up to `max_batch`) and scores them together (`CrossEncoderReranker.score_many`, which
batches their user passes). No request waits for a batch to fill: a request that arrives while
the model is idle runs at once, alone; batches form only from requests that arrived while the
previous batch ran.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)


class BatchScorer(Protocol):
    """What the batcher needs from a re-ranker."""

    def score_many(self, requests: Sequence[tuple[str, Sequence[str]]]) -> list[np.ndarray]: ...


@dataclass
class _Job:
    scorer: BatchScorer
    user_text: str
    item_texts: Sequence[str]
    done: Future[np.ndarray] = field(default_factory=Future)


class RerankBatcher:
    """One model thread scoring waiting requests together (see the module docstring)."""

    def __init__(self, max_batch: int = 16) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.batches = 0
        self.requests = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="rerank-batcher", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the requests already handed over, then stop the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def score(self, scorer: BatchScorer, user_text: str, item_texts: Sequence[str]) -> np.ndarray:
        """Relevance of `item_texts` for `user_text` by `scorer`, computed on the model thread.

        Raises:
            RuntimeError: the batcher is not running.
            Whatever the scorer raised for this batch.
        """
        if self._thread is None:
            raise RuntimeError("RerankBatcher.start() must be called before score()")
        job = _Job(scorer, user_text, item_texts)
        self._queue.put(job)
        return job.done.result()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            jobs = [first]
            while len(jobs) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                    break
                jobs.append(nxt)
            self._score(jobs)

    def _score(self, jobs: list[_Job]) -> None:
        # A hot swap can leave requests of two versions in one batch: each version scores
        # its own requests, so no answer mixes versions.
        groups: dict[int, list[_Job]] = {}
        for job in jobs:
            groups.setdefault(id(job.scorer), []).append(job)
        for group in groups.values():
            try:
                results = group[0].scorer.score_many([(j.user_text, j.item_texts) for j in group])
            except Exception as exc:  # handed to each waiting request, which raises it
                for job in group:
                    job.done.set_exception(exc)
                continue
            for job, result in zip(group, results, strict=True):
                job.done.set_result(result)
        self.batches += 1
        self.requests += len(jobs)
