"""Served scores end to end: Recommend on a real ranking server writes the served-score log,
and the updater's GetStatus reports score_psi from it once the champion has served long enough.

Waiting an hour for the window is replaced by moving the updater's wall clock two hours ahead
and writing the recent hour's histograms with a `ServedScoreLog` on a fake clock (as another
replica would have); the reference period is what the real server served.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from live_stack import bootstrap_shop, load_tiny_reranker, shop_config, teardown_project
from prometheus_client import REGISTRY

from freshrec.clients import channel, ranking_stub, updater_stub
from freshrec.config import FreshRecConfig
from freshrec.data.schema import Dataset
from freshrec.v1 import ranking_pb2, updater_pb2
from services.common.served_scores import (
    BINS,
    SERVED_SCORES_DIR,
    ServedScoreLog,
    read_served_scores,
)
from services.ranking.server import RankingApp, build_ranking
from services.updater.server import UpdaterApp, build_updater

pytestmark = pytest.mark.integration

AHEAD = timedelta(hours=2)  # how far the updater's clock is moved (window: 60 minutes)


class MovableClock:
    """Wall-clock seconds, plus an offset the test sets."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@dataclass
class Services:
    config: FreshRecConfig
    dataset: Dataset
    ranking: RankingApp
    updater: UpdaterApp
    clock: MovableClock


@pytest.fixture
def services(redis_url: str, tmp_path: Path) -> Iterator[Services]:
    import torch

    threads = torch.get_num_threads()
    config = shop_config(tmp_path / "work", redis_url, score_log_seconds=0.2)
    dataset = bootstrap_shop(config)
    clock = MovableClock()
    rank_app = build_ranking(config, port=0)
    upd_app = build_updater(config, port=0, load_reranker=load_tiny_reranker, clock=clock)
    try:
        yield Services(config, dataset, rank_app, upd_app, clock)
    finally:
        upd_app.stop(grace=1)
        rank_app.stop(grace=1)
        torch.set_num_threads(threads)
        teardown_project(config, redis_url)


def _served_total() -> float:
    return REGISTRY.get_sample_value("freshrec_served_relevance_count") or 0.0


def _logged(directory: Path, since: datetime) -> dict[str, np.ndarray]:
    """version -> all its counts summed."""
    read = read_served_scores(directory, since)
    return {v: np.sum([c for _, c in lines], axis=0) for v, lines in read.items()}


def _status(port: int) -> updater_pb2.GetStatusResponse:
    with channel(f"127.0.0.1:{port}") as ch:
        return updater_stub(ch).GetStatus(updater_pb2.GetStatusRequest(), timeout=60)


def test_recommend_writes_served_scores_and_get_status_reports_score_psi(
    services: Services,
) -> None:
    config = services.config
    directory = config.offline_dir / SERVED_SCORES_DIR
    started = datetime.now(UTC) - timedelta(minutes=1)
    before = _served_total()
    users = sorted(str(u) for u in services.dataset.interactions["user_id"].unique())
    returned_recall = 0
    with channel(f"127.0.0.1:{services.ranking.port}") as ch:
        stub = ranking_stub(ch)
        for user in users[:30]:
            response = stub.Recommend(ranking_pb2.RecommendRequest(user_id=user, k=10), timeout=60)
            assert response.model_version == "v0001"
            returned_recall += sum(1 for i in response.items if i.stage == ranking_pb2.STAGE_RECALL)
    served = _served_total() - before
    # Every re-ranked candidate, not only the k returned, went to the metric.
    assert served >= returned_recall > 0

    # The background flush (every 0.2 s) writes them all, under the serving version.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        logged = _logged(directory, started)
        if "v0001" in logged and logged["v0001"].sum() == served:
            break
        time.sleep(0.1)
    assert set(logged) == {"v0001"}
    assert int(logged["v0001"].sum()) == served >= 500
    # One file per replica and UTC day: this process is the only replica.
    files = list(directory.glob("*/*.jsonl"))
    assert files and {f.name for f in files} == {f"{socket.gethostname()}-{os.getpid()}.jsonl"}
    assert all(date.fromisoformat(f.parent.name) >= started.date() for f in files)

    # Just promoted: the champion has not served for longer than the window yet.
    status = _status(services.updater.port)
    assert status.champion_version == "v0001"
    assert "score_psi" not in status.signals

    # Two hours on, the recent hour served the same distribution as the first minutes.
    services.clock.offset = AHEAD.total_seconds()
    now = datetime.now(UTC) + AHEAD
    replica = ServedScoreLog(directory, flush_seconds=10, clock=lambda: now.timestamp() - 600)
    reference = logged["v0001"]
    centres = (np.arange(BINS) + 0.5) / BINS
    replica.observe("v0001", np.repeat(centres, reference))
    replica.flush()
    status = _status(services.updater.port)
    assert status.signals["score_psi"] == pytest.approx(0.0, abs=1e-9)

    # Then the recent hour turns to high scores: a large shift.
    replica.observe("v0001", np.full(int(reference.sum()) * 3, 0.99))
    replica.flush()
    status = _status(services.updater.port)
    assert status.signals["score_psi"] > 1.0
