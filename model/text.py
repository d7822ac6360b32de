"""Text the models read: the user-context side and the item side of a (user, item) pair.

Kept short on purpose: re-ranking cost is linear in tokens, and the most recent items and the
strongest categories carry most of the signal.
"""

from __future__ import annotations

import itertools
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


def _new_arrival(created: datetime | None, now: datetime, cutoff: datetime) -> bool:
    """Whether an item created at `created` is new at `now` (`cutoff` = now - NEW_ITEM_DAYS,
    passed in so a caller checking many items computes it once); a naive `created` is read
    in `now`'s zone."""
    if created is None:
        return False
    if created.tzinfo is None and now.tzinfo is not None:
        created = created.replace(tzinfo=now.tzinfo)
    return cutoff <= created <= now


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
    if now is not None and _new_arrival(item.created_at, now, now - timedelta(days=NEW_ITEM_DAYS)):
        head += " new arrival."
    return f"{head} {item_text(item)}"


class RankingTextMemo:
    """`ranking_item_text` for a request's candidates, built once per item record.

    Every request re-reads the texts of its ~70 candidates: ~100 µs built each time, ~10 µs
    from here, measured on the 2-core EPYC. The feature readers hand back the same
    `ItemFeatures` object while an item's stored record is unchanged
    (services/features/redis_reader.py), so the texts are kept per record object (held here,
    so its id cannot be reused) and a changed record, a new object, gets a new text. Only "new
    arrival" depends on the request's time: it is decided per call, as `ranking_item_text`
    decides it. Full, it forgets the older half of its entries (a reader that decodes every
    read into a new object would otherwise hold every record it ever saw). At its cap it holds
    ~28 MiB besides the records (65,536 texts of ~237 characters, measured with tracemalloc).
    """

    def __init__(self, capacity: int = 1 << 16) -> None:
        self.capacity = capacity
        # id(record) -> (record, its text without "new arrival", with it (built when asked))
        self._memo: dict[int, list[object]] = {}

    def texts(self, items: list[ItemFeatures], now: datetime | None) -> list[str]:
        """[ranking_item_text(item, now) for item in items], the same strings."""
        out = []
        memo = self._memo
        cutoff = now - timedelta(days=NEW_ITEM_DAYS) if now is not None else None
        for item in items:
            entry = memo.get(id(item))
            if entry is None or entry[0] is not item:
                if len(memo) >= self.capacity:
                    for old in list(itertools.islice(memo, max(1, len(memo) // 2))):
                        del memo[old]
                entry = memo[id(item)] = [item, ranking_item_text(item, None), None]
            if now is not None and _new_arrival(item.created_at, now, cutoff):  # type: ignore[arg-type]
                if entry[2] is None:
                    entry[2] = ranking_item_text(item, now)
                out.append(entry[2])
            else:
                out.append(entry[1])
        return out  # type: ignore[return-value]
