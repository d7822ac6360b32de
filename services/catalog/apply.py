"""Applying a batch of catalogue changes to a replica's serving index."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from model.embeddings import Embedder
from model.text import item_text
from services.catalog.changes import CatalogChange


class CatalogTarget(Protocol):
    def apply_catalog(
        self,
        upserts: dict[str, np.ndarray],
        removals: set[str],
        positions: Mapping[str, str] | None = None,
    ) -> None: ...


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


def embedded_changes(
    changes: Sequence[CatalogChange], encoder: Embedder
) -> tuple[dict[str, np.ndarray], set[str]]:
    """The net changes (`net_changes`) with each upserted item's text embedded (the same text
    the index was built from): (unit vectors by id, removed ids)."""
    upserts, removals = net_changes(changes)
    ids = list(upserts)
    vectors = (
        encoder.encode([item_text(upserts[i].item) for i in ids])  # type: ignore[arg-type]
        if ids
        else np.zeros((0, encoder.dim), dtype=np.float32)
    )
    return dict(zip(ids, vectors, strict=True)), removals


def apply_changes(
    changes: Sequence[tuple[str, CatalogChange]], encoder: Embedder, target: CatalogTarget
) -> None:
    """Embed and apply a batch of (stream id, change), telling the target the stream id of
    each item's last change (what it compares with its base index's `catalog_position`)."""
    upserts, removals = embedded_changes([change for _, change in changes], encoder)
    positions = {change.item_id: position for position, change in changes}
    target.apply_catalog(upserts, removals, positions)
