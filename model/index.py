"""The FAISS recall index over item embeddings, with its id map and a popularity fallback list.

Exact inner product (IndexFlatIP) for catalogues up to `EXACT_LIMIT` items, where one query
costs well under a few milliseconds; HNSW beyond that (see docs/performance for the floors).

Catalogue changes between index builds live in an overlay: new or changed items are searched
exactly (a small matrix), removed or replaced base items are skipped. `with_changes` returns a
new index sharing the base (read-only), so a change never rebuilds the whole index and a
request keeps the snapshot it started with.

The overlay is searched exactly on every request and the hidden base ids widen every FAISS
search, so it is folded into a new base from time to time (`compacted`, run by `freshrec
index-rebuild`): the new base records the change-stream position it folded up to
(`catalog_position`), and a replica re-applies only the changes after it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

EXACT_LIMIT = 50_000
INDEX_FILE = "index.faiss"
IDS_FILE = "item_ids.json"
POPULAR_FILE = "popular.json"
CATALOG_POSITION_FILE = "catalog_position.json"
# `catalog_position` of an index built from the catalogue alone: it folds no change.
NO_CHANGES = "0"
COMPACT_CHUNK = 65_536  # rows read back from FAISS at a time by `compacted` (96 MiB at 384 dims)


def default_ef_search(n_items: int) -> int:
    """HNSW `efSearch` for a catalogue of `n_items`: 128 up to 100k items, then in proportion,
    1024 from 800k. Measured on real embeddings of the synthetic shop (`freshrec bench recall`,
    docs/performance-log.md), recall@100 against exact search: 100k items 0.955 at 128; 1M items
    0.874 at 128, 0.943 at 512, 0.954 at 1024 (p99 4.2 ms on 2 cores). Between the two
    measured sizes it is an interpolation; `ranking.ef_search` overrides it."""
    return int(min(1024, max(128, round(128 * n_items / 100_000))))


@dataclass
class RecallIndex:
    """Item vectors in FAISS, their ids, and the most popular items (for cold start/fallback)."""

    index: faiss.Index
    item_ids: list[str]  # the base index's ids, by position
    popular: list[str]
    overlay_ids: tuple[str, ...] = ()  # items added or changed since the base was built
    overlay_vectors: np.ndarray | None = None  # (len(overlay_ids), dim), unit rows
    removed: frozenset[str] = frozenset()  # base ids hidden (removed, or replaced by overlay)
    # The catalogue change stream's id of the last change the base folds in (an opaque string
    # to the index: services/catalog/changes.py orders them); NO_CHANGES for none.
    catalog_position: str = NO_CHANGES
    # The base's id -> position map, shared by every snapshot of the same base (`with_changes`):
    # rebuilding it per catalogue change cost O(catalogue) while holding the GIL.
    base_positions: dict[str, int] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.base_positions is None:
            self.base_positions = {item_id: pos for pos, item_id in enumerate(self.item_ids)}
        self._position = self.base_positions
        self._overlay_position = {item_id: pos for pos, item_id in enumerate(self.overlay_ids)}

    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        item_ids: Sequence[str],
        popular: Sequence[str] = (),
        exact_limit: int = EXACT_LIMIT,
        catalog_position: str = NO_CHANGES,
    ) -> RecallIndex:
        """Index `vectors` (rows L2-normalised, aligned with `item_ids`): exact up to
        `exact_limit` items, HNSW above. `catalog_position`: the last catalogue change the
        vectors include.

        Raises:
            ValueError: shapes disagree or ids repeat.
        """
        if vectors.ndim != 2 or len(vectors) != len(item_ids):
            raise ValueError(f"vectors must be (len(item_ids), dim), got {vectors.shape}")
        if len(set(item_ids)) != len(item_ids):
            raise ValueError("item_ids must be unique")
        dim = vectors.shape[1]
        index: faiss.Index
        if len(item_ids) <= exact_limit:
            index = faiss.IndexFlatIP(dim)
        else:
            index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = 80
            index.hnsw.efSearch = default_ef_search(len(item_ids))
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        return cls(index, list(item_ids), list(popular), catalog_position=catalog_position)

    def compacted(self, catalog_position: str, exact_limit: int = EXACT_LIMIT) -> RecallIndex:
        """A new base index of the live items (the base's not hidden, in order, then the
        overlay's) with their vectors as this index searches them, and no overlay; it folds the
        catalogue changes up to `catalog_position`. The base's vectors are read back from FAISS
        (flat and HNSW-flat indexes store them exactly), so nothing is embedded again.

        Costs what `build` costs for the live catalogue (HNSW on 2 cores: 17-19 s at 100k
        items, 116 s at 1M, measured), and holds this index, the live vectors and the new
        index at once. A job that can let go of this index first calls `live_vectors`, drops
        it, then `build`s (services/jobs/index_rebuild.py): one copy less at the peak."""
        ids, vectors = self.live_vectors()
        return RecallIndex.build(vectors, ids, self.popular, exact_limit, catalog_position)

    def live_vectors(self) -> tuple[list[str], np.ndarray]:
        """The live items' ids (the base's not hidden, in order, then the overlay's) and their
        vectors as this index searches them, as one (n, dim) float32 array (`compacted`)."""
        keep = [p for p, item in enumerate(self.item_ids) if item not in self.removed]
        ids = [self.item_ids[p] for p in keep] + list(self.overlay_ids)
        vectors = np.empty((len(ids), int(self.index.d)), dtype=np.float32)
        # Read back into place, a chunk at a time: one array of the live vectors, not the
        # base's read back whole and then a concatenated copy (1.5 GiB more at 1M items).
        for start in range(0, len(keep), COMPACT_CHUNK):
            chunk = np.asarray(keep[start : start + COMPACT_CHUNK], dtype=np.int64)
            vectors[start : start + len(chunk)] = self.index.reconstruct_batch(chunk)
        if self.overlay_ids:
            assert self.overlay_vectors is not None
            vectors[len(keep) :] = self.overlay_vectors
        return ids, vectors

    def __len__(self) -> int:
        return len(self.item_ids) - len(self.removed) + len(self.overlay_ids)

    def __contains__(self, item_id: object) -> bool:
        if item_id in self._overlay_position:
            return True
        return item_id in self._position and item_id not in self.removed

    def live_ids(self) -> list[str]:
        """Every recallable id: base ids not removed, then the overlay's."""
        if not self.removed and not self.overlay_ids:
            return self.item_ids
        return [i for i in self.item_ids if i not in self.removed] + list(self.overlay_ids)

    def sample(
        self, rng: np.random.Generator, n: int, exclude: frozenset[str] | set[str] = frozenset()
    ) -> list[str]:
        """Up to `n` distinct live ids not in `exclude`, drawn uniformly at random.

        Draws positions and rejects excluded or removed ones, so a draw costs O(n) however
        large the catalogue (a list of every live id per exploration request cost O(catalogue):
        measured 4.2 ms at 100k items, 26 ms at 1M). When rejections pile up (a small catalogue
        mostly excluded) it falls back to drawing from the full list of what is left.
        """
        if n <= 0:
            return []
        base, total = len(self.item_ids), len(self.item_ids) + len(self.overlay_ids)
        chosen: list[str] = []
        seen: set[str] = set()
        for _ in range(16 * n + 16):
            if len(chosen) == n or total == 0:
                break
            pos = int(rng.integers(total))
            item = self.item_ids[pos] if pos < base else self.overlay_ids[pos - base]
            if item in seen or item in exclude or (pos < base and item in self.removed):
                continue
            seen.add(item)
            chosen.append(item)
        if len(chosen) < n:
            pool = [i for i in self.live_ids() if i not in exclude and i not in seen]
            picks = rng.choice(len(pool), size=min(n - len(chosen), len(pool)), replace=False)
            chosen += [pool[int(p)] for p in picks]
        return chosen

    def vectors_of(self, item_ids: Iterable[str]) -> np.ndarray:
        """Stored vectors of the known ids, in the given order (unknown ids skipped), as one
        (n, dim) float32 array: base rows in one `reconstruct_batch` call (a profile's 20
        recent items: 0.044 ms with one call per id, 0.010 ms batched)."""
        base_at: list[int] = []  # output rows, and the base positions they read
        base_keys: list[int] = []
        over_at: list[int] = []  # output rows, and the overlay rows they read
        over_rows: list[int] = []
        for i in item_ids:
            if i in self._overlay_position:
                over_at.append(len(base_at) + len(over_at))
                over_rows.append(self._overlay_position[i])
            elif i in self._position and i not in self.removed:
                base_at.append(len(base_at) + len(over_at))
                base_keys.append(self._position[i])
        out = np.empty((len(base_at) + len(over_at), self.index.d), dtype=np.float32)
        if base_keys:
            out[base_at] = self.index.reconstruct_batch(np.asarray(base_keys, dtype=np.int64))
        if over_rows:
            assert self.overlay_vectors is not None
            out[over_at] = self.overlay_vectors[over_rows]
        return out

    def search(
        self, query: np.ndarray, k: int, exclude: frozenset[str] | set[str] = frozenset()
    ) -> list[tuple[str, float]]:
        """Top-k (item_id, inner product) for one query vector, skipping excluded ids."""
        q = query.reshape(1, -1).astype(np.float32)
        fetch = min(len(self.item_ids), k + len(exclude) + len(self.removed))
        out: list[tuple[str, float]] = []
        if fetch > 0:
            scores, positions = self.index.search(q, fetch)
            for score, pos in zip(scores[0], positions[0], strict=True):
                if pos < 0:
                    continue
                item_id = self.item_ids[pos]
                if item_id in exclude or item_id in self.removed:
                    continue
                out.append((item_id, float(score)))
                if len(out) == k:
                    break
        if self.overlay_ids:
            out += self._search_overlay(q[0], k, exclude)
            out.sort(key=lambda pair: pair[1], reverse=True)
        return out[:k]

    def _search_overlay(
        self, query: np.ndarray, k: int, exclude: frozenset[str] | set[str]
    ) -> list[tuple[str, float]]:
        """The overlay's best k outside `exclude`, exactly: one matrix-vector product, then
        only the best k + |exclude| rows become Python objects (not every overlay row)."""
        assert self.overlay_vectors is not None
        scores = self.overlay_vectors @ query
        take = min(len(scores), k + len(exclude))
        if take < len(scores):
            best = np.argpartition(-scores, take - 1)[:take]
            best = best[np.argsort(-scores[best], kind="stable")]
        else:
            best = np.argsort(-scores, kind="stable")
        found = [(self.overlay_ids[r], float(scores[r])) for r in best.tolist()]
        return [pair for pair in found if pair[0] not in exclude][:k]

    def with_changes(
        self,
        upserts: dict[str, np.ndarray] | None = None,
        removals: Iterable[str] = (),
    ) -> RecallIndex:
        """A new index with items added/changed (unit vectors) and removed; self is unchanged.

        An id both upserted and removed in one call ends removed.
        """
        gone = set(removals)
        vectors = {
            i: self.overlay_vectors[p]  # type: ignore[index]
            for i, p in self._overlay_position.items()
        }
        for item_id, vector in (upserts or {}).items():
            vectors[item_id] = np.asarray(vector, dtype=np.float32)
        for item_id in gone:
            vectors.pop(item_id, None)
        hidden = set(self.removed) | {i for i in gone if i in self._position}
        hidden |= {i for i in vectors if i in self._position}
        ids = tuple(vectors)
        matrix = np.stack([vectors[i] for i in ids]) if ids else None
        popular = [i for i in self.popular if i not in gone]
        return RecallIndex(
            self.index,
            self.item_ids,
            popular,
            overlay_ids=ids,
            overlay_vectors=matrix,
            removed=frozenset(hidden),
            catalog_position=self.catalog_position,
            base_positions=self._position,
        )

    def save(self, directory: Path) -> list[Path]:
        """Write the index, ids and popularity list into `directory`; return the files.

        Raises:
            ValueError: the index has unfolded catalogue changes (rebuild it instead).
        """
        if self.overlay_ids or self.removed:
            raise ValueError("save() needs an index without catalogue changes: rebuild it")
        directory.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(directory / INDEX_FILE))
        (directory / IDS_FILE).write_text(json.dumps(self.item_ids))
        (directory / POPULAR_FILE).write_text(json.dumps(self.popular))
        position = directory / CATALOG_POSITION_FILE
        position.write_text(json.dumps({"after": self.catalog_position}))
        return [directory / INDEX_FILE, directory / IDS_FILE, directory / POPULAR_FILE, position]

    @classmethod
    def load(cls, directory: Path, ef_search: int = 0) -> RecallIndex:
        """Args:
        ef_search: HNSW `efSearch` to serve with; 0 = `default_ef_search` of its size (an
            index saved with an older default gets today's).
        """
        index = faiss.read_index(str(directory / INDEX_FILE))
        hnsw = getattr(index, "hnsw", None)
        if hnsw is not None:
            hnsw.efSearch = ef_search or default_ef_search(int(index.ntotal))
        item_ids = json.loads((directory / IDS_FILE).read_text())
        popular = json.loads((directory / POPULAR_FILE).read_text())
        if index.ntotal != len(item_ids):
            raise ValueError(
                f"index holds {index.ntotal} vectors but {IDS_FILE} lists {len(item_ids)} ids"
            )
        position_file = directory / CATALOG_POSITION_FILE  # absent before index rebuilds
        position = (
            str(json.loads(position_file.read_text())["after"])
            if position_file.exists()
            else NO_CHANGES
        )
        return cls(index, item_ids, popular, catalog_position=position)
