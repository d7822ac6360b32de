"""A bench workdir that bootstraps gets a Feast project of its own unless one is configured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from freshrec.bench import _explicit_settings, bench_project
from freshrec.config import FreshRecConfig


def test_each_workdir_gets_its_own_valid_stable_project(tmp_path: Path) -> None:
    one, two = tmp_path / "bench-1m", tmp_path / "other" / "bench-1m"

    # Same directory name, different paths: different projects; the same path: the same one.
    assert bench_project(one) != bench_project(two)
    assert bench_project(one) == bench_project(tmp_path / "x" / ".." / "bench-1m")
    assert bench_project(one).startswith("bench_bench_1m_")
    FreshRecConfig(workdir=one, project=bench_project(one))  # the config accepts it


def test_a_configured_project_is_seen_from_env_or_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FRESHREC_PROJECT", raising=False)
    assert "project" not in _explicit_settings(tmp_path)

    monkeypatch.setenv("FRESHREC_PROJECT", "mine")
    assert "project" in _explicit_settings(tmp_path)

    monkeypatch.delenv("FRESHREC_PROJECT")
    (tmp_path / "freshrec.json").write_text(json.dumps({"project": "shop"}))
    assert "project" in _explicit_settings(tmp_path)
