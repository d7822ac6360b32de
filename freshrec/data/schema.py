"""The canonical tables every data source is turned into, and the event vocabulary.

Items (one row per product):
    item_id (str), title (str), description (str), category (str), brand (str),
    price (float, >= 0), created_at (datetime64[ns, UTC]), in_stock (bool)
Interactions (one row per event):
    event_id (str, unique), user_id (str), item_id (str), event_type (one of EVENT_TYPES),
    timestamp (datetime64[ns, UTC])
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

ITEM_COLUMNS = (
    "item_id",
    "title",
    "description",
    "category",
    "brand",
    "price",
    "created_at",
    "in_stock",
)
INTERACTION_COLUMNS = ("event_id", "user_id", "item_id", "event_type", "timestamp")

EVENT_TYPES = ("impression", "click", "add_to_cart", "purchase")
# Events that say "the user wanted this": the positives for training and profiles.
POSITIVE_EVENT_TYPES = ("click", "add_to_cart", "purchase")
# How much each event counts towards a profile's affinities and an item's popularity.
EVENT_WEIGHTS = {"impression": 0.0, "click": 1.0, "add_to_cart": 2.0, "purchase": 3.0}


@dataclass(frozen=True)
class Dataset:
    """A catalogue and its interaction history, in the canonical columns above."""

    name: str
    items: pd.DataFrame
    interactions: pd.DataFrame
    notes: dict[str, str] = field(default_factory=dict)

    def split_by_time(self, fraction: float) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Interactions before and after the `fraction` quantile of time (stable order).

        Args:
            fraction: share of interactions (by count, in time order) in the first part, in (0, 1).

        Returns:
            (history, newer) data frames; every newer event is at or after every history event.

        Raises:
            ValueError: fraction outside (0, 1).
        """
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"fraction must be in (0, 1), got {fraction}")
        ordered = self.interactions.sort_values("timestamp", kind="stable").reset_index(drop=True)
        cut = int(len(ordered) * fraction)
        return ordered.iloc[:cut].reset_index(drop=True), ordered.iloc[cut:].reset_index(drop=True)
