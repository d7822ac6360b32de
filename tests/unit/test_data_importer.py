"""Importing a shop's own CSV/Parquet files: accepted rows, rejection counts, mapping, errors."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from freshrec.data import import_tables
from freshrec.data.schema import INTERACTION_COLUMNS, ITEM_COLUMNS
from freshrec.errors import InvalidArgument

ITEMS_CSV = """item_id,title,price,created_at,in_stock,category
a1,Alpha,10.5,2024-01-01,true,shoes
a2,Beta,,,,shoes
a3,Gamma,-1,,yes,x
a4,,5,,,x
,Nameless,5,,,x
a5,Delta,abc,,,x
a6,Eps,3,not a date,,x
a7,Zeta,3,,maybe,x
a1,Alpha again,1,,,x
a8,Eta,7,1704067200,0,x
{long_id},Too long,1,,,x
"""

EVENTS_CSV = """event_id,user_id,item_id,event_type,timestamp
e1,u1,a1,Click,2024-02-01T10:00:00Z
e2,u1,a2,purchase,1706781600
e3,u2,zz,click,1706781600
e4,u2,a1,view,1706781600
e5,u2,a1,click,yesterday
e1,u3,a1,click,1706781600
,u3,a1,click,1706781600
e6,,a1,click,1706781600
e7,u3,,click,1706781600
e8,u3,a3,click,1706781600
e9,u4,a8,ADD_TO_CART,2024-02-01 12:00:00+02:00
"""

EXPECTED_ITEM_REJECTS = {
    "missing_item_id": 1,
    "item_id_too_long": 1,
    "missing_title": 1,
    "bad_price": 2,
    "bad_created_at": 1,
    "bad_in_stock": 1,
    "duplicate_item_id": 1,
}
EXPECTED_EVENT_REJECTS = {
    "missing_event_id": 1,
    "missing_user_id": 1,
    "missing_item_id": 1,
    "unknown_item": 2,  # "zz" never existed; "a3" was rejected for its negative price
    "bad_event_type": 1,
    "bad_timestamp": 1,
    "duplicate_event_id": 1,
}
FEB_1_10H = pd.Timestamp("2024-02-01T10:00:00Z")


@pytest.fixture
def csv_files(tmp_path: Path) -> tuple[Path, Path]:
    items = tmp_path / "items.csv"
    events = tmp_path / "events.csv"
    items.write_text(ITEMS_CSV.format(long_id="x" * 129))
    events.write_text(EVENTS_CSV)
    return items, events


def test_csv_accepts_good_rows_and_counts_each_rejection(csv_files: tuple[Path, Path]) -> None:
    result = import_tables(*csv_files)

    assert result.rejected == {
        "items": EXPECTED_ITEM_REJECTS,
        "interactions": EXPECTED_EVENT_REJECTS,
    }
    assert result.accepted == {"items": 3, "interactions": 3}
    items = result.dataset.items.set_index("item_id")
    assert list(result.dataset.items.columns) == list(ITEM_COLUMNS)
    assert list(items.index) == ["a1", "a2", "a8"]
    assert items.loc["a1", "title"] == "Alpha"  # the first of the duplicates is kept
    assert items.loc["a1", "price"] == 10.5
    assert items.loc["a2", "price"] == 0.0
    assert items.loc["a8", "in_stock"] == False  # noqa: E712  ("0" reads as False)
    assert items.loc["a2", "in_stock"] == True  # noqa: E712  (blank defaults to True)
    assert items.loc["a8", "created_at"] == pd.Timestamp("2024-01-01", tz="UTC")  # epoch secs
    # No created_at given: the item's first accepted event.
    assert items.loc["a2", "created_at"] == FEB_1_10H
    assert str(result.dataset.items["created_at"].dtype) == "datetime64[ns, UTC]"

    events = result.dataset.interactions
    assert list(events.columns) == list(INTERACTION_COLUMNS)
    assert list(events["event_id"]) == ["e1", "e2", "e9"]
    assert list(events["event_type"]) == ["click", "purchase", "add_to_cart"]
    # ISO with Z, epoch seconds and ISO with an offset all land on the same UTC instant.
    assert (events["timestamp"] == FEB_1_10H).all()
    assert str(events["timestamp"].dtype) == "datetime64[ns, UTC]"


def test_parquet_with_typed_columns(tmp_path: Path) -> None:
    items = pd.DataFrame(
        {
            "item_id": ["p1", "p2", "p2", "p3"],
            "title": ["One", "Two", "Two bis", "Three"],
            "price": [1.5, 2.0, 3.0, -4.0],
            "in_stock": [True, False, True, True],
            "created_at": pd.to_datetime(["2024-01-01", "2024-01-02", "2024-01-03", None]),
        }
    )
    events = pd.DataFrame(
        {
            "event_id": ["e1", "e2", "e3", "e4", "e5"],
            "user_id": [10, 11, 12, 13, 14],  # integer ids become strings
            "item_id": ["p1", "p2", "p3", "p1", "p1"],
            "event_type": ["impression", "purchase", "click", "like", "click"],
            "timestamp": [1704153600, 1704153601, 1704153602, 1704153603, 1704153604],
        }
    )
    items.to_parquet(tmp_path / "items.parquet")
    events.to_parquet(tmp_path / "events.parquet")

    result = import_tables(tmp_path / "items.parquet", tmp_path / "events.parquet")

    assert result.rejected == {
        "items": {"bad_price": 1, "duplicate_item_id": 1},
        "interactions": {"unknown_item": 1, "bad_event_type": 1},
    }
    assert result.accepted == {"items": 2, "interactions": 3}
    got = result.dataset.items.set_index("item_id")
    assert got.loc["p2", "in_stock"] == False  # noqa: E712
    assert got.loc["p2", "created_at"] == pd.Timestamp("2024-01-02", tz="UTC")  # naive = UTC
    assert list(result.dataset.interactions["user_id"]) == ["10", "11", "14"]


def test_mapping_renames_columns_and_event_ids_are_derived(tmp_path: Path) -> None:
    (tmp_path / "products.csv").write_text("sku,name,cost\nS1,Mug,4\nS2,Pot,9\n")
    (tmp_path / "log.csv").write_text(
        "customer,product,action,when\n"
        "c1,S1,click,1700000000\n"
        "c1,S1,click,1700000000\n"
        "c2,S2,purchase,1700000100\n"
    )
    mapping = {
        "items.item_id": "sku",
        "interactions.item_id": "product",
        "title": "name",
        "price": "cost",
        "user_id": "customer",
        "event_type": "action",
        "timestamp": "when",
    }

    first = import_tables(tmp_path / "products.csv", tmp_path / "log.csv", mapping)
    again = import_tables(tmp_path / "products.csv", tmp_path / "log.csv", mapping)

    assert first.rejected == {"items": {}, "interactions": {}}
    assert first.accepted == {"items": 2, "interactions": 3}
    assert list(first.dataset.items["title"]) == ["Mug", "Pot"]
    assert list(first.dataset.items["price"]) == [4.0, 9.0]
    ids = list(first.dataset.interactions["event_id"])
    assert len(set(ids)) == 3  # two identical rows still get distinct ids
    assert all(i.startswith("evt-") for i in ids)
    assert ids == list(again.dataset.interactions["event_id"])  # deterministic


def test_missing_required_column_names_column_and_mapping(tmp_path: Path) -> None:
    (tmp_path / "items.csv").write_text("sku,title\nS1,Mug\n")
    (tmp_path / "events.csv").write_text("user_id,item_id,event_type,timestamp\nu,S1,click,1\n")

    with pytest.raises(InvalidArgument, match=r"'item_id'.*mapping"):
        import_tables(tmp_path / "items.csv", tmp_path / "events.csv")

    (tmp_path / "items.csv").write_text("item_id,title\nS1,Mug\n")
    (tmp_path / "events.csv").write_text("user_id,item_id,event_type\nu,S1,click\n")
    with pytest.raises(InvalidArgument, match=r"'timestamp'.*mapping"):
        import_tables(tmp_path / "items.csv", tmp_path / "events.csv")


def test_mapping_to_absent_column_and_unknown_key_are_errors(csv_files: tuple[Path, Path]) -> None:
    with pytest.raises(InvalidArgument, match=r"mapping\['title'\] names 'name'"):
        import_tables(*csv_files, mapping={"title": "name"})
    with pytest.raises(InvalidArgument, match="'colour'"):
        import_tables(*csv_files, mapping={"colour": "c"})


def test_unsupported_suffix_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "items.json").write_text("[]")
    (tmp_path / "events.csv").write_text(EVENTS_CSV)
    with pytest.raises(InvalidArgument, match=r"\.csv"):
        import_tables(tmp_path / "items.json", tmp_path / "events.csv")


def test_header_only_files_give_empty_canonical_frames(tmp_path: Path) -> None:
    (tmp_path / "items.csv").write_text("item_id,title,price,created_at\n")
    (tmp_path / "events.csv").write_text("user_id,item_id,event_type,timestamp\n")

    result = import_tables(tmp_path / "items.csv", tmp_path / "events.csv")

    assert result.accepted == {"items": 0, "interactions": 0}
    assert result.rejected == {"items": {}, "interactions": {}}
    assert str(result.dataset.items["created_at"].dtype) == "datetime64[ns, UTC]"
    assert str(result.dataset.interactions["timestamp"].dtype) == "datetime64[ns, UTC]"


def test_parquet_tz_aware_timestamps_are_converted_to_utc(tmp_path: Path) -> None:
    pd.DataFrame({"item_id": ["p1"], "title": ["One"]}).to_parquet(tmp_path / "items.pq")
    stamps = pd.to_datetime(["2024-05-01 12:00"]).tz_localize("Europe/Berlin")
    pd.DataFrame(
        {"user_id": ["u"], "item_id": ["p1"], "event_type": ["click"], "timestamp": stamps}
    ).to_parquet(tmp_path / "events.pq")

    result = import_tables(tmp_path / "items.pq", tmp_path / "events.pq")

    assert result.dataset.interactions["timestamp"].iloc[0] == pd.Timestamp(
        "2024-05-01 10:00", tz="UTC"
    )
    assert result.dataset.items["created_at"].iloc[0] == pd.Timestamp("2024-05-01 10:00", tz="UTC")
