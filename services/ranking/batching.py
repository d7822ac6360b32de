"""Micro-batching of the re-rank stage: concurrent requests share one model call.

gRPC answers each request on its own worker thread. Left alone, eight of them would run the
re-ranker at once on two cores: each forward pass spreads over torch's intra-op threads, the
threads oversubscribe the cores, and throughput falls below what one client gets (measured:
26 req/s at concurrency 8 vs 37 at concurrency 1). And every request thread that runs torch
gets an OpenMP team of its own, which slows every forward pass in the process
(services/ranking/compute.py). So the model runs on one thread, the `TorchWorker`: a request
queues its job and hands the worker a drain; the worker scores every job waiting at that
moment (up to `max_batch`) in one call (`CrossEncoderReranker.score_many`, which batches their
user passes), and goes on until the queue is empty; each request waits for its result. A request
that arrives while the model is idle is scored at once, alone; batches form only from requests
that arrived while a model call was running.
"""

from __future__ import annotations

import queue
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from services.ranking.compute import TorchWorker


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
    """One model call at a time, on the worker; waiting requests scored together (module
    docstring)."""

    def __init__(self, max_batch: int = 16, worker: TorchWorker | None = None) -> None:
        """Args:
        worker: the thread that runs the model; None = a worker of the batcher's own.
        """
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch = max_batch
        self.worker = worker or TorchWorker()
        self._queue: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self.batches = 0
        self.requests = 0

    def score(self, scorer: BatchScorer, user_text: str, item_texts: Sequence[str]) -> np.ndarray:
        """Relevance of `item_texts` for `user_text` by `scorer`.

        Raises:
            Whatever the scorer raised for the batch this request was in.
        """
        job = _Job(scorer, user_text, item_texts)
        self._queue.put(job)
        # Every queued job is followed by a drain on the worker, so some drain that starts
        # after the put takes it; drains that find the queue empty return at once.
        self.worker.submit(self._drain)
        return job.done.result()

    def _drain(self) -> None:
        while True:
            jobs: list[_Job] = []
            while len(jobs) < self.max_batch:
                try:
                    jobs.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if not jobs:
                return
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
