"""Drift signals over the offline event log and the served-score histograms: pure (no I/O).

Time is the log's own (score_psi aside): "recent" means the `window` before the newest event's
timestamp, so a replayed historical data set and a live stream are measured alike. The
champion's reference window is the `window` before the end of its training data
(`manifest.data_window["end"]`).

Signals (all floats, NaN-free; a signal without data is left out of the dict):
    new_item_share: share of recent events on items created after the champion's data ended
        (the catalogue moved on and the model never saw those items);
    ctr_recent / ctr_reference: clicks per impression in the recent / reference window;
    ctr_drop: 1 - ctr_recent / ctr_reference (positive = fewer clicks than when trained);
    ctr:<version>: clicks per impression of events *ingested* while <version> was champion
        (registry history). Ingestion time stands in for serving time: the ranking service does
        not record which version answered a request id, so a late event counts for whichever
        version was champion when it arrived;
    category_psi: population stability index of the events' item categories, recent vs
        reference (0 = same mix; > 0.25 is the usual "significant shift");
    score_psi: PSI of the relevance the champion served (20 bins on [0, 1]) in the last
        `UpdaterConfig.score_window_minutes` vs what it served from its promotion until that
        window began (`champion_score_psi`). Unlike the signals above, it is measured on
        serving wall-clock time, not the event log's time, and on the relevance of every
        candidate the re-ranker scored (not only the k returned); popular-item fallbacks (cold
        start, outages) add nothing. Left out until the champion has served longer than the
        window with at least `MIN_SCORES` scores on each side. The ranking replicas write the
        histograms (services/common/served_scores.py); the updater reads them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta

import numpy as np
import pandas as pd

_PSI_FLOOR = 1e-4  # a category absent on one side contributes a bounded term
MIN_SCORES = 500  # fewer scores on a side of score_psi: too noisy over 20 bins, left out


def _utc(value: datetime | pd.Timestamp) -> pd.Timestamp:
    stamp = pd.Timestamp(value)
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def ctr(events: pd.DataFrame) -> float | None:
    """Clicks per impression, or None without impressions."""
    types = events["event_type"]
    impressions = int((types == "impression").sum())
    if impressions == 0:
        return None
    return float((types == "click").sum()) / impressions


def new_item_share(
    recent: pd.DataFrame, created_at: Mapping[str, pd.Timestamp], since: datetime
) -> float | None:
    """Share of `recent` events whose item was created after `since` (None if no events)."""
    if recent.empty:
        return None
    cutoff = _utc(since)
    created = pd.to_datetime(recent["item_id"].map(created_at), utc=True)
    return float((created > cutoff).mean())


def category_psi(
    recent: pd.DataFrame, reference: pd.DataFrame, category: Mapping[str, str]
) -> float | None:
    """Population stability index of event categories, recent vs reference (None if empty)."""
    if recent.empty or reference.empty:
        return None
    p = recent["item_id"].map(category).fillna("").value_counts(normalize=True)
    q = reference["item_id"].map(category).fillna("").value_counts(normalize=True)
    psi = 0.0
    for name in p.index.union(q.index):
        a = max(float(p.get(name, 0.0)), _PSI_FLOOR)
        b = max(float(q.get(name, 0.0)), _PSI_FLOOR)
        psi += (a - b) * math.log(a / b)
    return psi


def _psi(p: np.ndarray, q: np.ndarray) -> float:
    a, b = np.maximum(p, _PSI_FLOOR), np.maximum(q, _PSI_FLOOR)
    return float(np.sum((a - b) * np.log(a / b)))


def score_psi(recent_counts: np.ndarray, reference_counts: np.ndarray) -> float | None:
    """PSI of two score histograms over the same bins (None if a side is empty).

    Raises:
        ValueError: the histograms have different shapes.
    """
    recent = np.asarray(recent_counts, dtype=np.float64)
    reference = np.asarray(reference_counts, dtype=np.float64)
    if recent.shape != reference.shape:
        raise ValueError(
            f"score histograms must have the same bins, got {recent.shape} and {reference.shape}"
        )
    if recent.sum() <= 0 or reference.sum() <= 0:
        return None
    return _psi(recent / recent.sum(), reference / reference.sum())


def champion_score_psi(
    histograms: Sequence[tuple[int, np.ndarray]],
    since: datetime,
    now: datetime,
    window: timedelta,
    min_count: int = MIN_SCORES,
) -> float | None:
    """PSI of the champion's served scores: the last `window` vs its earlier serving time.

    Minutes are whole: minute m (since the epoch) covers [60 m, 60 m + 60) s. Recent = minutes
    from the one holding `now - window` on; reference = minutes from the one holding `since`
    up to recent's first.

    Args:
        histograms: the champion's (minute, counts) lines, in any order, repeats summed.
        since: when the version last became champion (registry.champion_periods).
        now: the current wall-clock time.
        window: length of the recent window.
        min_count: least scores on each side.

    Returns:
        The PSI, or None when the champion became champion inside the recent window or a
        side holds fewer than `min_count` scores.
    """
    first = int(_utc(since).timestamp() // 60)
    cut = int((_utc(now) - window).timestamp() // 60)
    if first >= cut or not histograms:
        return None
    bins = len(histograms[0][1])
    recent, reference = np.zeros(bins), np.zeros(bins)
    for minute, counts in histograms:
        if minute >= cut:
            recent += counts
        elif minute >= first:
            reference += counts
    if recent.sum() < min_count or reference.sum() < min_count:
        return None
    return score_psi(recent, reference)


def ctr_by_version(
    events: pd.DataFrame, periods: Sequence[tuple[datetime, str]]
) -> dict[str, float]:
    """CTR of the events ingested while each version was champion.

    Args:
        events: with `event_type` and `ingested_at`.
        periods: (since, version) champion changes in time order; a version is champion from
            its `since` to the next one's.
    """
    if events.empty or not periods:
        return {}
    starts = [_utc(at) for at, _ in periods]
    ingested = pd.to_datetime(events["ingested_at"], utc=True)
    totals: dict[str, pd.DataFrame] = {}
    for i, (_, version) in enumerate(periods):
        end = starts[i + 1] if i + 1 < len(periods) else None
        mask = ingested >= starts[i]
        if end is not None:
            mask &= ingested < end
        chunk = events[mask]
        totals[version] = pd.concat([totals[version], chunk]) if version in totals else chunk
    out = {}
    for version, chunk in totals.items():
        value = ctr(chunk)
        if value is not None:
            out[version] = value
    return out


def drift_signals(
    events: pd.DataFrame,
    champion_end: datetime | None,
    window: timedelta,
    created_at: Mapping[str, pd.Timestamp],
    category: Mapping[str, str],
    periods: Sequence[tuple[datetime, str]] = (),
    served_score_psi: float | None = None,
) -> dict[str, float]:
    """Every signal of the module docstring that the data supports.

    Args:
        events: offline events (at least from `champion_end - window` on) with item_id,
            event_type, timestamp and ingested_at.
        champion_end: end of the champion's training data; None = no champion window known.
        window: length of the recent and reference windows.
        created_at, category: item_id -> created_at / category.
        periods: champion changes for `ctr:<version>` (see `ctr_by_version`).
        served_score_psi: `champion_score_psi` of the served-score log, reported as
            `score_psi` (even without events: it does not come from the event log); None = none.
    """
    signals: dict[str, float] = {}
    if served_score_psi is not None:
        signals["score_psi"] = served_score_psi
    if events.empty:
        return signals
    stamps = pd.to_datetime(events["timestamp"], utc=True)
    head = stamps.max()
    recent = events[stamps > head - window]
    reference = events.iloc[0:0]
    if champion_end is not None:
        end = _utc(champion_end)
        reference = events[(stamps >= end - window) & (stamps < end)]
        share = new_item_share(recent, created_at, end.to_pydatetime())
        if share is not None:
            signals["new_item_share"] = share
    ctr_recent, ctr_reference = ctr(recent), ctr(reference) if not reference.empty else None
    if ctr_recent is not None:
        signals["ctr_recent"] = ctr_recent
    if ctr_reference is not None:
        signals["ctr_reference"] = ctr_reference
        if ctr_recent is not None and ctr_reference > 0:
            signals["ctr_drop"] = 1.0 - ctr_recent / ctr_reference
    psi = category_psi(recent, reference, category)
    if psi is not None:
        signals["category_psi"] = psi
    for version, value in ctr_by_version(events, periods).items():
        signals[f"ctr:{version}"] = value
    return signals
