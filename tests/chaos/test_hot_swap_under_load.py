"""Promise 1, hot swap under load: 4 clients, 10,000 Recommend calls, 5 updates + 1 rollback.

The updater trains, publishes and promotes five tiny-model versions (TriggerUpdate with
force_promote, so every one is promoted) and then rolls one back (Rollback RPC) while four
clients, each on its own channel, keep calling Recommend. Checks:

* zero failed calls;
* every response names a version that had been made champion (history.jsonl) before it arrived;
* no response mixes versions: on a sample, each item's relevance equals what the named version
  computes for that request (and, on that sample, the versions are told apart);
* p99 latency in the swap windows vs steady state is printed as one JSON line.
"""

from __future__ import annotations

import itertools
import json
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import grpc
import numpy as np
import pandas as pd
import pytest
from live_stack import Stack, event, load_tiny_reranker, running_stack

from freshrec.clients import channel, ranking_stub
from freshrec.v1 import ranking_pb2, updater_pb2
from model.collab import profile_history
from model.text import ranking_item_text, user_context_text
from services.registry import HISTORY, ModelRegistry

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

CLIENTS = 4
TOTAL_CALLS = 10_000
UPDATES = 5
STEADY_BEFORE = 1_500  # calls answered before the first update starts
SAMPLE_EVERY = 20  # every 20th response is re-scored with the version it names
HISTORY_SLACK_S = 0.25
TOLERANCE = 1e-4  # float32 on the wire; batch padding moves scores by ~1e-7


@dataclass
class Call:
    client: int
    user_id: str
    request_id: str
    started: float  # time.monotonic()
    seconds: float
    wall_end: float  # time.time(), to compare with history.jsonl
    version: str = ""
    index_version: str = ""
    error: str = ""
    items: list[tuple[str, float, int]] = field(default_factory=list)  # id, relevance, stage


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # 20 candidates re-ranked per call (not 50): the load is about swaps, not re-ranker cost.
    with running_stack(
        tmp_path_factory.mktemp("hotswap") / "work", redis_url, recall_candidates=20
    ) as s:
        yield s


def _load_users(stack: Stack, n: int = 16) -> list[str]:
    """Known users with recent items: their answers go through recall and the re-ranker."""
    out = []
    for user_id in stack.users:
        profile = stack.features.get_user_profile(user_id)
        if profile is not None and profile.recent_items:
            out.append(user_id)
        if len(out) == n:
            break
    assert len(out) >= 4
    return out


def _log_training_events(stack: Stack, n: int = 40) -> None:
    """Fresh positives by users the load never asks for, so the load's profiles stay fixed."""
    now = datetime.now(UTC)
    run = uuid.uuid4().hex[:8]
    events = [
        event(
            f"{run}-{k}",
            f"trainer-{k % 5}",
            stack.catalog[(7 * k + len(run)) % len(stack.catalog)],
            ranking_pb2.EVENT_TYPE_PURCHASE if k % 5 == 0 else ranking_pb2.EVENT_TYPE_CLICK,
            # A narrow span just before now: every round's events must fall after the previous
            # champion's training window (a wide span overlapped it when updates ran fast).
            now - timedelta(milliseconds=10 * (n - k)),
        )
        for k in range(n)
    ]
    reply = stack.rank.LogEvents(ranking_pb2.LogEventsRequest(events=events), timeout=60)
    assert reply.accepted == n, dict(reply.rejected_by_reason)


class Load:
    """CLIENTS threads sharing one call budget, recording every call."""

    def __init__(self, address: str, users: list[str]) -> None:
        self.address = address
        self.users = users
        self.calls: list[Call] = []
        self._lock = threading.Lock()
        self._budget = itertools.count()
        self.threads = [
            threading.Thread(target=self._client, args=(c,), name=f"load-{c}", daemon=True)
            for c in range(CLIENTS)
        ]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self, timeout: float) -> None:
        for t in self.threads:
            t.join(timeout)
            assert not t.is_alive(), "a load client did not finish"

    @property
    def done(self) -> int:
        with self._lock:
            return len(self.calls)

    def latest_version(self) -> str:
        with self._lock:
            return self.calls[-1].version if self.calls else ""

    def wait_calls(self, n: int, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while self.done < n:
            assert time.monotonic() < deadline, f"only {self.done} calls within {timeout:.0f} s"
            time.sleep(0.05)

    def _client(self, client: int) -> None:
        with channel(self.address) as ch:
            stub = ranking_stub(ch)
            while (n := next(self._budget)) < TOTAL_CALLS:
                user = self.users[n % len(self.users)]
                request_id = f"load-{n}"
                t0 = time.monotonic()
                call = Call(client, user, request_id, t0, 0.0, 0.0)
                try:
                    reply = stub.Recommend(
                        ranking_pb2.RecommendRequest(user_id=user, k=10, request_id=request_id),
                        timeout=30,
                    )
                    call.version, call.index_version = reply.model_version, reply.index_version
                    if n % SAMPLE_EVERY == 0:
                        call.items = [(i.item_id, i.relevance, i.stage) for i in reply.items]
                except grpc.RpcError as exc:
                    call.error = f"{exc.code().name}: {exc.details()}"
                call.seconds = time.monotonic() - t0
                call.wall_end = time.time()
                with self._lock:
                    self.calls.append(call)
                    if len(self.calls) % 1000 == 0:
                        print(f"hot swap: {len(self.calls)} calls", file=sys.stderr, flush=True)


def _champion_since(stack: Stack) -> dict[str, float]:
    """version -> earliest wall time it became champion (v0001 was before the load)."""
    out = {"v0001": 0.0}
    path = stack.config.registry_dir / "reranker" / HISTORY
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        at = pd.Timestamp(rec["at"]).timestamp()
        out[rec["version"]] = min(out.get(rec["version"], at), at)
    return out


def _p(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values) * 1e3, q)) if values else float("nan")


def test_hot_swap_under_load(stack: Stack) -> None:
    users = _load_users(stack)
    load = Load(f"127.0.0.1:{stack.ranking.port}", users)
    windows: list[tuple[float, float]] = []  # monotonic [start, new version observed + 1 s]
    actions: list[str] = []

    load.start()
    load.wait_calls(STEADY_BEFORE)
    for n in range(UPDATES):
        _log_training_events(stack)
        t0 = time.monotonic()
        result = stack.upd.TriggerUpdate(
            updater_pb2.TriggerUpdateRequest(reason=f"chaos {n}", wait=True, force_promote=True),
            timeout=600,
        ).result
        assert result.state == "promoted", result.message
        target = result.champion_version
        actions.append(f"promote {target}")
        _wait_served(load, target)
        windows.append((t0, time.monotonic() + 1.0))
        load.wait_calls(load.done + 300)  # some steady calls between swaps
    t0 = time.monotonic()
    rolled = stack.upd.Rollback(updater_pb2.RollbackRequest(), timeout=30)
    actions.append(f"rollback {rolled.previous_version} -> {rolled.champion_version}")
    _wait_served(load, rolled.champion_version)
    windows.append((t0, time.monotonic() + 1.0))
    load.join(timeout=600)

    calls = load.calls
    failed = [c for c in calls if c.error]
    assert len(calls) == TOTAL_CALLS
    assert not failed, f"{len(failed)} failed calls, first: {failed[0].error}"

    # Every answer names a version that was champion before the answer arrived.
    since = _champion_since(stack)
    assert len(since) == 1 + UPDATES
    for c in calls:
        assert c.version in since, c
        # history.jsonl is appended just after CHAMPION is replaced: allow that gap.
        assert since[c.version] <= c.wall_end + HISTORY_SLACK_S, (
            f"{c.request_id}: {c.version} early"
        )
        assert c.index_version == "v0001"
    served = {c.version for c in calls}
    assert served == set(since), f"versions never served: {set(since) - served}"

    mixed, ambiguous, checked = _rescore_sample(stack, [c for c in calls if c.items])
    assert checked >= TOTAL_CALLS // SAMPLE_EVERY - 1
    assert not mixed, f"{len(mixed)} answers not scored by the version they name: {mixed[:3]}"
    assert ambiguous <= checked // 20, f"{ambiguous}/{checked} answers fit several versions"

    in_swap = [c.seconds for c in calls if any(a <= c.started <= b for a, b in windows)]
    steady = [c.seconds for c in calls if not any(a <= c.started <= b for a, b in windows)]
    report = {
        "test": "test_hot_swap_under_load",
        "calls": len(calls),
        "failed": len(failed),
        "clients": CLIENTS,
        "actions": actions,
        "versions_served": sorted(served),
        "rescored": checked,
        "ambiguous": ambiguous,
        "calls_in_swap_windows": len(in_swap),
        "p50_steady_ms": round(_p(steady, 50), 2),
        "p99_steady_ms": round(_p(steady, 99), 2),
        "p50_swap_ms": round(_p(in_swap, 50), 2),
        "p99_swap_ms": round(_p(in_swap, 99), 2),
        "seconds": round(max(c.started + c.seconds for c in calls) - calls[0].started, 1),
    }
    print(json.dumps(report))
    assert in_swap and steady


def _wait_served(load: Load, version: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while load.latest_version() != version:
        assert time.monotonic() < deadline, f"{version} not served within {timeout:.0f} s"
        time.sleep(0.02)


def _rescore_sample(stack: Stack, sample: list[Call]) -> tuple[list[str], int, int]:
    """Re-score sampled answers with every version; (mismatches, ambiguous, checked)."""
    registry = ModelRegistry(stack.config.registry_dir)
    models = {
        v: load_tiny_reranker(str(registry.path("reranker", v)))
        for v in registry.versions("reranker")
    }
    profiles = {u: stack.features.get_user_profile(u) for u in {c.user_id for c in sample}}
    mixed: list[str] = []
    ambiguous = checked = 0
    for c in sample:
        ids = [i for i, _, stage in c.items if stage == ranking_pb2.STAGE_RECALL]
        if not ids:
            continue
        features = stack.features.get_items(ids)
        now = datetime.now(UTC)
        texts = [ranking_item_text(features[i], now) for i in ids]
        got = np.array([r for _, r, stage in c.items if stage == ranking_pb2.STAGE_RECALL])
        user_text = user_context_text(profiles[c.user_id], None)
        history = profile_history(profiles[c.user_id])
        # What serving computes: the text scorer, then the version's collaborative term.
        fits = [
            v
            for v, m in models.items()
            if np.max(np.abs(m.add_collab(m.score(user_text, texts), history, ids) - got))
            <= TOLERANCE
        ]
        checked += 1
        if c.version not in fits:
            mixed.append(f"{c.request_id}: named {c.version}, fits {fits}")
        elif len(fits) > 1:
            ambiguous += 1
    return mixed, ambiguous, checked
