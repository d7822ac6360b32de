"""CatalogService over gRPC: UpsertItems / RemoveItems. Thin: validate, then `CatalogWriter`."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

from freshrec.v1 import catalog_pb2, catalog_pb2_grpc
from services.catalog.changes import CatalogChange, ChangeStream, append_offline
from services.catalog.validate import validate_removals, validate_upserts
from services.features.reader import FeatureReader, FeatureWriter

log = logging.getLogger(__name__)


def _response(
    accepted: int, rejected: Counter[str], change_id: str
) -> catalog_pb2.CatalogChangeResponse:
    return catalog_pb2.CatalogChangeResponse(
        accepted=accepted,
        rejected=sum(rejected.values()),
        rejected_by_reason=dict(rejected),
        change_id=change_id,
    )


class CatalogServicer(catalog_pb2_grpc.CatalogServiceServicer):
    """Order of writes: offline log (durable) → online features → change stream, so a change a
    replica applies is already readable, and nothing published is missing offline."""

    def __init__(
        self,
        reader: FeatureReader,
        writer: FeatureWriter,
        stream: ChangeStream,
        offline_root: Path,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.stream = stream
        self.offline_root = offline_root

    def UpsertItems(
        self, request: catalog_pb2.UpsertItemsRequest, context: Any
    ) -> catalog_pb2.CatalogChangeResponse:
        result = validate_upserts(list(request.items))
        changes = [CatalogChange("upsert", item.item_id, item) for item in result.accepted]
        append_offline(self.offline_root, changes)
        self.writer.push_items(result.accepted)
        change_id = self.stream.publish(changes)
        log.info("catalog upsert accepted=%d rejected=%s", len(changes), dict(result.rejected))
        return _response(len(changes), result.rejected, change_id)

    def RemoveItems(
        self, request: catalog_pb2.RemoveItemsRequest, context: Any
    ) -> catalog_pb2.CatalogChangeResponse:
        ids, rejected = validate_removals(list(request.item_ids))
        known = self.reader.get_items(ids)
        unknown = [i for i in ids if i not in known]
        if unknown:
            rejected["unknown_item"] += len(unknown)
        changes = [CatalogChange("remove", item_id) for item_id in known]
        if changes:
            append_offline(self.offline_root, changes)
            # Out of stock in the online features first: every replica's feature filter drops
            # the item at once, even before its index applies the removal.
            self.writer.push_items([replace(item, in_stock=False) for item in known.values()])
        change_id = self.stream.publish(changes) if changes else ""
        log.info("catalog remove accepted=%d rejected=%s", len(changes), dict(rejected))
        return _response(len(changes), rejected, change_id)
