"""Training and evaluation positives from the event log: (profile just before the event, item).

Profiles are rebuilt by replaying events in time order with the same `update_profile` the
ingestion path uses, so training sees exactly the context serving would have seen.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pandas as pd

from freshrec.data.schema import POSITIVE_EVENT_TYPES
from freshrec.records import Example, ItemFeatures, UserProfile
from services.features.profiles import update_profile

Positive = Example  # (profile just before the event, item, event time)


@dataclass(frozen=True)
class Window:
    """Half-open time interval [start, end); None means unbounded."""

    start: datetime | None
    end: datetime | None

    def mask(self, timestamps: pd.Series) -> pd.Series:
        keep = pd.Series(True, index=timestamps.index)
        if self.start is not None:
            keep &= timestamps >= pd.Timestamp(self.start)
        if self.end is not None:
            keep &= timestamps < pd.Timestamp(self.end)
        return keep


def positives_in_windows(
    events: pd.DataFrame,
    items: Mapping[str, ItemFeatures],
    windows: Mapping[str, Window],
) -> dict[str, list[Positive]]:
    """For each named window, every positive event in it with the user's profile before it.

    Args:
        events: canonical interaction columns, any order (all history: it builds the context).
        items: features of every item the events mention.
        windows: name -> Window; windows may overlap.

    Returns:
        name -> positives (profile before, item, event time) in time order.
    """
    out: dict[str, list[Positive]] = {name: [] for name in windows}
    if events.empty:
        return out
    ordered = events.sort_values("timestamp", kind="stable")
    last_end = None
    ends = [w.end for w in windows.values()]
    if all(e is not None for e in ends):
        last_end = max(e for e in ends if e is not None)
        ordered = ordered[ordered["timestamp"] < pd.Timestamp(last_end)]
    in_window = {name: w.mask(ordered["timestamp"]).to_numpy() for name, w in windows.items()}
    profiles: dict[str, UserProfile] = {}
    users = ordered["user_id"].to_numpy()
    item_ids = ordered["item_id"].to_numpy()
    types = ordered["event_type"].to_numpy()
    stamps = ordered["timestamp"].tolist()  # tz-aware pandas Timestamps
    for pos in range(len(ordered)):
        user, item_id, kind = str(users[pos]), str(item_ids[pos]), str(types[pos])
        before = profiles.get(user)
        if kind in POSITIVE_EVENT_TYPES and item_id in items:
            for name, flags in in_window.items():
                if flags[pos]:
                    out[name].append(Example(before, items[item_id], stamps[pos].to_pydatetime()))
        profiles[user] = update_profile(before, user, [(item_id, kind, stamps[pos])], items)
    return out


def sample_mix(
    new: list[Positive],
    replay: list[Positive] | None,
    max_examples: int,
    negatives_per_positive: int,
    replay_fraction: float,
    rng: np.random.Generator,
) -> tuple[list[Positive], list[Positive]]:
    """An update's positives: the pair budget (`max_examples` pairs, each positive bringing
    `negatives_per_positive` negatives) split between new data and a replay of older history.

    Returns:
        (new positives, replayed positives), each sampled without replacement in time order.
    """
    cap = max(1, max_examples // (1 + negatives_per_positive))
    n_replay = int(cap * replay_fraction) if replay is not None else 0
    return sample(new, cap - n_replay, rng), sample(replay or [], n_replay, rng)


def sample(positives: list[Positive], n: int, rng: np.random.Generator) -> list[Positive]:
    """At most `n` positives, drawn without replacement, kept in time order."""
    if len(positives) <= n:
        return list(positives)
    keep = np.sort(rng.choice(len(positives), size=n, replace=False))
    return [positives[int(i)] for i in keep]
