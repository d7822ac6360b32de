"""`freshrec index-rebuild`: fold the catalogue changes into a new recall index version.

A ranking replica applies every catalogue change (UpsertItems, RemoveItems) to an overlay on
its base FAISS index: new and changed items are searched exactly beside FAISS, removed and
replaced base items are skipped (`model.index.RecallIndex.with_changes`). That is what makes a
new item recallable in a second, but the overlay is searched on every request and each hidden
base id widens every FAISS search. At 100k items (HNSW, 2 cores), recall took p50 / p99 0.50 /
0.68 ms with no changes, 1.73 / 2.28 ms with 10,000 and 7.51 / 11.53 ms with 50,000; 0.54 /
0.81 ms once they were folded in (docs/performance-log.md, stop 37). And a replica that starts
applies the changes since its base was built again, embedding every changed item.

This job reads the changes since the champion index's `catalog_position` from the change
stream, embeds the upserted items' text with the recall encoder (as a replica does), builds a
new base of the live catalogue (`RecallIndex.compacted`: the unchanged items' vectors are read
back from FAISS, not embedded again), publishes it with the stream id of the last change it
folds in, and promotes it. Replicas hot-swap to it, keep as overlay only the changes after
that id, and a replica that starts follows the stream from there. Run it on a schedule
(deploy/k8s/index-rebuild-cronjob.yaml); with fewer than `min_changes` changes it publishes
nothing, unless they come from the offline change log (below).

The stream keeps the newest `STREAM_MAXLEN` changes (a full catalogue feed of 1M items
re-upserted at once is enough to trim it). When it has dropped changes after the base's
position, the job replays the offline change log instead (every change is written there
before it is published): from `OFFLINE_REPLAY_MARGIN` before the base's position, in the
order written, up to at least the stream's newest change, which becomes the new position.
Replaying a change the base already holds leaves the same result, so the margin only costs
embedding time; it covers the clock of the writer against Redis's.

A stream that Redis lost (a restart without persistence) and that began again shows no trim,
nor does a trim before Redis 7. The job then compares the offline log with the stream: writes
logged after the base's position but before the stream's oldest change (or, with none, a few
seconds ago) are changes the stream lost (`log_gap`), and the log is replayed as after a trim.
A change lost within `CLOCK_SKEW` of either end is not seen that way; `from_offline_log`
(`freshrec index-rebuild --from-offline-log`) replays the offline log regardless: the
operator's step after a loss, with `freshrec materialize --full` for the online features that went
too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

from freshrec.config import FreshRecConfig
from freshrec.errors import FailedPrecondition
from model.artifacts import Manifest
from model.embeddings import Embedder, TextEncoder
from model.index import RecallIndex
from services.catalog.apply import embedded_changes
from services.catalog.changes import (
    CatalogChange,
    ChangeStream,
    RedisChangeStream,
    log_gap,
    position_key,
    position_time,
    read_offline,
    read_since,
)
from services.jobs.bootstrap import read_online_store_choice
from services.registry import open_registry, required_champion

OFFLINE_REPLAY_MARGIN = timedelta(minutes=10)


@dataclass
class IndexRebuildReport:
    base_version: str  # the champion index the changes were folded into
    version: str | None  # the version published and promoted; None: too few changes
    changes: int  # stream entries since the base's position
    upserted: int  # items added or changed (net of the changes)
    removed: int  # items removed (net)
    items: int  # items in the new index (or the base's, when nothing was published)
    catalog_position: str  # the new index's position (the base's, when nothing was published)
    seconds: dict[str, float]
    source: str = "stream"  # where the changes came from: "stream" or "offline log"


def change_stream(config: FreshRecConfig) -> ChangeStream:
    """The workdir's catalogue change stream (the Redis one every replica follows).

    Raises:
        FailedPrecondition: the workdir serves from the embedded SQLite store, whose changes
            live only in the one ranking process.
    """
    online = read_online_store_choice(config)
    if online["kind"] != "redis" or not online["redis_url"]:
        raise FailedPrecondition(
            "index-rebuild reads the change stream in Redis; this workdir's store is SQLite"
        )
    return RedisChangeStream(str(online["redis_url"]), config.project)


def rebuild_index(
    config: FreshRecConfig,
    min_changes: int = 1,
    stream: ChangeStream | None = None,
    encoder: Embedder | None = None,
    announce: Callable[[str], None] = print,
    from_offline_log: bool = False,
) -> IndexRebuildReport:
    """Fold the catalogue changes since the champion index into a new index version and
    promote it, when there are at least `min_changes` of them or they come from the offline
    change log (the stream lost some: replicas cannot apply them until they are folded in).

    `from_offline_log`: replay the offline change log even where the stream looks whole (an
    operator's recovery after Redis lost the stream, for a loss the log comparison cannot see:
    module docstring).

    Raises:
        ValueError: `min_changes` < 1.
        NotFound: no champion index (run `freshrec init`).
        FailedPrecondition: no Redis change stream, or it has dropped changes the base lacks.
    """
    if min_changes < 1:
        raise ValueError(f"min_changes must be >= 1, got {min_changes}")
    seconds: dict[str, float] = {}
    clock = time.perf_counter
    registry = open_registry(config)
    where = config.registry_url or str(config.registry_dir)
    base_version = required_champion(registry, "index", where, "run `freshrec init` first")
    t = clock()
    registry.verify("index", base_version)
    base = RecallIndex.load(registry.path("index", base_version))
    seconds["load"] = clock() - t
    t = clock()
    changes, position, source = _changes_since(
        config,
        stream or change_stream(config),
        base_version,
        base.catalog_position,
        announce,
        from_offline_log,
    )
    seconds["read changes"] = clock() - t
    # From the offline log, replicas lack changes the stream no longer gives them: folded in
    # now, however few (min_changes spares replicas a rebuild for a small overlay only).
    if len(changes) < min_changes and source == "stream":
        announce(
            f"index {base_version}: {len(changes):,} catalogue changes since "
            f"{base.catalog_position} (fewer than {min_changes:,}): nothing published"
        )
        return IndexRebuildReport(
            base_version,
            None,
            len(changes),
            0,
            0,
            len(base),
            base.catalog_position,
            _rounded(seconds),
            source,
        )
    t = clock()
    encoder = encoder or TextEncoder.from_pretrained(config.model.base_model or None)
    upserts, removals = embedded_changes(changes, encoder)
    seconds["embed"] = clock() - t
    t = clock()
    changed = base.with_changes(upserts, removals)
    ids, vectors = changed.live_vectors()
    popular = changed.popular
    # Let the base go before the new index is built: its FAISS index (vectors and graph) is
    # freed, so the peak holds two copies of the vectors, not three (compacted's docstring).
    del base, changed
    rebuilt = RecallIndex.build(vectors, ids, popular, catalog_position=position)
    del vectors
    seconds["build"] = clock() - t
    t = clock()
    sealed = registry.publish_written(
        "index",
        rebuilt.save,
        Manifest(
            kind="index",
            version="",
            parent=base_version,
            metrics={
                "items": float(len(rebuilt)),
                "dim": float(rebuilt.index.d),
                "changes": float(len(changes)),
            },
            reason=f"{len(changes):,} catalogue changes folded into {base_version}, through "
            f"{position}" + (" (from the offline change log)" if source != "stream" else ""),
        ),
    )
    registry.promote("index", sealed.version, reason=f"index rebuild through {position}")
    seconds["publish"] = clock() - t
    announce(
        f"index {sealed.version}: {base_version} with {len(changes):,} catalogue changes folded "
        f"in ({len(upserts):,} added or changed, {len(removals):,} removed; "
        f"{len(rebuilt):,} items, {type(rebuilt.index).__name__}), through {position}; promoted"
    )
    return IndexRebuildReport(
        base_version,
        sealed.version,
        len(changes),
        len(upserts),
        len(removals),
        len(rebuilt),
        position,
        _rounded(seconds),
        source,
    )


def _changes_since(
    config: FreshRecConfig,
    stream: ChangeStream,
    base_version: str,
    after: str,
    announce: Callable[[str], None],
    from_offline_log: bool = False,
) -> tuple[list[CatalogChange], str, str]:
    """The catalogue changes since position `after`, in order, the position they run
    through, and where they came from: the stream, or the offline change log when the stream
    has dropped or lost some of them.

    Raises:
        FailedPrecondition: the stream has dropped changes and the offline log has none to
            replay (it is not where this workdir's replicas write it).
    """
    if from_offline_log:
        why = "asked to replay the offline change log"
    elif position_key(lost := stream.trimmed_through()) > position_key(after):
        why = f"the change stream has dropped changes through {lost}, past its position {after}"
    elif gap := log_gap(config.offline_dir, after, stream.first_held()):
        why = f"{gap.describe()}, after its position {after}"
    else:
        entries = read_since(stream, after, lost)
        return [change for _, change in entries], entries[-1][0] if entries else after, "stream"
    # Read the stream's newest id before the log: a change is logged before it is published,
    # so every change up to that id is in the log (and any later one replicas replay again).
    # Never behind the base (a stream Redis lost and began again).
    position = max(stream.last_position(), after, key=position_key)
    start = position_time(after)
    since = start - OFFLINE_REPLAY_MARGIN if start is not None else None
    changes = read_offline(config.offline_dir, since)
    if not changes:
        raise FailedPrecondition(
            f"{why}, and {config.offline_dir / 'catalog'} has no change to replay"
        )
    announce(
        f"index {base_version}: {why}; replaying {len(changes):,} changes from the offline "
        f"change log since {since.isoformat() if since else 'the start'}, through {position}"
    )
    return changes, position, "offline log"


def _rounded(seconds: dict[str, float]) -> dict[str, float]:
    return {step: round(value, 3) for step, value in seconds.items()}
