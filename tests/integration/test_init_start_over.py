"""`freshrec init` over an initialised workdir: refused without --force (nothing changes), and
`--force` starts it over (its own online keys and state gone, settings kept)."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis

from freshrec.config import CONFIG_FILE_NAME, load_config
from freshrec.data.synthetic import generate_shop
from freshrec.errors import FailedPrecondition
from model.reranker import CrossEncoderReranker, pretrained_path
from services.catalog.changes import CatalogChange, RedisChangeStream
from services.features.feast_store import FeastFeatureStore
from services.features.item_generation import ItemGeneration
from services.features.store import open_feature_store
from services.ingestion.offline_log import OfflineEventLog
from services.jobs.bootstrap import REPLAY_FILE, bootstrap, start_over

pytestmark = pytest.mark.integration


def _load_reranker(path: str) -> CrossEncoderReranker:
    if Path(path) == pretrained_path():
        return CrossEncoderReranker.tiny(seed=0, max_length=32)
    return CrossEncoderReranker.from_pretrained(path, 32, "cpu", "fp32")


def _profile_of(config: object, user: str) -> object:
    store = FeastFeatureStore(config.feature_repo_dir)  # type: ignore[attr-defined]
    store.start()
    return store.get_user_profile(user)


def _keys_of(client: redis.Redis, project: str) -> list[bytes]:
    """Feast's keys of `project` (they end with the project's name)."""
    return list(client.scan_iter(match=f"*{project}", count=1000))


def test_init_refuses_an_initialised_workdir_and_force_starts_it_over(
    redis_url: str, tmp_path: Path
) -> None:
    config = load_config(
        tmp_path / "work",
        project=f"init_{uuid.uuid4().hex[:10]}",
        redis_url=redis_url,
        online_store="redis",
        model={"max_length": 32, "device": "cpu", "rerank_dtype": "fp32"},
        training={"max_examples": 32, "batch_size": 16},
    )
    shop = generate_shop(seed=5, n_items=60, n_users=12, days=20, events_per_user=15)

    def boot() -> None:
        bootstrap(
            config, shop, announce=lambda _m: None, load_reranker=_load_reranker, progress=False
        )

    boot()
    try:
        events = OfflineEventLog(config.offline_dir).count()
        replay = (config.data_dir / REPLAY_FILE).read_bytes()
        user = str(shop.interactions["user_id"].iloc[0])
        assert events > 0 and _profile_of(config, user) is not None

        # A second bootstrap is refused before it writes anything.
        with pytest.raises(FailedPrecondition, match=r"already initialised.*init --force"):
            boot()
        assert OfflineEventLog(config.offline_dir).count() == events
        assert (config.data_dir / REPLAY_FILE).read_bytes() == replay

        # The CLI says so in one line, exit status 2, no traceback.
        cli = subprocess.run(
            [
                sys.executable,
                "-m",
                "freshrec.cli",
                "init",
                "--workdir",
                str(config.workdir),
                "--dataset",
                "synthetic",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert cli.returncode == 2, cli.stdout + cli.stderr
        assert "already initialised" in cli.stdout and "Traceback" not in cli.stderr

        # Starting over removes this project's online keys and the workdir's state, keeps
        # the settings, and a bootstrap then writes the same history once, not twice.
        client = redis.Redis.from_url(redis_url)
        assert _keys_of(client, config.project)
        # A catalogue change the old catalogue's replicas followed: a new index must not get it.
        stream = RedisChangeStream(redis_url, config.project)
        stream.publish([CatalogChange("remove", str(shop.items["item_id"].iloc[0]))])
        start_over(config.workdir, announce=lambda _m: None)
        assert _keys_of(client, config.project) == []
        assert stream.read("0", 1) == []
        assert sorted(p.name for p in config.workdir.iterdir()) == [CONFIG_FILE_NAME]
        assert OfflineEventLog(config.offline_dir).count() == 0
        assert load_config(config.workdir).project == config.project
        boot()
        assert OfflineEventLog(config.offline_dir).count() == events
        assert _profile_of(config, user) is not None
    finally:
        open_feature_store(config.feature_repo_dir).teardown()
        ItemGeneration(config.feature_repo_dir).forget()
