"""Import a shop's own catalogue and event log (CSV or Parquet) into the canonical tables.

Rows that break a rule are dropped and counted by reason rather than failing the import; a
missing required column fails it, naming the column and the `mapping` key that would fix it.
Each rejected row is counted once, under the first rule it breaks (in the order listed in
`ITEM_REJECTIONS` / `INTERACTION_REJECTIONS`); duplicates are looked for among rows that pass
every other rule, and the first one in file order is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from freshrec.data.schema import EVENT_TYPES, INTERACTION_COLUMNS, ITEM_COLUMNS, Dataset
from freshrec.errors import InvalidArgument

MAX_ITEM_ID_CHARS = 128
ITEM_REJECTIONS = (
    "missing_item_id",
    "item_id_too_long",
    "missing_title",
    "bad_price",
    "bad_created_at",
    "bad_in_stock",
    "duplicate_item_id",
)
INTERACTION_REJECTIONS = (
    "missing_event_id",
    "missing_user_id",
    "missing_item_id",
    "unknown_item",
    "bad_event_type",
    "bad_timestamp",
    "duplicate_event_id",
)
_REQUIRED = {
    "items": ("item_id", "title"),
    "interactions": ("user_id", "item_id", "event_type", "timestamp"),
}
_COLUMNS = {"items": ITEM_COLUMNS, "interactions": INTERACTION_COLUMNS}
_TRUE = frozenset({"true", "t", "yes", "y", "1", "1.0", "in_stock", "instock", "available"})
_FALSE = frozenset({"false", "f", "no", "n", "0", "0.0", "out_of_stock", "outofstock", "sold_out"})


@dataclass(frozen=True)
class ImportResult:
    """What an import produced.

    Attributes:
        dataset: the accepted rows in canonical columns (`name` is "imported").
        rejected: {"items": {reason: count}, "interactions": {reason: count}}; only reasons
            that occurred appear.
        accepted: {"items": count, "interactions": count}.
    """

    dataset: Dataset
    rejected: dict[str, dict[str, int]]
    accepted: dict[str, int]


def import_tables(
    items_path: Path,
    interactions_path: Path,
    mapping: dict[str, str] | None = None,
) -> ImportResult:
    """Read, validate and convert a shop's items and interactions files.

    Args:
        items_path: a .csv or .parquet file with one row per product.
        interactions_path: a .csv or .parquet file with one row per event.
        mapping: {canonical column: column in your file}. A plain key ("item_id") applies to
            both files; prefix it with "items." or "interactions." to address one file only
            (e.g. {"items.item_id": "sku", "interactions.item_id": "product"}).

    Returns:
        ImportResult with the canonical Dataset and per-reason rejection counts.

    Raises:
        InvalidArgument: unsupported file type, an unknown mapping key, or a required column
            missing from a file.
    """
    items_path, interactions_path = Path(items_path), Path(interactions_path)
    resolved = _resolve_mapping(mapping or {})
    raw_items = _rename(_read_table(items_path), "items", resolved["items"], items_path)
    raw_events = _rename(
        _read_table(interactions_path), "interactions", resolved["interactions"], interactions_path
    )

    items, item_created_given, item_rejects = _validate_items(raw_items)
    events, event_rejects = _validate_interactions(raw_events, set(items["item_id"]))
    items = _fill_created_at(items, item_created_given, events)

    dataset = Dataset(
        name="imported",
        items=items[list(ITEM_COLUMNS)].reset_index(drop=True),
        interactions=events[list(INTERACTION_COLUMNS)].reset_index(drop=True),
        notes={"items_path": str(items_path), "interactions_path": str(interactions_path)},
    )
    return ImportResult(
        dataset=dataset,
        rejected={"items": item_rejects, "interactions": event_rejects},
        accepted={"items": len(dataset.items), "interactions": len(dataset.interactions)},
    )


def _resolve_mapping(mapping: dict[str, str]) -> dict[str, dict[str, str]]:
    """Split the user's mapping into {table: {canonical: source}}; qualified keys win."""
    resolved: dict[str, dict[str, str]] = {"items": {}, "interactions": {}}
    qualified: list[tuple[str, str, str]] = []
    for key, source in mapping.items():
        if not isinstance(source, str) or not source:
            raise InvalidArgument(
                f"mapping[{key!r}] must be a non-empty column name, got {source!r}"
            )
        table, dot, column = key.partition(".")
        if dot:
            if table not in _COLUMNS or column not in _COLUMNS[table]:
                raise InvalidArgument(
                    f"mapping key {key!r} is unknown; use one of "
                    f"{', '.join('items.' + c for c in ITEM_COLUMNS)}, "
                    f"{', '.join('interactions.' + c for c in INTERACTION_COLUMNS)}"
                )
            qualified.append((table, column, source))
            continue
        targets = [t for t, cols in _COLUMNS.items() if key in cols]
        if not targets:
            raise InvalidArgument(
                f"mapping key {key!r} is not a canonical column; use one of "
                f"{', '.join(sorted(set(ITEM_COLUMNS) | set(INTERACTION_COLUMNS)))}"
            )
        for table in targets:
            resolved[table][key] = source
    for table, column, source in qualified:
        resolved[table][column] = source
    return resolved


def _read_table(path: Path) -> pd.DataFrame:
    suffixes = [s.lower() for s in path.suffixes]
    try:
        if suffixes and suffixes[-1] in (".parquet", ".pq"):
            return pd.read_parquet(path).reset_index(drop=True)
        if suffixes[-1:] == [".csv"] or suffixes[-2:] == [".csv", ".gz"]:
            # Everything as text: ids like "007" keep their zeros and "NA" stays a string.
            return pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError as exc:
        raise InvalidArgument(f"file {path} does not exist") from exc
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"could not read {path}: {exc}") from exc
    raise InvalidArgument(
        f"file {path} must end in .csv, .csv.gz, .parquet or .pq, got {''.join(path.suffixes)!r}"
    )


def _rename(frame: pd.DataFrame, table: str, mapping: dict[str, str], path: Path) -> pd.DataFrame:
    """Select and rename the canonical columns; raise if a required one is absent."""
    columns: dict[str, pd.Series] = {}
    for canonical in _COLUMNS[table]:
        source = mapping.get(canonical, canonical)
        if source in frame.columns:
            columns[canonical] = frame[source]
        elif canonical in _REQUIRED[table]:
            if canonical in mapping:
                hint = f"mapping[{canonical!r}] names {source!r}, which is not a column"
            else:
                hint = (
                    f"name the column holding it with `--map {canonical}=<your column>` "
                    f"(mapping key {canonical!r} or {table + '.' + canonical!r})"
                )
            raise InvalidArgument(
                f"{table} file {path.name} lacks required column {canonical!r}: {hint}; "
                f"columns present: {', '.join(map(str, frame.columns))}"
            )
    return pd.DataFrame(columns, index=frame.index)


def _text(series: pd.Series) -> pd.Series:
    """Stripped strings with nulls as ""; integers from Parquet stay integral ("7", not "7.0")."""
    if pd.api.types.is_float_dtype(series) and series.dropna().mod(1).eq(0).all():
        series = series.astype("Int64")
    return series.astype("string").fillna("").str.strip().astype(object)


def _validate_items(raw: pd.DataFrame) -> tuple[pd.DataFrame, pd.Series, dict[str, int]]:
    n = len(raw)
    item_id = _text(raw["item_id"])
    title = _text(raw["title"])
    price, bad_price = _parse_price(raw["price"]) if "price" in raw else _default(n, 0.0)
    created, created_given, bad_created = (
        _parse_created_at(raw["created_at"]) if "created_at" in raw else _no_created_at(n)
    )
    in_stock, bad_stock = _parse_bool(raw["in_stock"]) if "in_stock" in raw else _default(n, True)

    checks = {
        "missing_item_id": item_id.eq(""),
        "item_id_too_long": item_id.str.len().gt(MAX_ITEM_ID_CHARS),
        "missing_title": title.eq(""),
        "bad_price": bad_price,
        "bad_created_at": bad_created,
        "bad_in_stock": bad_stock,
    }
    valid, reasons = _first_failure(checks, n)
    duplicate = valid & item_id.where(valid).duplicated(keep="first")
    reasons["duplicate_item_id"] = int(duplicate.sum())
    keep = valid & ~duplicate

    items = pd.DataFrame(
        {
            "item_id": item_id,
            "title": title,
            "description": _text(raw["description"]) if "description" in raw else "",
            "category": _text(raw["category"]) if "category" in raw else "",
            "brand": _text(raw["brand"]) if "brand" in raw else "",
            "price": price.astype(np.float64),
            "created_at": created,
            "in_stock": in_stock.astype(bool),
        },
        index=raw.index,
    )[keep.to_numpy()]
    return items, created_given[keep.to_numpy()], _nonzero(reasons)


def _validate_interactions(
    raw: pd.DataFrame, known_items: set[str]
) -> tuple[pd.DataFrame, dict[str, int]]:
    n = len(raw)
    user_id = _text(raw["user_id"])
    item_id = _text(raw["item_id"])
    event_type = _text(raw["event_type"]).str.lower()
    timestamp = _parse_time(raw["timestamp"])
    has_event_id = "event_id" in raw
    event_id = _text(raw["event_id"]) if has_event_id else None

    checks = {
        "missing_event_id": event_id.eq("") if event_id is not None else _false(n),
        "missing_user_id": user_id.eq(""),
        "missing_item_id": item_id.eq(""),
        "unknown_item": ~item_id.isin(known_items) & item_id.ne(""),
        "bad_event_type": ~event_type.isin(EVENT_TYPES),
        "bad_timestamp": timestamp.isna(),
    }
    valid, reasons = _first_failure(checks, n)
    if event_id is None:
        event_id = _derived_event_ids(user_id, item_id, event_type, timestamp)
    duplicate = valid & event_id.where(valid).duplicated(keep="first")
    reasons["duplicate_event_id"] = int(duplicate.sum())
    keep = (valid & ~duplicate).to_numpy()

    events = pd.DataFrame(
        {
            "event_id": event_id,
            "user_id": user_id,
            "item_id": item_id,
            "event_type": event_type,
            "timestamp": timestamp,
        },
        index=raw.index,
    )[keep]
    events = events.sort_values("timestamp", kind="stable")
    return events, _nonzero(reasons)


def _first_failure(checks: dict[str, pd.Series], n: int) -> tuple[pd.Series, dict[str, int]]:
    """Count each row under the first check it fails; return (rows failing none, counts)."""
    failed = pd.Series(np.zeros(n, dtype=bool))
    reasons: dict[str, int] = {}
    for reason, mask in checks.items():
        hit = np.logical_and(mask.to_numpy(dtype=bool), np.logical_not(failed.to_numpy(dtype=bool)))
        reasons[reason] = int(hit.sum())
        failed |= hit
    valid = pd.Series(np.logical_not(failed.to_numpy(dtype=bool)))
    return valid, reasons


def _derived_event_ids(
    user_id: pd.Series, item_id: pd.Series, event_type: pd.Series, timestamp: pd.Series
) -> pd.Series:
    """Deterministic ids from the event's content; repeats of one event get an ordinal."""
    key = pd.DataFrame(
        {
            "user_id": user_id.to_numpy(),
            "item_id": item_id.to_numpy(),
            "event_type": event_type.to_numpy(),
            "ns": pd.DatetimeIndex(timestamp).asi8,
        }
    )
    key["ordinal"] = key.groupby(list(key.columns), sort=False).cumcount()
    digest = pd.util.hash_pandas_object(key, index=False).to_numpy()
    return pd.Series([f"evt-{h:016x}" for h in digest.tolist()], dtype=object)


def _parse_price(raw: pd.Series) -> tuple[pd.Series, pd.Series]:
    text = _text(raw)
    blank = text.eq("")
    value = pd.to_numeric(text.where(~blank), errors="coerce")
    bad = ~blank & (value.isna() | value.lt(0) | ~np.isfinite(value.fillna(0.0)))
    return value.where(~blank, 0.0).fillna(0.0), bad


def _parse_bool(raw: pd.Series) -> tuple[pd.Series, pd.Series]:
    if pd.api.types.is_bool_dtype(raw):
        return raw.fillna(True).astype(bool), _false(len(raw))
    text = _text(raw).str.lower()
    blank = text.eq("")
    is_true, is_false = text.isin(_TRUE), text.isin(_FALSE)
    return (blank | is_true), ~(blank | is_true | is_false)


def _parse_created_at(raw: pd.Series) -> tuple[pd.Series, pd.Series, pd.Series]:
    parsed = _parse_time(raw)
    blank = _text(raw).eq("") if not pd.api.types.is_datetime64_any_dtype(raw) else raw.isna()
    return parsed, ~blank, ~blank & parsed.isna()


def _no_created_at(n: int) -> tuple[pd.Series, pd.Series, pd.Series]:
    return pd.Series(pd.NaT, index=range(n), dtype="datetime64[ns, UTC]"), _false(n), _false(n)


def _parse_time(raw: pd.Series) -> pd.Series:
    """UTC timestamps from epoch seconds, ISO 8601 text or datetimes; NaT where unparseable.

    Naive datetimes and ISO strings without an offset are taken as UTC.
    """
    raw = raw.reset_index(drop=True)
    if pd.api.types.is_datetime64_any_dtype(raw):
        stamps = raw.dt.tz_localize("UTC") if raw.dt.tz is None else raw.dt.tz_convert("UTC")
        return stamps.astype("datetime64[ns, UTC]")
    if pd.api.types.is_numeric_dtype(raw) and not pd.api.types.is_bool_dtype(raw):
        return _from_epoch(pd.to_numeric(raw, errors="coerce"))
    text = _text(raw)
    numeric = pd.to_numeric(text.where(text.ne("")), errors="coerce")
    out = _from_epoch(numeric)
    iso = numeric.isna() & text.ne("")
    if iso.any():
        parsed = pd.to_datetime(text[iso], utc=True, errors="coerce", format="ISO8601")
        out[iso] = parsed.astype("datetime64[ns, UTC]")
    return out


def _from_epoch(seconds: pd.Series) -> pd.Series:
    # Outside the datetime64[ns] range (e.g. milliseconds taken as seconds) is unparseable.
    ok = seconds.notna() & seconds.abs().lt(9.2e9)
    nanos = (seconds.where(ok, 0.0).astype(np.float64) * 1e9).round().astype(np.int64)
    out = pd.Series(pd.to_datetime(nanos, utc=True), index=seconds.index)
    return out.where(ok).astype("datetime64[ns, UTC]")


def _fill_created_at(items: pd.DataFrame, given: pd.Series, events: pd.DataFrame) -> pd.DataFrame:
    """Default created_at: the item's first accepted event, else the earliest event, else now."""
    if given.all():
        return items
    first_seen = events.groupby("item_id")["timestamp"].min()
    fallback = events["timestamp"].min() if len(events) else pd.Timestamp.now(tz="UTC")
    default = items["item_id"].map(first_seen).fillna(fallback).astype("datetime64[ns, UTC]")
    items = items.copy()
    items["created_at"] = items["created_at"].where(given.to_numpy(), default)
    return items


def _default(n: int, value: float | bool) -> tuple[pd.Series, pd.Series]:
    return pd.Series([value] * n), _false(n)


def _false(n: int) -> pd.Series:
    return pd.Series(np.zeros(n, dtype=bool))


def _nonzero(counts: dict[str, int]) -> dict[str, int]:
    return {reason: count for reason, count in counts.items() if count}
