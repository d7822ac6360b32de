"""Item popularity recomputed for a scheduled materialisation (the re-ranker reads it), from
the offline event log, with the same windows as the bootstrap's batch builder."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from freshrec.config import FreshRecConfig
from freshrec.errors import FailedPrecondition
from services.features.profiles import build_item_features, refresh_item_popularity
from services.features.store import ITEM_FEATURES_TABLE, refresh_popularity
from services.ingestion.offline_log import OfflineEventLog

NOW = datetime(2026, 5, 1, 12, tzinfo=UTC)


def _catalogue() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "item_id": ["a", "b", "c"],
            "title": ["A", "B", "C"],
            "description": ["", "", ""],
            "category": ["x", "y", "x"],
            "brand": ["", "", ""],
            "price": [1.0, 2.0, 3.0],
            "created_at": [NOW - timedelta(days=90)] * 3,
            "in_stock": [True, True, False],
        }
    )


def _events() -> pd.DataFrame:
    rows = [
        ("u1", "a", "purchase", NOW - timedelta(days=1)),
        ("u2", "a", "click", NOW - timedelta(days=6)),
        ("u1", "a", "click", NOW - timedelta(days=20)),  # 30d only
        ("u3", "b", "add_to_cart", NOW - timedelta(days=40)),  # neither
        ("u3", "b", "impression", NOW - timedelta(hours=1)),  # weighs 0
        ("u4", "c", "click", NOW + timedelta(hours=1)),  # after as_of
    ]
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "event_type", "timestamp"])
    frame["event_id"] = [f"e{n}" for n in range(len(frame))]
    return frame


def test_refresh_equals_a_fresh_batch_build_and_keeps_the_other_columns() -> None:
    stale = build_item_features(_catalogue(), _events().iloc[:0], NOW - timedelta(days=60))

    fresh = refresh_item_popularity(stale, _events(), NOW)

    want = build_item_features(_catalogue(), _events(), NOW)
    pd.testing.assert_frame_equal(fresh, want)
    assert fresh["popularity_7d"].tolist() == [4.0, 0.0, 0.0]
    assert fresh["popularity_30d"].tolist() == [5.0, 0.0, 0.0]


def test_the_offline_item_table_is_rewritten_for_the_next_materialisation(
    tmp_path: Path,
) -> None:
    config = FreshRecConfig(workdir=tmp_path)
    config.offline_dir.mkdir(parents=True)
    table = config.offline_dir / ITEM_FEATURES_TABLE
    build_item_features(_catalogue(), _events().iloc[:0], NOW - timedelta(days=60)).to_parquet(
        table, index=False
    )
    OfflineEventLog(config.offline_dir).append_frame(_events())

    done = refresh_popularity(config, NOW)

    rows = pd.read_parquet(table)
    assert done["items"] == 3 and done["events"] >= 5
    assert rows["popularity_7d"].tolist() == [4.0, 0.0, 0.0]
    assert (rows["event_timestamp"] == pd.Timestamp(NOW)).all()
    assert rows["title"].tolist() == ["A", "B", "C"]


def test_refresh_without_a_table_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition, match="freshrec init"):
        refresh_popularity(FreshRecConfig(workdir=tmp_path), NOW)
