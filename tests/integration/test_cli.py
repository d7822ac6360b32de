"""The `freshrec` command as a user runs it: a subprocess, its output and its exit status."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from freshrec.demo import IMPORTED_INTERACTIONS, IMPORTED_ITEMS

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _freshrec(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("FRESHREC_WORKDIR", None)
    return subprocess.run(
        [sys.executable, "-m", "freshrec.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        env=env,
        timeout=120,
    )


def test_help_lists_the_commands() -> None:
    result = _freshrec("--help")

    assert result.returncode == 0, result.stderr
    for command in (
        "init",
        "serve",
        "updater",
        "data",
        "demo",
        "recommend",
        "materialize",
        "item-states",
        "index-rebuild",
    ):
        assert f" {command} " in result.stdout, command


def test_updater_help_lists_the_operator_commands() -> None:
    result = _freshrec("updater", "--help")

    assert result.returncode == 0, result.stderr
    for command in ("status", "trigger", "versions", "promote", "rollback"):
        assert f" {command} " in result.stdout, command


def test_an_unreachable_updater_is_a_one_line_error() -> None:
    result = _freshrec("updater", "status", "--address", "127.0.0.1:1")

    output = (result.stdout + result.stderr).strip()
    assert result.returncode != 0
    assert "Traceback" not in output
    assert len(output.splitlines()) == 1, output
    assert output.startswith("UNAVAILABLE:")


def test_data_import_reports_accepted_and_rejected_rows(tmp_path: Path) -> None:
    (tmp_path / "items.csv").write_text(
        "sku,name,price\nA1,Red shoe,10.5\nA2,Blue hat,not-a-price\n,Nameless,1\nA3,Lamp,20\n"
    )
    (tmp_path / "events.csv").write_text(
        "user_id,item_id,event_type,timestamp\n"
        "u1,A1,click,2024-03-01T10:00:00Z\n"
        "u2,A3,purchase,2024-03-01T11:00:00Z\n"
        "u3,ZZ,click,2024-03-01T12:00:00Z\n"
        ",A1,click,2024-03-01T12:00:00Z\n"
        "u4,A1,teleport,2024-03-01T12:00:00Z\n"
    )
    workdir = tmp_path / "work"

    result = _freshrec(
        "data",
        "import",
        "--items",
        "items.csv",
        "--interactions",
        "events.csv",
        "--workdir",
        str(workdir),
        "--map",
        "items.item_id=sku",
        "--map",
        "title=name",
        cwd=tmp_path,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "items: accepted 2; rejected bad_price: 1, missing_item_id: 1" in result.stdout
    assert (
        "interactions: accepted 2; rejected bad_event_type: 1, missing_user_id: 1, "
        "unknown_item: 1" in result.stdout
    )
    items = pd.read_parquet(workdir / "data" / IMPORTED_ITEMS)
    events = pd.read_parquet(workdir / "data" / IMPORTED_INTERACTIONS)
    assert sorted(items["item_id"]) == ["A1", "A3"]
    assert sorted(events["user_id"]) == ["u1", "u2"]


def test_data_import_with_a_missing_column_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "items.csv").write_text("sku,name\nA1,Red shoe\n")
    (tmp_path / "events.csv").write_text("user_id,item_id,event_type,timestamp\n")

    result = _freshrec(
        "data",
        "import",
        "--items",
        str(tmp_path / "items.csv"),
        "--interactions",
        str(tmp_path / "events.csv"),
        "--workdir",
        str(tmp_path / "work"),
    )

    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 2
    assert "Traceback" not in output
    assert output.startswith("error:")
    assert "item_id" in output
    assert not (tmp_path / "work" / "data" / IMPORTED_ITEMS).exists()


def test_a_bad_map_option_is_rejected_without_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "items.csv").write_text("item_id,title\nA1,Red shoe\n")
    (tmp_path / "events.csv").write_text("user_id,item_id,event_type,timestamp\n")

    result = _freshrec(
        "data",
        "import",
        "--items",
        str(tmp_path / "items.csv"),
        "--interactions",
        str(tmp_path / "events.csv"),
        "--map",
        "no-equals-sign",
        "--workdir",
        str(tmp_path / "work"),
    )

    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    assert "--map" in result.stdout + result.stderr


def test_item_states_without_a_model_is_a_one_line_error(tmp_path: Path) -> None:
    result = _freshrec("item-states", "--workdir", str(tmp_path / "empty"))

    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 2
    assert "Traceback" not in output
    assert len(output.splitlines()) == 1, output
    assert "no champion re-ranker" in output and "freshrec init" in output


def test_index_rebuild_without_an_index_or_a_redis_stream_is_a_one_line_error(
    tmp_path: Path,
) -> None:
    import json

    import numpy as np

    from freshrec.config import load_config
    from model.artifacts import Manifest
    from model.index import RecallIndex
    from services.jobs.bootstrap import ONLINE_STORE_FILE
    from services.registry import open_registry

    def one_line(workdir: Path) -> str:
        result = _freshrec("index-rebuild", "--workdir", str(workdir))
        output = (result.stdout + result.stderr).strip()
        assert result.returncode == 2, output
        assert "Traceback" not in output and len(output.splitlines()) == 1, output
        return output

    assert "no champion index" in one_line(tmp_path / "empty")

    # An index, served from the embedded SQLite store: its catalogue changes never left the
    # ranking process, so there is nothing this command could read.
    workdir = tmp_path / "embedded"
    registry = open_registry(load_config(workdir))
    vectors = np.eye(4, dtype=np.float32)
    index = RecallIndex.build(vectors, ["a", "b", "c", "d"])
    sealed = registry.publish_written("index", index.save, Manifest(kind="index", version=""))
    registry.promote("index", sealed.version)
    (workdir / ONLINE_STORE_FILE).write_text(json.dumps({"kind": "sqlite", "redis_url": None}))
    assert "change stream in Redis" in one_line(workdir)
    help_text = _freshrec("index-rebuild", "--help").stdout
    assert "--from-offline-log" in help_text and "--min-changes" in help_text
