"""Promise 6, duplicates and replays: the same events are counted once in features and training.

One batch is sent through the live ranking service twice, then "replayed after a crash": a
second ranking server is built on the same workdir (new deduplicator, new Feast client, new
offline-log writer; the same Redis and files) and the client re-sends everything. The offline
log holds each event once, the user's profile counters moved once, and the training positives
built from the offline log (`positives_in_windows` over `OfflineEventLog.read()`) count each
event once.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest
from live_stack import Stack, event, running_stack

from freshrec.clients import channel, ranking_stub
from freshrec.v1 import ranking_pb2
from services.ingestion.offline_log import OfflineEventLog
from services.ranking.server import build_ranking
from services.updater.examples import Window, positives_in_windows
from services.updater.service import load_item_catalog

pytestmark = pytest.mark.integration

CLICK, CART, BUY = (
    ranking_pb2.EVENT_TYPE_CLICK,
    ranking_pb2.EVENT_TYPE_ADD_TO_CART,
    ranking_pb2.EVENT_TYPE_PURCHASE,
)


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("replay") / "work", redis_url) as s:
        yield s


def test_duplicates_and_replays_are_counted_once(stack: Stack) -> None:
    user = next(u for u in stack.users if stack.features.get_user_profile(u) is not None)
    before = stack.features.get_user_profile(user)
    assert before is not None
    run = uuid.uuid4().hex[:8]
    # An hour ago, one second apart: a window no other event of this module falls in.
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    kinds = [CLICK, CLICK, CART, BUY, CLICK, BUY, ranking_pb2.EVENT_TYPE_IMPRESSION]
    batch = [
        event(f"{run}-{k}", user, stack.catalog[k * 3], kind, start + timedelta(seconds=k))
        for k, kind in enumerate(kinds)
    ]
    request = ranking_pb2.LogEventsRequest(events=batch)

    first = stack.rank.LogEvents(request, timeout=30)
    again = stack.rank.LogEvents(request, timeout=30)
    # The ranking process "crashes"; a new one on the same workdir gets the client's replay.
    replacement = build_ranking(stack.config, port=0)
    try:
        with channel(f"127.0.0.1:{replacement.port}") as ch:
            replayed = ranking_stub(ch).LogEvents(request, timeout=30)
            # A replay mixed with one new event: only the new one is taken.
            extra = event(
                f"{run}-new", user, stack.catalog[1], CLICK, start + timedelta(seconds=30)
            )
            mixed = ranking_stub(ch).LogEvents(
                ranking_pb2.LogEventsRequest(events=[*batch, extra]), timeout=30
            )
    finally:
        replacement.stop(grace=1)

    assert (first.accepted, first.rejected) == (len(batch), 0)
    for reply in (again, replayed):
        assert (reply.accepted, dict(reply.rejected_by_reason)) == (0, {"duplicate": len(batch)})
    assert (mixed.accepted, dict(mixed.rejected_by_reason)) == (1, {"duplicate": len(batch)})

    # Features: every counter moved by exactly this batch plus the one new click.
    after = stack.features.get_user_profile(user)
    assert after is not None
    assert after.clicks == before.clicks + kinds.count(CLICK) + 1
    assert after.add_to_carts == before.add_to_carts + kinds.count(CART)
    assert after.purchases == before.purchases + kinds.count(BUY)
    assert after.events_total == before.events_total + len(kinds) + 1

    # The offline log, which training reads, holds each event once.
    log = OfflineEventLog(stack.config.offline_dir).read()
    mine = log[log["event_id"].str.startswith(f"{run}-")]
    assert sorted(mine["event_id"]) == sorted([e.event_id for e in batch] + [extra.event_id])
    assert mine["event_id"].is_unique

    # Training data: one positive per positive event in the window, no more.
    window = Window(start, start + timedelta(seconds=len(kinds)))
    positives = positives_in_windows(log, load_item_catalog(stack.config), {"w": window})["w"]
    expected = sum(kind != ranking_pb2.EVENT_TYPE_IMPRESSION for kind in kinds)
    assert len(positives) == expected
    in_window = log[window.mask(log["timestamp"])]
    assert set(in_window["event_id"]) == {e.event_id for e in batch}
    print(
        json.dumps(
            {
                "test": "test_duplicates_and_replays_are_counted_once",
                "sent": 3 * len(batch) + len(batch) + 1,
                "distinct": len(batch) + 1,
                "stored_offline": len(mine),
                "training_positives": len(positives),
                "profile_events_added": after.events_total - before.events_total,
            }
        )
    )
    assert pd.api.types.is_datetime64_any_dtype(log["timestamp"])
