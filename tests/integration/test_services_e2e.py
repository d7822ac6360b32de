"""Both services for real: bootstrap into Redis + Feast, in-process gRPC servers on free ports.

One module-scoped stack (tiny synthetic shop, tiny re-ranker, the real MiniLM recall encoder:
the ranking server embeds queries with it, so the index must live in the same space). Tests
run in file order; the lifecycle test at the end changes champions.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pandas as pd
import pytest
import redis
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from freshrec.clients import channel, ranking_stub, relisting, updater_stub
from freshrec.config import FreshRecConfig, load_config
from freshrec.data.synthetic import generate_shop
from freshrec.records import UserProfile
from freshrec.v1 import ranking_pb2, ranking_pb2_grpc, updater_pb2, updater_pb2_grpc
from model.device import COMPUTE_FLAGS
from model.reranker import CrossEncoderReranker, pretrained_path
from services.features.feast_store import FeastFeatureStore
from services.features.store import open_feature_store
from services.jobs.bootstrap import bootstrap
from services.ranking.server import SERVICE_NAME as RANKING_SERVICE
from services.ranking.server import RankingApp, build_ranking
from services.registry import ModelRegistry
from services.updater.server import SERVICE_NAME as UPDATER_SERVICE
from services.updater.server import UpdaterApp, build_updater

pytestmark = pytest.mark.integration

MAX_LENGTH = 32
SWAP_DEADLINE_S = 60.0  # the holder polls every 0.2 s; a swap normally lands within a second


def _load_reranker(path: str) -> CrossEncoderReranker:
    """The pretrained backbone becomes a tiny random BERT with the product's default split
    architecture (one joint layer); registry versions load as saved."""
    if Path(path) == pretrained_path():
        return CrossEncoderReranker.tiny(seed=0, max_length=MAX_LENGTH, joint_layers=1)
    return CrossEncoderReranker.from_pretrained(path, MAX_LENGTH, "cpu", "fp32")


@dataclass
class Stack:
    config: FreshRecConfig
    ranking: RankingApp
    updater: UpdaterApp
    rank: ranking_pb2_grpc.RankingServiceStub
    upd: updater_pb2_grpc.UpdaterServiceStub
    rank_channel: grpc.Channel
    upd_channel: grpc.Channel
    features: FeastFeatureStore
    user: UserProfile  # a known user with purchases
    catalog: list[str]


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    import torch

    threads = torch.get_num_threads()
    workdir = tmp_path_factory.mktemp("e2e") / "work"
    config = load_config(
        workdir,
        project=f"e2e_{uuid.uuid4().hex[:10]}",
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
        ranking={"registry_poll_seconds": 0.2, "exploration_rate": 0.0, "workers": 4},
    )
    dataset = generate_shop(seed=5, n_items=150, n_users=40, days=30, events_per_user=40)
    report = bootstrap(
        config, dataset, announce=lambda _msg: None, load_reranker=_load_reranker, progress=False
    )
    assert report.index_version == "v0001"
    assert report.model is not None and report.model.state == "promoted"

    ranking = build_ranking(config, port=0)
    updater = build_updater(config, port=0, load_reranker=_load_reranker)
    rank_channel = channel(f"127.0.0.1:{ranking.port}")
    upd_channel = channel(f"127.0.0.1:{updater.port}")
    features = FeastFeatureStore(config.feature_repo_dir)
    features.start()
    user = None
    for user_id in dataset.interactions["user_id"].unique():
        profile = features.get_user_profile(str(user_id))
        if profile is not None and profile.purchased_items and profile.recent_items:
            user = profile
            break
    assert user is not None, "the synthetic shop has no user with purchases"
    try:
        yield Stack(
            config,
            ranking,
            updater,
            ranking_stub(rank_channel),
            updater_stub(upd_channel),
            rank_channel,
            upd_channel,
            features,
            user,
            [str(i) for i in dataset.items["item_id"]],
        )
    finally:
        rank_channel.close()
        upd_channel.close()
        updater.servicer.wait_idle(120)
        updater.stop(grace=1)
        ranking.stop(grace=1)
        torch.set_num_threads(threads)
        # The Redis may be shared: remove only this project's keys (Feast's and the dedup set).
        open_feature_store(config.feature_repo_dir).teardown()
        client = redis.Redis.from_url(redis_url)
        for key in client.scan_iter(f"freshrec:{config.project}:*"):
            client.delete(key)
        client.close()


def _event(
    event_id: str, user_id: str, item_id: str, type_: int, at: datetime
) -> ranking_pb2.Event:
    ts = Timestamp()
    ts.FromDatetime(at)
    return ranking_pb2.Event(
        event_id=event_id, user_id=user_id, item_id=item_id, type=type_, timestamp=ts
    )


def _wait_for(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + SWAP_DEADLINE_S
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {SWAP_DEADLINE_S:.0f} s")
        time.sleep(0.1)


def _recommend(
    stack: Stack, user_id: str, k: int = 10, **kw: object
) -> ranking_pb2.RecommendResponse:
    return stack.rank.Recommend(
        ranking_pb2.RecommendRequest(user_id=user_id, k=k, **kw),
        timeout=30,  # type: ignore[arg-type]
    )


# -- health, reflection ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("server", "service"), [("ranking", RANKING_SERVICE), ("updater", UPDATER_SERVICE)]
)
def test_both_services_report_serving(stack: Stack, server: str, service: str) -> None:
    ch = stack.rank_channel if server == "ranking" else stack.upd_channel
    health = health_pb2_grpc.HealthStub(ch)

    for name in (service, ""):
        reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
    with pytest.raises(grpc.RpcError) as info:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("server", "service"), [("ranking", RANKING_SERVICE), ("updater", UPDATER_SERVICE)]
)
def test_reflection_lists_the_services(stack: Stack, server: str, service: str) -> None:
    ch = stack.rank_channel if server == "ranking" else stack.upd_channel
    stub = reflection_pb2_grpc.ServerReflectionStub(ch)

    replies = list(
        stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
    )

    names = {s.name for s in replies[0].list_services_response.service}
    assert service in names
    assert "grpc.health.v1.Health" in names


# -- Recommend ------------------------------------------------------------------------------


def test_recommend_for_a_known_user(stack: Stack) -> None:
    reply = _recommend(stack, stack.user.user_id, 10, request_id="known-1")
    reranker = stack.ranking.models.current.reranker
    # The default serving path: split model, item states warmed at load, int8 user side.
    assert reranker.architecture == "split-1-int8user"
    assert reranker.cached_items() >= 100

    ids = [i.item_id for i in reply.items]
    assert len(ids) == 10 == len(set(ids))
    assert (reply.model_version, reply.index_version) == ("v0001", "v0001")
    assert not reply.cold_start and not reply.degraded
    assert reply.request_id == "known-1"
    assert not set(stack.user.purchased_items) & set(ids)
    assert not set(stack.user.recent_items) & set(ids)
    assert set(ids) <= set(stack.catalog)
    assert all(0.0 <= i.relevance <= 1.0 for i in reply.items)
    assert reply.items[0].stage == ranking_pb2.STAGE_RECALL


def test_recommend_with_a_query_and_exclusions(stack: Stack) -> None:
    first = _recommend(stack, stack.user.user_id, 5)
    excluded = [i.item_id for i in first.items[:3]]

    reply = _recommend(
        stack, stack.user.user_id, 5, query="coffee beans", exclude_item_ids=excluded
    )

    assert len(reply.items) == 5
    assert not set(excluded) & {i.item_id for i in reply.items}
    assert reply.request_id  # generated when the caller sent none


def test_recommend_for_an_unknown_user_is_a_cold_start(stack: Stack) -> None:
    from prometheus_client import REGISTRY

    def cold() -> float:
        return REGISTRY.get_sample_value("freshrec_cold_start_answers_total") or 0.0

    before = cold()
    reply = _recommend(stack, f"never-seen-{uuid.uuid4().hex}", 5)

    assert reply.cold_start and not reply.degraded
    assert cold() == before + 1  # counted: a share near 1 means the store lost its profiles
    _recommend(stack, stack.user.user_id, 5)
    assert cold() == before + 1
    assert len(reply.items) == 5
    assert all(i.stage == ranking_pb2.STAGE_FALLBACK for i in reply.items)


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"user_id": "u1", "k": 0}, "k must"),
        ({"user_id": "", "k": 5}, "user_id"),
        ({"user_id": "u1", "k": 101}, "k must"),
    ],
)
def test_recommend_rejects_bad_requests(
    stack: Stack, fields: dict[str, object], needle: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stack.rank.Recommend(ranking_pb2.RecommendRequest(**fields), timeout=10)  # type: ignore[arg-type]

    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in info.value.details()


# -- LogEvents ------------------------------------------------------------------------------


def test_log_events_accepts_dedups_rejects_and_updates_the_profile(stack: Stack) -> None:
    user = stack.user.user_id
    fresh = next(i for i in stack.catalog if i not in stack.user.recent_items)
    now = datetime.now(UTC)
    run = uuid.uuid4().hex[:8]
    good = [
        _event(
            f"{run}-a", user, fresh, ranking_pb2.EVENT_TYPE_IMPRESSION, now - timedelta(seconds=2)
        ),
        _event(f"{run}-b", user, fresh, ranking_pb2.EVENT_TYPE_CLICK, now - timedelta(seconds=1)),
    ]

    first = stack.rank.LogEvents(ranking_pb2.LogEventsRequest(events=good), timeout=30)
    again = stack.rank.LogEvents(ranking_pb2.LogEventsRequest(events=good), timeout=30)
    # A batch with some valid events is accepted in part, the rest counted by reason.
    mixed = stack.rank.LogEvents(
        ranking_pb2.LogEventsRequest(
            events=[
                _event(f"{run}-c", "", fresh, ranking_pb2.EVENT_TYPE_CLICK, now),
                _event(f"{run}-d", user, fresh, ranking_pb2.EVENT_TYPE_IMPRESSION, now),
            ]
        ),
        timeout=30,
    )
    # A batch with nothing valid is a client bug: INVALID_ARGUMENT naming the field.
    with pytest.raises(grpc.RpcError) as bad:
        stack.rank.LogEvents(
            ranking_pb2.LogEventsRequest(
                events=[_event(f"{run}-e", "", fresh, ranking_pb2.EVENT_TYPE_CLICK, now)]
            ),
            timeout=30,
        )

    assert (first.accepted, first.rejected) == (2, 0)
    assert (again.accepted, again.rejected) == (0, 2)
    assert dict(again.rejected_by_reason) == {"duplicate": 2}
    assert (mixed.accepted, mixed.rejected) == (1, 1)
    assert dict(mixed.rejected_by_reason) == {"missing_user_id": 1}
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "user_id" in bad.value.details()
    profile = stack.features.get_user_profile(user)
    assert profile is not None
    assert profile.recent_items[0] == fresh
    assert profile.clicks == stack.user.clicks + 1
    # The next answer for that user no longer offers what they just looked at.
    reply = _recommend(stack, user, 10)
    assert fresh not in {i.item_id for i in reply.items}


def test_a_repeat_request_reuses_its_scores_until_the_profile_changes(stack: Stack) -> None:
    user = stack.user.user_id
    reranker = stack.ranking.models.current.reranker

    def relevance(reply: ranking_pb2.RecommendResponse) -> dict[str, float]:
        return {i.item_id: i.relevance for i in reply.items if i.stage == ranking_pb2.STAGE_RECALL}

    first = relevance(_recommend(stack, user, 10))
    hits, misses = reranker.score_cache_hits, reranker.score_cache_misses
    again = relevance(_recommend(stack, user, 10))
    # No forward pass for the repeat, and the same scores for the items both answers hold.
    assert (reranker.score_cache_hits, reranker.score_cache_misses) == (hits + 1, misses)
    assert {i: again[i] for i in first.keys() & again.keys()} == {
        i: first[i] for i in first.keys() & again.keys()
    }

    # A click changes the profile, so the user context: the next answer runs the model again.
    profile = stack.features.get_user_profile(user)
    assert profile is not None
    clicked = next(i for i in stack.catalog if i not in profile.recent_items)
    event = _event(uuid.uuid4().hex, user, clicked, ranking_pb2.EVENT_TYPE_CLICK, datetime.now(UTC))
    assert stack.rank.LogEvents(ranking_pb2.LogEventsRequest(events=[event])).accepted == 1
    _recommend(stack, user, 10)
    assert (reranker.score_cache_hits, reranker.score_cache_misses) == (hits + 1, misses + 1)


def test_log_events_prepares_the_users_next_request_on_the_torch_thread(stack: Stack) -> None:
    # Another user than the tests above use, so their profile's context is new here.
    profiled = pd.read_parquet(stack.config.offline_dir / "user_profile.parquet")["user_id"]
    user = next(
        u
        for u in reversed(profiled.astype(str).tolist())
        if u != stack.user.user_id and stack.features.get_user_profile(u) is not None
    )
    reranker = stack.ranking.models.current.reranker
    _recommend(stack, user, 5)
    profile = stack.features.get_user_profile(user)
    assert profile is not None
    # From the end of the catalogue: the tests above click its first items, and a context
    # whose tokens another user's request already has is kept already, nothing to prepare
    # (the user segment keeps its first MAX_LENGTH // 2 tokens: mostly the newest title).
    clicked = next(i for i in reversed(stack.catalog) if i not in profile.recent_items)
    prepared = reranker.user_states_prepared
    hits, misses = reranker.user_cache_hits, reranker.user_cache_misses
    event = _event(uuid.uuid4().hex, user, clicked, ranking_pb2.EVENT_TYPE_CLICK, datetime.now(UTC))
    assert stack.rank.LogEvents(ranking_pb2.LogEventsRequest(events=[event])).accepted == 1
    reply = _recommend(stack, user, 5)
    # The new context's user side was computed after LogEvents, before this request's model
    # call (both queued on the one torch thread): the request found it kept.
    assert reranker.user_states_prepared == prepared + 1
    assert (reranker.user_cache_hits, reranker.user_cache_misses) == (hits + 1, misses)
    assert clicked not in {i.item_id for i in reply.items}  # the new profile was read
    changed = stack.features.get_user_profile(user)
    assert changed is not None and changed.recent_items[0] == clicked


def test_a_restarted_service_reads_its_item_states_from_disk_and_answers_alike(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    from model.item_state_snapshot import ItemStateSnapshot

    serving = stack.ranking.models.current.reranker
    fingerprint = serving.item_side_fingerprint()
    assert fingerprint is not None
    # The service's start-up computed its warm set and wrote it under its item side.
    written = ItemStateSnapshot.open(stack.config.item_state_dir, fingerprint)
    assert written is not None and len(written) >= len(stack.catalog)
    caplog.set_level(logging.INFO, logger="services.ranking.server")
    again = build_ranking(stack.config, port=0)  # a restart, or a replica on the same volume
    try:
        messages = [r.getMessage() for r in caplog.records]
        assert any(f"item states read from {written.info.path}" in m for m in messages)
        assert not any("item states computed" in m for m in messages)
        assert again.models.current.reranker.cached_items() == serving.cached_items()
        with channel(f"127.0.0.1:{again.port}") as other:
            stub = ranking_stub(other)
            for user in (stack.user.user_id, "someone-new"):
                request = ranking_pb2.RecommendRequest(user_id=user, k=10)
                theirs = stub.Recommend(request, timeout=30)
                ours = stack.rank.Recommend(request, timeout=30)
                assert [(i.item_id, i.relevance) for i in theirs.items] == [
                    (i.item_id, i.relevance) for i in ours.items
                ]
    finally:
        again.stop(grace=1)


def test_the_item_states_job_writes_the_catalogue_as_the_service_computes_it(
    stack: Stack,
) -> None:
    from model.item_state_snapshot import ItemStateSnapshot
    from services.jobs.item_states import write_item_states

    serving = stack.ranking.models.current.reranker
    fingerprint = serving.item_side_fingerprint()
    assert fingerprint is not None
    shutil.rmtree(stack.config.item_state_dir / fingerprint)  # the service keeps its open file
    head = write_item_states(stack.config, items=40, announce=lambda _m: None)
    assert (head.fingerprint, head.version) == (fingerprint, "v0001")
    assert (head.items, head.read, head.computed) == (40, 0, 40)
    whole = write_item_states(stack.config, announce=lambda _m: None)
    # The 40 written first are read back, the rest of the catalogue computed.
    assert whole.read == 40 and whole.items == whole.read + whole.computed >= 140
    snapshot = ItemStateSnapshot.open(stack.config.item_state_dir, fingerprint)
    assert snapshot is not None and len(snapshot) == whole.items
    # The job's states are the service's own, bit for bit, for the texts requests read.
    texts = serving.cached_item_texts(1000)
    found = [t for t, at in zip(texts, snapshot.find(texts), strict=True) if at >= 0]
    assert len(found) >= 100
    fresh = CrossEncoderReranker.from_pretrained(
        ModelRegistry(stack.config.registry_dir).path("reranker", "v0001"),
        MAX_LENGTH,
        "cpu",
        "fp32",
    )
    fresh.prepare_serving(True, False)
    assert fresh.load_item_states(snapshot, found) == len(found)
    assert fresh.warm_items(found) == 0
    user = "recently viewed: a lamp, a desk"
    assert (
        fresh.score(user, found, cache=False).tolist()
        == serving.score(user, found, cache=False).tolist()
    )


def test_log_events_rejects_an_empty_batch(stack: Stack) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stack.rank.LogEvents(ranking_pb2.LogEventsRequest(events=[]), timeout=10)

    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "events" in info.value.details()


# -- the updater lifecycle ------------------------------------------------------------------


def _log_fresh_positives(stack: Stack, n: int) -> None:
    """`n` clicks/purchases by several users in the last moment, distinct timestamps."""
    users = [stack.user.user_id, *(f"shopper-{k}" for k in range(4))]
    now = datetime.now(UTC)
    run = uuid.uuid4().hex[:8]
    events = [
        _event(
            f"{run}-{k}",
            users[k % len(users)],
            stack.catalog[(7 * k) % len(stack.catalog)],
            ranking_pb2.EVENT_TYPE_PURCHASE if k % 5 == 0 else ranking_pb2.EVENT_TYPE_CLICK,
            now - timedelta(milliseconds=10 * (n - k)),  # after any earlier training window
        )
        for k in range(n)
    ]
    reply = stack.rank.LogEvents(ranking_pb2.LogEventsRequest(events=events), timeout=60)
    assert reply.accepted == n, dict(reply.rejected_by_reason)


def _served_version(stack: Stack) -> str:
    return _recommend(stack, stack.user.user_id, 3).model_version


def test_updater_lifecycle(stack: Stack) -> None:
    upd = stack.upd
    status = upd.GetStatus(updater_pb2.GetStatusRequest(), timeout=10)
    assert (status.champion_version, status.index_version, status.state) == (
        "v0001",
        "v0001",
        "idle",
    )
    assert status.pending_events > 0

    # 1. An incremental update publishes v0002; promoted or rejected, every view agrees.
    _log_fresh_positives(stack, 40)
    result = upd.TriggerUpdate(
        updater_pb2.TriggerUpdateRequest(reason="e2e", wait=True), timeout=600
    ).result
    assert result.state in {"promoted", "rejected"}, result.message
    assert result.challenger_version == "v0002"
    assert result.examples > 0
    versions = upd.ListVersions(updater_pb2.ListVersionsRequest(), timeout=10)
    statuses = {v.version: v.status for v in versions.versions}
    after = "v0002" if result.state == "promoted" else "v0001"
    assert statuses["v0002"] == ("champion" if result.state == "promoted" else "rejected")
    assert statuses["v0001"] == ("retired" if result.state == "promoted" else "champion")
    assert versions.champion_version == result.champion_version == after
    v2 = next(v for v in versions.versions if v.version == "v0002")
    assert v2.parent == "v0001" and v2.reason == "e2e" and "ndcg@10" in v2.metrics
    # Negatives like serving's candidates (the champion index's FAISS neighbours among them),
    # and a score blend fitted on this run, saved beside the weights.
    registry = ModelRegistry(stack.config.registry_dir)
    training = registry.manifest("reranker", "v0002").training
    drawn = training["negatives"]
    positives = training["positives"] + training["replay_positives"]
    assert sum(drawn.values()) == 3 * positives and drawn["hard"] > 0, drawn
    assert training["blend"]["fitted_on"] > 0, training["blend"]
    assert (registry.path("reranker", "v0002") / "blend.json").exists()
    # Item factors for the blend's collaborative term: v0001 fitted them from scratch, v0002
    # warm-started from its parent's, on events up to its training window's end only.
    first = registry.manifest("reranker", "v0001").training["collab"]
    collab = training["collab"]
    assert (first["warm_start"], first["iterations"]) == (False, 15), first
    assert (collab["warm_start"], collab["iterations"]) == (True, 15), collab
    assert collab["interactions"] > first["interactions"] and collab["items"] >= first["items"]
    # v0001 fitted a first set of factors on older events to score its pairs; v0002 used v0001's.
    assert first["feature_fit_examples"] > 0 and collab["feature_fit_examples"] == 0
    v2_manifest = registry.manifest("reranker", "v0002")
    assert collab["fitted_until"] == v2_manifest.data_window["end"]
    assert (registry.path("reranker", "v0002") / "collab.safetensors").exists()
    status = upd.GetStatus(updater_pb2.GetStatusRequest(), timeout=10)
    assert status.champion_version == after
    assert (status.last.job_id, status.last.state) == (result.job_id, result.state)
    _wait_for(lambda: _served_version(stack) == after, f"serving {after}")

    # 2. A forced promotion is served without a restart (the holder polls the registry).
    _log_fresh_positives(stack, 40)
    forced = upd.TriggerUpdate(
        updater_pb2.TriggerUpdateRequest(reason="forced", wait=True, force_promote=True),
        timeout=600,
    ).result
    assert (forced.state, forced.challenger_version, forced.champion_version) == (
        "promoted",
        "v0003",
        "v0003",
    )
    _wait_for(lambda: _served_version(stack) == "v0003", "serving v0003")
    reply = _recommend(stack, stack.user.user_id, 10)
    assert (reply.model_version, reply.index_version) == ("v0003", "v0001")
    assert len(reply.items) == 10

    # 3. Operator commands: unknown version, rollback to the previous champion.
    with pytest.raises(grpc.RpcError) as info:
        upd.Promote(updater_pb2.PromoteRequest(version="v0999"), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        upd.Promote(updater_pb2.PromoteRequest(version=""), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for bad_kind in (
        lambda: upd.Promote(updater_pb2.PromoteRequest(version="v0001", kind="model"), timeout=10),
        lambda: upd.Rollback(updater_pb2.RollbackRequest(kind="Index"), timeout=10),
        lambda: upd.ListVersions(updater_pb2.ListVersionsRequest(kind="indexes"), timeout=10),
    ):
        with pytest.raises(grpc.RpcError) as info:
            bad_kind()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "kind must be one of reranker, index" in info.value.details()
    assert ModelRegistry(stack.config.registry_dir).champion("reranker") == "v0003"
    rolled = upd.Rollback(updater_pb2.RollbackRequest(), timeout=10)
    assert (rolled.champion_version, rolled.previous_version) == (after, "v0003")
    _wait_for(lambda: _served_version(stack) == after, f"serving {after} again")
    promoted = upd.Promote(updater_pb2.PromoteRequest(version="v0003"), timeout=30)
    assert (promoted.champion_version, promoted.previous_version) == ("v0003", after)
    _wait_for(lambda: _served_version(stack) == "v0003", "serving v0003 again")

    # 4. A corrupt champion (pointer set behind verification's back) is refused; v0003 stays.
    registry = ModelRegistry(stack.config.registry_dir)
    bad = registry.next_version("reranker")
    shutil.copytree(registry.path("reranker", "v0003"), registry.path("reranker", bad))
    weights = registry.path("reranker", bad) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    registry._set_champion("reranker", bad, "promote", "e2e: corrupt on purpose")
    holder = stack.ranking.models
    _wait_for(lambda: any(r.version == bad for r in holder.refusals), f"refusing {bad}")
    for n in range(5):
        reply = _recommend(stack, stack.user.user_id, 5, request_id=f"after-corrupt-{n}")
        assert reply.model_version == "v0003"
        assert len(reply.items) == 5
    refusal = next(r for r in holder.refusals if r.version == bad)
    assert "model.safetensors" in refusal.reason
    assert upd.GetStatus(updater_pb2.GetStatusRequest(), timeout=10).champion_version == bad
    # Leave the module's stack on a good champion: a service started later (bench serving)
    # refuses a corrupt one and, with nothing else to serve, does not start.
    rolled = upd.Rollback(updater_pb2.RollbackRequest(), timeout=10)
    assert (rolled.champion_version, rolled.previous_version) == ("v0003", bad)


# -- Catalogue: new items recallable in seconds, removed items gone, without an index rebuild --


def _eventually(predicate, seconds: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_catalog_upsert_makes_a_new_item_recallable_and_remove_takes_it_away(stack: Stack) -> None:
    from freshrec.v1 import catalog_pb2, catalog_pb2_grpc

    cat = catalog_pb2_grpc.CatalogServiceStub(stack.rank_channel)
    user = stack.user
    latest = stack.features.get_items([user.recent_items[0]])[user.recent_items[0]]
    new_id = f"new-{uuid.uuid4().hex[:8]}"
    # The same text as the user's latest item: its embedding is nearest to the user's vector.
    item = relisting(new_id, latest)
    index_version = _recommend(stack, user.user_id).index_version
    reply = cat.UpsertItems(catalog_pb2.UpsertItemsRequest(items=[item]), timeout=30)
    assert (reply.accepted, reply.rejected) == (1, 0) and reply.change_id

    def recalled() -> bool:
        answer = _recommend(stack, user.user_id, k=100)
        return any(
            i.item_id == new_id and i.stage == ranking_pb2.STAGE_RECALL for i in answer.items
        )

    assert _eventually(recalled), "the new item never came back from recall"
    assert stack.features.get_items([new_id])[new_id].title == latest.title
    # No rebuild: the same index version answers, with the item in its overlay.
    assert _recommend(stack, user.user_id).index_version == index_version
    # Out of stock: the service holds the item's features in its item cache
    # (ranking.item_cache_seconds), and the very next answer must still leave it out.
    item.in_stock = False
    assert cat.UpsertItems(catalog_pb2.UpsertItemsRequest(items=[item]), timeout=30).accepted == 1
    assert not recalled()
    item.in_stock = True
    assert cat.UpsertItems(catalog_pb2.UpsertItemsRequest(items=[item]), timeout=30).accepted == 1
    assert recalled()

    gone = cat.RemoveItems(catalog_pb2.RemoveItemsRequest(item_ids=[new_id, "no-such"]), timeout=30)
    assert (gone.accepted, dict(gone.rejected_by_reason)) == (1, {"unknown_item": 1})
    assert _eventually(lambda: not recalled())
    for _ in range(5):
        assert new_id not in {i.item_id for i in _recommend(stack, user.user_id, k=100).items}
    assert stack.features.get_items([new_id])[new_id].in_stock is False
    # The offline change log has every change, in order (a folder per UTC day).
    frames = sorted((stack.config.offline_dir / "catalog").glob("*/*.parquet"))
    import pandas as pd

    ops = pd.concat(pd.read_parquet(f) for f in frames)
    assert ops[ops["item_id"] == new_id]["op"].tolist() == ["upsert", "upsert", "upsert", "remove"]


def test_catalog_bad_input_is_invalid_argument(stack: Stack) -> None:
    from freshrec.v1 import catalog_pb2, catalog_pb2_grpc

    cat = catalog_pb2_grpc.CatalogServiceStub(stack.rank_channel)
    for request, field in (
        (catalog_pb2.UpsertItemsRequest(items=[]), "items"),
        (catalog_pb2.UpsertItemsRequest(items=[catalog_pb2.CatalogItem(item_id="x")]), "items"),
    ):
        with pytest.raises(grpc.RpcError) as err:
            cat.UpsertItems(request, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        cat.RemoveItems(catalog_pb2.RemoveItemsRequest(item_ids=[""]), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_bench_recall_measures_the_workdirs_serving_index(stack: Stack) -> None:
    from freshrec.bench_recall import bench_recall
    from model.index import RecallIndex
    from services.registry import open_registry

    registry = open_registry(stack.config)
    version = registry.champion("index")
    assert version is not None
    served = RecallIndex.load(registry.path("index", version))
    result = bench_recall(
        stack.config.workdir, items=1, queries=40, k=10, say=lambda _m: None, progress=False
    )
    # The serving index's own vectors, not a synthetic catalogue of `items` items.
    assert result["items"] == served.index.ntotal and result["embed_s"] is None
    # A small catalogue is searched exactly: recall is 1 by construction, and the bench must see it.
    assert result["index"] == "IndexFlatIP" and result["recall@10"] == 1.0
    assert result["queries"] == 40 and result["p99_ms"] >= result["p50_ms"] > 0
    assert result["rss_mb"] > 0 and result["index_mb"] > 0
    assert result["machine"]["after_idle"]["hot_us"] > 0  # the run's machine state, as served


def test_bench_serving_raises_what_broke_a_client_thread(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A floor sample that fails (here: made to) ends the bench with that error, instead of a
    # client thread dying on its own and the run reporting what the other threads measured.
    import freshrec.bench as bench

    def broken(_self: object) -> None:
        raise RuntimeError("floor sample failed")

    monkeypatch.setattr(bench._FloorSampler, "sample", broken)
    with pytest.raises(RuntimeError, match="floor sample failed"):
        bench.bench_serving(
            stack.config.workdir, candidates=20, concurrency=1, duration=2.0, say=lambda _m: None
        )


def test_bench_serving_times_every_floor_before_the_fp32_reference(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A floor timed right after the fp32 reference's pass (~0.5 s at 70 candidates) finds the
    # caches that pass emptied: stop 28 read a first FAISS search at 1.65-2.44 ms there against
    # 0.52-0.57 ms during the load. So no floor may run once a reference has.
    import freshrec.bench as bench
    from model.reranker import CrossEncoderReranker

    events: list[str] = []
    floors, score_pairs = bench._request_floors, CrossEncoderReranker.score_pairs

    def floor_spy(*args: Any, **kwargs: Any) -> Any:
        events.append("floor")
        return floors(*args, **kwargs)

    def reference_spy(self: CrossEncoderReranker, *args: Any, **kwargs: Any) -> Any:
        events.append("reference")
        return score_pairs(self, *args, **kwargs)

    monkeypatch.setattr(bench, "_request_floors", floor_spy)
    monkeypatch.setattr(CrossEncoderReranker, "score_pairs", reference_spy)
    result = bench.bench_serving(
        stack.config.workdir, candidates=20, concurrency=1, duration=1.0, say=lambda _m: None
    )
    assert result["rerank_speedup_vs_reference"] > 0
    first_reference = events.index("reference")
    # The load's samples and the after-load floors, all of them before the first reference.
    assert events[:first_reference].count("floor") > result["floor_samples_during_load"]
    assert "floor" not in events[first_reference:]


def test_bench_serving_drives_the_real_service_and_reports_floors(stack: Stack) -> None:
    from freshrec.bench import bench_serving

    result = bench_serving(
        stack.config.workdir, candidates=20, concurrency=1, duration=2.0, say=lambda _m: None
    )
    assert result["errors"] == 0 and result["calls"] > 0 and result["qps"] > 0
    assert result["max_ms"] >= result["p999_ms"] >= result["p99_ms"] >= result["p50_ms"] > 0
    assert result["candidates"] == 20 and result["items"] == len(stack.catalog)
    # Its service started on the workdir the stack's ranking service wrote its states from.
    assert 0 < result["item_states_read_at_start"] <= result["cached_item_states"]
    # Target 4's second ratio is only meaningful on identical values, and the bench checks it.
    assert result["feature_values_identical"] is True
    stages = result["stages_ms"]
    assert {"faiss", "redis_raw", "feast_sdk", "forward", "forward_user_cached"} <= stages.keys()
    assert result["feature_fetch_speedup_vs_feast_sdk"] == round(
        stages["feast_sdk"] / stages["redis_raw"], 2
    )
    # The transport every answer pays, measured on the same server: below a whole answer.
    assert 0 < stages["grpc_roundtrip"] < result["p50_ms"]
    # The floors the ratio uses were sampled between the load's calls (one every 0.5 s of a
    # 2 s load, the first after 0.25 s), the same floors as after the load.
    assert result["floor_samples_during_load"] >= 2
    during = result["stages_during_load_ms"]
    assert {"faiss", "redis_raw", "forward", "forward_user_cached", "grpc_roundtrip"} <= (
        during.keys()
    )
    assert all(during[k] > 0 for k in ("faiss", "redis_raw", "forward", "forward_user_cached"))
    assert during["grpc_roundtrip"] == stages["grpc_roundtrip"]
    after = result["overhead_after_load"]
    assert after["overhead_ratio"] > 0 and after["overhead_by_class"].keys() <= {
        "user_pass",
        "user_cached",
        "scores_cached",
    }
    # Each class of request against the floors of its own work; the first call of a user runs
    # the user pass, so a 2 s load over the stack's users sees that class.
    classes = result["overhead_by_class"]
    fetch = during["faiss"] + during["redis_raw"]
    assert classes["user_pass"]["floor_ms"] == pytest.approx(fetch + during["forward"], abs=0.011)
    after_fetch = stages["faiss"] + stages["redis_raw"]
    assert after["overhead_by_class"]["user_pass"]["floor_ms"] == pytest.approx(
        after_fetch + stages["forward"], abs=0.011
    )
    assert sum(c["requests"] for c in classes.values()) <= result["calls"]
    for c in classes.values():  # each of the three carries its rounding to two decimals
        slack = 0.005 + 0.005 * (1 + c["ratio"]) / (c["floor_ms"] - 0.005)
        assert abs(c["ratio"] - c["p50_ms"] / c["floor_ms"]) <= slack
    # The median over all requests lies between the classes' medians.
    ratios = [c["ratio"] for c in classes.values()]
    assert min(ratios) - 0.01 <= result["overhead_ratio"] <= max(ratios) + 0.01
    # Counting the measured round trip as a floor as well can only lower the ratio.
    assert 0 < result["overhead_ratio_with_transport"] <= result["overhead_ratio"]
    assert stages["faiss_repeated"] > 0  # the pre-stop-21 floor, shown beside the first search
    # Each call's time beyond its own forward passes (timed in the re-ranker during the load):
    # positive (there is a transport and a pipeline), and per call at most the call's whole
    # time, so within a class its median is at most the class's p50 (rounded to 0.01 ms).
    assert 0 < result["beyond_model_ms"] <= result["p99_ms"]
    beyond = result["beyond_model_by_class"]
    assert beyond.keys() == classes.keys()
    for name, ms in beyond.items():
        # 1e-9: 3.555 (3 decimals) against 3.55 + 0.005 (2 decimals) is 3.5549999999999997 in
        # floats, where a class without forward passes has the same median both ways.
        assert 0 < ms <= classes[name]["p50_ms"] + 0.005 + 1e-9, name
    # The service's own step timings under the load: ordered percentiles, and a server-side
    # total below the client's end-to-end time.
    steps = result["service_stages_ms"]
    assert {"fetch_user_profile", "recall_candidates", "rerank", "total"} <= steps.keys()
    for p in steps.values():
        assert 0 <= p["p50"] <= p["p95"] <= p["p99"]
    assert steps["total"]["p50"] <= result["p50_ms"]
    # Each call's time outside its pipeline (gRPC, the servicer): positive, and the pipeline
    # total plus it is the whole call, so it stays below the call's median.
    assert 0 < result["outside_pipeline_ms"] < result["p50_ms"]
    # CPU over the load: the service's share runs at least each call's own steps, and no more
    # cores than the machine has are busy; the client threads' share is counted apart.
    assert result["service_cpu_ms_per_call"] >= steps["total"]["p50"] * 0.5
    assert 0 < result["service_cores_busy"] <= os.cpu_count() + 0.05
    assert result["client_cpu_ms_per_call"] > 0
    # 2 s of calls over the stack's small catalogue: most candidates' features come from the
    # service's item cache (its first reads of each item do not).
    assert result["item_cache_seconds"] > 0
    assert 0.5 < result["item_cache_hit_rate"] < 1
    # The machine, with what decides its speed: figures from CPUs with and without AMX differ.
    machine = result["machine"]
    assert machine["cores"] >= 1 and machine["torch_threads"] >= 1
    assert isinstance(machine["cpu_model"], str)
    assert set(machine["cpu_features"]) <= set(COMPUTE_FLAGS)
    idle = machine["after_idle"]
    assert idle["hot_us"] > 0 and idle["after_idle_us"] > 0 and idle["idle_ms"] == 3.0
    assert idle["ratio"] == round(idle["after_idle_us"] / idle["hot_us"], 2)


def test_bench_quality_trains_both_models_on_the_updaters_serving_like_pairs(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    from freshrec.bench_quality import bench_quality

    # Tiny random BERTs in place of the pretrained backbone: this checks the protocol, not
    # MiniLM's NDCG (`freshrec bench quality` on a real workdir measures that).
    made: list[int | None] = []

    def tiny(cls: type, path: str, *args: object, **kwargs: object) -> CrossEncoderReranker:
        joint = kwargs.get("joint_layers")
        made.append(joint if isinstance(joint, int) else None)
        return CrossEncoderReranker.tiny(seed=0, max_length=32, joint_layers=made[-1])

    monkeypatch.setattr(CrossEncoderReranker, "from_pretrained", classmethod(tiny))
    result = bench_quality(stack.config.workdir, say=lambda _m: None)
    # The reference (every layer joint) and the served architecture, from the same backbone.
    assert made == [None, stack.config.model.joint_layers]
    # The updater's negatives: the user's own recall candidates among them, not only random.
    drawn = result["negatives_drawn"]
    assert drawn["hard"] > 0 and drawn["popular"] > 0 and drawn["random"] > 0
    assert sum(drawn.values()) == result["training_pairs"] - result["training_pairs"] // (
        1 + stack.config.training.negatives_per_positive
    )
    for key in ("ndcg@10_served", "ndcg@10_reference", "ndcg@10_recall_order"):
        assert 0.0 <= result[key] <= 1.0


def test_bench_swap_times_the_calls_around_a_real_hot_swap(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Last in the module: it promotes a version, and promotes the champion back at its end.
    from safetensors.torch import load_file

    from freshrec.bench_swap import bench_swap

    registry = ModelRegistry(stack.config.registry_dir)
    champion = registry.champion("reranker")
    # Updates that fine-tune every layer (the stack's `freeze_layers` is 0): a new item side.
    monkeypatch.setenv("FRESHREC_TRAINING__INCREMENTAL_FREEZE_LAYERS", "0")
    result = bench_swap(
        stack.config.workdir,
        concurrency=2,
        before=1.0,
        after=1.0,
        candidates=20,
        say=lambda _m: None,
    )
    assert result["swapped"] is True and result["errors"] == 0
    assert result["champion"] == champion and result["challenger"] != champion
    assert result["load_s"] > 0 and result["first_new_answer_s"] is not None
    assert result["machine"]["after_idle"]["after_idle_us"] > 0
    assert result["steady"]["calls"] > 0 and result["after"]["calls"] > 0
    for name in ("steady", "after"):
        w = result[name]
        assert w["max_ms"] >= w["p99_ms"] >= w["p50_ms"] > 0 and w["qps"] > 0
    # Answers come from the version serving when the call is made, never the other one.
    assert result["answered_by_new_before_promote"] == 0
    assert result["after_answered_by_old"] == 0
    assert result["rss_peak_mb_steady"] > 0 and result["rss_peak_mb_loading"] > 0
    # The workdir serves its champion again; the challenger stays in the registry, a child
    # of the champion (the stack fine-tunes every layer: tests/unit/test_bench_swap.py checks
    # that frozen layers stay).
    assert registry.champion("reranker") == champion
    assert registry.manifest("reranker", result["challenger"]).parent == champion
    old = load_file(registry.path("reranker", champion) / "model.safetensors")
    new = load_file(registry.path("reranker", result["challenger"]) / "model.safetensors")
    assert old.keys() == new.keys() and all(not (old[k] == new[k]).all() for k in old)
    assert result["item_states_shared"] is False  # its embeddings moved: its own states
    # The timeline, from the promote on: the service's load of the challenger, in order.
    events = [e["event"] for e in result["timeline"]]
    at = [e["at_s"] for e in result["timeline"]]
    assert at == sorted(at) and at[0] >= 0
    assert f"loading reranker {result['challenger']}" in events
    # Its warm set: the texts the serving version held, not the offline catalogue again.
    assert any(
        "item states computed in" in e and "(warm set: the texts the serving version holds)" in e
        for e in events
    )
    assert any(e.startswith("call answered in") for e in events)
    # By default an update freezes everything below the split (the stack's models split after
    # layer 1 of 2): the new version keeps the serving one's item states.
    monkeypatch.delenv("FRESHREC_TRAINING__INCREMENTAL_FREEZE_LAYERS")
    frozen = bench_swap(
        stack.config.workdir, before=1.0, after=1.0, candidates=20, say=lambda _m: None
    )
    assert frozen["swapped"] is True and frozen["errors"] == 0
    assert frozen["item_states_shared"] is True and frozen["freeze_layers"] == 1
    # The users' states below the split came with them: the first swap's new version ran
    # the user pass for every user it served, this one for none of those the old one had.
    assert frozen["after_user_cache_hit_rate"] > result["after_user_cache_hit_rate"]
    assert frozen["after_answered_by_old"] == 0
    _wait_for(lambda: _served_version(stack) == champion, "the champion serving again")


# -- Index rebuild: the catalogue changes folded into a new base the replicas swap to --------


def test_index_rebuild_folds_catalogue_changes_into_a_new_base_and_a_rollback_replays_them(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    from freshrec.v1 import catalog_pb2, catalog_pb2_grpc
    from services.jobs.index_rebuild import rebuild_index

    cat = catalog_pb2_grpc.CatalogServiceStub(stack.rank_channel)
    user = stack.user
    latest = stack.features.get_items([user.recent_items[0]])[user.recent_items[0]]

    def add(item_id: str) -> None:  # the text of the user's latest item: recalled for them
        item = relisting(item_id, latest)
        assert cat.UpsertItems(catalog_pb2.UpsertItemsRequest(items=[item]), timeout=30).accepted

    def recalled() -> set[str]:
        answer = _recommend(stack, user.user_id, k=100)
        return {i.item_id for i in answer.items if i.stage == ranking_pb2.STAGE_RECALL}

    holder = stack.ranking.models
    base_version = holder.current.index_version
    first, second = f"new-{uuid.uuid4().hex[:8]}", f"new-{uuid.uuid4().hex[:8]}"
    gone = sorted(recalled() - {first})[0]
    add(first)
    assert cat.RemoveItems(catalog_pb2.RemoveItemsRequest(item_ids=[gone]), timeout=30).accepted
    assert _eventually(lambda: first in recalled() and gone not in recalled())
    assert first in holder.current.index.overlay_ids and gone in holder.current.index.removed

    report = rebuild_index(stack.config, announce=lambda _m: None)
    assert report.base_version == base_version and report.version is not None
    assert report.changes >= 2 and report.items == len(holder.current.index)
    _wait_for(
        lambda: _recommend(stack, user.user_id).index_version == report.version,
        "the rebuilt index serving",
    )
    served = holder.current.index
    # The changes are in the base now: nothing left to search beside FAISS.
    assert served.catalog_position == report.catalog_position
    assert (served.overlay_ids, served.removed) == ((), frozenset())
    assert first in served.item_ids and gone not in served.item_ids
    assert first in recalled() and gone not in recalled()
    # Nothing waiting: nothing published.
    idle = rebuild_index(stack.config, announce=lambda _m: None)
    assert (idle.version, idle.changes, idle.base_version) == (None, 0, report.version)
    # Operators see the index's versions, not the re-ranker's, when they ask for them.
    listed = stack.upd.ListVersions(updater_pb2.ListVersionsRequest(kind="index"), timeout=10)
    assert listed.champion_version == report.version
    by_version = {v.version: v for v in listed.versions}
    assert set(by_version) == {base_version, report.version}
    rebuilt = by_version[report.version]
    assert (rebuilt.status, rebuilt.parent) == ("champion", base_version)
    assert rebuilt.metrics["changes"] == report.changes
    assert (rebuilt.data_window, rebuilt.train_examples) == ("", 0)
    assert report.catalog_position in rebuilt.reason
    assert rebuilt.metrics["items"] == len(served.item_ids)
    assert by_version[base_version].status != "champion"
    from typer.testing import CliRunner

    from freshrec.cli import app

    address = f"127.0.0.1:{stack.updater.port}"
    shown = CliRunner().invoke(
        app, ["updater", "versions", "--kind", "index", "--address", address]
    )
    assert shown.exit_code == 0, shown.output
    assert f"index versions (champion {report.version})" in shown.output
    row = next(line for line in shown.output.splitlines() if f" {report.version} " in line)
    # version, status, parent, created, items, dim, changes, reason
    cells = [cell.strip() for cell in row.strip(" │|").split("│")]
    assert cells[:3] == [report.version, "champion", base_version], row
    items, dim = f"{len(served.item_ids):,}", f"{rebuilt.metrics['dim']:.0f}"
    assert cells[4:7] == [items, dim, f"{report.changes:,}"], row

    # A change after the rebuild is the only overlay; a replica started now follows the
    # stream from the rebuild's position, so it neither embeds nor overlays the folded ones.
    add(second)
    assert _eventually(lambda: second in recalled())
    assert holder.current.index.overlay_ids == (second,)
    caplog.set_level(logging.INFO, logger="services.ranking.server")
    again = build_ranking(stack.config, port=0)
    try:
        following = f"following catalogue changes after {report.catalog_position} (index "
        assert any(following in r.getMessage() for r in caplog.records)
        assert _eventually(lambda: again.models.current.index.overlay_ids == (second,))
        assert again.follower is not None and again.follower.applied == 1  # `second` only
        # The gauges read the last app built in this process: `again`.
        from prometheus_client import REGISTRY

        def overlay_gauge(part: str) -> float | None:
            return REGISTRY.get_sample_value("freshrec_catalog_overlay_items", {"part": part})

        assert (overlay_gauge("searched"), overlay_gauge("hidden")) == (1.0, 0.0)
        assert again.models.current.index_version == report.version
    finally:
        again.stop(grace=1)

    # An operator rolls the index back: the replica follows the stream again from the old
    # base's position, and every change since reaches recall again.
    rolled = stack.upd.Rollback(updater_pb2.RollbackRequest(kind="index"), timeout=30)
    assert (rolled.champion_version, rolled.previous_version) == (base_version, report.version)
    _wait_for(
        lambda: _recommend(stack, user.user_id).index_version == base_version,
        "the old index serving again",
    )
    assert _eventually(lambda: {first, second} <= recalled() and gone not in recalled())
    old = holder.current.index
    assert old.catalog_position == "0" and {first, second} <= set(old.overlay_ids)
    assert gone in old.removed


def test_a_trimmed_change_stream_is_folded_in_from_the_offline_change_log(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    from freshrec.v1 import catalog_pb2, catalog_pb2_grpc
    from services.catalog.changes import RedisChangeStream, change_stream_key
    from services.jobs.index_rebuild import rebuild_index

    cat = catalog_pb2_grpc.CatalogServiceStub(stack.rank_channel)
    latest = stack.features.get_items([stack.user.recent_items[0]])[stack.user.recent_items[0]]
    fresh = f"new-{uuid.uuid4().hex[:8]}"
    item = relisting(fresh, latest)
    assert cat.UpsertItems(catalog_pb2.UpsertItemsRequest(items=[item]), timeout=30).accepted
    holder = stack.ranking.models
    assert _eventually(lambda: fresh in holder.current.index.overlay_ids)
    base = holder.current
    # Redis drops every change the stream holds (as MAXLEN does after a large feed): the
    # serving index's position is behind what the stream can still give.
    client = redis.Redis.from_url(stack.config.redis_url, decode_responses=True)
    key = change_stream_key(stack.config.project)
    newest = client.xrevrange(key, count=1)[0][0]
    client.xtrim(key, maxlen=0)
    # Redis counts only XDEL in max-deleted-entry-id; the trim shows in entries-added.
    assert client.xinfo_stream(key)["max-deleted-entry-id"] == "0-0"
    stream = RedisChangeStream(stack.config.redis_url, stack.config.project)
    assert stream.trimmed_through() == newest

    # A replica that starts now cannot have those changes, and says so.
    caplog.set_level(logging.WARNING, logger="services.catalog.changes")
    again = build_ranking(stack.config, port=0)
    try:
        assert _eventually(lambda: again.follower is not None and again.follower.gaps == ["0"])
    finally:
        again.stop(grace=1)
    warning = (
        f"has dropped changes through {newest}, past position 0 of the index this replica serves"
    )
    assert any(warning in r.getMessage() for r in caplog.records)

    report = rebuild_index(stack.config, announce=lambda _m: None)
    assert report.source == "offline log" and report.catalog_position == newest
    _wait_for(lambda: holder.current.index_version == report.version, "the rebuilt index serving")
    served = holder.current.index
    assert fresh in served.item_ids and (served.overlay_ids, served.removed) == ((), frozenset())
    assert set(served.item_ids) == (set(base.index.item_ids) | set(base.index.overlay_ids)) - set(
        base.index.removed
    )


def test_a_change_stream_redis_lost_is_found_from_the_offline_log_and_folded_in(
    stack: Stack, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import services.catalog.changes as changes
    from freshrec.v1 import catalog_pb2, catalog_pb2_grpc
    from services.catalog.changes import change_stream_key
    from services.jobs.index_rebuild import rebuild_index

    # The clocks are one machine's here: a change's log write and its stream id are
    # milliseconds apart, so 0.3 s stands for the allowance, with 0.5 s pauses around it.
    monkeypatch.setattr(changes, "CLOCK_SKEW", timedelta(milliseconds=300))
    cat = catalog_pb2_grpc.CatalogServiceStub(stack.rank_channel)
    latest = stack.features.get_items([stack.user.recent_items[0]])[stack.user.recent_items[0]]
    holder = stack.ranking.models
    position = holder.current.index.catalog_position
    lost, kept = (f"new-{uuid.uuid4().hex[:8]}" for _ in range(2))
    time.sleep(0.5)
    assert cat.UpsertItems(
        catalog_pb2.UpsertItemsRequest(items=[relisting(lost, latest)]), timeout=30
    ).accepted
    assert _eventually(lambda: lost in holder.current.index.overlay_ids)
    # Redis loses the stream (a restart without persistence): no trim to read, XINFO has no
    # stream; the next change begins a new one.
    client = redis.Redis.from_url(stack.config.redis_url, decode_responses=True)
    assert client.delete(change_stream_key(stack.config.project)) == 1
    time.sleep(0.5)
    assert cat.UpsertItems(
        catalog_pb2.UpsertItemsRequest(items=[relisting(kept, latest)]), timeout=30
    ).accepted
    assert _eventually(lambda: kept in holder.current.index.overlay_ids)

    # A replica that starts now would follow the new stream without the lost item; it says so,
    # and its gap gauge reads 1 until it serves an index that folds the lost item in.
    from prometheus_client import REGISTRY

    caplog.set_level(logging.WARNING, logger="services.catalog.changes")
    again = build_ranking(stack.config, port=0)
    try:
        follower = again.follower
        assert follower is not None
        assert _eventually(lambda: follower.gaps == [position])
        assert _eventually(lambda: kept in again.models.current.index.overlay_ids)
        assert lost not in again.models.current.index.overlay_ids
        assert follower.missing
        assert REGISTRY.get_sample_value("freshrec_catalog_stream_gap") == 1.0
        assert any(
            "the offline change log holds 1 write(s)" in r.getMessage()
            and f"after position {position} of the index this replica serves" in r.getMessage()
            for r in caplog.records
        )

        said: list[str] = []
        report = rebuild_index(stack.config, announce=said.append)
        assert report.source == "offline log", said
        for replica in (holder, again.models):
            _wait_for(
                lambda r=replica: r.current.index_version == report.version,
                "the rebuilt index serving",
            )
            served = replica.current.index
            assert {lost, kept} <= set(served.item_ids)
            assert (served.overlay_ids, served.removed) == ((), frozenset())
        # Checked again at the swap: nothing the index lacks is missing from the stream now.
        assert _eventually(lambda: not follower.missing)
        assert REGISTRY.get_sample_value("freshrec_catalog_stream_gap") == 0.0
        assert follower.gaps == [position]
    finally:
        again.stop(grace=1)
