"""Stock `feast materialize` vs the fast path on the same data and Redis, in one run.

`compare_materialize` is what `freshrec bench freshness` reports as `materialize_rows_per_s`
and `feast_materialize_rows_per_s`. Each engine loads its own Feast project (own key space) from
the same offline tables; afterwards the two projects' hashes are compared byte for byte on a
sample of entities, and both projects' keys are removed.
"""

from __future__ import annotations

import logging
import random
import time
from datetime import UTC, datetime
from typing import Any

import pandas as pd
import redis

from freshrec.config import FreshRecConfig, load_config
from freshrec.data import generate_shop
from freshrec.errors import FailedPrecondition
from services.features.fast_materialize import VIEW_TABLES, entity_keys, fast_materialize
from services.features.item_generation import ItemGeneration
from services.features.profiles import build_item_features, build_user_profiles
from services.features.redis_reader import connection_kwargs
from services.features.store import (
    OnlineStoreChoice,
    apply_feature_repo,
    materialize,
    open_feature_store,
    render_feature_store_yaml,
    resolve_online_store,
    write_offline_tables,
)

log = logging.getLogger(__name__)

_SAMPLE_PER_VIEW = 1000
_EVENT_ITEMS = 2000


def synthetic_feature_tables(
    n_users: int, n_items: int, events_per_user: float = 25.0, seed: int = 7
) -> tuple[pd.DataFrame, pd.DataFrame, datetime]:
    """Offline `user_profile` and `item_features` tables of a generated shop.

    The event simulation's memory grows with sessions x items per category, so events are drawn
    over the first `min(n_items, 2000)` products (the generator names items `sku-NNNNN` by
    position, so they are the catalogue's first rows) and the catalogue has all `n_items`.
    Users without any event get no profile row.

    Returns:
        (profiles, items, as_of): as_of = the last event's time (every row is at or before it).
    """
    shop = generate_shop(
        seed=seed,
        n_items=min(n_items, _EVENT_ITEMS),
        n_users=n_users,
        days=30,
        events_per_user=events_per_user,
    )
    catalogue = shop.items
    if n_items > _EVENT_ITEMS:
        catalogue = generate_shop(seed=seed, n_items=n_items, n_users=1, days=30).items
    as_of = pd.Timestamp(shop.interactions["timestamp"].max()).to_pydatetime()
    profiles = build_user_profiles(shop.interactions, catalogue, as_of)
    items = build_item_features(catalogue, shop.interactions, as_of)
    return profiles, items, as_of


def compare_materialize(
    config: FreshRecConfig,
    n_users: int,
    n_items: int,
    *,
    events_per_user: float = 25.0,
    keep_keys: bool = False,
) -> dict[str, Any]:
    """Materialise the same synthetic tables with the Feast SDK and with the fast path.

    Args:
        config: its workdir gets `bench_materialize/{sdk,fast}/`; its redis_url/online_store
            pick the Redis (it must be a single Redis node).
        n_users, n_items: size of the generated shop (users with no event have no profile).
        events_per_user: mean events per user of the generated shop.
        keep_keys: leave both projects' keys in Redis (default: remove them).

    Returns:
        {"rows", "feast_materialize_rows_per_s", "materialize_rows_per_s", "speedup",
        "feast_seconds", "fast_seconds", "identical_sample", "sampled_entities", "redis"}.

    Raises:
        FailedPrecondition: the online store is not Redis.
    """
    profiles, items, as_of = synthetic_feature_tables(n_users, n_items, events_per_user)
    choice = resolve_online_store(config)  # one Redis for both engines
    if choice.kind != "redis" or choice.redis_url is None:
        raise FailedPrecondition(f"compare_materialize needs Redis, got {choice.description}")
    try:
        return _compare(config, choice, profiles, items, as_of, keep_keys)
    finally:
        choice.stop()  # only if this call started a redis-server


def _compare(
    config: FreshRecConfig,
    choice: OnlineStoreChoice,
    profiles: pd.DataFrame,
    items: pd.DataFrame,
    as_of: datetime,
    keep_keys: bool,
) -> dict[str, Any]:
    assert choice.redis_url is not None
    suffix = f"{int(time.time())}_{random.randrange(1 << 16):04x}"
    runs: dict[str, dict[str, Any]] = {}
    configs = {}
    for engine in ("sdk", "fast"):
        cfg = config.model_copy(
            update={
                "workdir": config.workdir / "bench_materialize" / engine,
                "project": f"bench_{engine}_{suffix}",
                "redis_url": choice.redis_url,
                "online_store": "redis",
            }
        )
        render_feature_store_yaml(cfg, choice)
        write_offline_tables(cfg, profiles, items)
        store = open_feature_store(cfg.feature_repo_dir)
        apply_feature_repo(cfg, store)
        t0 = time.perf_counter()
        if engine == "sdk":
            report = materialize(cfg, as_of, store)
            rows = sum(v["rows"] for v in report["views"].values())
        else:
            report = fast_materialize(cfg, as_of, store)
            rows = report["rows"]
        runs[engine] = {"rows": rows, "seconds": time.perf_counter() - t0, "store": store}
        configs[engine] = (cfg, choice.redis_url)
    sdk, fast = runs["sdk"], runs["fast"]
    identical, sampled = _same_hashes(profiles, items, configs)
    if not keep_keys:
        for engine, run in runs.items():
            run["store"].teardown()
            # Both paths bump the project's item generation after their write.
            ItemGeneration(configs[engine][0].feature_repo_dir).forget()
    return {
        "rows": fast["rows"],
        "feast_rows": sdk["rows"],
        "feast_seconds": round(sdk["seconds"], 3),
        "fast_seconds": round(fast["seconds"], 3),
        "feast_materialize_rows_per_s": round(sdk["rows"] / sdk["seconds"], 1),
        "materialize_rows_per_s": round(fast["rows"] / fast["seconds"], 1),
        "speedup": round((fast["rows"] / fast["seconds"]) / (sdk["rows"] / sdk["seconds"]), 2),
        "identical_sample": identical,
        "sampled_entities": sampled,
        "redis": configs["fast"][1],
    }


def _same_hashes(
    profiles: pd.DataFrame,
    items: pd.DataFrame,
    configs: dict[str, tuple[FreshRecConfig, str]],
) -> tuple[bool, int]:
    """HGETALL a sample of entities in both projects: equal hashes, byte for byte."""
    rng = random.Random(0)
    ids = {
        "user_profile": ("user_id", list(profiles["user_id"])),
        "item_features": ("item_id", list(items["item_id"])),
    }
    url = configs["fast"][1]
    client = redis.Redis(**connection_kwargs(_feast_connection(url)))
    try:
        same, sampled = True, 0
        for view in VIEW_TABLES:
            join_key, all_ids = ids[view]
            sample = rng.sample(all_ids, min(_SAMPLE_PER_VIEW, len(all_ids)))
            replies = {}
            for engine, (cfg, _) in configs.items():
                pipe = client.pipeline(transaction=False)
                for key in entity_keys(cfg.project, join_key, sample, 3):
                    pipe.hgetall(key)  # type: ignore[arg-type]  # bytes keys are fine
                replies[engine] = pipe.execute()
            same = same and replies["sdk"] == replies["fast"] and all(replies["fast"])
            sampled += len(sample)
        return same, sampled
    finally:
        client.close()


def _feast_connection(url: str) -> str:
    from services.features.store import redis_connection_string

    return redis_connection_string(url)


def main() -> None:
    """`python -m services.features.materialize_bench [n_users n_items]`: print JSON."""
    import json
    import sys
    import tempfile
    from pathlib import Path

    n_users = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    n_items = int(sys.argv[2]) if len(sys.argv) > 2 else 100_000
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(Path(tmp))
        started = datetime.now(UTC)
        result = compare_materialize(config, n_users, n_items)
        result["started"] = started.isoformat()
        result["n_users"], result["n_items"] = n_users, n_items
    print(json.dumps(result))


if __name__ == "__main__":
    main()
