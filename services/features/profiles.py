"""Pure builders of the online feature rows: batch (whole history) and streaming (new events).

No I/O. The batch builders turn the canonical tables (`freshrec/data/schema.py`) into the rows
of the Feast views `user_profile` and `item_features`; `update_profile` folds new events into an
existing profile with the same semantics, so ingestion and the nightly batch agree.

Profile semantics (batch and streaming alike):
    - only events at or before `as_of` count (batch); events are ordered by timestamp, ties by
      their order in the input;
    - recent_items: distinct items of positive events (POSITIVE_EVENT_TYPES), most recent first,
      at most MAX_RECENT_ITEMS;
    - recent_text: titles of recent_items joined with " | ", whole titles only, at most
      MAX_RECENT_TEXT_CHARS characters (a first title longer than that is cut);
    - category_scores: each category's EVENT_WEIGHTS-weighted event mass divided by the user's
      total weighted mass (events on items without a known category count in the total only),
      top MAX_CATEGORIES by score, ties by name. The scores sum to 1 when every weighted event has
      a known category and the user touched at most MAX_CATEGORIES categories; dividing by the
      total (not by the kept top 8) is what lets `update_profile` recover the masses from the
      counts and stay exact;
    - purchased_items: distinct purchased items, most recent first, at most MAX_PURCHASED_ITEMS;
    - clicks / add_to_carts / purchases: event counts; events_total counts every event,
      impressions included; last_seen: time of the newest event.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd

from freshrec.data.schema import EVENT_TYPES, EVENT_WEIGHTS, POSITIVE_EVENT_TYPES
from freshrec.records import ItemFeatures, UserProfile

MAX_RECENT_ITEMS = 20
MAX_RECENT_TEXT_CHARS = 400
MAX_CATEGORIES = 8
MAX_PURCHASED_ITEMS = 200
RECENT_TEXT_SEPARATOR = " | "

USER_PROFILE_FEATURES = (
    "recent_items",
    "recent_text",
    "top_categories",
    "category_scores",
    "purchased_items",
    "clicks",
    "add_to_carts",
    "purchases",
    "events_total",
    "last_seen",
)
ITEM_FEATURES = (
    "title",
    "text",
    "category",
    "brand",
    "price",
    "popularity_7d",
    "popularity_30d",
    "created_at",
    "in_stock",
)
USER_PROFILE_COLUMNS = ("user_id", *USER_PROFILE_FEATURES, "event_timestamp")
ITEM_FEATURE_COLUMNS = ("item_id", *ITEM_FEATURES, "event_timestamp")

_COUNT_FIELD = {"click": "clicks", "add_to_cart": "add_to_carts", "purchase": "purchases"}

Event = tuple[str, str, datetime]  # (item_id, event_type, timestamp)


# ---------------------------------------------------------------------------------------------
# Batch builders
# ---------------------------------------------------------------------------------------------


def build_user_profiles(
    interactions: pd.DataFrame, items: pd.DataFrame, as_of: datetime
) -> pd.DataFrame:
    """One profile row per user with an event at or before `as_of`.

    Args:
        interactions: canonical interactions (user_id, item_id, event_type, timestamp, ...).
        items: canonical items; titles and categories are looked up here.
        as_of: events after this instant are ignored (naive = UTC).

    Returns:
        Columns USER_PROFILE_COLUMNS; event_timestamp = the user's last_seen (the instant the
        profile reached this state), so Feast's TTL drops users idle for longer than the TTL.

    Raises:
        ValueError: an event_type outside EVENT_TYPES.
    """
    cutoff = _utc_timestamp(as_of)
    _check_event_types(interactions["event_type"])
    events = interactions.loc[
        interactions["timestamp"] <= cutoff, ["user_id", "item_id", "event_type", "timestamp"]
    ]
    # Stable sort: equal timestamps keep their input order, as in update_profile.
    events = events.sort_values("timestamp", kind="stable")
    if events.empty:
        return _empty_frame(USER_PROFILE_COLUMNS)

    titles, categories = _title_and_category_maps(items)
    weight = events["event_type"].map(EVENT_WEIGHTS).astype("float64")
    grouped = events.groupby("user_id", sort=True)

    counts = pd.crosstab(events["user_id"], events["event_type"])
    frame = pd.DataFrame(index=counts.index)
    for event_type, column in _COUNT_FIELD.items():
        frame[column] = counts.get(event_type, 0)
    frame["events_total"] = counts.sum(axis=1)
    frame["last_seen"] = grouped["timestamp"].max()
    total_mass = weight.groupby(events["user_id"]).sum()

    positive = events[events["event_type"].isin(POSITIVE_EVENT_TYPES)]
    recent = _distinct_most_recent_first(positive, MAX_RECENT_ITEMS)
    purchased = _distinct_most_recent_first(
        events[events["event_type"] == "purchase"], MAX_PURCHASED_ITEMS
    )

    event_category = events["item_id"].map(categories)
    mass = (
        pd.DataFrame({"user_id": events["user_id"], "category": event_category, "w": weight})
        .dropna(subset=["category"])
        .loc[lambda d: (d["category"] != "") & (d["w"] > 0)]
        .groupby(["user_id", "category"], sort=False)["w"]
        .sum()
    )
    category_masses: dict[str, dict[str, float]] = {}
    for key, value in mass.items():
        user_key, category = cast(tuple[Any, Any], key)  # (user_id, category) MultiIndex
        category_masses.setdefault(str(user_key), {})[str(category)] = float(value)
    total_by_user = {str(k): float(v) for k, v in total_mass.items()}

    rows = []
    for user_id, row in frame.iterrows():
        uid = str(user_id)
        recent_items = recent.get(uid, [])
        top, scores = _top_categories(category_masses.get(uid, {}), total_by_user[uid])
        last_seen = row["last_seen"]
        rows.append(
            {
                "user_id": uid,
                "recent_items": recent_items,
                "recent_text": _join_titles(titles.get(i, "") for i in recent_items),
                "top_categories": top,
                "category_scores": scores,
                "purchased_items": purchased.get(uid, []),
                "clicks": int(row["clicks"]),
                "add_to_carts": int(row["add_to_carts"]),
                "purchases": int(row["purchases"]),
                "events_total": int(row["events_total"]),
                "last_seen": last_seen,
                "event_timestamp": last_seen,
            }
        )
    return _typed_profile_frame(pd.DataFrame(rows, columns=list(USER_PROFILE_COLUMNS)))


def build_item_features(
    items: pd.DataFrame, interactions: pd.DataFrame, as_of: datetime
) -> pd.DataFrame:
    """One feature row per catalogue item, with popularity as of `as_of`.

    Args:
        items: canonical items.
        interactions: canonical interactions; popularity_Nd is the EVENT_WEIGHTS-weighted count
            of events on the item with timestamp in (as_of - N days, as_of].
        as_of: the snapshot instant (naive = UTC); also every row's event_timestamp.

    Returns:
        Columns ITEM_FEATURE_COLUMNS, in the order of `items`.

    Raises:
        ValueError: an event_type outside EVENT_TYPES.
    """
    cutoff = _utc_timestamp(as_of)
    _check_event_types(interactions["event_type"])

    def popularity(days: int) -> pd.Series:
        return _popularity(items["item_id"], interactions, cutoff, days)

    out = pd.DataFrame(
        {
            "item_id": items["item_id"].astype(str),
            "title": items["title"].fillna("").astype(str),
            "text": items["description"].fillna("").astype(str),
            "category": items["category"].fillna("").astype(str),
            "brand": items["brand"].fillna("").astype(str),
            "price": items["price"].astype("float32"),
            "popularity_7d": popularity(7),
            "popularity_30d": popularity(30),
            "created_at": pd.to_datetime(items["created_at"], utc=True),
            "in_stock": items["in_stock"].astype(bool),
        }
    )
    out["event_timestamp"] = cutoff
    out["event_timestamp"] = out["event_timestamp"].astype("datetime64[ns, UTC]")
    return out.reset_index(drop=True)[list(ITEM_FEATURE_COLUMNS)]


def _popularity(
    item_ids: pd.Series, interactions: pd.DataFrame, cutoff: pd.Timestamp, days: int
) -> pd.Series:
    """EVENT_WEIGHTS-weighted events per item with timestamp in (cutoff - days, cutoff]."""
    ts = pd.to_datetime(interactions["timestamp"], utc=True)
    weight = interactions["event_type"].map(EVENT_WEIGHTS).astype("float64")
    in_window = (ts > cutoff - pd.Timedelta(days=days)) & (ts <= cutoff)
    per_item = weight[in_window].groupby(interactions.loc[in_window, "item_id"].astype(str)).sum()
    return item_ids.astype(str).map(per_item).fillna(0.0).astype("float32")


def refresh_item_popularity(
    item_rows: pd.DataFrame, interactions: pd.DataFrame, as_of: datetime
) -> pd.DataFrame:
    """The item feature rows with popularity_7d/30d recomputed as of `as_of` (the same
    windows as `build_item_features`) and every row stamped `as_of`, so the next
    materialisation loads them. Other columns are kept as they are.

    Raises:
        ValueError: an event_type outside EVENT_TYPES.
    """
    cutoff = _utc_timestamp(as_of)
    _check_event_types(interactions["event_type"])
    out = item_rows.copy()
    for days in (7, 30):
        out[f"popularity_{days}d"] = _popularity(out["item_id"], interactions, cutoff, days)
    out["event_timestamp"] = cutoff
    out["event_timestamp"] = out["event_timestamp"].astype("datetime64[ns, UTC]")
    return out.reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
# Streaming update
# ---------------------------------------------------------------------------------------------


def update_profile(
    profile: UserProfile | None,
    user_id: str,
    events: Sequence[Event],
    items: Mapping[str, ItemFeatures],
) -> UserProfile:
    """Fold new events into a profile; the batch builder's semantics for the same events.

    `update_profile(None, u, events, items)` equals the batch profile of `u` built from the same
    events. Folding into an existing profile is exact as long as the new events are not older
    than the profile's events and the old profile kept every category it had (at most
    MAX_CATEGORIES); categories that had fallen out of the old top list restart from zero.

    Args:
        profile: the current profile, or None for a new user. Not modified.
        user_id: the user; must match `profile.user_id` when a profile is given.
        events: (item_id, event_type, timestamp) in any order; equal timestamps keep this order.
        items: features of the events' items AND of `profile.recent_items` (their titles rebuild
            recent_text); a missing item contributes no title and no category.

    Returns:
        A new UserProfile.

    Raises:
        ValueError: user_id differs from the profile's, or an event_type outside EVENT_TYPES.
    """
    if profile is not None and profile.user_id != user_id:
        raise ValueError(f"user_id must match profile.user_id {profile.user_id!r}, got {user_id!r}")
    base = profile if profile is not None else UserProfile(user_id=user_id)
    for _, event_type, _ in events:
        if event_type not in EVENT_WEIGHTS:
            raise ValueError(f"event_type must be one of {EVENT_TYPES}, got {event_type!r}")
    ordered = sorted(events, key=lambda e: _utc_timestamp(e[2]))  # sorted() is stable

    counts = {
        "clicks": base.clicks,
        "add_to_carts": base.add_to_carts,
        "purchases": base.purchases,
    }
    impressions = base.events_total - sum(counts.values())
    old_total = _total_mass(counts, impressions)
    masses = {
        c: s * old_total for c, s in zip(base.top_categories, base.category_scores, strict=True)
    }

    recent = list(base.recent_items)
    purchased = list(base.purchased_items)
    last_seen = _utc_timestamp(base.last_seen) if base.last_seen is not None else None
    for item_id, event_type, ts in ordered:
        stamp = _utc_timestamp(ts)
        last_seen = stamp if last_seen is None else max(last_seen, stamp)
        if event_type in _COUNT_FIELD:
            counts[_COUNT_FIELD[event_type]] += 1
        else:
            impressions += 1
        weight = EVENT_WEIGHTS[event_type]
        feature = items.get(item_id)
        if weight > 0 and feature is not None and feature.category:
            masses[feature.category] = masses.get(feature.category, 0.0) + weight
        if event_type in POSITIVE_EVENT_TYPES:
            recent = _push_front(recent, item_id)
        if event_type == "purchase":
            purchased = _push_front(purchased, item_id)

    recent = recent[:MAX_RECENT_ITEMS]
    top, scores = _top_categories(masses, _total_mass(counts, impressions))
    return UserProfile(
        user_id=user_id,
        recent_items=tuple(recent),
        recent_text=_join_titles(items[i].title if i in items else "" for i in recent),
        top_categories=tuple(top),
        category_scores=tuple(scores),
        purchased_items=tuple(purchased[:MAX_PURCHASED_ITEMS]),
        clicks=counts["clicks"],
        add_to_carts=counts["add_to_carts"],
        purchases=counts["purchases"],
        events_total=sum(counts.values()) + impressions,
        last_seen=last_seen.to_pydatetime() if last_seen is not None else None,
    )


# ---------------------------------------------------------------------------------------------
# Converters between records and rows
# ---------------------------------------------------------------------------------------------


def profile_to_row(profile: UserProfile, event_timestamp: datetime | None = None) -> dict[str, Any]:
    """A `user_profile` row (dict of USER_PROFILE_COLUMNS) for a DataFrame or a Feast push.

    Args:
        profile: the record.
        event_timestamp: the row's event time; defaults to profile.last_seen, else now (UTC).
    """
    stamp = event_timestamp or profile.last_seen or datetime.now(UTC)
    return {
        "user_id": profile.user_id,
        "recent_items": list(profile.recent_items),
        "recent_text": profile.recent_text,
        "top_categories": list(profile.top_categories),
        "category_scores": [float(s) for s in profile.category_scores],
        "purchased_items": list(profile.purchased_items),
        "clicks": int(profile.clicks),
        "add_to_carts": int(profile.add_to_carts),
        "purchases": int(profile.purchases),
        "events_total": int(profile.events_total),
        "last_seen": _to_datetime(profile.last_seen),
        "event_timestamp": _to_datetime(stamp),
    }


def profile_from_row(row: Mapping[str, Any]) -> UserProfile:
    """A UserProfile from a row (dict, Series or Feast response); nulls become defaults."""
    return UserProfile(
        user_id=str(row["user_id"]),
        recent_items=_str_tuple(row.get("recent_items")),
        recent_text=_str(row.get("recent_text")),
        top_categories=_str_tuple(row.get("top_categories")),
        category_scores=tuple(float(s) for s in _sequence(row.get("category_scores"))),
        purchased_items=_str_tuple(row.get("purchased_items")),
        clicks=_int(row.get("clicks")),
        add_to_carts=_int(row.get("add_to_carts")),
        purchases=_int(row.get("purchases")),
        events_total=_int(row.get("events_total")),
        last_seen=_to_datetime(row.get("last_seen")),
    )


def item_to_row(item: ItemFeatures, event_timestamp: datetime | None = None) -> dict[str, Any]:
    """An `item_features` row (dict of ITEM_FEATURE_COLUMNS); `item.extra` is not stored.

    Args:
        item: the record.
        event_timestamp: the row's event time; defaults to now (UTC).
    """
    return {
        "item_id": item.item_id,
        "title": item.title,
        "text": item.text,
        "category": item.category,
        "brand": item.brand,
        "price": float(item.price),
        "popularity_7d": float(item.popularity_7d),
        "popularity_30d": float(item.popularity_30d),
        "created_at": _to_datetime(item.created_at),
        "in_stock": bool(item.in_stock),
        "event_timestamp": _to_datetime(event_timestamp or datetime.now(UTC)),
    }


def item_from_row(row: Mapping[str, Any]) -> ItemFeatures:
    """An ItemFeatures from a row (dict, Series or Feast response); nulls become defaults."""
    in_stock = row.get("in_stock")
    return ItemFeatures(
        item_id=str(row["item_id"]),
        title=_str(row.get("title")),
        text=_str(row.get("text")),
        category=_str(row.get("category")),
        brand=_str(row.get("brand")),
        price=_float(row.get("price")),
        popularity_7d=_float(row.get("popularity_7d")),
        popularity_30d=_float(row.get("popularity_30d")),
        created_at=_to_datetime(row.get("created_at")),
        in_stock=True if _is_null(in_stock) else bool(in_stock),
    )


def read_item_catalog(table: Path) -> dict[str, ItemFeatures]:
    """Every item's features from the offline item table (the source of materialisation)."""
    rows: list[dict[str, Any]] = pd.read_parquet(table).to_dict("records")  # type: ignore[assignment]
    return {str(row["item_id"]): item_from_row(row) for row in rows}


def iter_item_records(
    frame: pd.DataFrame, item_ids: Sequence[str], chunk: int = 1024
) -> Iterator[ItemFeatures]:
    """The records of `item_ids` (those the item table `frame` holds, in that order), as
    `read_item_catalog` builds them (the last row of an id wins), made `chunk` at a time.

    For a caller that uses each record and drops it: a whole catalogue's records and row dicts
    alive at once (~300,000 objects the garbage collector tracks at 100k items) made the
    ranking service's full collections walk them while a model version loaded, several in a
    row, each stopping every request for up to ~220 ms (stop 30)."""
    frame = frame.drop_duplicates(subset="item_id", keep="last")
    where = pd.Index(frame["item_id"].astype(str)).get_indexer(pd.Index(list(item_ids)))
    where = where[where >= 0]
    for start in range(0, len(where), chunk):
        rows: list[dict[str, Any]] = frame.iloc[where[start : start + chunk]].to_dict("records")  # type: ignore[assignment]
        for row in rows:
            yield item_from_row(row)


def profiles_frame(profiles: Iterable[UserProfile]) -> pd.DataFrame:
    """A typed `user_profile` DataFrame from records (event_timestamp = last_seen or now)."""
    rows = [profile_to_row(p) for p in profiles]
    return _typed_profile_frame(pd.DataFrame(rows, columns=list(USER_PROFILE_COLUMNS)))


def items_frame(items: Iterable[ItemFeatures], event_timestamp: datetime) -> pd.DataFrame:
    """A typed `item_features` DataFrame from records, every row stamped `event_timestamp`."""
    rows = [item_to_row(i, event_timestamp) for i in items]
    frame = pd.DataFrame(rows, columns=list(ITEM_FEATURE_COLUMNS))
    for column in ("price", "popularity_7d", "popularity_30d"):
        frame[column] = frame[column].astype("float32")
    for column in ("created_at", "event_timestamp"):
        frame[column] = pd.to_datetime(frame[column], utc=True)
    frame["in_stock"] = frame["in_stock"].astype(bool)
    return frame


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _utc_timestamp(value: datetime | pd.Timestamp) -> pd.Timestamp:
    stamp = pd.Timestamp(value)
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def _check_event_types(event_types: pd.Series) -> None:
    unknown = sorted(set(event_types.unique()) - set(EVENT_WEIGHTS))
    if unknown:
        raise ValueError(f"event_type must be one of {EVENT_TYPES}, got {unknown[:5]!r}")


def _title_and_category_maps(items: pd.DataFrame) -> tuple[dict[str, str], dict[str, str]]:
    ids = items["item_id"].astype(str)
    titles = dict(zip(ids, items["title"].fillna("").astype(str), strict=True))
    categories = dict(zip(ids, items["category"].fillna("").astype(str), strict=True))
    return titles, categories


def _distinct_most_recent_first(events: pd.DataFrame, limit: int) -> dict[str, list[str]]:
    """Per user: distinct item_ids, newest first (input is sorted oldest first)."""
    newest_first = events.iloc[::-1]
    distinct = newest_first.drop_duplicates(subset=["user_id", "item_id"], keep="first")
    capped = distinct.groupby("user_id", sort=False).head(limit)
    return {
        str(user_id): [str(i) for i in group]
        for user_id, group in capped.groupby("user_id", sort=False)["item_id"]
    }


def _total_mass(counts: Mapping[str, int], impressions: int) -> float:
    total = EVENT_WEIGHTS["impression"] * impressions
    for event_type, field_name in _COUNT_FIELD.items():
        total += EVENT_WEIGHTS[event_type] * counts[field_name]
    return float(total)


def _top_categories(masses: Mapping[str, float], total: float) -> tuple[list[str], list[float]]:
    if total <= 0:
        return [], []
    ranked = sorted(((c, m) for c, m in masses.items() if m > 0), key=lambda cm: (-cm[1], cm[0]))[
        :MAX_CATEGORIES
    ]
    return [c for c, _ in ranked], [m / total for _, m in ranked]


def _push_front(items: list[str], item_id: str) -> list[str]:
    return [item_id, *(i for i in items if i != item_id)]


def _join_titles(titles: Iterable[str]) -> str:
    out = ""
    for title in titles:
        if not title:
            continue
        candidate = f"{out}{RECENT_TEXT_SEPARATOR}{title}" if out else title
        if len(candidate) > MAX_RECENT_TEXT_CHARS:
            return out or candidate[:MAX_RECENT_TEXT_CHARS]
        out = candidate
    return out


def _typed_profile_frame(frame: pd.DataFrame) -> pd.DataFrame:
    for column in ("clicks", "add_to_carts", "purchases", "events_total"):
        frame[column] = frame[column].astype("int64")
    for column in ("last_seen", "event_timestamp"):
        frame[column] = pd.to_datetime(frame[column], utc=True)
    return frame


def _empty_frame(columns: Sequence[str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="object") for c in columns})


def _is_null(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return value is pd.NaT


def _sequence(value: Any) -> Sequence[Any]:
    if _is_null(value):
        return ()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return list(value)


def _str_tuple(value: Any) -> tuple[str, ...]:
    return tuple(str(v) for v in _sequence(value))


def _str(value: Any) -> str:
    return "" if _is_null(value) else str(value)


def _int(value: Any) -> int:
    return 0 if _is_null(value) else int(value)


def _float(value: Any) -> float:
    return 0.0 if _is_null(value) else float(value)


def _to_datetime(value: Any) -> datetime | None:
    """A tz-aware UTC datetime (Feast returns Timestamps, ints or datetimes), or None."""
    if _is_null(value):
        return None
    if type(value) is datetime and value.tzinfo is UTC:  # the common case: already right
        return value
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        return datetime.fromtimestamp(int(value), tz=UTC)
    return _utc_timestamp(value).to_pydatetime()
