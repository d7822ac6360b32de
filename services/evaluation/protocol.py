"""The replay protocol's data side: chronological periods, the fed feature state, and what each
evaluation point may know (profiles, seen items, the catalogue that exists, relevant sets).

Periods (cut by event count, in time order; boundaries are timestamps, ties go to the later one):
    bootstrap  the first `bootstrap_fraction` of events: profiles, index, first re-ranker;
    holdout    the next `holdout_fraction`: the fixed early slice that forgetting is measured on;
               fed to features and to the count-based baselines, never a re-ranker training example;
    w0..wN-1   the rest, in W windows of equal event counts; each is evaluated, then fed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import pandas as pd

from freshrec.data.schema import EVENT_WEIGHTS, POSITIVE_EVENT_TYPES, Dataset
from freshrec.records import ItemFeatures, UserProfile
from services.features.profiles import (
    build_item_features,
    build_user_profiles,
    item_from_row,
    profile_from_row,
    update_profile,
)
from services.updater.examples import Window


@dataclass(frozen=True)
class Period:
    """A named half-open time interval [start, end) of the replay (None = unbounded)."""

    name: str
    start: pd.Timestamp | None
    end: pd.Timestamp | None

    @property
    def window(self) -> Window:
        return Window(
            None if self.start is None else self.start.to_pydatetime(),
            None if self.end is None else self.end.to_pydatetime(),
        )

    def mask(self, timestamps: pd.Series) -> pd.Series:
        return self.window.mask(timestamps)


@dataclass(frozen=True)
class ReplaySplit:
    bootstrap: Period
    holdout: Period
    windows: tuple[Period, ...]

    @property
    def all(self) -> tuple[Period, ...]:
        return (self.bootstrap, self.holdout, *self.windows)


def split_periods(
    events: pd.DataFrame, windows: int, bootstrap_fraction: float, holdout_fraction: float
) -> ReplaySplit:
    """Cut time-sorted events into bootstrap, early holdout and `windows` equal-count windows.

    Raises:
        ValueError: a fraction out of range, windows < 1, or too few events for the cut.
    """
    if windows < 1:
        raise ValueError(f"windows must be >= 1, got {windows}")
    if not 0 < bootstrap_fraction < 1:
        raise ValueError(f"bootstrap_fraction must be in (0, 1), got {bootstrap_fraction}")
    if not 0 < holdout_fraction < 1 - bootstrap_fraction:
        raise ValueError(
            f"holdout_fraction must be in (0, {1 - bootstrap_fraction:g}), got {holdout_fraction}"
        )
    stamps = events["timestamp"].sort_values(kind="stable").reset_index(drop=True)
    n = len(stamps)
    h = int(n * bootstrap_fraction)
    first = h + max(1, int(n * holdout_fraction))
    if n - first < windows or h < 1:
        raise ValueError(f"{n} events are too few for a bootstrap, a holdout and {windows} windows")
    cuts = [first + round(i * (n - first) / windows) for i in range(windows)]
    times = [pd.Timestamp(stamps[i]) for i in (h, *cuts)]
    periods = [
        Period(f"w{i}", times[i + 1], times[i + 2] if i + 1 < windows else None)
        for i in range(windows)
    ]
    return ReplaySplit(
        bootstrap=Period("bootstrap", None, times[0]),
        holdout=Period("holdout", times[0], times[1]),
        windows=tuple(periods),
    )


def item_catalogue(dataset: Dataset) -> dict[str, ItemFeatures]:
    """ItemFeatures of every catalogue item (text, category, stock; popularity left at 0)."""
    as_of = pd.Timestamp(dataset.interactions["timestamp"].max())
    frame = build_item_features(dataset.items, dataset.interactions.iloc[:0], as_of)
    records = cast(list[dict[str, Any]], frame.to_dict("records"))
    return {str(row["item_id"]): item_from_row(row) for row in records}


@dataclass
class FeatureState:
    """What serving knows as events are fed: online profiles and every user's positive items.

    Bootstrapped with the batch builder (`build_user_profiles`), then folded forward with the
    streaming `update_profile`, the same two paths production uses.
    """

    profiles: dict[str, UserProfile] = field(default_factory=dict)
    seen: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    fed_until: pd.Timestamp | None = None

    @classmethod
    def bootstrap(
        cls, events: pd.DataFrame, items_frame: pd.DataFrame, end: pd.Timestamp
    ) -> FeatureState:
        """Profiles from all events before `end` (batch builder)."""
        before = events[events["timestamp"] < end]
        state = cls(fed_until=end)
        if not before.empty:
            rows = build_user_profiles(before, items_frame, before["timestamp"].max())
            records = cast(list[dict[str, Any]], rows.to_dict("records"))
            state.profiles = {str(r["user_id"]): profile_from_row(r) for r in records}
        state._note_seen(before)
        return state

    def feed(
        self, events: pd.DataFrame, items: Mapping[str, ItemFeatures], end: pd.Timestamp | None
    ) -> None:
        """Fold a period's events (time order) into the profiles (streaming path)."""
        ordered = events.sort_values("timestamp", kind="stable")
        for user, group in ordered.groupby("user_id", sort=False):
            uid = str(user)
            batch = list(
                zip(
                    group["item_id"].astype(str),
                    group["event_type"].astype(str),
                    group["timestamp"],
                    strict=True,
                )
            )
            self.profiles[uid] = update_profile(self.profiles.get(uid), uid, batch, items)
        self._note_seen(ordered)
        self.fed_until = end

    def _note_seen(self, events: pd.DataFrame) -> None:
        positive = events[events["event_type"].isin(POSITIVE_EVENT_TYPES)]
        for user, item in zip(positive["user_id"], positive["item_id"], strict=True):
            self.seen[str(user)].add(str(item))


def relevant_sets(events: pd.DataFrame, seen: Mapping[str, set[str]]) -> dict[str, set[str]]:
    """Per user: items with a positive event among `events`, minus the items seen before."""
    positive = events[events["event_type"].isin(POSITIVE_EVENT_TYPES)]
    out: dict[str, set[str]] = defaultdict(set)
    for user, item in zip(
        positive["user_id"].astype(str), positive["item_id"].astype(str), strict=True
    ):
        if item not in seen.get(user, ()):
            out[user].add(item)
    return {u: s for u, s in out.items() if s}


def sample_users(users: list[str], cap: int | None, seed: int) -> list[str]:
    """All users (sorted) or, above `cap`, a seeded uniform sample of `cap` of them (sorted)."""
    ordered = sorted(users)
    if cap is None or len(ordered) <= cap:
        return ordered
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(ordered), size=cap, replace=False))
    return [ordered[int(i)] for i in keep]


def recent_popularity(
    events: pd.DataFrame, now: pd.Timestamp, days: float, candidates: list[str]
) -> list[str]:
    """`candidates` by EVENT_WEIGHTS-weighted events in [now - days, now), then all-time mass
    before now, then id: the `popular` strategy's order and the pipeline's cold-start list."""
    before = events[events["timestamp"] < now]
    weight = before["event_type"].map(EVENT_WEIGHTS).astype("float64")
    recent = before["timestamp"] >= now - pd.Timedelta(days=days)
    short = weight[recent].groupby(before.loc[recent, "item_id"]).sum()
    long = weight.groupby(before["item_id"]).sum()
    frame = pd.DataFrame({"item_id": candidates})
    frame["short"] = frame["item_id"].map(short).fillna(0.0)
    frame["long"] = frame["item_id"].map(long).fillna(0.0)
    frame = frame.sort_values(["short", "long", "item_id"], ascending=[False, False, True])
    return [str(i) for i in frame["item_id"]]
