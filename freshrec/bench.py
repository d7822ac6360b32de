"""`freshrec bench serving`: drive a real ranking service over gRPC and report latency as JSON.

It uses an initialised workdir (or bootstraps the synthetic shop into one), starts the ranking
service in this process on a free port, and calls Recommend from K concurrent clients for S
seconds. Then, in the same run, it measures the stage floors on sampled requests of that load:

- rerank_speedup_vs_reference: plain transformers fp32 with the HF tokenizer per call, the
  same weights run as a full cross-encoder (the reference), vs the serving path (split model:
  cached item states and one user pass; serving precision; cached token ids), same candidates;
  ratio of medians.
- feature_fetch_speedup_vs_feast_sdk: `FeatureStore.get_online_features` (FeastFeatureStore) vs
  the one-round-trip RedisFeatureReader for 1 user + its candidates, values checked identical.
- overhead_ratio: at concurrency 1, the median over requests of end-to-end time / the stage
  floors of that request's work: raw FAISS search + raw Redis read + raw model forward on the
  same tensors (for a split model, the joint top layer over the cached item states, plus the
  user pass when the request missed the user-state cache: `forward` or `forward_user_cached`;
  none when every logit came from the score cache), medians. A request that found some logits
  cached ran the joint layer on the rest only, and is held to the whole joint layer's floor.
  The floors are those sampled during the load (`stages_during_load_ms`): every
  FLOOR_SAMPLE_EVERY_S of load the client measures one random user's floors on the service's
  torch thread between two calls (their time is no call's), so latencies and floors come from
  the same minutes. Up to stop 26 they were measured after the load only, and on machines
  whose speed drifts by the minute one version read 1.29 and 1.56 in two runs (stop 26, its
  floors 6.03 against 4.46 ms). `overhead_after_load` keeps that reading beside it;
  `floor_samples_during_load` counts the samples (0: the after-load floors are used). The
  after-load floors run for all sampled users before any re-rank reference: until stop 28 each
  user's followed the previous user's fp32 reference pass, whose ~0.5 s emptied the caches, and
  a first FAISS search read 1.65-2.44 ms there against 0.52-0.57 ms during the load (100k items,
  Xeon with AMX), which lowered that ratio to 1.16-1.28 where the load's floors gave 1.62-1.69.
  The bench tells the classes apart by the re-ranker's cache counters around each call, which
  only one client at a time makes exact; at higher concurrency the overhead fields are null
  (queueing behind other requests is not overhead of the request path).
- overhead_ms: the median of the same end-to-end time minus the same floor sum, in ms.
- beyond_model_ms: at concurrency 1, the median over re-ranked requests of end-to-end time
  minus the forward passes that request ran, timed inside the re-ranker during the load
  (`CrossEncoderReranker.forward_seconds`): what a request costs beyond the model, read in
  the same instant as its latency. Up to stop 26 the floors above were measured after the
  load only; on a machine whose speed drifts by the minute the ratio moved with them (stop 23:
  one version read 1.55–1.88 in three runs), while this difference resolved a ~0.4 ms change.
  `beyond_model_by_class` gives it per class.
- outside_pipeline_ms: at concurrency 1, the median over calls of end-to-end time minus the
  pipeline's own total for that call (`RankingPipeline.recommend`, timed in the service): the
  gRPC transport both ways with its thread hand-offs, plus the servicer's proto, metrics and
  log work around the pipeline. The part of `overhead_ms` that is not the request path's own
  steps (stop 26 on the AVX2 EPYC: ~1.26 of ~9.2 ms a MovieLens call).
- overhead_by_class: p50, p99, floor and ratio for each class alone: `user_pass` (a user's
  first request, or one after their profile changed: the whole model runs), `user_cached`,
  `scores_cached` (`ranking.score_cache`).
- stages_ms.faiss: the raw search of each sampled request's query, timed on its first run, as
  the service runs each query once, after other work. `faiss_repeated` (the `faiss` floor up to
  stop 20) is the median of 3 runs after a warm-up run of the same query: those find the HNSW
  graph's nodes in the CPU caches, and at 100k items took ~0.09 ms where a first search took
  ~0.31 ms (stop 21).
- stages_ms.grpc_roundtrip: the median of a health Check round trip on the same server and
  channel, the transport every answer pays; not a stage floor (the issue names three), shown
  so the overhead can be read against it.
- overhead_ratio_with_transport: overhead_ratio with that round trip added to each request's
  floors: what the service's own Python costs beyond work no server in Python can skip.
- p999_ms, max_ms: the tail beyond p99, where pauses of the whole process show (e.g. a full
  garbage collection: `ranking.freeze_heap`, services/common/heap.py).
- service_stages_ms: p50/p95/p99 of each pipeline step as the service timed it under the load.
- service_cpu_ms_per_call, service_cores_busy: the process's CPU time over the load (every
  thread) less the client threads' own, per call and per second of load. It counts gRPC's C
  threads (which carry the clients' side of each call too) and torch's OpenMP workers, whose
  spin between parallel regions counts too, so with one client it is well above the work a
  call does (stop 24, 100k: ~13–14 ms a call at p50 ~6 ms). client_cpu_ms_per_call: the client
  threads' own share.
- item_cache_hit_rate: the share of candidates' item features the service answered from its
  in-process item cache (`ranking.item_cache_seconds`) rather than Redis. The `redis_raw` floor
  still reads the profile and every candidate from Redis, so with the cache the service's
  reads can come in under that floor.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from freshrec.config import FreshRecConfig, load_config


def bench_serving(
    workdir: Path,
    candidates: int,
    concurrency: int,
    duration: float,
    k: int = 10,
    items: int = 2000,
    say: Any = print,
) -> dict[str, Any]:
    """Run the benchmark; returns the JSON-able result."""
    import grpc

    from freshrec.clients import channel, ranking_stub
    from freshrec.data import load_dataset
    from freshrec.machine import after_idle
    from freshrec.v1 import ranking_pb2
    from model.device import cpu_description
    from services.jobs.bootstrap import bootstrap, read_online_store_choice
    from services.ranking.compute import in_passing_thread
    from services.ranking.server import build_ranking
    from services.registry import open_registry

    # Exploration stays as the workdir configures it (default: 10% of answers carry a random
    # item, one more feature read): the bench measures the service a storefront would call.
    config = load_config(workdir, ranking={"recall_candidates": candidates})
    if open_registry(config).champion("reranker") is None:
        if "project" not in _explicit_settings(workdir):
            # Its own Feast project (kept in the workdir's freshrec.json by the bootstrap):
            # every synthetic shop uses the same item ids, so two bench workdirs in the default
            # project on one Redis would read and overwrite each other's features.
            config = load_config(
                workdir, project=bench_project(workdir), ranking={"recall_candidates": candidates}
            )
        say(
            f"no models in {workdir}: bootstrapping a synthetic shop of {items:,} items first "
            f"(Feast project {config.project})"
        )
        shop = load_dataset("synthetic", workdir / "cache", n_items=items)
        # On a thread that ends with it: the bootstrap trains with torch, and a thread that ran
        # torch keeps an OpenMP team for its life, which would slow the service's torch thread
        # for the rest of this process (services/ranking/compute.py). Measured here with the
        # bootstrap on the main thread: forward floor 12.09 ms against 6.10 ms in a run of its
        # own (100k items).
        kept = _bootstrap_config(config)
        in_passing_thread(lambda: bootstrap(kept, shop, announce=say))
    started_at = time.perf_counter()
    app = build_ranking(config, port=0)  # loads the champion and warms its item states
    startup_s = time.perf_counter() - started_at
    # States the start-up read from disk instead of computing (ranking.item_state_snapshots).
    read_at_start = app.models.current.reranker.item_states_read
    users = profile_user_ids(config)
    n_items = len(app.models.current.index)
    assert app.pipeline is not None
    app.pipeline.timings_log = deque(maxlen=200_000)
    latencies: list[float] = []
    # Per call at concurrency 1, from the re-ranker's counters around it (`_call_class`).
    call_classes: list[int] = []
    # Per call at concurrency 1: the forward passes it ran, timed in the re-ranker.
    forward_ms: list[float] = []
    errors = 0
    client_cpu = 0.0  # CPU seconds of the client threads (they run in this process)
    lock = threading.Lock()
    stop_at = time.perf_counter() + duration
    address = f"127.0.0.1:{app.port}"
    # At concurrency 1 the floors are also sampled between calls (their time is not a call's).
    sampler = (
        _FloorSampler(app, config, users, candidates)
        if concurrency == 1 and read_online_store_choice(config)["kind"] == "redis"
        else None
    )

    crashed: list[BaseException] = []  # a client thread's error other than a failed call

    def client(seed: int) -> None:
        try:
            load(seed)
        except BaseException as exc:  # raised on the main thread after the load
            crashed.append(exc)

    def load(seed: int) -> None:
        nonlocal errors, client_cpu
        cpu_started = time.thread_time()
        rng = np.random.default_rng(seed)
        local: list[float] = []
        classes: list[int] = []
        forwards: list[float] = []
        failed = 0
        next_floor = time.perf_counter() + FLOOR_SAMPLE_EVERY_S / 2
        with channel(address) as ch:
            stub = ranking_stub(ch)
            while time.perf_counter() < stop_at:
                if sampler is not None and time.perf_counter() >= next_floor:
                    sampler.sample()
                    next_floor = time.perf_counter() + FLOOR_SAMPLE_EVERY_S
                req = ranking_pb2.RecommendRequest(
                    user_id=users[int(rng.integers(len(users)))], k=k
                )
                counts = _cache_counts(app)
                t = time.perf_counter()
                try:
                    stub.Recommend(req, timeout=30)
                    local.append((time.perf_counter() - t) * 1e3)
                    after = _cache_counts(app)
                    classes.append(_call_class(counts, after))
                    forwards.append((after[3] - counts[3]) * 1e3)
                except grpc.RpcError:
                    failed += 1
        with lock:
            client_cpu += time.thread_time() - cpu_started
            latencies.extend(local)
            call_classes.extend(classes)
            forward_ms.extend(forwards)
            errors += failed

    rss_before = psutil.Process().memory_info().rss
    cpu_before = time.process_time()
    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed = time.perf_counter() - started
    if crashed:
        if sampler is not None:
            sampler.close()
        app.stop()
        raise crashed[0]
    process_cpu = time.process_time() - cpu_before
    reranker = app.models.current.reranker
    hits, misses = reranker.user_cache_hits, reranker.user_cache_misses
    hit_rate = hits / (hits + misses) if hits + misses else 0.0
    score_hits, score_misses = reranker.score_cache_hits, reranker.score_cache_misses
    score_hit_rate = score_hits / (score_hits + score_misses) if score_hits + score_misses else 0.0
    # On the service's torch thread: a forward pass measured on another thread would pay for
    # a second OpenMP team (services/ranking/compute.py) that serving never has.
    assert app.worker is not None
    with channel(address) as ch:
        roundtrip = _grpc_roundtrip_ms(ch)
    floors = app.worker.call(_stage_floors, config, app.models.current, users, candidates)
    if floors.get("stages_ms"):
        floors["stages_ms"]["grpc_roundtrip"] = round(roundtrip, 3)
    during: dict[str, Any] = {}
    if sampler is not None:
        sampler.close()
        during = {"stages_ms": {**sampler.medians(), "grpc_roundtrip": round(roundtrip, 3)}}
        during["samples"] = min(len(v) for v in sampler.samples.values())
    service_stages = _percentiles(list(app.pipeline.timings_log))
    pipeline_ms = [t["total"] for t in app.pipeline.timings_log]
    # The hot-path reader under the breaker (services/ranking/server.py); the Feast SDK reader
    # of a non-Redis store keeps no item cache.
    item_hit_rate = getattr(
        getattr(app.pipeline.features, "inner", None), "item_cache_hit_rate", 0.0
    )
    architecture = app.models.current.reranker.architecture
    item_states_int8 = app.models.current.reranker.item_states_int8
    cached_states = app.models.current.reranker.cached_items()
    state_bytes = app.models.current.reranker.item_state_bytes()
    app.stop()
    # After the service has stopped: the same work back to back and after idle (the floors
    # above are timed hot; freshrec/machine.py).
    idle_cost = after_idle()
    arr = np.asarray(latencies) if latencies else np.asarray([float("nan")])
    p50 = float(np.percentile(arr, 50))
    return {
        "p50_ms": round(p50, 2),
        "p95_ms": round(float(np.percentile(arr, 95)), 2),
        "p99_ms": round(float(np.percentile(arr, 99)), 2),
        "p999_ms": round(float(np.percentile(arr, 99.9)), 2),
        "max_ms": round(float(arr.max()), 2),
        "qps": round(len(latencies) / elapsed, 2),
        "calls": len(latencies),
        "errors": errors,
        "candidates": candidates,
        "popular_candidates": config.ranking.popular_candidates,
        "items": n_items,
        "k": k,
        "exploration_rate": config.ranking.exploration_rate,
        "concurrency": concurrency,
        "duration_s": round(elapsed, 1),
        **_cpu_per_call(process_cpu, client_cpu, len(latencies) + errors, elapsed),
        "rss_mb": round(max(rss_before, psutil.Process().memory_info().rss) / 2**20, 1),
        "rerank_speedup_vs_reference": floors.get("rerank_speedup_vs_reference"),
        "feature_fetch_speedup_vs_feast_sdk": floors.get("feature_fetch_speedup_vs_feast_sdk"),
        # Against the floors sampled during the load; with none, those after it.
        **_overhead(
            latencies, call_classes, during if during.get("samples") else floors, concurrency
        ),
        "overhead_after_load": _overhead(latencies, call_classes, floors, concurrency),
        **_beyond_model(latencies, call_classes, forward_ms, concurrency),
        "outside_pipeline_ms": _outside_pipeline(latencies, pipeline_ms, concurrency),
        "user_cache_hit_rate": round(hit_rate, 3),
        "score_cache_hit_rate": round(score_hit_rate, 3),
        "score_cache": config.ranking.score_cache,
        "item_cache_hit_rate": round(item_hit_rate, 3),
        "item_cache_seconds": config.ranking.item_cache_seconds,
        "stages_ms": floors.get("stages_ms", {}),
        "stages_during_load_ms": during.get("stages_ms", {}),
        "floor_samples_during_load": during.get("samples", 0),
        "service_stages_ms": service_stages,
        "feature_values_identical": floors.get("identical"),
        "machine": {
            "cores": os.cpu_count(),
            "torch_threads": _torch_threads(),
            "cpu": platform.processor() or platform.machine(),
            **cpu_description(),
            "after_idle": idle_cost,
        },
        "model_dtype": config.model.rerank_dtype,
        "architecture": architecture,
        "item_states_int8": item_states_int8,
        "cached_item_states": cached_states,
        "item_state_mib": round(state_bytes / 2**20, 1),
        "warm_item_states": config.ranking.warm_item_states,
        "startup_s": round(startup_s, 1),
        "item_states_read_at_start": read_at_start,
        "max_length": config.model.max_length,
    }


def profile_user_ids(config: FreshRecConfig) -> list[str]:
    """The ids of the users with a profile in the workdir's offline store: the users a bench
    drives `Recommend` for."""
    import pandas as pd

    table = pd.read_parquet(config.offline_dir / "user_profile.parquet", columns=["user_id"])
    # Once per user: `materialize --full` appends a row per user it updates.
    return table["user_id"].astype(str).drop_duplicates().tolist()


def bench_project(workdir: Path) -> str:
    """The Feast project a bench workdir bootstraps into when none is configured:
    `bench_<directory name>_<hash of its absolute path>` (letters, digits and '_')."""
    resolved = Path(workdir).resolve()
    name = re.sub(r"[^A-Za-z0-9]", "_", resolved.name)[:24]
    digest = hashlib.blake2b(str(resolved).encode(), digest_size=4).hexdigest()
    return f"bench_{name}_{digest}"


def _explicit_settings(workdir: Path) -> set[str]:
    """Top-level settings given by the environment or the workdir's freshrec.json."""
    from freshrec.config import FreshRecConfig, read_config_file

    nothing: dict[str, Any] = {}  # the environment alone
    given = set(FreshRecConfig(**nothing).model_dump(exclude_unset=True))
    return given | set(read_config_file(workdir))


def _bootstrap_config(config: Any) -> Any:
    """`config` as the bench's bootstrap writes it into the workdir's freshrec.json: the
    serving settings (`ranking`) as that file gave them, or the defaults, not this run's
    environment or `--candidates`. The bootstrap reads none of them, and a later run takes its
    own: in stop 26 a first run's `FRESHREC_RANKING__SCORE_CACHE=false`, written into the
    file, turned a later run meant to use the score cache into one without it."""
    from freshrec.config import RankingConfig, read_config_file

    given = read_config_file(config.workdir).get("ranking", {})
    return config.model_copy(update={"ranking": RankingConfig(**given)})


def _cache_counts(app: Any) -> tuple[float, ...]:
    """(user-state cache hits, misses, score-cache hits, forward seconds) of the serving
    re-ranker so far."""
    reranker = app.models.current.reranker
    return (
        reranker.user_cache_hits,
        reranker.user_cache_misses,
        reranker.score_cache_hits,
        reranker.forward_seconds,
    )


# The reported name of each `_call_class` value that was re-ranked.
_CALL_CLASSES = (("user_pass", 1), ("user_cached", 0), ("scores_cached", 2))


def _call_class(before: tuple[float, ...], after: tuple[float, ...]) -> int:
    """1: the call ran the user pass; 0: it found the user side cached and ran the joint
    layer; 2: every logit was cached (no forward pass); -1: not re-ranked (a fallback
    answer). Exact while one call runs at a time."""
    if after[1] > before[1]:
        return 1
    if after[0] > before[0]:
        return 0
    return 2 if after[2] > before[2] else -1


def _grpc_roundtrip_ms(ch: Any, calls: int = 200) -> float:
    """Median health Check round trip on `ch`: the transport floor of every answer."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(ch)
    req = health_pb2.HealthCheckRequest()
    stub.Check(req, timeout=5)
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        stub.Check(req, timeout=5)
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def _overhead(
    latencies: list[float], classes: list[int], floors: dict[str, Any], concurrency: int
) -> dict[str, Any]:
    """overhead_ratio, overhead_ms and overhead_by_class (module docstring); null where they
    are not defined: concurrency above 1, no floors, or no re-ranked call."""
    none: dict[str, Any] = {
        "overhead_ratio": None,
        "overhead_ratio_with_transport": None,
        "overhead_ms": None,
        "overhead_by_class": {},
    }
    stages = floors.get("stages_ms") or {}
    if concurrency != 1 or not {"faiss", "redis_raw", "forward"} <= stages.keys():
        return none
    fetch = stages["faiss"] + stages["redis_raw"]
    floor_of = {
        1: fetch + stages["forward"],
        0: fetch + stages.get("forward_user_cached", 0.0),
        2: fetch,
    }
    if not all(f > 0 for f in floor_of.values()):
        return none
    lat = np.asarray(latencies, dtype=np.float64)
    cls = np.asarray(classes, dtype=np.int64)
    kept = cls >= 0
    if not kept.any():
        return none
    floor = np.asarray([floor_of[int(c)] for c in cls[kept]])
    by_class = {}
    for name, c in _CALL_CLASSES:
        mine = lat[cls == c]
        if len(mine):
            p50 = float(np.median(mine))
            by_class[name] = {
                "requests": len(mine),
                "p50_ms": round(p50, 2),
                "p99_ms": round(float(np.percentile(mine, 99)), 2),
                "floor_ms": round(floor_of[c], 2),
                "ratio": round(p50 / floor_of[c], 2),
            }
    transport = stages.get("grpc_roundtrip")
    return {
        "overhead_ratio": round(float(np.median(lat[kept] / floor)), 2),
        "overhead_ratio_with_transport": (
            round(float(np.median(lat[kept] / (floor + transport))), 2) if transport else None
        ),
        "overhead_ms": round(float(np.median(lat[kept] - floor)), 2),
        "overhead_by_class": by_class,
    }


def _beyond_model(
    latencies: list[float], classes: list[int], forward_ms: list[float], concurrency: int
) -> dict[str, Any]:
    """beyond_model_ms and beyond_model_by_class (module docstring); null above concurrency 1
    (another call's forward pass would count against this one) or with no re-ranked call."""
    lat, cls = np.asarray(latencies), np.asarray(classes, dtype=np.int64)
    fwd = np.asarray(forward_ms)
    if concurrency != 1 or len(fwd) != len(lat) or not (cls >= 0).any():
        return {"beyond_model_ms": None, "beyond_model_by_class": {}}
    beyond = lat - fwd
    by_class = {
        name: round(float(np.median(beyond[cls == c])), 3)
        for name, c in _CALL_CLASSES
        if (cls == c).any()
    }
    return {
        "beyond_model_ms": round(float(np.median(beyond[cls >= 0])), 3),
        "beyond_model_by_class": by_class,
    }


def _outside_pipeline(
    latencies: list[float], pipeline_ms: list[float], concurrency: int
) -> float | None:
    """outside_pipeline_ms (module docstring); null above concurrency 1 (calls overlap) or
    when calls and pipeline timings do not pair up one to one (a call that failed)."""
    if concurrency != 1 or not latencies or len(latencies) != len(pipeline_ms):
        return None
    return round(float(np.median(np.subtract(latencies, pipeline_ms))), 3)


def _cpu_per_call(
    process_cpu_s: float, client_cpu_s: float, calls: int, elapsed_s: float
) -> dict[str, float | None]:
    """service_cpu_ms_per_call, client_cpu_ms_per_call and service_cores_busy over the load.

    The process's CPU time (every thread) less the client threads' own: the service's share
    includes gRPC's C threads, which carry the clients' calls too, and torch's OpenMP workers,
    which spin between parallel regions while requests keep coming.
    """
    service = max(process_cpu_s - client_cpu_s, 0.0)
    if calls <= 0 or elapsed_s <= 0:
        return {
            "service_cpu_ms_per_call": None,
            "client_cpu_ms_per_call": None,
            "service_cores_busy": None,
        }
    return {
        "service_cpu_ms_per_call": round(service / calls * 1e3, 2),
        "client_cpu_ms_per_call": round(client_cpu_s / calls * 1e3, 2),
        "service_cores_busy": round(service / elapsed_s, 2),
    }


def _percentiles(timings: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """{step: {p50, p95, p99}} in ms over the answers' step timings."""
    out: dict[str, dict[str, float]] = {}
    for step in dict.fromkeys(k for t in timings for k in t):
        values = np.asarray([t[step] for t in timings if step in t])
        out[step] = {f"p{q}": round(float(np.percentile(values, q)), 3) for q in (50, 95, 99)}
    return out


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


def _median_ms(fn: Any, repeat: int) -> float:
    """Median of `repeat` timed calls after one untimed call: the stages are timed one after
    another per user, and the first call after the ~1 s reference cross-encoder runs on cold
    caches (measured: the forward floor doubled without the warm-up call)."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def _read_both(reader: Any, user: str, ids: list[str]) -> tuple[Any, Any]:
    return reader.get_user_profile(user), reader.get_items(ids)


# The floors a request's work is held to, measured per sampled user both during the load
# (interleaved, `_FloorSampler`) and after it (`_stage_floors`, beside the references).
_REQUEST_FLOORS = ("faiss", "faiss_repeated", "redis_raw", "forward", "forward_user_cached")
# At concurrency 1, one sampled user's floors between two calls this often (seconds of load):
# ~30 ms of floors each time at 100k items, so ~6% of the load's time.
FLOOR_SAMPLE_EVERY_S = 0.5


@dataclass
class _FloorWork:
    """One sampled user's request work, as the floors ran it (for the references after)."""

    ids: list[str]
    context: str
    texts: list[str]


def _request_floors(
    models: Any, raw: Any, user: str, candidates: int, popular: int
) -> tuple[dict[str, float], _FloorWork] | None:
    """The `_REQUEST_FLOORS` of `user`'s request, in ms (None: a user recall cannot serve).

    Runs on the service's torch thread (the forward passes; module docstring)."""
    from functools import partial

    import torch

    from model.embeddings import user_vector
    from model.text import ranking_item_text, user_context_text

    profile = raw.get_user_profile(user)
    query = user_vector(models.index.vectors_of(profile.recent_items)) if profile else None
    if profile is None or query is None:
        return None
    got: dict[str, float] = {}
    exclude = frozenset(profile.recent_items) | frozenset(profile.purchased_items)
    search = partial(models.index.search, query, candidates, exclude)
    # The query's first search, as a request runs it (module docstring: stages_ms.faiss).
    t = time.perf_counter()
    found = search()
    got["faiss"] = (time.perf_counter() - t) * 1e3
    got["faiss_repeated"] = _median_ms(search, 3)
    ids = [i for i, _ in found]
    # The second recall source, as the pipeline adds it (pipeline.popular_extras).
    have = set(ids)
    extra = [i for i in models.index.popular if i not in have and i not in exclude]
    ids += extra[:popular]
    got["redis_raw"] = _median_ms(partial(_read_both, raw, user, ids), 3)
    items = raw.get_items(ids)
    now = datetime.now(UTC)
    texts = [ranking_item_text(items[i], now) for i in ids if i in items]
    context = user_context_text(profile)
    inputs = models.reranker.serving_inputs(context, texts)
    with torch.inference_mode():
        # The user pass included (no user-state cache): what a user's first request costs.
        got["forward"] = _median_ms(
            partial(models.reranker.serving_logits, inputs, user_cache=False), 2
        )
        got["forward_user_cached"] = _median_ms(
            partial(models.reranker.serving_logits, inputs, user_cache=True), 2
        )
    return got, _FloorWork(ids, context, texts)


class _FloorSampler:
    """Floors of sampled users measured between the load's calls, on the service's torch
    thread (`_request_floors`): the same minutes of a machine whose speed drifts as the
    latencies they are held against (module docstring: overhead_ratio)."""

    def __init__(self, app: Any, config: Any, users: list[str], candidates: int) -> None:
        from services.features.redis_reader import RedisFeatureReader

        self._app, self._users, self._candidates = app, users, candidates
        self._popular = config.ranking.popular_candidates
        self._raw = RedisFeatureReader(config.feature_repo_dir)
        self._raw.start()
        self._rng = np.random.default_rng(1)
        self.samples: dict[str, list[float]] = {k: [] for k in _REQUEST_FLOORS}

    def sample(self) -> None:
        """One random user's floors (a user recall cannot serve adds nothing)."""
        user = self._users[int(self._rng.integers(len(self._users)))]
        got = self._app.worker.call(
            _request_floors,
            self._app.models.current,
            self._raw,
            user,
            self._candidates,
            self._popular,
        )
        if got is not None:
            for name, ms in got[0].items():
                self.samples[name].append(ms)

    def medians(self) -> dict[str, float]:
        """{floor: median ms}, empty before a sample."""
        return _medians(self.samples)

    def close(self) -> None:
        self._raw.close()


def _medians(samples: dict[str, list[float]]) -> dict[str, float]:
    """{stage: median ms to 0.01} of the stages with samples."""
    return {k: round(float(np.median(v)), 2) for k, v in samples.items() if v}


def _stage_floors(
    config: Any, models: Any, users: list[str], candidates: int, samples: int = 20
) -> dict[str, Any]:
    """Per-stage medians on `samples` users after the load, with the references of target 4
    on the same work (see the module docstring)."""
    from functools import partial

    from services.features.feast_store import FeastFeatureStore
    from services.features.redis_reader import RedisFeatureReader
    from services.jobs.bootstrap import read_online_store_choice

    if read_online_store_choice(config)["kind"] != "redis":
        return {}
    sdk = FeastFeatureStore(config.feature_repo_dir)
    sdk.start()
    raw = RedisFeatureReader(config.feature_repo_dir)
    raw.start()
    # Plain transformers fp32 over the same weights, pairs packed by the HF tokenizer.
    reference = models.reranker.as_cross_encoder("fp32")
    rng = np.random.default_rng(0)
    names = (*_REQUEST_FLOORS, "feast_sdk", "rerank_serving", "rerank_reference")
    stages: dict[str, list[float]] = {k: [] for k in names}
    identical = True
    picked = rng.choice(len(users), size=min(samples, len(users)), replace=False)
    # Every user's floors and reads first, the re-rank references after (module docstring:
    # overhead_ratio); the two reads of target 4 stay side by side, under the same conditions.
    works: list[_FloorWork] = []
    for user in (users[int(i)] for i in picked):
        got = _request_floors(models, raw, user, candidates, config.ranking.popular_candidates)
        if got is None:
            continue
        floors, work = got
        for name, ms in floors.items():
            stages[name].append(ms)
        stages["feast_sdk"].append(_median_ms(partial(_read_both, sdk, user, work.ids), 3))
        identical &= _read_both(raw, user, work.ids) == _read_both(sdk, user, work.ids)
        works.append(work)
    for work in works:
        stages["rerank_serving"].append(  # the forward pass timed, not the score cache
            _median_ms(partial(models.reranker.score, work.context, work.texts, cache=False), 2)
        )
        stages["rerank_reference"].append(
            _median_ms(
                partial(reference.score_pairs, [work.context] * len(work.texts), work.texts), 2
            )
        )
    raw.close()
    med = _medians(stages)
    if not {"faiss", "redis_raw", "forward"} <= med.keys():
        return {}
    return {
        "stages_ms": med,
        "rerank_speedup_vs_reference": round(med["rerank_reference"] / med["rerank_serving"], 2),
        "feature_fetch_speedup_vs_feast_sdk": round(med["feast_sdk"] / med["redis_raw"], 2),
        "identical": bool(identical),
    }
