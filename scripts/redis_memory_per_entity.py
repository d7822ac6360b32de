"""Redis memory per user profile and per item: materialise a synthetic shop, measure, print JSON.

    .venv/bin/python scripts/redis_memory_per_entity.py --port 6399 --users 2000 --items 5000

Needs an empty Redis (it refuses a non-empty one: `used_memory` growth is only meaningful
then). Each key is measured with `MEMORY USAGE key SAMPLES 0`; docs/scaling.md quotes the result.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import redis

from freshrec.config import FreshRecConfig
from freshrec.data.synthetic import generate_shop
from services.features.profiles import build_item_features, build_user_profiles
from services.features.store import (
    apply_feature_repo,
    materialize,
    open_feature_store,
    render_feature_store_yaml,
    resolve_online_store,
    write_offline_tables,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--items", type=int, default=5000)
    args = parser.parse_args()
    client = redis.Redis(port=args.port)
    if client.dbsize():
        sys.exit(f"Redis on port {args.port} is not empty; start an empty one")
    shop = generate_shop(seed=7, n_items=args.items, n_users=args.users, days=60)
    as_of = shop.interactions["timestamp"].max().to_pydatetime()
    profiles = build_user_profiles(shop.interactions, shop.items, as_of)
    items = build_item_features(shop.items, shop.interactions, as_of)
    before = client.info("memory")["used_memory"]
    with tempfile.TemporaryDirectory() as workdir:
        config = FreshRecConfig(
            workdir=Path(workdir),
            project="memprobe",
            redis_url=f"redis://127.0.0.1:{args.port}/0",
            online_store="redis",
        )
        render_feature_store_yaml(config, resolve_online_store(config))
        write_offline_tables(config, profiles, items)
        store = open_feature_store(config.feature_repo_dir)
        apply_feature_repo(config, store)
        materialize(config, as_of, store)
    used = client.info("memory")["used_memory"] - before
    sizes: dict[str, list[int]] = {"user": [], "item": []}
    for key in client.scan_iter(count=1000):
        kind = "user" if b"user_id" in key else "item" if b"item_id" in key else None
        if kind:
            sizes[kind].append(int(client.memory_usage(key, samples=0) or 0))
    n = len(sizes["user"]) + len(sizes["item"])
    print(
        json.dumps(
            {
                "redis_version": client.info("server")["redis_version"],
                "users_in_shop": args.users,
                "profiles_written": len(sizes["user"]),
                "items_written": len(sizes["item"]),
                "user_key_bytes_mean": round(sum(sizes["user"]) / max(1, len(sizes["user"]))),
                "item_key_bytes_mean": round(sum(sizes["item"]) / max(1, len(sizes["item"]))),
                "used_memory_growth_bytes": used,
                "used_memory_growth_per_entity": round(used / max(1, n)),
                "recent_items_len_mean": round(float(profiles["recent_items"].map(len).mean()), 2),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
