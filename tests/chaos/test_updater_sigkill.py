"""Promise 3, updater killed at any moment: SIGKILL the training + publish path 24 times.

A child process runs the updater's job (`incremental_update`, force-promoted, tiny models) in a
loop on a prepared workdir, appending fresh events to the offline log before each update. It is
SIGKILLed at random points: half after a random delay (mostly in training), half a few
milliseconds after it announces `publish` or `promote` (inside the registry's publish path).
After every kill the registry must be whole: CHAMPION names a version that verifies, every
listed version verifies, no `v*` directory lacks its manifest, history.jsonl has no torn line.
Staging directories may remain; the next updater (`build_updater`) removes them, and its first
update publishes and promotes cleanly.
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from live_stack import bootstrap_shop, load_tiny_reranker, shop_config, teardown_project

from freshrec.config import FreshRecConfig
from freshrec.v1 import updater_pb2
from services.registry import HISTORY, ModelRegistry
from services.updater.server import build_updater

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

KILLS = 24
SEED = 20240611

# The child: imports once, says "ready", then updates forever, announcing each registry step.
CHILD = r"""
import sys, uuid
from datetime import UTC, datetime, timedelta
import pandas as pd
import torch
from freshrec.config import load_config
from services.ingestion.offline_log import OfflineEventLog
from services.registry import ModelRegistry
from services.updater.service import incremental_update, load_item_catalog
from model.reranker import CrossEncoderReranker

torch.set_num_threads(1)
config = load_config(sys.argv[1])
items = load_item_catalog(config)
ids = sorted(items)

class Announcing(ModelRegistry):
    def publish(self, kind, staging, manifest):
        print("publish", flush=True)
        return super().publish(kind, staging, manifest)

    def promote(self, kind, version, reason=""):
        print("promote", version, flush=True)
        return super().promote(kind, version, reason)

load = lambda path: CrossEncoderReranker.from_pretrained(path, 32, "cpu", "fp32")
registry = Announcing(config.registry_dir)
log = OfflineEventLog(config.offline_dir)
print("ready", flush=True)
while True:
    now = datetime.now(UTC)
    run = uuid.uuid4().hex[:8]
    log.append_frame(pd.DataFrame({
        "event_id": [f"{run}-{k}" for k in range(40)],
        "user_id": [f"kill-user-{k % 5}" for k in range(40)],
        "item_id": [ids[(7 * k + int(run, 16)) % len(ids)] for k in range(40)],
        "event_type": ["purchase" if k % 5 == 0 else "click" for k in range(40)],
        "timestamp": [now - timedelta(milliseconds=50 * (40 - k)) for k in range(40)],
    }))
    print("train", flush=True)
    out = incremental_update(config, registry, log, "chaos", True, load, items)
    print("done", out.state, out.challenger_version, flush=True)
"""


@pytest.fixture(scope="module")
def workdir_config(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FreshRecConfig]:
    config = shop_config(tmp_path_factory.mktemp("sigkill") / "work", redis_url)
    bootstrap_shop(config)
    try:
        yield config
    finally:
        teardown_project(config, redis_url)


class Child:
    """The updater loop in a subprocess; stdout lines arrive on a queue."""

    def __init__(self, workdir: Path) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(workdir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def wait_for(self, prefix: str, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                err = self.proc.stderr.read() if self.proc.stderr else ""
                raise AssertionError(
                    f"child never said {prefix!r}; seen {self.seen}\n{err[-3000:]}"
                )
            try:
                line = self.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            self.seen.append(line)
            if line.startswith(prefix):
                return line

    def drain(self) -> None:
        while True:
            try:
                self.seen.append(self.lines.get_nowait())
            except queue.Empty:
                return

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        assert self.proc.returncode == -signal.SIGKILL
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


def assert_registry_whole(registry: ModelRegistry) -> dict[str, int]:
    """The invariants a kill must never break; returns what it left behind, by kind."""
    base = registry.root / "reranker"
    champion = registry.champion("reranker")
    assert champion is not None, "CHAMPION is missing or empty"
    registry.verify("reranker", champion)  # raises ArtifactError / NotFound
    for version in registry.versions("reranker"):
        registry.verify("reranker", version)
    half = [p.name for p in base.glob("v*") if not (p / "manifest.json").is_file()]
    assert not half, f"version directories without a manifest: {half}"
    for n, line in enumerate((base / HISTORY).read_text().splitlines()):
        json.loads(line)  # a torn line would raise here
        assert line, f"empty line {n} in history.jsonl"
    chain = registry.champion_chain("reranker")
    assert chain and chain[-1] == champion, f"history ends at {chain[-1:]}, CHAMPION {champion}"
    return {
        "staging": len(list(base.glob(".staging-*"))),
        "champion_tmp": len(list(base.glob(".CHAMPION.*"))),
    }


def test_updater_sigkill_at_random_points(workdir_config: FreshRecConfig) -> None:
    import torch

    config = workdir_config
    registry = ModelRegistry(config.registry_dir)
    rng = random.Random(SEED)
    phases: Counter[str] = Counter()
    left_behind: Counter[str] = Counter()
    started_versions = len(registry.versions("reranker"))

    for n in range(KILLS):
        child = Child(config.workdir)
        child.wait_for("ready")
        if n % 2 == 0:  # anywhere: mostly training, sometimes publishing
            time.sleep(rng.uniform(0.0, 4.0))
        else:  # inside the publish path, a few ms after it starts
            child.wait_for("publish" if n % 4 == 1 else "promote")
            time.sleep(rng.uniform(0.0, 0.03))
        child.drain()
        phase = child.seen[-1].split()[0] if child.seen else "ready"
        phases[phase] += 1
        child.kill()
        left_behind = Counter(assert_registry_whole(registry))  # they pile up until cleaned

    published = len(registry.versions("reranker")) - started_versions
    # Resume: a new updater cleans staging, and its first update publishes and promotes.
    before = registry.champion("reranker")
    threads = torch.get_num_threads()
    upd = build_updater(config, port=0, load_reranker=load_tiny_reranker)
    try:
        assert not list((registry.root / "reranker").glob(".staging-*"))
        _append_fresh_events(config)
        result = upd.servicer.TriggerUpdate(
            updater_pb2.TriggerUpdateRequest(reason="after kills", wait=True, force_promote=True),
            None,
        ).result
    finally:
        upd.stop(grace=1)
        torch.set_num_threads(threads)
    assert result.state == "promoted", result.message
    assert result.champion_version == registry.champion("reranker") != before
    assert_registry_whole(registry)
    rolled, previous = registry.rollback("reranker", reason="chaos: check the chain")
    assert (rolled, previous) == (before, result.champion_version)

    print(
        json.dumps(
            {
                "test": "test_updater_sigkill_at_random_points",
                "kills": KILLS,
                "last_step_before_kill": dict(phases),
                "versions_published_while_killed": published,
                "staging_dirs_left_then_cleaned": left_behind["staging"],  # after the last kill
                "champion_tmp_files_left": left_behind["champion_tmp"],
                "resumed_with": result.champion_version,
            }
        )
    )
    # 12 kills aimed at publish/promote; a few ms may carry one past the step it aimed at.
    assert phases["train"] + phases["ready"] >= 4
    assert phases["publish"] + phases["promote"] >= 8


def _append_fresh_events(config: FreshRecConfig) -> None:
    import uuid
    from datetime import UTC, datetime, timedelta

    import pandas as pd

    from services.ingestion.offline_log import OfflineEventLog
    from services.updater.service import load_item_catalog

    ids = sorted(load_item_catalog(config))
    now = datetime.now(UTC)
    run = uuid.uuid4().hex[:8]
    OfflineEventLog(config.offline_dir).append_frame(
        pd.DataFrame(
            {
                "event_id": [f"{run}-{k}" for k in range(40)],
                "user_id": [f"resume-user-{k % 5}" for k in range(40)],
                "item_id": [ids[(7 * k) % len(ids)] for k in range(40)],
                "event_type": ["purchase" if k % 5 == 0 else "click" for k in range(40)],
                "timestamp": [now - timedelta(milliseconds=50 * (40 - k)) for k in range(40)],
            }
        )
    )
