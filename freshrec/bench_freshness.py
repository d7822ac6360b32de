"""`freshrec bench freshness`: how fast what happens in the shop shapes the next answer.

Against real servers (ranking + updater in this process, real gRPC, Redis through Feast):
1. event → profile: a click sent through LogEvents, until the online profile read through the
   Feast SDK shows it first in recent_items; and the next Recommend no longer offers that item.
   Then `recommend_after_event_ms`: the Recommend a storefront's next page sends after a
   user's click (PAGE_GAP_S after LogEvents answered), with the new profile's user side
   prepared after LogEvents (`ranking.prepare_user_states`) for every other click and not for
   the rest, and the share of each whose re-rank found it kept.
2. new item → recallable: UpsertItems of an item whose text matches a user's latest item,
   until Recommend (k = 100, so every recall candidate shows) returns it from recall; then
   RemoveItems, until it is gone; it must not come back.
3. events → new model serving: a batch of events, one update, until Recommend names the new
   champion (the gate may reject: then that is reported, not hidden).
4. materialisation throughput: stock Feast SDK vs FreshRec's pipelined writer, same data.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from freshrec.config import load_config

PAGE_GAP_S = 0.03  # LogEvents answered -> the next page's Recommend (the client idle)


def _p(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


def bench_freshness(
    workdir: Path,
    events: int = 500,
    new_items: int = 30,
    update_events: int = 10_000,
    say: Any = print,
) -> dict[str, Any]:
    import pandas as pd
    from google.protobuf.timestamp_pb2 import Timestamp

    from freshrec.clients import channel, ranking_stub, relisting, updater_stub
    from freshrec.data import load_dataset
    from freshrec.v1 import catalog_pb2, catalog_pb2_grpc, ranking_pb2, updater_pb2
    from model.embeddings import user_vector
    from services.features.feast_store import FeastFeatureStore

    # A fresh workdir and Feast project every run: the benchmark adds items and events, and a
    # second run must not find them already there.
    from services.jobs.bootstrap import bootstrap, read_online_store_choice, remove_workdir
    from services.ranking.server import build_ranking
    from services.updater.server import build_updater

    remove_workdir(workdir, say)
    config = load_config(
        workdir,
        project=f"freshrec_bench_{datetime.now(UTC):%Y%m%d%H%M%S}",
        ranking={"exploration_rate": 0.0},
    )
    say(f"bootstrapping the synthetic shop into {workdir}")
    # 1,500 shoppers x ~70 events: the newest 10% kept for replay is ~10k events, the batch
    # size the "events -> new model serving" target speaks of.
    shop = load_dataset("synthetic", workdir / "cache", n_users=1500, events_per_user=70.0)
    bootstrap(config, shop, announce=say, progress=False)
    if read_online_store_choice(config)["kind"] != "redis":
        raise RuntimeError("the freshness benchmark needs the Redis online store")
    rank_app = build_ranking(config, port=0)
    upd_app = build_updater(config, port=0)
    feast = FeastFeatureStore(config.feature_repo_dir)
    feast.start()
    profiles = pd.read_parquet(config.offline_dir / "user_profile.parquet")
    users = profiles["user_id"].astype(str).drop_duplicates().tolist()
    catalog = rank_app.models.current.index.item_ids
    rng = np.random.default_rng(1)
    result: dict[str, Any] = {"items": len(catalog), "users": len(users)}

    def stamp() -> Timestamp:
        ts = Timestamp()
        ts.FromDatetime(datetime.now(UTC))
        return ts

    try:
        with (
            channel(f"127.0.0.1:{rank_app.port}") as rch,
            channel(f"127.0.0.1:{upd_app.port}") as uch,
        ):
            rank, upd = ranking_stub(rch), updater_stub(uch)
            cat = catalog_pb2_grpc.CatalogServiceStub(rch)

            # 1. event -> profile
            lat, still_offered = [], 0
            for _ in range(events):
                user = users[int(rng.integers(len(users)))]
                item = catalog[int(rng.integers(len(catalog)))]
                event = ranking_pb2.Event(
                    event_id=f"bench-{uuid.uuid4().hex}",
                    user_id=user,
                    item_id=item,
                    type=ranking_pb2.EVENT_TYPE_CLICK,
                    timestamp=stamp(),
                )
                t0 = time.perf_counter()
                rank.LogEvents(ranking_pb2.LogEventsRequest(events=[event]), timeout=30)
                while True:
                    profile = feast.get_user_profile(user)
                    if profile is not None and profile.recent_items[:1] == (item,):
                        break
                    if time.perf_counter() - t0 > 10:
                        break
                lat.append((time.perf_counter() - t0) * 1e3)
                reply = rank.Recommend(ranking_pb2.RecommendRequest(user_id=user, k=10), timeout=30)
                still_offered += item in {i.item_id for i in reply.items}
            result.update(
                event_to_profile_p50_ms=_p(lat, 50),
                event_to_profile_p99_ms=_p(lat, 99),
                event_to_profile_events=len(lat),
                clicked_item_offered_again=still_offered,
            )
            say(f"event → profile: p50 {_p(lat, 50)} ms, p99 {_p(lat, 99)} ms over {len(lat)}")

            # 1b. the Recommend after a user's own click
            after = _recommend_after_event(rank_app, rank, users, catalog, rng, events, stamp)
            result.update(recommend_after_event_ms=after)
            for arm, figures in after.items():
                say(f"Recommend {PAGE_GAP_S * 1e3:.0f} ms after a click, {arm}: {figures}")

            # 2. new item -> recallable, removed -> gone
            add_lat, gone_lat, came_back = [], [], 0
            for n in range(new_items):
                user = users[int(rng.integers(len(users)))]
                profile = feast.get_user_profile(user)
                if profile is None or not profile.recent_items:
                    continue
                # A matching item by construction: a twin of the user's first FAISS
                # candidate (the serving query over the serving index), so FAISS must return
                # the twin too. (The top *re-ranked* item, used before, may now be one of the
                # popular candidates, whose twin text is nowhere near this user's query.)
                index = rank_app.models.current.index
                query = user_vector(index.vectors_of(profile.recent_items))
                seen = frozenset(profile.recent_items) | frozenset(profile.purchased_items)
                found_first = index.search(query, 1, seen) if query is not None else []
                first = found_first[0][0] if found_first else None
                model = feast.get_items([first]).get(first) if first else None
                if model is None:
                    continue
                new_id = f"bench-new-{uuid.uuid4().hex[:10]}"
                new_item = relisting(new_id, model)
                t0 = time.perf_counter()
                cat.UpsertItems(catalog_pb2.UpsertItemsRequest(items=[new_item]), timeout=30)
                found = False
                while time.perf_counter() - t0 < 10:
                    reply = rank.Recommend(
                        ranking_pb2.RecommendRequest(user_id=user, k=100), timeout=30
                    )
                    if any(
                        i.item_id == new_id and i.stage == ranking_pb2.STAGE_RECALL
                        for i in reply.items
                    ):
                        found = True
                        break
                if found:
                    add_lat.append((time.perf_counter() - t0) * 1e3)
                t0 = time.perf_counter()
                cat.RemoveItems(catalog_pb2.RemoveItemsRequest(item_ids=[new_id]), timeout=30)
                while time.perf_counter() - t0 < 10:
                    reply = rank.Recommend(
                        ranking_pb2.RecommendRequest(user_id=user, k=100), timeout=30
                    )
                    if new_id not in {i.item_id for i in reply.items}:
                        break
                gone_lat.append((time.perf_counter() - t0) * 1e3)
                for _ in range(3):
                    reply = rank.Recommend(
                        ranking_pb2.RecommendRequest(user_id=user, k=100), timeout=30
                    )
                    came_back += new_id in {i.item_id for i in reply.items}
                say(f"  item {n + 1}/{new_items}: recallable {'yes' if found else 'NO'}")
            result.update(
                item_to_recallable_p50_ms=_p(add_lat, 50),
                item_to_recallable_p99_ms=_p(add_lat, 99),
                items_recallable=len(add_lat),
                items_tried=new_items,
                removed_item_gone_p99_ms=_p(gone_lat, 99),
                removed_item_came_back=came_back,
            )
            say(f"new item → recallable: p99 {_p(add_lat, 99)} ms ({len(add_lat)}/{new_items})")

            # 3. events -> new model serving: the shop's own newer events (kept by init for
            # replay, real spacing and signal), not random clicks a gate would rightly refuse.
            from freshrec.demo import replay_events
            from services.jobs.bootstrap import REPLAY_FILE

            newer = pd.read_parquet(config.data_dir / REPLAY_FILE).head(update_events)
            sent, _rejected = replay_events(rank, newer, batch=1000)
            result.update(update_events_sent=len(newer), update_events_accepted=sent)
            t_last = time.perf_counter()
            before = rank.Recommend(
                ranking_pb2.RecommendRequest(user_id=users[0], k=5)
            ).model_version
            outcome = upd.TriggerUpdate(
                updater_pb2.TriggerUpdateRequest(reason="bench freshness", wait=True), timeout=3600
            ).result
            # Fine-tune + gate + publish, whatever the gate decides: what a rejected run took.
            decision_s = round(time.perf_counter() - t_last, 1)
            serving_s = forced_s = None
            if outcome.state == "promoted":
                serving_s = _wait_serving(rank, users[0], outcome.challenger_version, t_last)
            elif outcome.state == "rejected" and outcome.challenger_version:
                # The gate kept the champion (the right call, and no figure for the key
                # above). For the latency of the path itself, an operator promotes the
                # challenger (`Promote`, as `freshrec updater promote` does), reported apart.
                upd.Promote(
                    updater_pb2.PromoteRequest(version=outcome.challenger_version), timeout=60
                )
                forced_s = _wait_serving(rank, users[0], outcome.challenger_version, t_last)
            result.update(
                events_to_serving_s=serving_s,
                events_to_serving_operator_promoted_s=forced_s,
                events_to_decision_s=decision_s,
                update_state=outcome.state,
                update_message=outcome.message,
                update_examples=outcome.examples,
                version_before=before,
            )
            say(
                f"events → new model serving: {serving_s} s; gate decision after {decision_s} s "
                f"({outcome.state}: {outcome.message}); serving after an operator promotion: "
                f"{forced_s} s"
            )
    finally:
        rank_app.stop()
        upd_app.stop()

    # 4. materialisation throughput
    try:
        from services.features.fast_materialize import compare_materialize

        mat = compare_materialize(config, 100_000, 100_000)
        result.update(
            materialize_rows_per_s=mat.get("materialize_rows_per_s"),
            feast_materialize_rows_per_s=mat.get("feast_materialize_rows_per_s"),
            materialize=mat,
        )
    except ImportError as exc:
        result.update(
            materialize_rows_per_s=None,
            feast_materialize_rows_per_s=None,
            materialize_error=str(exc),
        )
    return result


def _wait_serving(rank: Any, user: str, version: str, since: float) -> float | None:
    """Seconds from `since` until Recommend answers with `version` (None after 600 s)."""
    from freshrec.v1 import ranking_pb2

    while time.perf_counter() - since < 600:
        reply = rank.Recommend(ranking_pb2.RecommendRequest(user_id=user, k=5))
        if reply.model_version == version:
            return round(time.perf_counter() - since, 1)
        time.sleep(0.2)
    return None


def _recommend_after_event(
    rank_app: Any,
    rank: Any,
    users: list[str],
    catalog: list[str],
    rng: np.random.Generator,
    clicks: int,
    stamp: Any,
) -> dict[str, dict[str, Any]]:
    """Per arm (`prepared`, `not_prepared`; alternated click by click, so both run in the same
    minutes): p50/p99 ms, calls and `user_side_kept` of the Recommend sent PAGE_GAP_S after a
    returning user's click was answered. The user asks once before the click (their old context
    kept, as for a user browsing), the client then waits without work, as a storefront's
    server does between a click and the next page."""
    from freshrec.v1 import ranking_pb2

    ingestor = rank_app.ingestor
    prepare = ingestor.on_profiles if ingestor is not None else None
    arms = ("prepared", "not_prepared") if prepare is not None else ("not_prepared",)
    latencies: dict[str, list[float]] = {arm: [] for arm in arms}
    kept = dict.fromkeys(arms, 0)
    try:
        for n in range(clicks):
            arm = arms[n % len(arms)]
            if ingestor is not None:
                ingestor.on_profiles = prepare if arm == "prepared" else None
            user = users[int(rng.integers(len(users)))]
            rank.Recommend(ranking_pb2.RecommendRequest(user_id=user, k=10), timeout=30)
            event = ranking_pb2.Event(
                event_id=f"bench-{uuid.uuid4().hex}",
                user_id=user,
                item_id=catalog[int(rng.integers(len(catalog)))],
                type=ranking_pb2.EVENT_TYPE_CLICK,
                timestamp=stamp(),
            )
            rank.LogEvents(ranking_pb2.LogEventsRequest(events=[event]), timeout=30)
            time.sleep(PAGE_GAP_S)
            reranker = rank_app.models.current.reranker
            hits = reranker.user_cache_hits
            t = time.perf_counter()
            rank.Recommend(ranking_pb2.RecommendRequest(user_id=user, k=10), timeout=30)
            latencies[arm].append((time.perf_counter() - t) * 1e3)
            kept[arm] += reranker.user_cache_hits > hits
    finally:
        if ingestor is not None:
            ingestor.on_profiles = prepare
    return {
        arm: {
            "p50": _p(latencies[arm], 50),
            "p99": _p(latencies[arm], 99),
            "calls": len(latencies[arm]),
            "user_side_kept": round(kept[arm] / len(latencies[arm]), 3) if latencies[arm] else None,
        }
        for arm in arms
    }
