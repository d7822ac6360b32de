"""Negatives drawn the way serving draws candidates.

The re-ranker never sees a random catalogue item at serving time: it orders the user's FAISS
neighbours and the popular items (`RankingPipeline.recall_candidates`). Trained only against
uniform random negatives it learns the easy lesson ("resembles the history, or is popular,
so it is a positive") and cannot order candidates that all resemble the history. So each
positive's negatives cycle through three sources:

- **hard**: one of the user's own recall candidates (FAISS top-`recall_k` of the profile
  vector, the serving query), not the positive;
- **popular**: an item drawn in proportion to its events in the `popularity_days` before the
  positive's event (what the popular recall source offers then);
- **random**: a uniform catalogue item (keeps the easy contrast).

A source with nothing to offer (cold user, no recent events) falls back to random. Items
created after the positive's event are never drawn. Pure compute: an index, arrays, a catalogue.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import pandas as pd

from freshrec.records import Example, ItemFeatures
from model.embeddings import user_vector
from model.index import RecallIndex
from model.popularity import utc

SOURCES = ("hard", "popular", "random")


@dataclass
class ServingLikeNegatives:
    """A `make_pairs` negative sampler: `sampler(example, n, rng) -> n items`."""

    catalog: Sequence[ItemFeatures]
    index: RecallIndex | None = None
    event_items: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=object))
    event_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    recall_k: int = 50
    popularity_days: float = 7.0
    drawn: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SOURCES, 0))

    def __post_init__(self) -> None:
        self.by_id: Mapping[str, ItemFeatures] = {i.item_id: i for i in self.catalog}

    @classmethod
    def from_events(
        cls,
        catalog: Sequence[ItemFeatures],
        index: RecallIndex | None,
        events: pd.DataFrame,
        positive_types: Sequence[str],
        recall_k: int = 50,
    ) -> ServingLikeNegatives:
        """Args:
        events: item_id, event_type, timestamp; only `positive_types` count as popularity.
        """
        kept = events[events["event_type"].isin(list(positive_types))]
        stamps = pd.to_datetime(kept["timestamp"], utc=True)
        order = np.argsort(stamps.astype("int64").to_numpy(), kind="stable")
        return cls(
            catalog,
            index,
            kept["item_id"].astype(str).to_numpy()[order],
            stamps.astype("int64").to_numpy()[order],
            recall_k,
        )

    def __call__(self, example: Example, n: int, rng: np.random.Generator) -> list[ItemFeatures]:
        profile, item, at = Example(*example)
        avoid = {item.item_id, *(profile.recent_items if profile else ())}
        hard = self._hard_pool(profile.recent_items if profile else (), avoid)
        out: list[ItemFeatures] = []
        chosen: set[str] = set()
        for slot in range(n):
            source = SOURCES[slot % len(SOURCES)]
            pick: ItemFeatures | None = None
            for _ in range(8):  # a few tries per source before falling back
                if source == "hard" and hard:
                    candidate = self.by_id.get(hard[int(rng.integers(len(hard)))])
                elif source == "popular":
                    candidate = self._popular_draw(at, rng)
                else:
                    break
                if (
                    candidate is not None
                    and candidate.item_id not in avoid
                    and candidate.item_id not in chosen
                    and _existed(candidate, at)
                ):
                    pick = candidate
                    break
            if pick is None:
                source = "random"
                for _ in range(10 * n + 10):
                    candidate = self.catalog[int(rng.integers(len(self.catalog)))]
                    if (
                        candidate.item_id not in avoid
                        and candidate.item_id not in chosen
                        and _existed(candidate, at)
                    ):
                        pick = candidate
                        break
            if pick is not None:
                out.append(pick)
                chosen.add(pick.item_id)
                self.drawn[source] += 1
        return out

    def _hard_pool(self, recent: Sequence[str], avoid: set[str]) -> list[str]:
        if self.index is None or not recent:
            return []
        query = user_vector(self.index.vectors_of(recent))
        if query is None:
            return []
        return [i for i, _ in self.index.search(query, self.recall_k, frozenset(avoid))]

    def _popular_draw(self, at: datetime | None, rng: np.random.Generator) -> ItemFeatures | None:
        if at is None or len(self.event_ns) == 0:
            return None
        end_ns = utc(at).value
        start_ns = end_ns - int(self.popularity_days * 86_400 * 10**9)
        lo = int(np.searchsorted(self.event_ns, start_ns, side="left"))
        hi = int(np.searchsorted(self.event_ns, end_ns, side="left"))  # strictly before `at`
        if hi <= lo:
            return None
        return self.by_id.get(str(self.event_items[int(rng.integers(lo, hi))]))


def _existed(item: ItemFeatures, at: datetime | None) -> bool:
    if at is None or item.created_at is None:
        return True
    return utc(item.created_at) <= utc(at)
