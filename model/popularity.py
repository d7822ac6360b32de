"""Point-in-time item popularity: what the daily `popularity_7d` feature said at any instant.

The re-ranker reads an item's recent popularity (see `model.text.ranking_item_text`). Serving
sees the materialised feature; training must see the value that was known *before* each
example's event, or the model learns from its own labels (an item's clicks in the training
window would raise its popularity and "predict" those same clicks). `PopularityClock` answers
"weighted events of this item in the 7 full days before the day of `t`", the daily-batch
semantics of `build_item_features`, from an event log.

Pure compute (numpy/pandas); no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime

import numpy as np
import pandas as pd

from freshrec.records import ItemFeatures

DAY_NS = 86_400 * 10**9


def utc(t: datetime | pd.Timestamp) -> pd.Timestamp:
    """`t` as a tz-aware pandas Timestamp; naive values are read as UTC."""
    stamp = pd.Timestamp(t)
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp


def _day(t: datetime | pd.Timestamp) -> int:
    return int(utc(t).value // DAY_NS)


@dataclass(frozen=True)
class PopularityClock:
    """Per item: the days with events and the cumulative event weight up to each of them."""

    days: Mapping[str, np.ndarray]  # item → sorted day numbers (days since the epoch, UTC)
    cumulative: Mapping[str, np.ndarray]  # item → cumulative weight, aligned with `days`
    window_days: int = 7

    @classmethod
    def from_events(
        cls, events: pd.DataFrame, weights: Mapping[str, float], window_days: int = 7
    ) -> PopularityClock:
        """Args:
        events: columns item_id, event_type, timestamp (tz-aware or UTC-naive).
        weights: event_type → weight (EVENT_WEIGHTS); unknown types weigh 0.
        """
        if events.empty:
            return cls({}, {}, window_days)
        stamps = pd.to_datetime(events["timestamp"], utc=True)
        frame = pd.DataFrame(
            {
                "item": events["item_id"].astype(str).to_numpy(),
                "day": (stamps.astype("int64") // DAY_NS).to_numpy(),
                "w": events["event_type"].map(weights).fillna(0.0).astype("float64").to_numpy(),
            }
        )
        frame = frame[frame["w"] > 0]
        per_day = frame.groupby(["item", "day"], sort=True)["w"].sum()
        days: dict[str, np.ndarray] = {}
        cumulative: dict[str, np.ndarray] = {}
        for item, group in per_day.groupby(level=0, sort=False):
            days[str(item)] = group.index.get_level_values(1).to_numpy(dtype=np.int64)
            cumulative[str(item)] = np.cumsum(group.to_numpy(dtype=np.float64))
        return cls(days, cumulative, window_days)

    def at(self, item_id: str, t: datetime | pd.Timestamp) -> float:
        """Weighted events of `item_id` on the `window_days` days before the day of `t`."""
        days = self.days.get(item_id)
        if days is None:
            return 0.0
        cum = self.cumulative[item_id]
        today = _day(t)
        hi = int(np.searchsorted(days, today, side="left"))  # days < today
        lo = int(np.searchsorted(days, today - self.window_days, side="left"))
        upper = cum[hi - 1] if hi > 0 else 0.0
        lower = cum[lo - 1] if lo > 0 else 0.0
        return float(upper - lower)

    def stamp(self, item: ItemFeatures, t: datetime | pd.Timestamp | None) -> ItemFeatures:
        """`item` with `popularity_7d` as known at `t` (unchanged when `t` is None)."""
        if t is None:
            return item
        return replace(item, popularity_7d=self.at(item.item_id, t))
