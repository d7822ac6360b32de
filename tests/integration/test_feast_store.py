"""The Feast feature store end to end: render, apply, materialise, read, push (Redis and SQLite)."""

from __future__ import annotations

import contextlib
import gc
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import redis

from freshrec.config import FreshRecConfig, save_config
from freshrec.errors import FailedPrecondition, FeatureStoreUnavailable
from freshrec.records import ItemFeatures, UserProfile
from services.features.feast_store import FeastFeatureStore
from services.features.item_generation import ItemGeneration
from services.features.profiles import (
    build_item_features,
    build_user_profiles,
    item_from_row,
    profile_from_row,
    update_profile,
)
from services.features.store import (
    OnlineStoreChoice,
    apply_feature_repo,
    materialize,
    open_feature_store,
    prepare_feature_store,
    render_feature_store_yaml,
    resolve_online_store,
    start_redis_server,
    write_offline_tables,
)
from services.jobs.bootstrap import remove_workdir

pytestmark = pytest.mark.integration

AS_OF = datetime(2024, 3, 10, tzinfo=UTC)
CLOSED_PORT_URL = "redis://127.0.0.1:1/0"  # port 1: nothing listens, connect is refused


def _hours(n: float) -> datetime:
    return datetime(2024, 3, 1, tzinfo=UTC) + timedelta(hours=n)


ITEMS = pd.DataFrame(
    {
        "item_id": ["i1", "i2", "i3", "i4"],
        "title": ["Red shoe", "Blue hat", "Green sock", "Lamp"],
        "description": ["A red shoe.", "A blue hat.", "A green sock.", "A lamp."],
        "category": ["shoes", "hats", "shoes", "home"],
        "brand": ["acme", "acme", "sox", "lumo"],
        "price": [49.5, 20.25, 5.0, 80.0],  # exact in float32: Feast stores Float32
        "created_at": pd.to_datetime(
            ["2023-01-01", "2023-06-01", "2024-01-01", "2024-02-01"], utc=True
        ),
        "in_stock": [True, True, False, True],
    }
)
EVENTS = [
    ("u1", "i1", "click", _hours(1)),
    ("u1", "i2", "click", _hours(2)),
    ("u1", "i1", "purchase", _hours(3)),
    ("u2", "i4", "add_to_cart", _hours(4)),
    ("u2", "i3", "impression", _hours(5)),
    ("u3", "i2", "impression", _hours(6)),
]
INTERACTIONS = pd.DataFrame(
    {
        "event_id": [f"e{n}" for n in range(len(EVENTS))],
        "user_id": [e[0] for e in EVENTS],
        "item_id": [e[1] for e in EVENTS],
        "event_type": [e[2] for e in EVENTS],
        "timestamp": pd.to_datetime([e[3] for e in EVENTS], utc=True),
    }
)


def _float32(value: float) -> float:
    return float(np.float32(value))


def _as_stored(profile: UserProfile) -> UserProfile:
    """The profile as Feast returns it: category scores rounded to Float32."""
    return replace(profile, category_scores=tuple(_float32(s) for s in profile.category_scores))


@dataclass
class Prepared:
    config: FreshRecConfig
    choice: OnlineStoreChoice
    reader: FeastFeatureStore
    profiles: pd.DataFrame
    items: pd.DataFrame
    report: dict


def _prepare(config: FreshRecConfig, elsewhere: Path) -> Prepared:
    profiles = build_user_profiles(INTERACTIONS, ITEMS, AS_OF)
    items = build_item_features(ITEMS, INTERACTIONS, AS_OF)
    # Run from another cwd: FileSource paths must not depend on it.
    with contextlib.chdir(elsewhere):
        choice = resolve_online_store(config)
        render_feature_store_yaml(config, choice)
        write_offline_tables(config, profiles, items)
        apply_feature_repo(config)
        report = materialize(config, AS_OF)
    reader = FeastFeatureStore(config.feature_repo_dir)
    reader.start()
    return Prepared(config, choice, reader, profiles, items, report)


def _config(tmp: Path, **overrides: object) -> FreshRecConfig:
    project = f"t_{uuid.uuid4().hex[:10]}"  # own key space in a shared Redis
    return FreshRecConfig(workdir=tmp / "work", project=project, **overrides)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def on_redis(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prepared]:
    tmp = tmp_path_factory.mktemp("feast_redis")
    prepared = _prepare(_config(tmp, redis_url=redis_url, online_store="redis"), tmp)
    yield prepared
    # The Redis may be shared ($FRESHREC_TEST_REDIS_URL): remove this project's keys only.
    open_feature_store(prepared.config.feature_repo_dir).teardown()
    ItemGeneration(prepared.config.feature_repo_dir).forget()


@pytest.fixture(scope="module")
def on_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    tmp = tmp_path_factory.mktemp("feast_sqlite")
    return _prepare(_config(tmp, redis_url=CLOSED_PORT_URL, online_store="sqlite"), tmp)


@pytest.fixture(params=["redis", "sqlite"])
def prepared(request: pytest.FixtureRequest) -> Prepared:
    return request.getfixturevalue(f"on_{request.param}")


def test_rendered_repo_names_the_store(on_redis: Prepared, on_sqlite: Prepared) -> None:
    redis_yaml = (on_redis.config.feature_repo_dir / "feature_store.yaml").read_text()
    assert "type: redis" in redis_yaml
    assert f"project: {on_redis.config.project}" in redis_yaml
    assert "entity_key_serialization_version: 3" in redis_yaml
    sqlite_yaml = (on_sqlite.config.feature_repo_dir / "feature_store.yaml").read_text()
    assert "type: sqlite" in sqlite_yaml
    assert (on_sqlite.config.feature_repo_dir / "online.db").exists()
    assert (on_sqlite.config.feature_repo_dir / "features.py").exists()


def test_materialize_reports_rows(prepared: Prepared) -> None:
    views = prepared.report["views"]
    assert views["user_profile"]["rows"] == 3
    assert views["item_features"]["rows"] == 4
    assert prepared.report["seconds"] >= 0


def test_profiles_read_back_exactly(prepared: Prepared) -> None:
    for _, row in prepared.profiles.iterrows():
        expected = _as_stored(profile_from_row(row))
        assert prepared.reader.get_user_profile(row["user_id"]) == expected
    u1 = prepared.reader.get_user_profile("u1")
    assert u1 is not None
    assert u1.recent_items == ("i1", "i2")
    assert u1.purchased_items == ("i1",)
    assert u1.top_categories == ("shoes", "hats")
    assert u1.category_scores == (_float32(4 / 5), _float32(1 / 5))
    assert u1.last_seen == _hours(3)


def test_items_read_back_exactly(prepared: Prepared) -> None:
    got = prepared.reader.get_items(["i3", "i1", "nope", "i1"])
    assert list(got) == ["i3", "i1"]
    expected = {
        row["item_id"]: item_from_row(row)
        for _, row in prepared.items.iterrows()
        if row["item_id"] in ("i1", "i3")
    }
    assert got == expected
    assert got["i1"] == ItemFeatures(
        item_id="i1",
        title="Red shoe",
        text="A red shoe.",
        category="shoes",
        brand="acme",
        price=49.5,
        popularity_7d=0.0,  # its events are 9 days before as_of
        popularity_30d=4.0,  # click 1 + purchase 3
        created_at=datetime(2023, 1, 1, tzinfo=UTC),
        in_stock=True,
    )
    assert prepared.reader.get_items([]) == {}


def test_unknown_user_is_none(prepared: Prepared) -> None:
    assert prepared.reader.get_user_profile("nobody") is None


def test_pushed_profile_is_read_back(prepared: Prepared) -> None:
    reader = prepared.reader
    before = reader.get_user_profile("u2")
    records = {r["item_id"]: item_from_row(r) for _, r in prepared.items.iterrows()}
    updated = update_profile(
        before, "u2", [("i3", "purchase", _hours(30)), ("i1", "click", _hours(31))], records
    )
    reader.push_profiles([updated])
    assert reader.get_user_profile("u2") == _as_stored(updated)

    newcomer = update_profile(None, "u9", [("i2", "click", _hours(40))], records)
    reader.push_profiles([newcomer])
    assert reader.get_user_profile("u9") == _as_stored(newcomer)


def test_pushed_item_is_read_back(prepared: Prepared) -> None:
    reader = prepared.reader
    current = reader.get_items(["i4"])["i4"]
    changed = replace(current, price=75.5, in_stock=False, title="Desk lamp")
    fresh = ItemFeatures(item_id="i99", title="New thing", category="home", price=1.25)
    reader.push_items([changed, fresh])
    assert reader.get_items(["i4", "i99"]) == {"i4": changed, "i99": fresh}


def test_resolve_redis_mode_requires_a_reachable_redis(tmp_path: Path) -> None:
    config = _config(tmp_path, redis_url=CLOSED_PORT_URL, online_store="redis")
    with pytest.raises(FeatureStoreUnavailable, match="does not answer"):
        resolve_online_store(config)


def test_auto_mode_prefers_a_reachable_redis(redis_url: str, tmp_path: Path) -> None:
    choice = resolve_online_store(_config(tmp_path, redis_url=redis_url))
    assert (choice.kind, choice.redis_url, choice.process) == ("redis", redis_url, None)


def test_auto_mode_starts_redis_server_and_reuses_it(tmp_path: Path) -> None:
    config = _config(tmp_path, redis_url=CLOSED_PORT_URL, online_store="auto")
    first = resolve_online_store(config)
    try:
        assert first.kind == "redis" and first.process is not None
        assert (config.workdir / "redis.pid").read_text().strip() == str(first.process.pid)
        second = resolve_online_store(config)  # e.g. a service started later
        assert (second.redis_url, second.process) == (first.redis_url, None)
    finally:
        first.stop()
    assert first.process.poll() is not None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[tuple[str, OnlineStoreChoice]]:
    """A redis-server this test alone uses, so stopping it disturbs nobody."""
    url, process = start_redis_server("redis-server", tmp_path / "private")
    choice = OnlineStoreChoice("redis", url, "private", process)
    try:
        yield url, choice
    finally:
        choice.stop()


def test_reads_and_pushes_fail_with_feature_store_unavailable_when_redis_stops(
    private_redis: tuple[str, OnlineStoreChoice], tmp_path: Path
) -> None:
    url, choice = private_redis
    config = _config(tmp_path, redis_url=url, online_store="redis")
    profiles = build_user_profiles(INTERACTIONS, ITEMS, AS_OF)
    items = build_item_features(ITEMS, INTERACTIONS, AS_OF)
    prepare_feature_store(config, profiles, items, AS_OF)
    reader = FeastFeatureStore(config.feature_repo_dir)
    reader.start()
    assert reader.get_user_profile("u1") is not None
    from services.features.redis_reader import RedisFeatureReader

    cached = RedisFeatureReader(config.feature_repo_dir, item_cache_max_age_s=3600)
    cached.start()
    assert set(cached.get_items(["i1"])) == {"i1"}

    choice.stop()
    with pytest.raises(FeatureStoreUnavailable) as info:
        reader.get_user_profile("u1")
    assert isinstance(info.value.__cause__, redis.RedisError)
    with pytest.raises(FeatureStoreUnavailable):
        reader.get_items(["i1"])
    # A reader that holds the item still asks Redis for the generation: no held value is
    # served from get_items while the store is down (the degraded path says so explicitly).
    with pytest.raises(FeatureStoreUnavailable):
        cached.get_items(["i1"])
    with pytest.raises(FeatureStoreUnavailable):
        reader.push_profiles([UserProfile(user_id="u1", last_seen=_hours(50))])


def test_reads_fail_with_feature_store_unavailable_on_a_closed_port(
    on_redis: Prepared, tmp_path: Path
) -> None:
    config = _config(tmp_path, redis_url=CLOSED_PORT_URL, online_store="redis")
    render_feature_store_yaml(config, OnlineStoreChoice("redis", CLOSED_PORT_URL, "closed"))
    write_offline_tables(config, on_redis.profiles, on_redis.items)
    apply_feature_repo(config)  # the registry is a local file: no Redis needed
    reader = FeastFeatureStore(config.feature_repo_dir)
    reader.start()
    with pytest.raises(FeatureStoreUnavailable, match="online feature read failed"):
        reader.get_user_profile("u1")
    with pytest.raises(FeatureStoreUnavailable):
        materialize(config, AS_OF)


@pytest.mark.parametrize("fast", [False, True])
def test_materialize_before_the_repository_is_applied_names_what_is_missing(
    on_sqlite: Prepared, tmp_path: Path, fast: bool
) -> None:
    config = _config(tmp_path, redis_url=CLOSED_PORT_URL, online_store="sqlite")
    render_feature_store_yaml(config, OnlineStoreChoice("sqlite", None, "local"))
    write_offline_tables(config, on_sqlite.profiles, on_sqlite.items)
    # No `apply_feature_repo`: Feast's registry holds no feature view (as after a teardown).
    with pytest.raises(FailedPrecondition, match="feature view 'user_profile' is not in the Feast"):
        materialize(config, AS_OF, fast=fast)


def test_materialize_command_on_an_unapplied_repository_is_a_one_line_error(
    on_sqlite: Prepared, tmp_path: Path
) -> None:
    import os
    import subprocess
    import sys

    from freshrec.config import load_config

    workdir = tmp_path / "work"
    config = load_config(workdir)
    render_feature_store_yaml(config, OnlineStoreChoice("sqlite", None, "local"))
    write_offline_tables(config, on_sqlite.profiles, on_sqlite.items)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRESHREC_")}
    result = subprocess.run(
        [sys.executable, "-m", "freshrec.cli", "materialize", "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        env={**env, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        timeout=120,
    )
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 2, output
    assert "Traceback" not in output
    flat = " ".join(output.split())  # the console wraps long lines
    assert "error: feature view 'user_profile' is not in the Feast registry of project" in flat
    assert flat.endswith("or apply its feature repository (`feast apply`) first"), output


# -- RedisFeatureReader: the one-round-trip reader must return exactly what the SDK returns ----


def test_raw_redis_reader_matches_the_feast_sdk(on_redis: Prepared) -> None:
    from services.features.redis_reader import RedisFeatureReader

    raw = RedisFeatureReader(on_redis.config.feature_repo_dir)
    raw.start()
    try:
        for user in ("u1", "u2", "u3", "nobody"):
            assert raw.get_user_profile(user) == on_redis.reader.get_user_profile(user)
        ids = ["i1", "i2", "i3", "i4", "missing", "i1"]
        assert raw.get_items(ids) == on_redis.reader.get_items(ids)
        assert set(raw.get_items(ids)) == {"i1", "i2", "i3", "i4"}
        # A pushed update is seen by both readers alike.
        before = on_redis.reader.get_user_profile("u3")
        assert before is not None
        pushed = replace(
            before,
            recent_items=("i4", *before.recent_items),
            clicks=before.clicks + 1,
            last_seen=datetime(2024, 3, 11, tzinfo=UTC),
        )
        on_redis.reader.push_profiles([pushed])
        assert raw.get_user_profile("u3") == on_redis.reader.get_user_profile("u3")
        assert raw.get_user_profile("u3").clicks == before.clicks + 1  # type: ignore[union-attr]
    finally:
        raw.close()


def test_raw_redis_reader_sees_a_changed_item_at_once(on_redis: Prepared) -> None:
    """Decoded records are memoised by their raw bytes: a changed item must not come back
    stale, and an unchanged one comes back as the same record."""
    from services.features.redis_reader import RedisFeatureReader

    raw = RedisFeatureReader(on_redis.config.feature_repo_dir)
    raw.start()
    try:
        first = raw.get_items(["i1", "i2"])
        assert raw.get_items(["i1", "i2"]) == first
        changed = replace(first["i1"], price=first["i1"].price + 7.5, in_stock=False)
        on_redis.reader.push_items([changed])
        after = raw.get_items(["i1", "i2"])
        assert after["i1"] == changed == on_redis.reader.get_items(["i1"])["i1"]
        assert after["i2"] is first["i2"]  # unchanged bytes: the memoised record
    finally:
        raw.close()


def test_warmed_records_are_served_without_decoding_and_an_edit_is_still_seen(
    on_redis: Prepared,
) -> None:
    """`warm_records` (the ranking service's start-up) decodes the warm set once; a request
    then decodes nothing for those items, and an item edited after the warm-up comes back
    edited (the memo is keyed by the bytes read)."""
    from services.features.redis_reader import RedisFeatureReader

    raw = RedisFeatureReader(on_redis.config.feature_repo_dir, item_cache_max_age_s=30)
    raw.start()
    decoded: list[int] = []
    decode = raw._decode
    raw._decode = lambda names, values: (decoded.append(1), decode(names, values))[1]  # type: ignore[method-assign]
    try:
        assert raw.warm_records(["i1", "i2", "i3", "missing", "i1"], chunk=2) == 3
        assert len(decoded) == 4  # i1, i2, i3 and the missing one's empty row; i1 once
        assert raw.item_cache_hits == raw.item_cache_misses == 0  # the item cache untouched
        warm = raw.get_items(["i1", "i2", "i3"])
        assert len(decoded) == 4  # read from Redis, decoded from the memo
        assert warm == on_redis.reader.get_items(["i1", "i2", "i3"])
        changed = replace(warm["i2"], price=warm["i2"].price + 1.25)
        on_redis.reader.push_items([changed])
        assert raw.get_items(["i2"])["i2"] == changed
        assert len(decoded) == 5
    finally:
        raw.close()


def test_raw_redis_reader_refuses_a_sqlite_repo_and_a_dead_redis(
    on_sqlite: Prepared, on_redis: Prepared, tmp_path: Path
) -> None:
    from freshrec.errors import FailedPrecondition
    from services.features.redis_reader import RedisFeatureReader

    with pytest.raises(FailedPrecondition, match="Redis online store"):
        RedisFeatureReader(on_sqlite.config.feature_repo_dir).start()
    dead = tmp_path / "repo"
    dead.mkdir()
    text = (on_redis.config.feature_repo_dir / "feature_store.yaml").read_text()
    port = on_redis.choice.redis_url.rsplit(":", 1)[1].split("/")[0]  # type: ignore[union-attr]
    (dead / "feature_store.yaml").write_text(text.replace(f":{port},", ":1,"))
    with pytest.raises(FeatureStoreUnavailable):
        RedisFeatureReader(dead).start()


# -- RedisFeatureReader's item cache: held items are served only while the generation holds --


def _generation(prepared: Prepared) -> bytes | None:
    from services.features.item_generation import item_generation_key

    client = redis.Redis.from_url(prepared.choice.redis_url)  # type: ignore[arg-type]
    try:
        return client.get(item_generation_key(prepared.config.project))  # type: ignore[return-value]
    finally:
        client.close()


def test_item_cache_serves_held_items_and_sees_a_pushed_edit_at_once(on_redis: Prepared) -> None:
    from services.features.redis_reader import RedisFeatureReader

    cached = RedisFeatureReader(on_redis.config.feature_repo_dir, item_cache_max_age_s=3600)
    cached.start()
    try:
        ids = ["i1", "i2", "missing", "i3"]
        first = cached.get_items(ids)
        assert first == on_redis.reader.get_items(ids)
        assert list(first) == ["i1", "i2", "i3"]  # request order, unknown ids absent
        assert (cached.item_cache_hits, cached.item_cache_misses) == (0, 4)
        assert cached.get_items(ids) == first
        # Held: only the unknown id was read again.
        assert (cached.item_cache_hits, cached.item_cache_misses) == (3, 5)

        before = _generation(on_redis)
        edited = replace(first["i2"], price=first["i2"].price + 1.5, in_stock=False)
        on_redis.reader.push_items([edited])  # the catalogue service's write: bumps
        assert _generation(on_redis) != before
        after = cached.get_items(ids)
        assert after["i2"] == edited == on_redis.reader.get_items(["i2"])["i2"]
        assert after["i1"] == first["i1"]
        assert cached.item_cache_hits == 3  # nothing was served from before the edit
    finally:
        cached.close()


def test_the_generation_read_with_a_profile_spares_the_item_round_trip_once(
    on_redis: Prepared, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request reads its profile, then its items: with every item held, the generation read
    in the profile's round trip is used and the items cost no second one. It serves the next
    `get_items` of the same thread only, and only while young."""
    import threading

    from services.features.redis_reader import PROFILE_GENERATION_MAX_AGE_S, RedisFeatureReader

    cached = RedisFeatureReader(on_redis.config.feature_repo_dir, item_cache_max_age_s=3600)
    cached.start()
    rounds: list[list[str]] = []
    real = cached._read_items_and_generation

    def counted(item_ids: list[str]) -> tuple[bytes | None, dict[str, ItemFeatures]]:
        rounds.append(list(item_ids))
        return real(item_ids)

    monkeypatch.setattr(cached, "_read_items_and_generation", counted)
    ids = ["i1", "i2"]
    try:
        assert cached.get_user_profile("u1") == on_redis.reader.get_user_profile("u1")
        first = cached.get_items(ids)
        assert rounds == [["i1", "i2"]]  # nothing held yet: read, with the generation
        cached.get_user_profile("u1")
        assert cached.get_items(ids) == first
        assert len(rounds) == 1  # all held, generation from the profile read: no round trip
        assert cached.get_items(ids) == first
        assert rounds[-1] == []  # already taken: the generation is read on its own

        # A catalogue edit made before a request's profile read is in that request's items.
        edited = replace(first["i1"], in_stock=False, price=first["i1"].price + 2.0)
        on_redis.reader.push_items([edited])
        assert cached.get_user_profile("u1") is not None
        assert cached.get_items(ids)["i1"] == edited

        cached.get_user_profile("u1")  # another thread's items do not use this thread's read
        other = threading.Thread(target=cached.get_items, args=(ids,))
        other.start()
        other.join()
        assert len(rounds) == 3
        cached.get_user_profile("u1")
        time.sleep(PROFILE_GENERATION_MAX_AGE_S + 0.02)  # too old to stand in for a read
        cached.get_items(ids)
        assert len(rounds) == 4
    finally:
        on_redis.reader.push_items([first["i1"]])
        cached.close()


def test_item_cache_max_age_bounds_a_write_that_does_not_bump(on_redis: Prepared) -> None:
    """A write from outside FreshRec (Feast's own write path, as `feast materialize` by hand
    would do) leaves the generation alone: the held value is served until the maximum age."""
    from services.features.profiles import items_frame
    from services.features.redis_reader import RedisFeatureReader

    cached = RedisFeatureReader(on_redis.config.feature_repo_dir, item_cache_max_age_s=0.5)
    cached.start()
    try:
        held = cached.get_items(["i4"])["i4"]
        outside = replace(held, title=held.title + " (renamed)")
        before = _generation(on_redis)
        store = open_feature_store(on_redis.config.feature_repo_dir)
        store.write_to_online_store("item_features", items_frame([outside], datetime.now(UTC)))
        assert _generation(on_redis) == before
        assert cached.get_items(["i4"])["i4"] == held  # within the maximum age: held
        time.sleep(0.6)
        assert cached.get_items(["i4"])["i4"] == outside
    finally:
        cached.close()


def test_re_reading_unchanged_items_makes_no_object_the_collector_tracks(
    on_redis: Prepared,
) -> None:
    """Past the maximum age, held items are read again. An unchanged record is the same object
    (decoded once per stored bytes), and the cache keeps it and its read time without a new
    container: objects that outlive a request would otherwise pile up between the ranking
    service's freezes for every full collection to walk (services/common/heap.py)."""
    from services.features.redis_reader import RedisFeatureReader

    cached = RedisFeatureReader(on_redis.config.feature_repo_dir, item_cache_max_age_s=0.05)
    cached.start()
    ids = [str(i) for i in ITEMS["item_id"]]
    try:
        first = cached.get_items(ids)
        records = {id(r) for r in first.values()}
        gc.collect()
        gc.freeze()
        try:
            for _ in range(5):
                time.sleep(0.06)
                again = cached.get_items(ids)
            gc.collect()
            # Objects made since the freeze that refer to a record.
            made = [
                o for o in gc.get_objects() if any(id(r) in records for r in gc.get_referents(o))
            ]
        finally:
            gc.unfreeze()
        assert cached.item_cache_misses == 6 * len(ids)  # every round read them again
        assert all(again[i] is first[i] for i in ids)
        assert all(o is again for o in made)  # the test's own answer, nothing the cache made
    finally:
        cached.close()


def test_materialize_bumps_the_item_generation(on_redis: Prepared) -> None:
    before = _generation(on_redis)
    materialize(on_redis.config, AS_OF + timedelta(hours=1))
    after_sdk = _generation(on_redis)
    assert after_sdk != before
    from services.features.fast_materialize import fast_materialize

    report = fast_materialize(
        on_redis.config, AS_OF, overwrite=True, start=AS_OF - timedelta(days=30)
    )
    assert report["views"]["item_features"]["rows"] == len(ITEMS)
    assert _generation(on_redis) not in (before, after_sdk)


@pytest.mark.parametrize("fast", [False, True])
def test_materialize_full_brings_back_what_the_online_store_lost(
    redis_url: str, tmp_path: Path, fast: bool
) -> None:
    from services.features.store import refresh_profiles
    from services.ingestion.offline_log import OfflineEventLog
    from services.ingestion.validate import EventRow

    prepared = _prepare(_config(tmp_path, redis_url=redis_url, online_store="redis"), tmp_path)
    config, reader = prepared.config, prepared.reader
    try:
        # The event log as a bootstrap leaves it (the history the profiles were built from),
        # then two events LogEvents accepted and pushed online: u1 buys i4, u9 is new.
        log = OfflineEventLog(config.offline_dir)
        log.append_frame(INTERACTIONS)
        bought, clicked = AS_OF + timedelta(minutes=30), AS_OF + timedelta(minutes=40)
        log.append(
            [
                EventRow("n1", "u1", "i4", "purchase", bought),
                EventRow("n2", "u9", "i2", "click", clicked),
            ]
        )
        before = reader.get_user_profile("u1")
        u2 = reader.get_user_profile("u2")
        item = reader.get_items(["i1"])["i1"]
        assert before is not None and before.purchases == 1
        # The online store loses this project's keys (Feast's keys end with the project).
        client = redis.Redis.from_url(redis_url)
        lost = list(client.scan_iter(match=f"*{config.project}", count=1000))
        assert lost and client.delete(*lost) == len(lost)
        assert reader.get_user_profile("u1") is None and "i1" not in reader.get_items(["i1"])

        # A scheduled run loads what changed since the last one: nothing comes back.
        later = AS_OF + timedelta(hours=1)
        materialize(config, later, fast=fast)
        assert reader.get_user_profile("u1") is None

        folded = refresh_profiles(config, later)
        assert (folded["updated"], folded["events"]) == (2, 2)  # the history not again
        again = refresh_profiles(config, later)  # each row's last_seen moved past them
        assert (again["updated"], again["events"], again["users"]) == (0, 0, folded["users"])
        # Appended: u1's state before the purchase stays in the table, as it was then.
        table = pd.read_parquet(config.offline_dir / "user_profile.parquet")
        assert table["user_id"].tolist().count("u1") == 2 and folded["users"] == 4
        report = materialize(config, later, fast=fast, full=True)
        assert report["views"]["user_profile"]["rows"] > 0
        u1 = reader.get_user_profile("u1")
        assert u1 is not None
        assert (u1.purchases, u1.clicks, u1.events_total) == (2, before.clicks, 4)
        assert u1.recent_items[0] == "i4" and u1.purchased_items[0] == "i4"
        assert u1.last_seen == bought
        assert reader.get_user_profile("u2") == u2
        u9 = reader.get_user_profile("u9")
        assert u9 is not None and (u9.clicks, u9.recent_items) == (1, ("i2",))
        assert reader.get_items(["i1"])["i1"] == item
    finally:
        open_feature_store(config.feature_repo_dir).teardown()
        ItemGeneration(config.feature_repo_dir).forget()


def test_remove_workdir_takes_its_projects_online_keys_and_nothing_else(
    on_redis: Prepared, tmp_path: Path
) -> None:
    config = _config(tmp_path, redis_url=on_redis.config.redis_url, online_store="redis")
    _prepare(config, tmp_path)
    save_config(config)  # what `freshrec init` leaves: forget_online_state reads it
    ItemGeneration(config.feature_repo_dir).bump()
    client = redis.Redis.from_url(on_redis.config.redis_url)
    mine = [k for k in client.scan_iter(count=1000) if config.project.encode() in k]
    assert len(mine) > 2
    said: list[str] = []
    remove_workdir(config.workdir, said.append)
    assert not config.workdir.exists()
    assert [k for k in client.scan_iter(count=1000) if config.project.encode() in k] == []
    assert said == [f"   removed the previous run's online keys (project {config.project})"]
    # Another project's keys stay.
    assert on_redis.reader.get_user_profile("u1") is not None
    client.close()
