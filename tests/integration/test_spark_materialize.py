"""Materialisation on Feast's Spark compute engine (local[2]) gives the local engine's values."""

from __future__ import annotations

import importlib.util
import shutil
import uuid
from pathlib import Path

import pytest
import yaml
from _feast_parity import materialize_shop, read_back, small_shop

from freshrec.config import FreshRecConfig
from services.features.store import resolve_online_store

pytestmark = pytest.mark.integration


def _require_spark() -> None:
    # Installed by `make setup` (the dev extra); a missing one is a broken setup, not a skip.
    if importlib.util.find_spec("pyspark") is None:
        pytest.fail("pyspark is not installed: run `make setup` (dev extra)", pytrace=False)
    if shutil.which("java") is None:
        pytest.fail(
            "java is not on PATH: Spark needs a JDK 17+ (apt-get install openjdk-17-jre-headless)",
            pytrace=False,
        )


def _config(tmp_path: Path, redis_url: str, engine: str) -> FreshRecConfig:
    return FreshRecConfig(
        workdir=tmp_path / engine,
        project=f"spark_{engine}_{uuid.uuid4().hex[:8]}",
        redis_url=redis_url,
        online_store="redis",
        materialize={"engine": engine, "spark_master": "local[2]"},
    )


def test_spark_engine_materialises_the_same_values_as_the_local_engine(
    tmp_path: Path, redis_url: str
) -> None:
    _require_spark()
    profiles, items, as_of = small_shop()
    local = _config(tmp_path, redis_url, "local")
    spark = _config(tmp_path, redis_url, "spark")

    local_report = materialize_shop(local, resolve_online_store(local), profiles, items, as_of)
    spark_report = materialize_shop(spark, resolve_online_store(spark), profiles, items, as_of)

    rendered = yaml.safe_load((spark.feature_repo_dir / "feature_store.yaml").read_text())
    assert rendered["batch_engine"]["type"] == "spark.engine"
    assert rendered["batch_engine"]["spark_conf"]["spark.master"] == "local[2]"
    assert rendered["offline_store"]["type"] == "file"
    for view in ("user_profile", "item_features"):
        assert spark_report["views"][view]["rows"] == local_report["views"][view]["rows"] > 0

    user_ids = [*profiles["user_id"].astype(str), "nobody"]
    item_ids = [*items["item_id"].astype(str), "no-such-item"]
    expected = read_back(local, user_ids, item_ids)
    got = read_back(spark, user_ids, item_ids)
    assert got == expected
    # Not vacuous: the rows really arrived (the unknown ids read back as None).
    assert sum(v is not None for v in got["users"]["events_total"]) == len(profiles)
    assert got["items"]["title"][-1] is None
    assert sum(v is not None for v in got["items"]["title"]) == len(items)
