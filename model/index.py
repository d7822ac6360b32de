"""The FAISS recall index over item embeddings, with its id map and a popularity fallback list.

Exact inner product (IndexFlatIP) for catalogues up to `EXACT_LIMIT` items, where one query
costs well under a few milliseconds; HNSW beyond that (see docs/performance for the floors).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

EXACT_LIMIT = 50_000
INDEX_FILE = "index.faiss"
IDS_FILE = "item_ids.json"
POPULAR_FILE = "popular.json"


@dataclass
class RecallIndex:
    """Item vectors in FAISS, their ids, and the most popular items (for cold start/fallback)."""

    index: faiss.Index
    item_ids: list[str]
    popular: list[str]

    def __post_init__(self) -> None:
        self._position = {item_id: pos for pos, item_id in enumerate(self.item_ids)}

    @classmethod
    def build(
        cls, vectors: np.ndarray, item_ids: Sequence[str], popular: Sequence[str] = ()
    ) -> RecallIndex:
        """Index `vectors` (rows L2-normalised, aligned with `item_ids`).

        Raises:
            ValueError: shapes disagree or ids repeat.
        """
        if vectors.ndim != 2 or len(vectors) != len(item_ids):
            raise ValueError(f"vectors must be (len(item_ids), dim), got {vectors.shape}")
        if len(set(item_ids)) != len(item_ids):
            raise ValueError("item_ids must be unique")
        dim = vectors.shape[1]
        index: faiss.Index
        if len(item_ids) <= EXACT_LIMIT:
            index = faiss.IndexFlatIP(dim)
        else:
            index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = 80
            index.hnsw.efSearch = 128
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        return cls(index, list(item_ids), list(popular))

    def __len__(self) -> int:
        return len(self.item_ids)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._position

    def vectors_of(self, item_ids: Iterable[str]) -> list[np.ndarray]:
        """Stored vectors of the known ids, in the given order (unknown ids skipped)."""
        return [
            np.asarray(self.index.reconstruct(self._position[i]))
            for i in item_ids
            if i in self._position
        ]

    def search(
        self, query: np.ndarray, k: int, exclude: frozenset[str] | set[str] = frozenset()
    ) -> list[tuple[str, float]]:
        """Top-k (item_id, inner product) for one query vector, skipping excluded ids."""
        fetch = min(len(self.item_ids), k + len(exclude))
        if fetch <= 0:
            return []
        scores, positions = self.index.search(query.reshape(1, -1).astype(np.float32), fetch)
        out: list[tuple[str, float]] = []
        for score, pos in zip(scores[0], positions[0], strict=True):
            if pos < 0:
                continue
            item_id = self.item_ids[pos]
            if item_id in exclude:
                continue
            out.append((item_id, float(score)))
            if len(out) == k:
                break
        return out

    def save(self, directory: Path) -> list[Path]:
        """Write the index, ids and popularity list into `directory`; return the files."""
        directory.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(directory / INDEX_FILE))
        (directory / IDS_FILE).write_text(json.dumps(self.item_ids))
        (directory / POPULAR_FILE).write_text(json.dumps(self.popular))
        return [directory / INDEX_FILE, directory / IDS_FILE, directory / POPULAR_FILE]

    @classmethod
    def load(cls, directory: Path) -> RecallIndex:
        index = faiss.read_index(str(directory / INDEX_FILE))
        item_ids = json.loads((directory / IDS_FILE).read_text())
        popular = json.loads((directory / POPULAR_FILE).read_text())
        if index.ntotal != len(item_ids):
            raise ValueError(
                f"index holds {index.ntotal} vectors but {IDS_FILE} lists {len(item_ids)} ids"
            )
        return cls(index, item_ids, popular)
