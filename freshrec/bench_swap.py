"""`freshrec bench swap`: what a model hot swap costs the requests served while it happens.

The updater publishes a new re-ranker version every time it promotes a challenger, and the
ranking service loads it while it keeps serving the old one (services/ranking/models.py). With a
split re-ranker the load may include the item-side states of the warm set (`ranking.
warm_item_states`): the same forward passes as at start-up, on the same two cores that serve
requests, unless the new version keeps the serving one's (`CrossEncoderReranker.
share_item_states`: an update that froze the layers below the split, the default).
`freshrec bench serving` serves one version and never sees a swap. This bench does:

1. In an initialised workdir (e.g. one `freshrec bench serving --items N` bootstrapped), it
   publishes a challenger before anything is timed: the champion with the layers an update
   fine-tunes (those above what `training.incremental_freeze_layers` freezes, and the head)
   moved by a small deterministic step. The ranking service cannot tell it from a fine-tuned
   version: which layers changed decides what a load recomputes, not by how much.
2. It starts the ranking service in this process (as `bench serving` does), drives Recommend
   from K clients, promotes the challenger after `--before` seconds, and keeps the load going
   until the service serves the new version, then `--after` seconds more.
3. Each call counts in the window it started in: `steady` (before the promote), `loading`
   (promote until the service serves the new version: it polls, verifies, loads and prepares
   it), `after`. Per window: calls, errors, p50/p95/p99/max, req/s, and the full garbage
   collections that ended in it (`full_gc`, `full_gc_max_ms`: each stops every thread).
   `load_s` is the loading window's length. RSS is sampled every 0.1 s: a load that computes
   item states holds two versions' for a while.
4. It promotes the old champion again at the end, so the workdir serves what it served before
   (both versions stay in the registry, as after any rollback).

The JSON's last line: `load_s`, `swapped`, `item_states_shared`, `steady`, `loading`, `after`
(each `calls`, `errors`, `p50_ms`, `p95_ms`, `p99_ms`, `max_ms`, `qps`, `full_gc`,
`full_gc_max_ms`), `errors`, `after_user_cache_hit_rate` (the new version's user-state lookups
that found the user's states, each miss a request that ran the whole user pass; null without a
swap), `rss_peak_mb_steady`, `rss_peak_mb_loading`, `rss_mb_end` (once the old version is
gone), `timeline` (from the promote on, in seconds since it: the slowest calls, every full
garbage collection and the service's load milestones), `freeze_layers` (the challenger's
frozen layers), `warm_item_states`, `items`, `machine`.
"""

from __future__ import annotations

import gc
import logging
import os
import platform
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import psutil

from freshrec.config import FreshRecConfig, load_config

# The challenger's step: each fine-tuned tensor moves by this share of its mean magnitude.
CHALLENGER_STEP = 1e-3


def publish_challenger(config: FreshRecConfig, seed: int = 0) -> tuple[str, str, int]:
    """Publish the champion re-ranker with the layers an update fine-tunes moved (module
    docstring, 1); returns (champion, challenger, the encoder layers left frozen). Not
    promoted."""
    import torch

    from model.artifacts import Manifest
    from model.reranker import CrossEncoderReranker
    from model.training import freeze_lower_layers
    from services.ranking.compute import in_passing_thread
    from services.registry import open_registry, required_champion
    from services.updater.job import train_params

    registry = open_registry(config)
    champion = required_champion(
        registry,
        "reranker",
        str(config.workdir),
        "run `freshrec init` (or `freshrec bench serving`, which bootstraps one) first",
    )

    def make() -> tuple[str, int]:
        reranker = CrossEncoderReranker.from_pretrained(
            registry.path("reranker", champion), config.model.max_length, "cpu", "fp32"
        )
        # What the updater freezes in an update from this champion (services/updater/job.py).
        layers = train_params(
            config.training, from_parent=True, item_side_layers=reranker.item_side_layers
        ).freeze_layers
        freeze_lower_layers(reranker, layers)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in reranker.model.parameters():
                if p.requires_grad:
                    scale = CHALLENGER_STEP * float(p.abs().mean()) + 1e-12
                    p.add_(torch.randn(p.shape, generator=generator) * scale)
        sealed = registry.publish_written(
            "reranker",
            reranker.save,
            Manifest(
                kind="reranker",
                version="",
                parent=champion,
                reason=f"bench swap: {champion} with layers {layers + 1}+ and the head moved",
                training={"freeze_layers": layers, "bench_swap_step": CHALLENGER_STEP},
            ),
        )
        return sealed.version, layers

    # torch on a thread that ends with it (services/ranking/compute.py).
    challenger, layers = in_passing_thread(make)
    return champion, challenger, layers


class _Call(NamedTuple):
    """One call. The clients record each as a plain tuple of atomic values, which CPython's
    collector stops tracking (it does not untrack a tuple subclass such as this one): tens
    of thousands of tracked records would make the process's full collections, which the
    bench counts against the service, longer and more frequent."""

    started: float
    ms: float
    ok: bool
    version: str


# Calls listed in `timeline` (the slowest after the promote), and the loggers whose records
# during the run go there: the service's load and swap milestones.
TIMELINE_CALLS = 8
TIMELINE_LOGGERS = ("services.ranking.server", "services.ranking.models")


class _Milestones(logging.Handler):
    """Records of `TIMELINE_LOGGERS` at INFO and above, with their perf_counter time, kept
    from the console (the bench prints warnings only)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[tuple[float, str]] = []
        self._saved: list[tuple[logging.Logger, int, bool]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((time.perf_counter(), record.getMessage()))

    def attach(self) -> _Milestones:
        for name in TIMELINE_LOGGERS:
            logger = logging.getLogger(name)
            self._saved.append((logger, logger.level, logger.propagate))
            logger.setLevel(logging.INFO)
            logger.propagate = False
            logger.addHandler(self)
        return self

    def detach(self) -> None:
        for logger, level, propagate in self._saved:
            logger.removeHandler(self)
            logger.setLevel(level)
            logger.propagate = propagate


def timeline(
    calls: Sequence[_Call],
    pauses: Sequence[tuple[float, int, float]],
    milestones: Sequence[tuple[float, str]],
    promoted: float,
    slowest: int = TIMELINE_CALLS,
) -> list[dict[str, Any]]:
    """What happened from the promote on, in order: the `slowest` calls started since
    (`at_s` is when each started), every full garbage collection (`at_s`: when it ended) and
    the service's milestones, each at seconds since the promote."""
    events: list[tuple[float, str]] = [(at, text) for at, text in milestones if at >= promoted]
    events += [
        (end, f"full garbage collection, {sec * 1e3:.1f} ms")
        for end, gen, sec in pauses
        if gen == 2 and end >= promoted
    ]
    late = sorted((c for c in calls if c.started >= promoted), key=lambda c: -c.ms)[:slowest]
    events += [
        (c.started, f"call {'answered' if c.ok else 'failed'} in {c.ms:.1f} ms") for c in late
    ]
    return [{"at_s": round(at - promoted, 3), "event": text} for at, text in sorted(events)]


@dataclass
class _RssPeaks:
    """Peak RSS per phase, sampled on a thread."""

    phase: str = "steady"
    peaks: dict[str, float] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        process = psutil.Process()
        while not self.stop.is_set():
            rss = process.memory_info().rss / 2**20
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), rss)
            self.stop.wait(0.1)


def window(
    calls: list[_Call],
    start: float,
    end: float,
    pauses: Sequence[tuple[float, int, float]] = (),
) -> dict[str, Any]:
    """Calls that started in [start, end): count, errors, latency percentiles, req/s; and the
    process's full garbage collections that ended in it (`pauses`: (end, generation, s)),
    which stop every thread."""
    full = [sec * 1e3 for at, gen, sec in pauses if gen == 2 and start <= at < end]
    inside = [c for c in calls if start <= c.started < end]
    ms = np.asarray([c.ms for c in inside if c.ok])
    seconds = max(end - start, 1e-9)
    out: dict[str, Any] = {
        "calls": len(inside),
        "errors": sum(not c.ok for c in inside),
        "seconds": round(seconds, 2),
        "qps": round(len(inside) / seconds, 2),
        "full_gc": len(full),
        "full_gc_max_ms": round(max(full, default=0.0), 1),
    }
    if ms.size:
        out |= {
            "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p95_ms": round(float(np.percentile(ms, 95)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "max_ms": round(float(ms.max()), 2),
        }
    return out


def bench_swap(
    workdir: Path,
    concurrency: int = 1,
    before: float = 10.0,
    after: float = 10.0,
    timeout: float = 900.0,
    candidates: int = 50,
    k: int = 10,
    say: Any = print,
) -> dict[str, Any]:
    """Run the benchmark (module docstring); returns the JSON-able result."""
    import grpc

    from freshrec.bench import profile_user_ids
    from freshrec.clients import channel, ranking_stub
    from freshrec.machine import after_idle
    from freshrec.v1 import ranking_pb2
    from model.device import cpu_description
    from services.common.heap import watch_pauses
    from services.ranking.server import build_ranking
    from services.registry import open_registry

    config = load_config(workdir, ranking={"recall_candidates": candidates})
    champion, challenger, frozen_layers = publish_challenger(config)
    say(f"challenger {challenger} published (champion {champion}); starting the service")
    registry = open_registry(config)
    app = build_ranking(config, port=0)
    milestones = _Milestones().attach()
    pauses: list[tuple[float, int, float]] = []
    hook = watch_pauses(lambda gen, sec: pauses.append((time.perf_counter(), gen, sec)))
    rss = _RssPeaks()
    rss_thread = threading.Thread(target=rss.run, name="bench-rss", daemon=True)
    rss_thread.start()
    try:
        users = profile_user_ids(config)
        calls: list[_Call] = []
        lock = threading.Lock()
        stop = threading.Event()
        address = f"127.0.0.1:{app.port}"
        crashed: list[BaseException] = []

        def client(seed: int) -> None:
            rng = np.random.default_rng(seed)
            local: list[tuple[float, float, bool, str]] = []
            try:
                with channel(address) as ch:
                    stub = ranking_stub(ch)
                    while not stop.is_set():
                        req = ranking_pb2.RecommendRequest(
                            user_id=users[int(rng.integers(len(users)))], k=k
                        )
                        t = time.perf_counter()
                        try:
                            answer = stub.Recommend(req, timeout=30)
                            ms = (time.perf_counter() - t) * 1e3
                            local.append((t, ms, True, answer.model_version))
                        except grpc.RpcError:
                            local.append((t, (time.perf_counter() - t) * 1e3, False, ""))
            except BaseException as exc:  # raised on the main thread after the load
                crashed.append(exc)
            with lock:
                calls.extend(_Call(*c) for c in local)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
        started = time.perf_counter()
        for th in threads:
            th.start()
        time.sleep(before)
        old = app.models.current.reranker
        promoted = time.perf_counter()
        rss.phase = "loading"
        registry.promote("reranker", challenger, reason="bench swap")
        served: float | None = None
        while time.perf_counter() - promoted < timeout and not crashed:
            if app.models.current.model_version == challenger:
                served = time.perf_counter()
                break
            time.sleep(0.005)
        shared = served is not None and app.models.current.reranker.shares_item_states_with(old)
        del old  # the old version goes as soon as the service lets it (`rss_mb_end`)
        rss.phase = "after"
        if served is not None:
            time.sleep(after)
        stop.set()
        for th in threads:
            th.join()
        ended = time.perf_counter()
        rss_end = psutil.Process().memory_info().rss / 2**20
        if crashed:
            raise crashed[0]
        n_items = len(app.models.current.index)
        new = app.models.current.reranker
        # The new version's user-state lookups, all made after the swap (its counters start
        # at its load): a miss is a request that ran the whole user pass.
        user_hits, user_misses = new.user_cache_hits, new.user_cache_misses
        del new
    finally:
        gc.callbacks.remove(hook)
        milestones.detach()
        rss.stop.set()
        rss_thread.join()
        try:
            app.stop()
        finally:
            # The workdir serves what it served before the bench.
            registry.promote("reranker", champion, reason="bench swap: restore")
    swapped = served if served is not None else ended
    first_new = min((c.started for c in calls if c.version == challenger), default=None)
    return {
        "load_s": round(swapped - promoted, 2) if served is not None else None,
        "swapped": served is not None,
        "steady": window(calls, started, promoted, pauses),
        "loading": window(calls, promoted, swapped, pauses),
        "after": window(calls, swapped, ended, pauses),
        "errors": sum(not c.ok for c in calls),
        # A call answered by the new version before it was promoted would be a bug.
        "answered_by_new_before_promote": sum(
            c.version == challenger and c.started + c.ms / 1e3 < promoted for c in calls
        ),
        # Every answer once the service swapped: the new version's.
        "after_answered_by_old": sum(
            c.ok and c.version != challenger for c in calls if c.started >= swapped
        ),
        "first_new_answer_s": round(first_new - promoted, 2) if first_new else None,
        # The new version kept the old one's item states (same item side: no warm-up).
        "item_states_shared": shared,
        "after_user_cache_hit_rate": (
            round(user_hits / max(user_hits + user_misses, 1), 3) if served is not None else None
        ),
        "rss_peak_mb_steady": round(rss.peaks.get("steady", 0.0), 1),
        "rss_peak_mb_loading": round(rss.peaks.get("loading", 0.0), 1),
        "rss_peak_mb_after": round(rss.peaks.get("after", 0.0), 1),
        "rss_mb_end": round(rss_end, 1),
        "timeline": timeline(calls, pauses, milestones.records, promoted),
        "champion": champion,
        "challenger": challenger,
        "concurrency": concurrency,
        "candidates": candidates,
        "items": n_items,
        "warm_item_states": config.ranking.warm_item_states,
        "freeze_layers": frozen_layers,
        "machine": {
            "cores": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(),
            **cpu_description(),
            "after_idle": after_idle(),  # freshrec/machine.py
        },
    }
