"""Text the models read: the user-context side and the item side of a (user, item) pair.

Kept short on purpose: re-ranking cost is linear in tokens, and the most recent items and the
strongest categories carry most of the signal.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta

from freshrec.records import ItemFeatures, UserProfile

MAX_RECENT_TITLES = 5
MAX_CATEGORIES = 3
POPULARITY_LEVELS = 19  # popularity_7d buckets: min(19, floor(2 log2(1 + popularity_7d)))
NEW_ITEM_DAYS = 14  # "new arrival" for items created at most this long before `now`


def user_context_text(profile: UserProfile | None, query: str | None = None) -> str:
    """The user side of a pair: what they asked for, then what they did recently.

    Args:
        profile: the online profile, or None for a cold-start user.
        query: free text typed by the shopper, if any.

    Returns:
        e.g. "query: trail shoes. recent: Aurora Trail Shoe | Peak Socks. likes: running, outdoor."
    """
    parts: list[str] = []
    if query:
        parts.append(f"query: {query.strip()}.")
    if profile is not None:
        titles = [t.strip() for t in profile.recent_text.split("|") if t.strip()]
        if titles:
            parts.append("recent: " + " | ".join(titles[:MAX_RECENT_TITLES]) + ".")
        if profile.top_categories:
            parts.append("likes: " + ", ".join(profile.top_categories[:MAX_CATEGORIES]) + ".")
    return " ".join(parts) if parts else "new visitor."


def item_text(item: ItemFeatures) -> str:
    """The item side of a pair: title, category, brand, then the description."""
    head = item.title
    if item.category:
        head += f" [{item.category}]"
    if item.brand:
        head += f" by {item.brand}"
    return f"{head}. {item.text}".strip() if item.text else head


def popularity_level(popularity_7d: float) -> int:
    """The 7-day weighted event count in half-octaves, 0..POPULARITY_LEVELS (1 event → 2,
    3 → 4, 7 → 6, 100 → 13, 724 or more → 19): coarse enough that the text (and the
    re-ranker's cached item states) changes only when popularity moves by a factor of ~1.4."""
    if not popularity_7d > 0:
        return 0
    return min(POPULARITY_LEVELS, int(2.0 * math.log2(1.0 + popularity_7d)))


def ranking_item_text(item: ItemFeatures, now: datetime | None = None) -> str:
    """The item side the re-ranker reads: fresh signals first (so truncation never cuts them),
    then `item_text`. The recall embedding reads `item_text` alone: it must not move when
    popularity does.

    Args:
        now: the request's time; with it, items created in the last NEW_ITEM_DAYS are marked
            "new arrival" (a launch is news the text cannot otherwise carry).

    Returns:
        e.g. "popularity 5. new arrival. Aurora [shoes] by Kairo. Light."
    """
    head = f"popularity {popularity_level(item.popularity_7d)}."
    created = item.created_at
    if now is not None and created is not None:
        if created.tzinfo is None and now.tzinfo is not None:
            created = created.replace(tzinfo=now.tzinfo)
        age = now - created
        if timedelta(0) <= age <= timedelta(days=NEW_ITEM_DAYS):
            head += " new arrival."
    return f"{head} {item_text(item)}"
