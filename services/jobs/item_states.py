"""`freshrec item-states`: the champion re-ranker's item-side states for the whole catalogue,
written to disk for the ranking service to read instead of computing.

The ranking service writes the states it computed at a load (its warm set,
`ranking.warm_item_states`) and holds at most its cache's capacity in memory. A catalogue
larger than that (1M items: ~23 GiB of states in 16 bits) cannot be warmed whole, and a
request whose candidate is outside the warm set computed it (~4 ms an item on two cores). With
the whole catalogue on disk, such a request reads its ~20 KiB instead
(`CrossEncoderReranker.item_state_source`), and a restart reads its warm set.

The job loads the champion as the ranking service does (the same settings: device, precision,
`prepare_serving`), so its states carry the fingerprint the service looks for: run it with the
ranking service's configuration, on the same kind of machine. It streams: states read from an
earlier snapshot of the same item side and states computed a batch at a time go straight to
the file; the memory it needs is the model and one batch.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from freshrec.config import FreshRecConfig
from freshrec.errors import FailedPrecondition
from model.index import POPULAR_FILE
from model.item_state_snapshot import ItemStateSnapshot, write_snapshot
from model.reranker import CrossEncoderReranker
from services.ranking.server import catalogue_texts
from services.registry import ModelRegistry, open_registry, required_champion

BATCH = 128


@dataclass
class ItemStatesReport:
    version: str
    fingerprint: str
    items: int  # texts written
    read: int  # of them, read from the snapshot there was
    computed: int  # of them, computed
    path: Path | None
    mib: float
    seconds: float


def write_item_states(
    config: FreshRecConfig, items: int = 0, announce: Callable[[str], None] = print
) -> ItemStatesReport:
    """Write the item states of the catalogue's `items` most popular items (0 = all) as the
    champion re-ranker's item-side snapshot under `config.item_state_dir`."""
    started = time.perf_counter()
    registry = open_registry(config)
    where = config.registry_url or str(config.registry_dir)
    version = required_champion(registry, "reranker", where, "run `freshrec init` first")
    registry.verify("reranker", version)
    reranker = CrossEncoderReranker.from_pretrained(
        registry.path("reranker", version),
        config.model.max_length,
        config.model.device,
        config.model.rerank_dtype,
        joint_layers=config.model.joint_layers,
    )
    reranker.prepare_serving(config.model.user_side_int8, config.model.item_states_int8)
    fingerprint = reranker.item_side_fingerprint()
    if fingerprint is None:
        raise FailedPrecondition(
            f"re-ranker {version} keeps no item states on disk: it is a full cross-encoder, "
            "or its item states are int8 (model.item_states_int8)"
        )
    texts = catalogue_texts(config, _popular(registry), items or 2**62)
    if not texts:
        raise FailedPrecondition(f"no item catalogue under {config.offline_dir}")
    # One text once: two items with the same text have the same states.
    texts = list(dict.fromkeys(texts))
    announce(f"re-ranker {version}: {len(texts):,} item texts, item side {fingerprint[:12]}")
    earlier = ItemStateSnapshot.open(config.item_state_dir, fingerprint)
    counts = {"read": 0, "computed": 0}
    try:
        info = write_snapshot(
            config.item_state_dir,
            fingerprint,
            _states(reranker, texts, earlier, counts, announce),
        )
    except OSError as exc:  # a full or read-only volume: a message, not a traceback
        raise FailedPrecondition(
            f"item states not written to {config.item_state_dir}: {exc}"
        ) from exc
    if earlier is not None:
        earlier.close()
    mib = 0.0 if info is None else info.rows * info.width * info.dtype.itemsize / 2**20
    return ItemStatesReport(
        version,
        fingerprint,
        0 if info is None else info.items,
        counts["read"],
        counts["computed"],
        None if info is None else info.path,
        round(mib, 1),
        round(time.perf_counter() - started, 1),
    )


def _popular(registry: ModelRegistry) -> list[str]:
    """The serving index's popularity list (the order the ranking service warms in)."""
    version = registry.champion("index")
    if version is None:
        return []
    path = registry.path("index", version) / POPULAR_FILE
    return [str(i) for i in json.loads(path.read_text())] if path.exists() else []


def _states(
    reranker: CrossEncoderReranker,
    texts: Sequence[str],
    earlier: ItemStateSnapshot | None,
    counts: dict[str, int],
    announce: Callable[[str], None],
) -> Iterator[tuple[Sequence[str], torch.Tensor, Sequence[int]]]:
    """(texts, rows, lengths) for every text: those the earlier snapshot holds read from it,
    the rest computed a batch at a time (sorted by length: a batch pads to its longest)."""
    dtype = reranker.item_state_dtype
    rest = list(texts)
    if earlier is not None and earlier.info.dtype == dtype:
        found = earlier.find(rest)
        for part in earlier.read(rest, found=found):
            counts["read"] += len(part[0])
            yield part
        rest = [t for t, at in zip(rest, found, strict=True) if at < 0]
    rest.sort(key=reranker.item_row_length)
    started, reported = time.perf_counter(), 0
    for chunk, states, lengths in reranker.item_state_batches(rest, BATCH):
        keep = (
            torch.arange(states.shape[1], device=states.device)[None, :]
            < torch.as_tensor(lengths, device=states.device)[:, None]
        )
        counts["computed"] += len(chunk)
        yield chunk, states[keep].to(dtype).cpu(), lengths
        if counts["computed"] - reported >= 10_000:
            reported = counts["computed"]
            rate = reported / (time.perf_counter() - started)
            announce(f"{reported:,} of {len(rest):,} computed ({rate:.0f} items/s)")
