"""The updater's scheduler starts an update by itself when a drift threshold is crossed."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from freshrec.clients import channel, updater_stub
from freshrec.config import load_config
from freshrec.data.synthetic import generate_shop
from freshrec.v1 import updater_pb2
from model.reranker import CrossEncoderReranker, pretrained_path
from services.features.item_generation import ItemGeneration
from services.features.store import open_feature_store
from services.ingestion.offline_log import OfflineEventLog
from services.jobs.bootstrap import bootstrap
from services.registry import ModelRegistry
from services.updater.server import UpdaterApp, build_updater

pytestmark = pytest.mark.integration

MAX_LENGTH = 32
DEADLINE_S = 180.0


def _load_reranker(path: str) -> CrossEncoderReranker:
    if Path(path) == pretrained_path():
        return CrossEncoderReranker.tiny(seed=0, max_length=MAX_LENGTH)
    return CrossEncoderReranker.from_pretrained(path, MAX_LENGTH, "cpu", "fp32")


@pytest.fixture(scope="module")
def updater(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpdaterApp]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    config = load_config(
        tmp_path_factory.mktemp("triggers") / "work",
        project=f"trg_{uuid.uuid4().hex[:10]}",
        redis_url=redis_url,
        online_store="redis",
        model={"max_length": MAX_LENGTH, "device": "cpu", "rerank_dtype": "fp32"},
        training={
            "max_examples": 64,
            "incremental_max_examples": 64,
            "batch_size": 16,
            "freeze_layers": 0,
        },
        updater={
            "min_new_events": 5,
            "drift_check_seconds": 0.2,
            "drift_window_hours": 24 * 7,
            # Low thresholds: any drift at all starts an update.
            "new_item_share_threshold": 1e-6,
            "ctr_drop_threshold": 1e-6,
            "category_psi_threshold": 1e-6,
        },
    )
    dataset = generate_shop(seed=3, n_items=120, n_users=30, days=30, events_per_user=40)
    bootstrap(
        config,
        dataset,
        history_fraction=0.7,
        announce=lambda _msg: None,
        load_reranker=_load_reranker,
        progress=False,
    )
    # The newer 30% arrive after the champion was trained: the drift the scheduler watches.
    _, newer = dataset.split_by_time(0.7)
    OfflineEventLog(config.offline_dir).append_frame(newer)
    app = build_updater(config, port=0, load_reranker=_load_reranker)
    try:
        yield app
    finally:
        app.servicer.wait_idle(120)
        app.stop(grace=1)
        torch.set_num_threads(threads)
        open_feature_store(config.feature_repo_dir).teardown()
        ItemGeneration(config.feature_repo_dir).forget()


def test_scheduler_starts_an_update_when_a_threshold_is_crossed(updater: UpdaterApp) -> None:
    servicer = updater.servicer
    deadline = time.monotonic() + DEADLINE_S
    while servicer.last_started() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert servicer.last_started() is not None, "the scheduler did not start an update"
    assert servicer.wait_idle(DEADLINE_S)

    with channel(f"127.0.0.1:{updater.port}") as ch:
        status = updater_stub(ch).GetStatus(updater_pb2.GetStatusRequest(), timeout=30)
    assert status.last.state in ("promoted", "rejected", "skipped"), status.last.message
    assert {"new_item_share", "ctr_recent", "category_psi"} <= set(status.signals)
    assert "drift: " in status.next_trigger
    registry = ModelRegistry(servicer.config.registry_dir)
    if status.last.challenger_version:
        manifest = registry.manifest("reranker", status.last.challenger_version)
        assert manifest.reason.startswith("automatic: drift: ")
