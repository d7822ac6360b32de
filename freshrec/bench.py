"""`freshrec bench serving`: drive a real ranking service over gRPC and report latency as JSON.

It uses an initialised workdir (or bootstraps the synthetic shop into one), starts the ranking
service in this process on a free port, and calls Recommend from K concurrent clients for S
seconds. Issue #3's stage-floor ratios (re-rank vs a reference cross-encoder, feature fetch vs
the Feast SDK, overhead vs floors) are not measured yet and are reported as null.
"""

from __future__ import annotations

import os
import platform
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from freshrec.config import load_config


def bench_serving(
    workdir: Path,
    candidates: int,
    concurrency: int,
    duration: float,
    k: int = 10,
    say: Any = print,
) -> dict[str, Any]:
    """Run the benchmark; returns the JSON-able result."""
    import grpc
    import pandas as pd

    from freshrec.clients import channel, ranking_stub
    from freshrec.data import load_dataset
    from freshrec.v1 import ranking_pb2
    from services.jobs.bootstrap import bootstrap
    from services.ranking.server import build_ranking
    from services.registry import ModelRegistry

    config = load_config(
        workdir, ranking={"recall_candidates": candidates, "exploration_rate": 0.0}
    )
    if ModelRegistry(config.registry_dir).champion("reranker") is None:
        say(f"no models in {workdir}: bootstrapping the synthetic shop first")
        bootstrap(config, load_dataset("synthetic", workdir / "cache"), announce=say)
    app = build_ranking(config, port=0)
    users = (
        pd.read_parquet(config.offline_dir / "user_profile.parquet", columns=["user_id"])["user_id"]
        .astype(str)
        .tolist()
    )
    items = len(app.models.current.index)
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    stop_at = time.perf_counter() + duration
    address = f"127.0.0.1:{app.port}"

    def client(seed: int) -> None:
        nonlocal errors
        rng = np.random.default_rng(seed)
        local: list[float] = []
        failed = 0
        with channel(address) as ch:
            stub = ranking_stub(ch)
            while time.perf_counter() < stop_at:
                req = ranking_pb2.RecommendRequest(
                    user_id=users[int(rng.integers(len(users)))], k=k
                )
                t = time.perf_counter()
                try:
                    stub.Recommend(req, timeout=30)
                    local.append((time.perf_counter() - t) * 1e3)
                except grpc.RpcError:
                    failed += 1
        with lock:
            latencies.extend(local)
            errors += failed

    rss_before = psutil.Process().memory_info().rss
    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed = time.perf_counter() - started
    app.stop()
    arr = np.asarray(latencies) if latencies else np.asarray([float("nan")])
    return {
        "p50_ms": round(float(np.percentile(arr, 50)), 2),
        "p95_ms": round(float(np.percentile(arr, 95)), 2),
        "p99_ms": round(float(np.percentile(arr, 99)), 2),
        "qps": round(len(latencies) / elapsed, 2),
        "calls": len(latencies),
        "errors": errors,
        "candidates": candidates,
        "items": items,
        "k": k,
        "concurrency": concurrency,
        "duration_s": round(elapsed, 1),
        "rss_mb": round(max(rss_before, psutil.Process().memory_info().rss) / 2**20, 1),
        "rerank_speedup_vs_reference": None,
        "feature_fetch_speedup_vs_feast_sdk": None,
        "overhead_ratio": None,
        "machine": {
            "cores": os.cpu_count(),
            "torch_threads": _torch_threads(),
            "cpu": platform.processor() or platform.machine(),
        },
        "model_dtype": config.model.rerank_dtype,
        "max_length": config.model.max_length,
    }


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())
