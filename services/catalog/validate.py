"""Pure validation of catalogue changes (CatalogService requests) into ItemFeatures records."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from freshrec.errors import InvalidArgument
from freshrec.records import ItemFeatures
from freshrec.v1 import catalog_pb2

MAX_BATCH = 1000
MAX_ID_CHARS = 128
MAX_TITLE_CHARS = 512
MAX_TEXT_CHARS = 4096
MAX_LABEL_CHARS = 128


@dataclass(frozen=True)
class CatalogValidation:
    accepted: list[ItemFeatures]
    rejected: Counter[str] = field(default_factory=Counter)


def _check_batch(n: int, name: str) -> None:
    if not 1 <= n <= MAX_BATCH:
        raise InvalidArgument(f"{name} must hold 1..{MAX_BATCH} entries, got {n}")


def _reason(item: catalog_pb2.CatalogItem) -> str | None:
    if not item.item_id.strip():
        return "missing_item_id"
    if len(item.item_id) > MAX_ID_CHARS:
        return "item_id_too_long"
    if not item.title.strip():
        return "missing_title"
    if len(item.title) > MAX_TITLE_CHARS:
        return "title_too_long"
    if len(item.description) > MAX_TEXT_CHARS:
        return "description_too_long"
    if len(item.category) > MAX_LABEL_CHARS or len(item.brand) > MAX_LABEL_CHARS:
        return "label_too_long"
    if not math.isfinite(item.price) or item.price < 0:
        return "bad_price"
    return None


def validate_upserts(
    items: Sequence[catalog_pb2.CatalogItem], now: datetime | None = None
) -> CatalogValidation:
    """Items that pass, as records; the rest counted by reason (first rule broken).

    Raises:
        InvalidArgument: the batch is empty or larger than MAX_BATCH, or no item is valid.
    """
    _check_batch(len(items), "items")
    stamp = now or datetime.now(UTC)
    accepted: dict[str, ItemFeatures] = {}
    rejected: Counter[str] = Counter()
    for item in items:
        reason = _reason(item)
        if reason is None and item.item_id in accepted:
            reason = "duplicate_in_batch"
        if reason is not None:
            rejected[reason] += 1
            continue
        created = item.created_at.ToDatetime(tzinfo=UTC) if item.HasField("created_at") else stamp
        accepted[item.item_id] = ItemFeatures(
            item_id=item.item_id,
            title=item.title.strip(),
            text=item.description.strip(),
            category=item.category.strip(),
            brand=item.brand.strip(),
            price=float(item.price),
            created_at=created,
            in_stock=bool(item.in_stock),
        )
    if not accepted:
        reasons = ", ".join(f"{n} x {r}" for r, n in rejected.most_common())
        raise InvalidArgument(f"items: no valid item in the batch ({reasons})")
    return CatalogValidation(list(accepted.values()), rejected)


def validate_removals(item_ids: Sequence[str]) -> tuple[list[str], Counter[str]]:
    """Distinct well-formed ids, and the rest counted by reason.

    Raises:
        InvalidArgument: the batch is empty or too large, or no id is valid.
    """
    _check_batch(len(item_ids), "item_ids")
    kept: dict[str, None] = {}
    rejected: Counter[str] = Counter()
    for item_id in item_ids:
        if not item_id.strip():
            rejected["missing_item_id"] += 1
        elif len(item_id) > MAX_ID_CHARS:
            rejected["item_id_too_long"] += 1
        elif item_id in kept:
            rejected["duplicate_in_batch"] += 1
        else:
            kept[item_id] = None
    if not kept:
        raise InvalidArgument("item_ids: no valid id in the batch")
    return list(kept), rejected
