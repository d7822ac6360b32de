"""`make demo`: the whole FreshRec loop on real parts, narrated step by step.

dataset → offline store → Feast apply + materialise (Redis, or SQLite said plainly) → item
embeddings + FAISS index → first re-ranker from the pretrained BERT → ranking and updater
services as separate processes on real ports → recommendations → newer events through
LogEvents → one incremental update → the same ranking process answering with version N+1.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console

from freshrec.config import FreshRecConfig, load_config
from freshrec.data.schema import Dataset

IMPORTED_ITEMS = "imported_items.parquet"
IMPORTED_INTERACTIONS = "imported_interactions.parquet"
DEMO_USERS = 3
LATENCY_CALLS = 200


def load_named_dataset(name: str, config: FreshRecConfig, say: Callable[[str], None]) -> Dataset:
    """ml100k (from the recbole wheel; synthetic when it cannot be had), synthetic, imported."""
    from freshrec.data import DatasetUnavailable, load_dataset

    cache = Path(os.environ.get("FRESHREC_CACHE_DIR", Path.home() / ".cache" / "freshrec"))
    if name == "imported":
        items = pd.read_parquet(config.data_dir / IMPORTED_ITEMS)
        inter = pd.read_parquet(config.data_dir / IMPORTED_INTERACTIONS)
        return Dataset("imported", items, inter)
    if name == "ml100k":
        try:
            return load_dataset("ml100k", cache)
        except DatasetUnavailable as exc:
            say(f"[yellow]MovieLens-100k unavailable ({exc}); using the synthetic shop[/yellow]")
            name = "synthetic"
    return load_dataset(name, cache)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Service:
    """A `freshrec serve ...` child process with its log file."""

    def __init__(self, kind: str, workdir: Path) -> None:
        self.kind = kind
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        log_dir = workdir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{kind}.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "freshrec.cli",
                "serve",
                kind,
                "--workdir",
                str(workdir),
                "--port",
                str(self.port),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()


def replay_events(stub: Any, newer: pd.DataFrame, batch: int = 500) -> tuple[int, dict[str, int]]:
    """Send newer interactions through LogEvents, in order, with their own timestamps (bootstrap
    placed them between the end of history and now)."""
    from google.protobuf.timestamp_pb2 import Timestamp

    from freshrec.v1 import ranking_pb2

    types = {
        "impression": ranking_pb2.EVENT_TYPE_IMPRESSION,
        "click": ranking_pb2.EVENT_TYPE_CLICK,
        "add_to_cart": ranking_pb2.EVENT_TYPE_ADD_TO_CART,
        "purchase": ranking_pb2.EVENT_TYPE_PURCHASE,
    }
    accepted = 0
    rejected: dict[str, int] = {}
    rows = newer.to_dict("records")
    for start in range(0, len(rows), batch):
        events = []
        for row in rows[start : start + batch]:
            ts = Timestamp()
            ts.FromDatetime(pd.Timestamp(row["timestamp"]).to_pydatetime())
            events.append(
                ranking_pb2.Event(
                    event_id=str(row["event_id"]),
                    user_id=str(row["user_id"]),
                    item_id=str(row["item_id"]),
                    type=types[str(row["event_type"])],
                    timestamp=ts,
                )
            )
        reply = stub.LogEvents(ranking_pb2.LogEventsRequest(events=events), timeout=60)
        accepted += reply.accepted
        for reason, n in reply.rejected_by_reason.items():
            rejected[reason] = rejected.get(reason, 0) + n
    return accepted, rejected


def measure_latency(stub: Any, users: list[str], calls: int) -> dict[str, float]:
    """Median and p99 of Recommend (k=10) over `calls` sequential calls, in milliseconds."""
    from freshrec.v1 import ranking_pb2

    times = []
    for i in range(calls):
        req = ranking_pb2.RecommendRequest(user_id=users[i % len(users)], k=10)
        t = time.perf_counter()
        stub.Recommend(req, timeout=30)
        times.append((time.perf_counter() - t) * 1e3)
    arr = np.asarray(times)
    return {
        "calls": float(calls),
        "p50_ms": float(np.percentile(arr, 50)),
        "p99_ms": float(np.percentile(arr, 99)),
        "mean_ms": float(arr.mean()),
    }


def run_demo(dataset: str, workdir: Path, n_replay: int, console: Console) -> dict[str, Any]:
    """Run the loop; print each step with its time; return a summary (for --json)."""
    from freshrec.clients import channel, ranking_stub, updater_stub, wait_serving
    from freshrec.v1 import ranking_pb2, updater_pb2
    from services.common.auth import updater_token
    from services.jobs.bootstrap import REPLAY_FILE, bootstrap, remove_workdir

    steps: dict[str, float] = {}
    say = console.print
    started = time.perf_counter()
    remove_workdir(workdir, say)
    # A project name per run: nothing a previous run left in a shared Redis can leak in.
    config = load_config(workdir, project=f"freshrec_demo_{datetime.now(UTC):%Y%m%d%H%M%S}")

    say("[bold]1. data[/bold]")
    t = time.perf_counter()
    data = load_named_dataset(dataset, config, say)
    steps["load dataset"] = time.perf_counter() - t
    say(f"   {data.name}: {len(data.items):,} items, {len(data.interactions):,} interactions")

    say("[bold]2. bootstrap: offline store, Feast, FAISS, first re-ranker[/bold]")
    report = bootstrap(config, data, announce=lambda m: say("   " + m))
    steps.update(report.steps)
    services: list[_Service] = []
    summary: dict[str, Any] = {"dataset": data.name, "online_store": report.online_store}
    try:
        say("[bold]3. start ranking and updater services (separate processes)[/bold]")
        t = time.perf_counter()
        ranking = _Service("ranking", workdir)
        updater = _Service("updater", workdir)
        services += [ranking, updater]
        wait_serving(ranking.address, timeout=300)
        wait_serving(updater.address, timeout=300)
        steps["start services"] = time.perf_counter() - t
        say(
            f"   ranking on {ranking.address}, updater on {updater.address} (logs in {workdir / 'logs'})"
        )

        from freshrec.cli import print_recommendation

        newer = pd.read_parquet(workdir / "data" / REPLAY_FILE)
        replay = newer.head(n_replay)
        known = set(
            pd.read_parquet(config.offline_dir / "user_profile.parquet", columns=["user_id"])[
                "user_id"
            ].astype(str)
        )
        counts = replay["user_id"].astype(str).value_counts()
        active = [u for u in counts.index if u in known][:DEMO_USERS] or counts.index.tolist()[
            :DEMO_USERS
        ]
        # The services inherit this environment: with an updater token set, the demo uses it.
        token = updater_token(config.security)
        with channel(ranking.address) as rch, channel(updater.address, token=token) as uch:
            rank, upd = ranking_stub(rch), updater_stub(uch)
            say("[bold]4. recommendations[/bold]")
            t = time.perf_counter()
            for user in active:
                reply = rank.Recommend(ranking_pb2.RecommendRequest(user_id=user, k=5), timeout=30)
                print_recommendation(reply, f"user {user}")
            cold = rank.Recommend(
                ranking_pb2.RecommendRequest(user_id=f"new-{uuid.uuid4().hex[:6]}", k=5)
            )
            print_recommendation(cold, "a user never seen before")
            steps["first recommendations"] = time.perf_counter() - t
            version_before = reply.model_version

            say(f"[bold]5. replay {len(replay):,} newer events through LogEvents[/bold]")
            t = time.perf_counter()
            accepted, rejected = replay_events(rank, replay)
            again, again_rej = replay_events(rank, replay.head(200))
            steps["replay events"] = time.perf_counter() - t
            say(f"   accepted {accepted:,}; rejected {rejected or 'none'}")
            say(f"   the first 200 sent again: accepted {again}, rejected {again_rej}")

            say(
                "[bold]6. incremental update (fine-tune the champion on the new events, gate, publish)[/bold]"
            )
            t = time.perf_counter()
            result = upd.TriggerUpdate(
                updater_pb2.TriggerUpdateRequest(reason="demo: newer events", wait=True),
                timeout=3600,
            ).result
            steps["incremental update"] = time.perf_counter() - t
            say(
                f"   {result.state}: {result.message} ({result.examples:,} pairs, {result.seconds:.0f} s)"
            )

            say(
                "[bold]7. the running ranking service picks up the new champion (no restart)[/bold]"
            )
            t = time.perf_counter()
            champion = upd.GetStatus(updater_pb2.GetStatusRequest()).champion_version
            deadline = time.monotonic() + 60
            reply = rank.Recommend(ranking_pb2.RecommendRequest(user_id=active[0], k=5))
            while reply.model_version != champion and time.monotonic() < deadline:
                time.sleep(0.5)
                reply = rank.Recommend(ranking_pb2.RecommendRequest(user_id=active[0], k=5))
            steps["hot swap visible"] = time.perf_counter() - t
            print_recommendation(reply, f"user {active[0]} after the update")
            say(
                f"   served version: {version_before} → {reply.model_version} (ranking pid {ranking.proc.pid}, same process)"
            )

            say(f"[bold]8. Recommend latency, {LATENCY_CALLS} sequential calls over gRPC[/bold]")
            latency = measure_latency(rank, active, LATENCY_CALLS)
            say(f"   p50 {latency['p50_ms']:.1f} ms, p99 {latency['p99_ms']:.1f} ms")
        summary.update(
            version_before=version_before,
            version_after=reply.model_version,
            update_state=result.state,
            events_accepted=accepted,
            latency=latency,
        )
    finally:
        for svc in services:
            svc.stop()
        if report.choice is not None:
            report.choice.stop()
    steps["total"] = time.perf_counter() - started
    from rich.table import Table

    table = Table(title="demo summary", title_justify="left")
    table.add_column("step")
    table.add_column("seconds", justify="right")
    for name, seconds in steps.items():
        table.add_row(name, f"{seconds:.1f}")
    console.print(table)
    summary["steps"] = {k: round(v, 2) for k, v in steps.items()}
    return summary
