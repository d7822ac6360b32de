"""Applying a batch of catalogue changes to a replica's serving index."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from model.embeddings import Embedder
from model.text import item_text
from services.catalog.changes import CatalogChange


class CatalogTarget(Protocol):
    def apply_catalog(self, upserts: dict[str, np.ndarray], removals: set[str]) -> None: ...


def net_changes(changes: Sequence[CatalogChange]) -> tuple[dict[str, CatalogChange], set[str]]:
    """The final state per item after the changes in order: (upserts by id, removed ids)."""
    upserts: dict[str, CatalogChange] = {}
    removals: set[str] = set()
    for change in changes:
        if change.op == "upsert" and change.item is not None:
            upserts[change.item_id] = change
            removals.discard(change.item_id)
        else:
            upserts.pop(change.item_id, None)
            removals.add(change.item_id)
    return upserts, removals


def apply_changes(
    changes: Sequence[CatalogChange], encoder: Embedder, target: CatalogTarget
) -> None:
    """Embed upserted items' text (the same text the index was built from) and apply."""
    upserts, removals = net_changes(changes)
    ids = list(upserts)
    vectors = (
        encoder.encode([item_text(upserts[i].item) for i in ids])  # type: ignore[arg-type]
        if ids
        else np.zeros((0, encoder.dim), dtype=np.float32)
    )
    target.apply_catalog(dict(zip(ids, vectors, strict=True)), removals)
