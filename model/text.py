"""Text the models read: the user-context side and the item side of a (user, item) pair.

Kept short on purpose: re-ranking cost is linear in tokens, and the most recent items and the
strongest categories carry most of the signal.
"""

from __future__ import annotations

from freshrec.records import ItemFeatures, UserProfile

MAX_RECENT_TITLES = 5
MAX_CATEGORIES = 3


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
