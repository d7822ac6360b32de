"""Catalogue changes: validation, the change stream contract, net effect, offline log."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from freshrec.errors import FailedPrecondition, InvalidArgument
from freshrec.records import ItemFeatures
from freshrec.v1 import catalog_pb2
from services.catalog.apply import net_changes
from services.catalog.changes import (
    CatalogChange,
    ChangeFollower,
    InMemoryChangeStream,
    LogGap,
    append_offline,
    log_gap,
    position_key,
    position_time,
    read_offline,
    read_since,
    trimmed_position,
)
from services.catalog.validate import validate_removals, validate_upserts


def _item(item_id: str, **kw: object) -> catalog_pb2.CatalogItem:
    fields = {"title": f"Title {item_id}", "price": 10.0, "in_stock": True, **kw}
    return catalog_pb2.CatalogItem(item_id=item_id, **fields)  # type: ignore[arg-type]


def test_upserts_are_validated_and_counted_by_reason() -> None:
    result = validate_upserts(
        [
            _item("a", description="nice", category="shoes"),
            _item("", title="x"),
            _item("b", title=""),
            _item("c", price=-1.0),
            _item("d", price=float("nan")),
            _item("a"),
            _item("x" * 129),
        ],
        now=datetime(2026, 1, 1, tzinfo=UTC),
    )
    assert [i.item_id for i in result.accepted] == ["a"]
    assert result.accepted[0].text == "nice" and result.accepted[0].category == "shoes"
    assert result.accepted[0].created_at == datetime(2026, 1, 1, tzinfo=UTC)
    assert dict(result.rejected) == {
        "missing_item_id": 1,
        "missing_title": 1,
        "bad_price": 2,
        "duplicate_in_batch": 1,
        "item_id_too_long": 1,
    }


def test_empty_oversized_or_all_invalid_batches_are_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match=r"items must hold 1\.\.1000"):
        validate_upserts([])
    with pytest.raises(InvalidArgument, match=r"items must hold 1\.\.1000"):
        validate_upserts([_item(str(n)) for n in range(1001)])
    with pytest.raises(InvalidArgument, match="no valid item"):
        validate_upserts([_item("a", title="")])
    with pytest.raises(InvalidArgument, match="item_ids"):
        validate_removals([])
    ids, rejected = validate_removals(["a", "a", "", "b"])
    assert ids == ["a", "b"] and dict(rejected) == {"duplicate_in_batch": 1, "missing_item_id": 1}


def test_change_fields_round_trip() -> None:
    item = ItemFeatures("a", "T", "text", "c", "b", 1.5, 0, 0, datetime(2026, 1, 1, tzinfo=UTC))
    for change in (CatalogChange("upsert", "a", item), CatalogChange("remove", "a")):
        assert CatalogChange.from_fields(change.to_fields()) == change


def test_net_changes_follow_order() -> None:
    item = ItemFeatures("a", "T")
    upserts, removals = net_changes(
        [
            CatalogChange("upsert", "a", item),
            CatalogChange("remove", "a"),
            CatalogChange("remove", "b"),
            CatalogChange("upsert", "b", ItemFeatures("b", "B")),
        ]
    )
    assert set(upserts) == {"b"} and removals == {"a"}


def test_follower_applies_each_change_once_in_order() -> None:
    stream = InMemoryChangeStream()
    seen: list[tuple[str, str]] = []
    follower = ChangeFollower(
        stream, lambda batch: seen.extend((p, c.item_id) for p, c in batch), block_ms=1
    )
    stream.publish([CatalogChange("remove", "a"), CatalogChange("remove", "b")])
    assert follower.poll_once() == 2
    assert follower.poll_once() == 0
    stream.publish([CatalogChange("remove", "c")])
    follower.poll_once()
    assert seen == [("1-0", "a"), ("2-0", "b"), ("3-0", "c")] and follower.applied == 3


def test_follower_starts_after_a_position_and_rewinds_to_an_older_one() -> None:
    stream = InMemoryChangeStream()
    stream.publish([CatalogChange("remove", x) for x in "abcd"])
    seen: list[str] = []
    follower = ChangeFollower(
        stream, lambda batch: seen.extend(c.item_id for _, c in batch), "2-0", block_ms=1
    )
    follower.poll_once()
    assert seen == ["c", "d"] and follower.last_id == "4-0"
    follower.rewind("1-0")
    follower.poll_once()
    assert seen == ["c", "d", "b", "c", "d"] and follower.last_id == "4-0"


def test_stream_positions_sort_as_the_stream_does() -> None:
    ordered = ["0", "0-1", "5-0", "5-2", "10-0", "1733580000000-0", "1733580000000-11"]
    assert sorted(ordered, key=position_key) == ordered
    assert position_key("0") == position_key("0-0")
    for junk in ("", "x", "1-y", "-1", "1-2-3"):
        with pytest.raises(ValueError, match="not a change-stream id"):
            position_key(junk)


def test_read_since_drains_the_stream_and_refuses_when_changes_were_dropped() -> None:
    stream = InMemoryChangeStream()
    stream.publish([CatalogChange("remove", f"i{n}") for n in range(2500)])
    got = read_since(stream, "100-0")
    assert [c.item_id for _, c in got] == [f"i{n}" for n in range(100, 2500)]
    assert read_since(stream, "2500-0") == []

    class Trimmed(InMemoryChangeStream):
        def trimmed_through(self) -> str:
            return "7-0"

    trimmed = Trimmed()
    assert read_since(trimmed, "7-0") == []
    with pytest.raises(FailedPrecondition, match="dropped changes through 7-0, past position 3-0"):
        read_since(trimmed, "3-0")


def test_offline_log_appends(tmp_path) -> None:
    append_offline(tmp_path, [CatalogChange("upsert", "a", ItemFeatures("a", "T", price=2.0))])
    append_offline(tmp_path, [CatalogChange("remove", "a")])
    paths = sorted((tmp_path / "catalog").glob("*/*.parquet"))
    # One folder per UTC day, named by the day of the time each file is named by.
    for path in paths:
        written = int(path.name.partition("-")[0])
        day = datetime.fromtimestamp(written / 1e9, UTC).strftime("%Y-%m-%d")
        assert path.parent.name == day
    frame = pd.concat(pd.read_parquet(p) for p in paths)
    assert frame["op"].tolist() == ["upsert", "remove"]
    assert frame["title"].tolist()[0] == "T"


def test_offline_log_lists_only_the_days_it_needs_and_reads_a_flat_log(tmp_path: Path) -> None:
    append_offline(tmp_path, [CatalogChange("remove", "today")])
    # A file of an earlier version, straight in catalog/, and one in a day folder long ago.
    written = append_offline(tmp_path, [CatalogChange("remove", "flat")])
    flat_at = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    flat_name = f"{int(flat_at.timestamp() * 1e9)}-00000000.parquet"
    written.replace(tmp_path / "catalog" / flat_name)
    old = append_offline(tmp_path, [CatalogChange("remove", "old")])
    old_at = datetime(2025, 6, 1, 12, tzinfo=UTC)
    (tmp_path / "catalog" / "2025-06-01").mkdir()
    old.replace(tmp_path / "catalog" / "2025-06-01" / f"{int(old_at.timestamp() * 1e9)}-1.parquet")
    (tmp_path / "catalog" / "not-a-day").mkdir()  # ignored

    assert [c.item_id for c in read_offline(tmp_path)] == ["flat", "old", "today"]
    # Rows are kept by their changed_at (these were written today): the files' names decide
    # only which files are opened.
    assert [c.item_id for c in read_offline(tmp_path, datetime(2025, 6, 1, tzinfo=UTC))] == [
        "old",
        "today",
    ]
    later = datetime.now(UTC) + timedelta(minutes=1)
    gap = log_gap(tmp_path, _stream_id(datetime(2025, 3, 1, tzinfo=UTC)), None, now=later)
    assert gap is not None and gap.writes == 2 and gap.first == old_at
    july = _stream_id(datetime(2025, 7, 1, tzinfo=UTC))
    assert log_gap(tmp_path, _stream_id(flat_at - timedelta(days=1)), july) == LogGap(
        2, flat_at, old_at
    )


def test_offline_log_reads_back_every_change_in_order_and_from_a_time(tmp_path) -> None:
    created = datetime(2026, 3, 1, 12, tzinfo=UTC)
    shoe = ItemFeatures("a", "Red shoe", "Soft leather", "shoes", "Acme", 10.5, created_at=created)
    append_offline(tmp_path, [CatalogChange("upsert", "a", shoe), CatalogChange("remove", "b")])
    time.sleep(0.01)
    between = datetime.now(UTC)
    time.sleep(0.01)
    append_offline(tmp_path, [CatalogChange("remove", "a"), CatalogChange("upsert", "c", shoe)])

    every = read_offline(tmp_path)
    assert [(c.op, c.item_id) for c in every] == [
        ("upsert", "a"),
        ("remove", "b"),
        ("remove", "a"),
        ("upsert", "c"),
    ]
    # What the recall text is made of comes back as it was written.
    assert every[0].item == shoe
    assert every[3].item is not None and every[3].item.title == "Red shoe"
    assert [(c.op, c.item_id) for c in read_offline(tmp_path, between)] == [
        ("remove", "a"),
        ("upsert", "c"),
    ]
    assert read_offline(tmp_path / "nowhere") == []


def test_a_stream_position_tells_when_its_change_was_added() -> None:
    assert position_time("0") is None
    assert position_time("1796663938293-196") == datetime.fromtimestamp(1796663938.293, UTC)
    stream = InMemoryChangeStream()
    assert stream.last_position() == "0"
    stream.publish([CatalogChange("remove", "a"), CatalogChange("remove", "b")])
    assert stream.last_position() == "2-0"


def test_a_redis_stream_trimmed_by_maxlen_reports_what_it_may_have_dropped() -> None:
    """XINFO STREAM replies (Redis 7.0) before and after trims: MAXLEN leaves
    max-deleted-entry-id at 0-0, so the trim is read from entries-added and the first entry."""
    whole = {"length": 10, "entries-added": 10, "max-deleted-entry-id": "0-0"}
    assert trimmed_position({**whole, "first-entry": ("1700-0", {})}) == "0"
    # 250 added, the oldest 150 trimmed: everything before 1700-150 may be gone.
    cut = {"length": 100, "entries-added": 250, "max-deleted-entry-id": "0-0"}
    assert trimmed_position({**cut, "first-entry": ("1700-150", {})}) == "1700-149"
    head = trimmed_position({**cut, "first-entry": ("1701-0", {})})
    assert position_key("1700-999") < position_key(head) < position_key("1701-0")
    emptied = {"length": 0, "entries-added": 250, "first-entry": None}
    assert trimmed_position({**emptied, "last-generated-id": "1702-3"}) == "1702-3"
    # XDEL of a newer entry than the trim reached: the newer of the two.
    both = {**cut, "first-entry": ("1700-150", {}), "max-deleted-entry-id": "1700-200"}
    assert trimmed_position(both) == "1700-200"
    # Before Redis 7 (no entries-added): only what the reply says.
    assert trimmed_position({"length": 3, "first-entry": ("9-0", {})}) == "0"


class _TrimmedThrough3(InMemoryChangeStream):
    """Five removals, a..e at 1-0..5-0, of which the stream has dropped through 3-0."""

    def __init__(self) -> None:
        super().__init__()
        self.publish([CatalogChange("remove", x) for x in "abcde"])

    def trimmed_through(self) -> str:
        return "3-0"


def _follower(stream: InMemoryChangeStream, start: str) -> tuple[ChangeFollower, list[str]]:
    """A follower of `stream` from `start`, and the item ids it applies, in order."""
    seen: list[str] = []
    follower = ChangeFollower(
        stream, lambda batch: seen.extend(c.item_id for _, c in batch), start, block_ms=1
    )
    return follower, seen


def test_follower_warns_when_it_starts_or_rewinds_behind_a_trim(
    caplog: pytest.LogCaptureFixture,
) -> None:
    follower, seen = _follower(_TrimmedThrough3(), "3-0")
    with caplog.at_level("WARNING", logger="services.catalog.changes"):
        follower.poll_once()  # from 3-0: nothing it follows was dropped
        follower.poll_once()
        assert follower.gaps == [] and not caplog.records
        follower.rewind("1-0")  # an older index: 2-0 and 3-0 are gone
        follower.poll_once()
        follower.poll_once()  # said once per position, not per poll
    assert follower.gaps == ["1-0"]
    assert [r.getMessage() for r in caplog.records] == [
        "the catalogue change stream has dropped changes through 3-0, past position 1-0 of the "
        "index this replica serves: they are not in its recall until `freshrec index-rebuild` "
        "folds them in"
    ]
    assert seen == ["d", "e", "b", "c", "d", "e"]


def _stream_id(when: datetime) -> str:
    """The Redis stream id of a change added at `when`."""
    return f"{int(when.timestamp() * 1000)}-0"


def test_the_offline_log_shows_changes_a_stream_lost_without_a_trim(tmp_path: Path) -> None:
    start = datetime.now(UTC)
    base = _stream_id(start - timedelta(minutes=1))  # the index folds in changes to here
    append_offline(tmp_path, [CatalogChange("remove", "a")])
    append_offline(tmp_path, [CatalogChange("remove", "b"), CatalogChange("remove", "c")])
    written = datetime.now(UTC)
    later = written + timedelta(minutes=1)

    # Redis lost the stream and nothing was published since: both writes are missing.
    gap = log_gap(tmp_path, base, None, now=later)
    assert gap is not None and gap.writes == 2
    assert start <= gap.first <= gap.last <= written
    assert "holds 2 write(s) from" in gap.describe()
    # A new stream that began after them lacks them too.
    assert log_gap(tmp_path, base, _stream_id(later)) == gap
    # Writes within CLOCK_SKEW of now may still be on their way to the stream.
    assert log_gap(tmp_path, base, None, now=written) is None
    # A stream that holds changes from before the writes holds the writes as well.
    assert log_gap(tmp_path, base, _stream_id(start - timedelta(seconds=30)), now=later) is None
    # An index whose position is after the writes needs none of them.
    assert log_gap(tmp_path, _stream_id(later), None, now=later + timedelta(minutes=1)) is None
    assert log_gap(tmp_path / "nowhere", base, None, now=later) is None


def test_follower_warns_when_it_starts_behind_changes_only_the_offline_log_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import services.catalog.changes as changes

    monkeypatch.setattr(changes, "CLOCK_SKEW", timedelta(0))
    position = _stream_id(datetime.now(UTC) - timedelta(minutes=1))
    append_offline(tmp_path, [CatalogChange("remove", "a")])
    empty = InMemoryChangeStream()  # as a Redis stream that lost its changes shows: no trim
    unaware = ChangeFollower(empty, lambda _b: None, position, block_ms=1)
    told = ChangeFollower(empty, lambda _b: None, position, block_ms=1, offline_root=tmp_path)
    with caplog.at_level("WARNING", logger="services.catalog.changes"):
        unaware.poll_once()
        assert unaware.gaps == [] and not caplog.records
        told.poll_once()
        told.poll_once()
    assert told.gaps == [position]
    [record] = caplog.records
    assert record.getMessage().startswith("the offline change log holds 1 write(s) from ")
    assert record.getMessage().endswith(
        "that the change stream lacks (Redis lost the stream, or trimmed it without reporting "
        f"it), after position {position} of the index this replica serves: they are not in "
        "its recall until `freshrec index-rebuild` folds them in"
    )


def test_follower_reports_missing_changes_until_a_newer_index_folds_them_in() -> None:
    from prometheus_client import REGISTRY

    from services.common import metrics

    follower, seen = _follower(_TrimmedThrough3(), "1-0")
    metrics.watch_catalog_follower(follower)

    def gauge() -> float | None:
        return REGISTRY.get_sample_value("freshrec_catalog_stream_gap")

    assert gauge() == 0.0
    follower.poll_once()  # starts at 1-0: 2-0 and 3-0 are gone
    assert (follower.missing, follower.gaps, gauge()) == (True, ["1-0"], 1.0)
    follower.recheck("2-0")  # a newer index, still behind the trim
    follower.poll_once()
    assert (follower.missing, follower.gaps) == (True, ["1-0", "2-0"])
    follower.recheck("3-0")  # an index that folds in everything the stream dropped
    follower.poll_once()
    assert (follower.missing, follower.gaps, gauge()) == (False, ["1-0", "2-0"], 0.0)
    # A recheck does not move where it reads from: nothing was applied twice.
    assert seen == ["b", "c", "d", "e"]
