"""Plain records passed between the feature store, the ranking pipeline and the model.

No I/O here: these are what a `FeatureReader` returns and what the text builders read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple


@dataclass(frozen=True)
class UserProfile:
    """A user's online profile (Feast view `user_profile`)."""

    user_id: str
    recent_items: tuple[str, ...] = ()  # most recent first, at most 20
    recent_text: str = ""  # titles of the recent items, most recent first
    top_categories: tuple[str, ...] = ()  # highest affinity first, at most 8
    category_scores: tuple[float, ...] = ()  # aligned with top_categories, sum to 1
    purchased_items: tuple[str, ...] = ()  # most recent first, at most 200
    clicks: int = 0
    add_to_carts: int = 0
    purchases: int = 0
    events_total: int = 0
    last_seen: datetime | None = None


@dataclass(frozen=True)
class ItemFeatures:
    """An item's online features (Feast view `item_features`)."""

    item_id: str
    title: str = ""
    text: str = ""  # description-like text the re-ranker reads
    category: str = ""
    brand: str = ""
    price: float = 0.0
    popularity_7d: float = 0.0
    popularity_30d: float = 0.0
    created_at: datetime | None = None
    in_stock: bool = True
    extra: dict[str, str] = field(default_factory=dict)


class Example(NamedTuple):
    """A training or evaluation positive: the user's profile just before the event, the item,
    and the event's time (item signals such as popularity are read as known *before* it;
    None = unknown, the item's features are used as they are)."""

    profile: UserProfile | None
    item: ItemFeatures
    at: datetime | None = None
