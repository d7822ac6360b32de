"""Fast materialisation gives what `feast materialize` gives, read back through the Feast SDK."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
import redis

from freshrec.config import FreshRecConfig
from services.features.fast_materialize import (
    FastMaterializeUnsupported,
    entity_keys,
    fast_materialize,
)
from services.features.feast_store import FeastFeatureStore
from services.features.item_generation import ItemGeneration
from services.features.materialize_bench import compare_materialize, synthetic_feature_tables
from services.features.store import (
    apply_feature_repo,
    materialize,
    open_feature_store,
    render_feature_store_yaml,
    resolve_online_store,
    write_offline_tables,
)

pytestmark = pytest.mark.integration


@dataclass
class Loaded:
    config: FreshRecConfig
    reader: FeastFeatureStore
    report: dict


@dataclass
class Pair:
    sdk: Loaded
    fast: Loaded
    profiles: pd.DataFrame
    items: pd.DataFrame
    as_of: datetime
    redis_url: str


def _setup(tmp: Path, redis_url: str, profiles: pd.DataFrame, items: pd.DataFrame, **kw: object):
    config = FreshRecConfig(
        workdir=tmp,
        project=f"t_{uuid.uuid4().hex[:10]}",
        redis_url=redis_url,
        online_store="redis",
        **kw,  # type: ignore[arg-type]
    )
    render_feature_store_yaml(config, resolve_online_store(config))
    write_offline_tables(config, profiles, items)
    apply_feature_repo(config)
    return config


@pytest.fixture(scope="module")
def pair(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    profiles, items, as_of = synthetic_feature_tables(n_users=300, n_items=400)
    loaded = {}
    for engine in ("sdk", "fast"):
        config = _setup(tmp_path_factory.mktemp(engine), redis_url, profiles, items)
        if engine == "sdk":
            report = materialize(config, as_of)
        else:
            report = fast_materialize(config, as_of, batch_size=64)  # several batches
        reader = FeastFeatureStore(config.feature_repo_dir)
        reader.start()
        loaded[engine] = Loaded(config, reader, report)
    yield Pair(loaded["sdk"], loaded["fast"], profiles, items, as_of, redis_url)
    for run in loaded.values():
        open_feature_store(run.config.feature_repo_dir).teardown()
        ItemGeneration(run.config.feature_repo_dir).forget()


def test_every_user_reads_back_identically_through_the_sdk(pair: Pair) -> None:
    users = list(pair.profiles["user_id"])
    assert len(users) > 100
    for user_id in users:
        fast = pair.fast.reader.get_user_profile(user_id)
        assert fast is not None
        assert fast == pair.sdk.reader.get_user_profile(user_id)
    assert pair.fast.reader.get_user_profile("nobody") is None


def test_every_item_reads_back_identically_through_the_sdk(pair: Pair) -> None:
    ids = list(pair.items["item_id"])
    fast = pair.fast.reader.get_items(ids)
    assert set(fast) == set(ids)
    assert fast == pair.sdk.reader.get_items(ids)


def test_redis_hashes_are_byte_identical(pair: Pair) -> None:
    client = redis.Redis.from_url(pair.redis_url)
    try:
        for join_key, ids in (
            ("user_id", list(pair.profiles["user_id"])),
            ("item_id", list(pair.items["item_id"])),
        ):
            replies = []
            for run in (pair.sdk, pair.fast):
                pipe = client.pipeline(transaction=False)
                for key in entity_keys(run.config.project, join_key, ids, 3):
                    pipe.hgetall(key)
                replies.append(pipe.execute())
            assert replies[0] == replies[1]
    finally:
        client.close()


def test_report_and_registry(pair: Pair) -> None:
    report = pair.fast.report
    assert report["engine"] == "fast"
    assert report["views"]["user_profile"]["rows"] == len(pair.profiles)
    assert report["views"]["item_features"]["rows"] == len(pair.items)
    assert report["rows"] == len(pair.profiles) + len(pair.items)
    store = open_feature_store(pair.fast.config.feature_repo_dir)
    for view in ("user_profile", "item_features"):
        assert store.get_feature_view(view).most_recent_end_time == pair.as_of


def test_older_rows_never_overwrite_a_fresher_pushed_profile(
    pair: Pair, redis_url: str, tmp_path: Path
) -> None:
    config = _setup(tmp_path, redis_url, pair.profiles, pair.items)
    try:
        fast_materialize(config, pair.as_of)
        reader = FeastFeatureStore(config.feature_repo_dir)
        reader.start()
        user_id = str(pair.profiles["user_id"].iloc[0])
        before = reader.get_user_profile(user_id)
        assert before is not None and before.last_seen is not None
        later = (pair.as_of + timedelta(days=1)).replace(microsecond=0)  # stored in seconds
        fresher = replace(before, clicks=before.clicks + 7, last_seen=later)
        reader.push_profiles([fresher])
        # Re-materialise the whole history (a backfill): every stored row is as new or newer,
        # so nothing is written, as Feast skips them; the pushed profile survives.
        everything = datetime(1970, 1, 1, tzinfo=UTC)
        again = fast_materialize(config, pair.as_of, views=["user_profile"], start=everything)
        assert again["views"]["user_profile"]["rows"] == 0
        assert again["views"]["user_profile"]["skipped"] == len(pair.profiles)
        assert reader.get_user_profile(user_id) == fresher
        forced = fast_materialize(
            config, pair.as_of, views=["user_profile"], start=everything, overwrite=True
        )
        assert forced["views"]["user_profile"]["rows"] == len(pair.profiles)
        assert reader.get_user_profile(user_id) == before
    finally:
        open_feature_store(config.feature_repo_dir).teardown()
        ItemGeneration(config.feature_repo_dir).forget()


def test_key_ttl_is_applied_when_configured(pair: Pair, redis_url: str, tmp_path: Path) -> None:
    config = _setup(tmp_path, redis_url, pair.profiles.head(5), pair.items.head(5))
    yaml_path = config.feature_repo_dir / "feature_store.yaml"
    text = yaml_path.read_text().replace(
        "  type: redis\n", "  type: redis\n  key_ttl_seconds: 900\n"
    )
    yaml_path.write_text(text)
    try:
        fast_materialize(config, pair.as_of)
        client = redis.Redis.from_url(redis_url)
        (key,) = entity_keys(config.project, "item_id", [str(pair.items["item_id"].iloc[0])], 3)
        assert 0 < client.ttl(key) <= 900
        client.close()
    finally:
        open_feature_store(config.feature_repo_dir).teardown()
        ItemGeneration(config.feature_repo_dir).forget()


def test_sqlite_repo_is_refused_and_materialize_falls_back_to_the_sdk(
    pair: Pair, tmp_path: Path
) -> None:
    config = FreshRecConfig(
        workdir=tmp_path, project=f"t_{uuid.uuid4().hex[:10]}", online_store="sqlite"
    )
    render_feature_store_yaml(config, resolve_online_store(config))
    write_offline_tables(config, pair.profiles.head(5), pair.items.head(5))
    apply_feature_repo(config)
    with pytest.raises(FastMaterializeUnsupported, match="sqlite"):
        fast_materialize(config, pair.as_of)
    report = materialize(config, pair.as_of, fast=True)
    assert "engine" not in report  # the SDK's report
    assert report["views"]["item_features"]["rows"] == 5


def test_cluster_repo_is_refused(pair: Pair) -> None:
    repo = pair.fast.config.feature_repo_dir
    yaml_path = repo / "feature_store.yaml"
    original = yaml_path.read_text()
    try:
        yaml_path.write_text(
            original.replace(
                "  type: redis\n", "  type: redis\n  redis_type: redis_cluster\n"
            ).replace(",db=0", "")  # cluster nodes have no databases
        )
        with pytest.raises(FastMaterializeUnsupported, match="redis_cluster"):
            fast_materialize(pair.fast.config, pair.as_of)
    finally:
        yaml_path.write_text(original)


def test_compare_materialize_reports_both_rates(redis_url: str, tmp_path: Path) -> None:
    config = FreshRecConfig(workdir=tmp_path, redis_url=redis_url, online_store="redis")
    client = redis.Redis.from_url(redis_url)

    def its_keys() -> set[bytes]:  # Feast's keys end with the project; ours name it
        return {
            k for k in client.scan_iter(count=1000) if b"bench_sdk_" in k or b"bench_fast_" in k
        }

    before = its_keys()
    result = compare_materialize(config, n_users=200, n_items=200)
    assert result["identical_sample"] is True
    assert result["rows"] == result["feast_rows"] > 200
    assert result["materialize_rows_per_s"] > 0 and result["feast_materialize_rows_per_s"] > 0
    # Its two projects leave no key behind (the Redis may be shared).
    assert its_keys() - before == set()
    client.close()
