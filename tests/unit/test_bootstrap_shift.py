"""`shift_to`, the bootstrap's move of a historical data set to the present.

The first model is trained on daily features (`popularity_7d` counts the 7 full UTC days
before an event's day). A shift that moved events across midnight would regroup them, so
`freshrec init` run at two hours of one day would train two different first models.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pandas as pd

from freshrec.data.schema import Dataset
from model.popularity import PopularityClock
from services.jobs.bootstrap import shift_to

WEIGHTS = {"click": 1.0, "purchase": 3.0}


def dataset() -> Dataset:
    start = pd.Timestamp("1998-03-01 00:00", tz="UTC")
    hours = [3, 20, 29, 44, 47, 70, 95, 118, 140, 150, 166, 190, 215, 239]  # across midnights
    inter = pd.DataFrame(
        {
            "event_id": [f"e{n}" for n in range(len(hours))],
            "user_id": ["u1", "u2"] * (len(hours) // 2),
            "item_id": ["i1", "i2", "i1", "i3", "i1", "i2", "i1"] * 2,
            "event_type": ["click", "purchase"] * (len(hours) // 2),
            "timestamp": [start + pd.Timedelta(hours=h) for h in hours],
        }
    )
    items = pd.DataFrame(
        {
            "item_id": ["i1", "i2", "i3"],
            "created_at": [start - pd.Timedelta(days=d) for d in (9, 5, 1)],
        }
    )
    return Dataset("toy", items, inter)


def popularity_at_each_event(data: Dataset) -> list[float]:
    clock = PopularityClock.from_events(data.interactions, WEIGHTS)
    return [clock.at(r.item_id, r.timestamp) for r in data.interactions.itertuples()]


def test_the_shift_is_whole_days_and_ends_in_the_day_before_end() -> None:
    data = dataset()
    end = datetime(2026, 12, 6, 15, 42, 7, tzinfo=UTC)
    moved = shift_to(data, end)
    delta = moved.interactions["timestamp"] - data.interactions["timestamp"]
    assert delta.nunique() == 1 and delta.iloc[0] % pd.Timedelta(days=1) == pd.Timedelta(0)
    assert (moved.items["created_at"] - data.items["created_at"] == delta.iloc[0]).all()
    last = moved.interactions["timestamp"].max()
    assert end - timedelta(days=1) < last <= end
    # Every event keeps its time of day.
    assert list(moved.interactions["timestamp"].dt.time) == list(
        data.interactions["timestamp"].dt.time
    )


def test_the_first_models_daily_features_do_not_depend_on_the_hour_init_runs() -> None:
    data = dataset()
    runs = [datetime(2026, 12, 6, hour, 0, tzinfo=UTC) for hour in (0, 7, 13, 23)]
    seen = [popularity_at_each_event(shift_to(data, end)) for end in runs]
    assert all(values == seen[0] for values in seen[1:])
    assert len(set(seen[0])) > 2  # the toy history does give different popularities
