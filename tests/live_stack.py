"""A tiny synthetic shop bootstrapped into the test Redis, and both services on it, in-process.

Shared by the robustness tests (tests/chaos, tests/integration): `shop_config` + `bootstrap_shop`
prepare a workdir (Feast project, offline log, index v0001, tiny re-ranker v0001);
`running_stack` starts the real ranking and updater servers on free ports and tears down the
project's keys afterwards. Imported as a plain module (tests/ is on sys.path via conftest.py).
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import redis
from google.protobuf.timestamp_pb2 import Timestamp

from freshrec.clients import channel, ranking_stub, updater_stub
from freshrec.config import FreshRecConfig, load_config
from freshrec.data.schema import Dataset
from freshrec.data.synthetic import generate_shop
from freshrec.v1 import ranking_pb2, ranking_pb2_grpc, updater_pb2_grpc
from model.reranker import CrossEncoderReranker, pretrained_path
from services.features.feast_store import FeastFeatureStore
from services.features.store import open_feature_store
from services.jobs.bootstrap import bootstrap
from services.ranking.server import RankingApp, build_ranking
from services.updater.server import UpdaterApp, build_updater

MAX_LENGTH = 32


def load_tiny_reranker(path: str) -> CrossEncoderReranker:
    """The pretrained backbone becomes a tiny random BERT; registry versions load as saved."""
    if Path(path) == pretrained_path():
        return CrossEncoderReranker.tiny(seed=0, max_length=MAX_LENGTH)
    return CrossEncoderReranker.from_pretrained(path, MAX_LENGTH, "cpu", "fp32")


def shop_config(workdir: Path, redis_url: str, **ranking: Any) -> FreshRecConfig:
    """A config for a fresh Feast project on `redis_url`; `ranking` overrides that section."""
    return load_config(
        workdir,
        project=f"t_{uuid.uuid4().hex[:10]}",
        # Test traffic is machine-made (bursts, repeats): hygiene is off here and tested on
        # its own (tests/unit/test_ingestion_hygiene.py, test_ingestion_pipeline.py).
        ingestion={"duplicate_window_seconds": 0, "max_events_per_user_per_minute": 1_000_000},
        redis_url=redis_url,
        online_store="redis",
        model={
            "max_length": MAX_LENGTH,
            "device": "cpu",
            "rerank_dtype": "fp32",
            "torch_threads": 1,
        },
        training={
            "max_examples": 120,
            "incremental_max_examples": 120,
            "batch_size": 16,
            "negatives_per_positive": 3,
            "freeze_layers": 0,
            "learning_rate": 1e-3,
            "incremental_learning_rate": 1e-3,
        },
        updater={"min_new_events": 5},
        ranking={"registry_poll_seconds": 0.2, "exploration_rate": 0.0, "workers": 8, **ranking},
    )


def bootstrap_shop(config: FreshRecConfig) -> Dataset:
    """Bootstrap the synthetic shop into `config` (index and re-ranker v0001 promoted)."""
    dataset = generate_shop(seed=5, n_items=150, n_users=40, days=30, events_per_user=40)
    report = bootstrap(
        config,
        dataset,
        announce=lambda _msg: None,
        load_reranker=load_tiny_reranker,
        progress=False,
    )
    assert report.index_version == "v0001"
    assert report.model is not None and report.model.state == "promoted"
    return dataset


def teardown_project(config: FreshRecConfig, redis_url: str) -> None:
    """Remove only this project's keys: the Redis may be shared (Feast's and the dedup set)."""
    open_feature_store(config.feature_repo_dir).teardown()
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(f"freshrec:{config.project}:*"):
        client.delete(key)
    client.close()


@contextmanager
def prepared_shop(workdir: Path, redis_url: str, **ranking: Any) -> Iterator[FreshRecConfig]:
    """`shop_config` + `bootstrap_shop` in `workdir`, the project's keys removed afterwards: the
    workdir of a test that starts `freshrec serve` as a process of its own."""
    config = shop_config(workdir, redis_url, **ranking)
    bootstrap_shop(config)
    try:
        yield config
    finally:
        teardown_project(config, redis_url)


def free_port() -> int:
    """A loopback TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Stack:
    config: FreshRecConfig
    dataset: Dataset
    ranking: RankingApp
    updater: UpdaterApp
    rank: ranking_pb2_grpc.RankingServiceStub
    upd: updater_pb2_grpc.UpdaterServiceStub
    rank_channel: grpc.Channel
    upd_channel: grpc.Channel
    features: FeastFeatureStore

    @property
    def catalog(self) -> list[str]:
        return [str(i) for i in self.dataset.items["item_id"]]

    @property
    def users(self) -> list[str]:
        return sorted(str(u) for u in self.dataset.interactions["user_id"].unique())


@contextmanager
def running_stack(workdir: Path, redis_url: str, **ranking: Any) -> Iterator[Stack]:
    """Bootstrap a shop under `workdir` and serve it; everything is stopped and removed after."""
    import torch

    threads = torch.get_num_threads()
    config = shop_config(workdir, redis_url, **ranking)
    dataset = bootstrap_shop(config)
    rank_app = build_ranking(config, port=0)
    upd_app = build_updater(config, port=0, load_reranker=load_tiny_reranker)
    rank_channel = channel(f"127.0.0.1:{rank_app.port}")
    upd_channel = channel(f"127.0.0.1:{upd_app.port}")
    features = FeastFeatureStore(config.feature_repo_dir)
    features.start()
    try:
        yield Stack(
            config,
            dataset,
            rank_app,
            upd_app,
            ranking_stub(rank_channel),
            updater_stub(upd_channel),
            rank_channel,
            upd_channel,
            features,
        )
    finally:
        rank_channel.close()
        upd_channel.close()
        upd_app.servicer.wait_idle(120)
        upd_app.stop(grace=1)
        rank_app.stop(grace=1)
        torch.set_num_threads(threads)
        teardown_project(config, redis_url)


def event(event_id: str, user_id: str, item_id: str, type_: int, at: datetime) -> ranking_pb2.Event:
    """One proto event."""
    ts = Timestamp()
    ts.FromDatetime(at)
    return ranking_pb2.Event(
        event_id=event_id, user_id=user_id, item_id=item_id, type=type_, timestamp=ts
    )
