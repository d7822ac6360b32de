"""A bench workdir that bootstraps gets a Feast project of its own unless one is configured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from freshrec.bench import _explicit_settings, bench_project
from freshrec.config import FreshRecConfig, RankingConfig


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


def test_the_bootstrap_keeps_no_serving_setting_of_the_run_that_made_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from freshrec.bench import _bootstrap_config
    from freshrec.config import load_config, save_config

    monkeypatch.setenv("FRESHREC_RANKING__SCORE_CACHE", "false")
    monkeypatch.setenv("FRESHREC_RANKING__WARM_ITEM_STATES", "1234")
    monkeypatch.setenv("FRESHREC_MODEL__MAX_LENGTH", "48")
    config = load_config(tmp_path, ranking={"recall_candidates": 77})
    assert not config.ranking.score_cache and config.ranking.recall_candidates == 77

    written = json.loads(save_config(_bootstrap_config(config)).read_text())

    # The serving settings are the defaults; the rest of the run's config is kept (the
    # bootstrap trains with the model settings, which later runs must share).
    defaults = RankingConfig()  # a section alone reads no environment
    assert written["ranking"]["score_cache"] == defaults.score_cache is True
    assert written["ranking"]["warm_item_states"] == defaults.warm_item_states != 1234
    assert written["ranking"]["recall_candidates"] == defaults.recall_candidates != 77
    assert written["model"]["max_length"] == 48


def test_the_bootstrap_keeps_serving_settings_the_workdir_file_gave(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from freshrec.bench import _bootstrap_config
    from freshrec.config import load_config

    monkeypatch.setenv("FRESHREC_RANKING__SCORE_CACHE", "true")
    (tmp_path / "freshrec.json").write_text(json.dumps({"ranking": {"score_cache": False}}))
    config = load_config(tmp_path)

    assert _bootstrap_config(config).ranking.score_cache is False
