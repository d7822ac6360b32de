"""The ranking process's one torch thread.

torch's CPU wheels run intra-op parallelism on GNU OpenMP (libgomp). libgomp gives every thread
that runs a parallel region its own team of worker threads, kept for that thread's lifetime.
While the process holds no more OpenMP threads than CPUs, a team's workers spin between
regions and the next region starts at once; once it holds more, libgomp throttles the spin to
almost nothing and every region pays a futex wake-up. A split re-ranker's forward pass is ~100
small ops, so on 2 cores a second long-lived torch thread (a second team) doubles its cost.
Measured on the 2-core EPYC (bench-ml workdir, 70 candidates, user pass included): 9.6 ms with
one torch thread in the process, 9.3 ms after a short-lived thread ran torch and exited, 20.7 ms
once a second long-lived thread had run one matrix product. gRPC answers each request on
whichever worker of its pool is free, so re-ranking on the request threads meant one team per
gRPC worker.

So the ranking service runs every torch call of its request path (re-rank, query and catalogue
embedding) on one long-lived thread, `TorchWorker`, and loads and warms new model versions on a
thread that ends when the load does (`in_passing_thread`): its team goes with it.

While a version loads, its thread and team compete with the serving team for the same two
cores, and an OpenMP region of a request's forward pass waits at its barrier for whichever of
its threads the loader pushed off a core. So the model watcher runs at a lower CPU priority
(`lower_thread_priority`; the threads it starts inherit it): the load takes the cores requests
leave idle (docs/performance-log.md, stop 32).
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

import numpy as np

from model.embeddings import Embedder

T = TypeVar("T")


class TorchWorker:
    """One long-lived thread that runs the callables it is given, in order of submission."""

    def __init__(self, name: str = "freshrec-torch", threads: int | None = None) -> None:
        """Args:
        threads: torch's intra-op threads on the worker; None keeps torch's default (the
            process-wide setting, e.g. `model.torch_threads`).
        """
        self._pool = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix=name,
            initializer=partial(_set_threads, threads) if threads else None,
        )

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
        return self._pool.submit(fn, *args, **kwargs)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn(*args, **kwargs)` on the worker and return its result (or raise its error)."""
        return self.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        """Finish what was submitted, then end the thread."""
        self._pool.shutdown(wait=True)


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


class WorkerEncoder:
    """A text encoder whose `encode` runs on a `TorchWorker` (same interface as `TextEncoder`
    for what the ranking service uses: `encode` and `dim`)."""

    def __init__(self, encoder: Embedder, worker: TorchWorker) -> None:
        self.encoder = encoder
        self.worker = worker

    @property
    def dim(self) -> int:
        return int(self.encoder.dim)

    def encode(self, texts: Sequence[str], batch_size: int = 128) -> np.ndarray:
        result: np.ndarray = self.worker.call(self.encoder.encode, texts, batch_size)
        return result


def in_passing_thread(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` on a new thread that ends with it (the executor's shutdown joins it);
    returns its result or raises its error."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="freshrec-load") as pool:
        return pool.submit(fn, *args).result()


def lower_thread_priority(steps: int) -> int:
    """Make the calling thread `steps` nice levels nicer than it is (19 at most); threads it
    starts afterwards inherit the value. Returns the thread's nice value afterwards. Linux
    only, where the nice value is per thread; elsewhere (or for 0 steps) nothing changes.

    Raises:
        ValueError: `steps` is negative (a higher priority needs privileges).
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not sys.platform.startswith("linux"):
        return os.getpriority(os.PRIO_PROCESS, 0)
    thread = threading.get_native_id()
    nice = min(19, os.getpriority(os.PRIO_PROCESS, thread) + steps)
    os.setpriority(os.PRIO_PROCESS, thread, nice)
    return nice
