"""Feast on a Redis Cluster (`redis_type: redis_cluster`): a 3-master cluster started here."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import yaml
from _feast_parity import materialize_shop, read_back, small_shop
from redis.cluster import RedisCluster

from freshrec.config import FreshRecConfig
from services.features.feast_store import FeastFeatureStore
from services.features.redis_reader import RedisFeatureReader
from services.features.store import resolve_online_store

pytestmark = pytest.mark.integration

MASTERS = 3
CREATE_FLAGS = ("--cluster-replicas", "0", "--cluster-yes")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(predicate: object, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if predicate():  # type: ignore[operator]
                return
        except (redis.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {timeout_s}s", pytrace=False)
        time.sleep(0.1)


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[int]]:
    """Three redis-server masters with cluster mode on, joined by `redis-cli --cluster create`."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        pytest.fail("redis-server and redis-cli must be on PATH (Redis 7)", pytrace=False)
    # Cluster bus port = port + 10000: pick ports whose bus port is free too.
    ports: list[int] = []
    while len(ports) < MASTERS:
        port = _free_port()
        if port + 10000 < 65536 and port not in ports:
            ports.append(port)
    processes = []
    try:
        for port in ports:
            node_dir = tmp_path_factory.mktemp(f"cluster{port}")
            # fmt: off
            processes.append(subprocess.Popen(
                [server, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                 "--cluster-config-file", str(node_dir / "nodes.conf"),
                 "--cluster-node-timeout", "5000", "--save", "", "--appendonly", "no",
                 "--dir", str(node_dir), "--logfile", str(node_dir / "redis.log")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))
            # fmt: on
        for port in ports:
            _wait(lambda p=port: redis.Redis(port=p).ping(), f"node {port} did not answer")
        create = subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports), *CREATE_FLAGS],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert create.returncode == 0, create.stdout + create.stderr
        for port in ports:
            _wait(
                lambda p=port: redis.Redis(port=p).cluster("info")["cluster_state"] == "ok",
                f"node {port} did not reach cluster_state:ok",
            )
        yield ports
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


def _cluster_config(tmp_path: Path, ports: list[int]) -> FreshRecConfig:
    return FreshRecConfig(
        workdir=tmp_path / "cluster",
        project=f"cluster_{uuid.uuid4().hex[:8]}",
        redis_url=f"redis://127.0.0.1:{ports[0]}/0",
        redis_type="redis_cluster",
        redis_cluster_nodes=[f"127.0.0.1:{p}" for p in ports[1:]],
        online_store="redis",
    )


def test_feast_on_redis_cluster_reads_back_what_a_single_node_holds(
    tmp_path: Path, redis_url: str, redis_cluster: list[int]
) -> None:
    profiles, items, as_of = small_shop()
    cluster = _cluster_config(tmp_path, redis_cluster)
    single = FreshRecConfig(
        workdir=tmp_path / "single",
        project=f"single_{uuid.uuid4().hex[:8]}",
        redis_url=redis_url,
        online_store="redis",
    )
    materialize_shop(single, resolve_online_store(single), profiles, items, as_of)
    report = materialize_shop(cluster, resolve_online_store(cluster), profiles, items, as_of)

    rendered = yaml.safe_load((cluster.feature_repo_dir / "feature_store.yaml").read_text())
    assert rendered["online_store"]["redis_type"] == "redis_cluster"
    assert "db=" not in rendered["online_store"]["connection_string"]
    assert report["views"]["user_profile"]["rows"] == len(profiles)

    user_ids = [*profiles["user_id"].astype(str), "nobody"]
    item_ids = [*items["item_id"].astype(str), "no-such-item"]
    got = read_back(cluster, user_ids, item_ids)
    assert got == read_back(single, user_ids, item_ids)
    assert sum(v is not None for v in got["users"]["events_total"]) == len(profiles)

    # The keys really are spread over the shards (not all on the seed node).
    keys_per_node = [redis.Redis(port=p).dbsize() for p in redis_cluster]
    assert sum(1 for n in keys_per_node if n > 0) == MASTERS, keys_per_node

    reader = FeastFeatureStore(cluster.feature_repo_dir)
    reader.start()
    user_id = str(profiles["user_id"].iloc[0])
    profile = reader.get_user_profile(user_id)
    assert profile is not None and profile.user_id == user_id
    wanted = [str(i) for i in items["item_id"].iloc[:10]]
    assert sorted(reader.get_items(wanted)) == sorted(wanted)
    assert reader.get_user_profile("nobody") is None


def test_raw_redis_reader_on_a_cluster_matches_the_feast_sdk_and_sees_edits(
    tmp_path: Path, redis_cluster: list[int]
) -> None:
    """The hot-path reader reads a cluster repo itself (one pipeline split by shard) and
    returns exactly what the SDK returns; its item cache sees a catalogue edit at once."""
    from dataclasses import replace

    from services.features.item_generation import item_generation_key

    profiles, items, as_of = small_shop()
    config = _cluster_config(tmp_path, redis_cluster)
    materialize_shop(config, resolve_online_store(config), profiles, items, as_of)
    sdk = FeastFeatureStore(config.feature_repo_dir)
    sdk.start()
    plain = RedisFeatureReader(config.feature_repo_dir)
    cached = RedisFeatureReader(config.feature_repo_dir, item_cache_max_age_s=3600)
    plain.start()
    cached.start()
    try:
        for user_id in [*profiles["user_id"].astype(str)[:10], "nobody"]:
            want = sdk.get_user_profile(user_id)
            assert plain.get_user_profile(user_id) == want
            # With the item cache on, the profile comes with the generation (a pipeline).
            assert cached.get_user_profile(user_id) == want
        item_ids = [*items["item_id"].astype(str), "no-such-item"]
        expected = sdk.get_items(item_ids)
        assert len(expected) == len(items)
        assert plain.get_items(item_ids) == expected
        assert cached.get_items(item_ids) == expected
        assert cached.get_items(item_ids) == expected  # from the item cache this time
        assert cached.item_cache_hits == len(items)

        # The generation lives on the cluster too: the SDK writer bumps it after the push.
        node = RedisCluster(host="127.0.0.1", port=redis_cluster[0])
        key = item_generation_key(config.project)
        before = node.get(key)
        first = item_ids[0]
        edited = replace(expected[first], in_stock=not expected[first].in_stock)
        sdk.push_items([edited])
        assert node.get(key) != before
        # A request's profile read carries the new generation; its held items are re-read.
        assert cached.get_user_profile(str(profiles["user_id"].iloc[0])) is not None
        assert cached.get_items([first])[first] == edited == plain.get_items([first])[first]
        node.close()
    finally:
        plain.close()
        cached.close()
