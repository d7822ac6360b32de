"""The catalogue change stream every ranking replica follows, and the offline change log.

A change accepted by any replica is appended to the offline log (durable, for index rebuilds
and re-materialisation) and published to a Redis Stream; each replica tails the stream and
applies the change to its in-memory index overlay, so a new item is recallable everywhere
within a poll interval. Without Redis (the embedded SQLite mode, one process) an in-process
stream plays the same role.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, Protocol, cast

import pandas as pd
import redis

from freshrec.errors import FailedPrecondition, FeatureStoreUnavailable
from freshrec.records import ItemFeatures

log = logging.getLogger(__name__)

STREAM_MAXLEN = 1_000_000  # approximate trim; an index rebuild folds older changes in
# How far the clocks of the replicas that write the offline change log may be from Redis's
# (stream ids are Redis's milliseconds) when the log is compared with the stream (`log_gap`).
CLOCK_SKEW = timedelta(seconds=5)


@dataclass(frozen=True)
class CatalogChange:
    op: Literal["upsert", "remove"]
    item_id: str
    item: ItemFeatures | None = None  # set for upserts

    def to_fields(self) -> dict[str, str]:
        payload = asdict(self.item) if self.item is not None else None
        if payload is not None and payload.get("created_at") is not None:
            payload["created_at"] = payload["created_at"].isoformat()
        return {"op": self.op, "item_id": self.item_id, "item": json.dumps(payload)}

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> CatalogChange:
        payload = json.loads(fields["item"])
        item = None
        if payload is not None:
            created = payload.get("created_at")
            payload["created_at"] = datetime.fromisoformat(created) if created else None
            item = ItemFeatures(**payload)
        op: Literal["upsert", "remove"] = "upsert" if fields["op"] == "upsert" else "remove"
        return cls(op, fields["item_id"], item)


def position_key(position: str) -> tuple[int, int]:
    """A change's stream id (`<ms>-<seq>`, or "0" for before the first) as a pair that sorts
    as the stream does.

    Raises:
        ValueError: not a stream id.
    """
    head, _, tail = position.partition("-")
    if not head.isdigit() or not (tail == "" or tail.isdigit()):
        raise ValueError(f"not a change-stream id: {position!r}")
    return int(head), int(tail or 0)


class ChangeStream(Protocol):
    def publish(self, changes: Sequence[CatalogChange]) -> str:
        """Append changes; returns the id of the last one."""
        ...

    def read(self, after: str, block_ms: int) -> list[tuple[str, CatalogChange]]:
        """Changes after `after` ("0" = from the start), waiting up to block_ms for one."""
        ...

    def trimmed_through(self) -> str:
        """The id of the newest change the stream has dropped ("0" for none): a reader that
        needs the changes after an older id can no longer have them all."""
        ...

    def last_position(self) -> str:
        """The id of the newest change ever published ("0" for none), held or dropped."""
        ...

    def first_held(self) -> str | None:
        """The id of the oldest change the stream holds; None when it holds none."""
        ...


def read_since(
    stream: ChangeStream, after: str, lost: str | None = None
) -> list[tuple[str, CatalogChange]]:
    """Every change after `after` the stream holds now, in order (without waiting for more).

    Args:
        lost: the stream's `trimmed_through()` when the caller has just read it (else read
            here).

    Raises:
        FailedPrecondition: the stream has dropped changes after `after` (it keeps the newest
            `STREAM_MAXLEN`).
    """
    lost = stream.trimmed_through() if lost is None else lost
    if position_key(lost) > position_key(after):
        raise FailedPrecondition(
            f"the change stream has dropped changes through {lost}, past position {after}"
        )
    out: list[tuple[str, CatalogChange]] = []
    while batch := stream.read(out[-1][0] if out else after, 1):
        out += batch
    return out


def trimmed_position(info: dict[str, Any]) -> str:
    """The newest id a Redis stream may have dropped, from its XINFO STREAM reply ("0" for
    none; Redis 7).

    `max-deleted-entry-id` counts only XDEL: a trim (MAXLEN, XTRIM) leaves it at 0-0. A trim
    drops the oldest entries, so when the stream has held more entries than it holds now
    (`entries-added` > `length`), everything before its first entry may be gone: the id just
    before it (or, for an emptied stream, the last id it gave). A reader positioned exactly at
    the last dropped entry is told it lost changes it did not; it replays more than it needs.
    """
    lost = position_key(str(info.get("max-deleted-entry-id") or "0"))
    added, length = info.get("entries-added"), int(info.get("length") or 0)
    if added is not None and int(added) > length:
        first = info.get("first-entry")
        if first:
            ms, seq = position_key(str(first[0]))
            before = (ms, seq - 1) if seq else (ms - 1, 2**64 - 1)
        else:
            before = position_key(str(info.get("last-generated-id") or "0"))
        lost = max(lost, before)
    return f"{lost[0]}-{lost[1]}" if lost != (0, 0) else "0"


def change_stream_key(project: str) -> str:
    """The Redis key of `project`'s catalogue change stream."""
    return f"freshrec:{project}:catalog"


class RedisChangeStream:
    """A Redis Stream `freshrec:<project>:catalog`."""

    def __init__(self, redis_url: str, project: str) -> None:
        self.key = change_stream_key(project)
        self._client = redis.Redis.from_url(redis_url, decode_responses=True, socket_timeout=5)

    def publish(self, changes: Sequence[CatalogChange]) -> str:
        try:
            pipe = self._client.pipeline(transaction=False)
            for change in changes:
                pipe.xadd(self.key, change.to_fields(), maxlen=STREAM_MAXLEN, approximate=True)  # type: ignore[arg-type]
            ids = pipe.execute()
        except redis.RedisError as exc:
            raise FeatureStoreUnavailable(f"catalogue change stream unavailable: {exc}") from exc
        return str(ids[-1]) if ids else ""

    def read(self, after: str, block_ms: int) -> list[tuple[str, CatalogChange]]:
        try:
            reply = self._client.xread({self.key: after}, count=1000, block=block_ms)
        except redis.RedisError as exc:
            raise FeatureStoreUnavailable(f"catalogue change stream unavailable: {exc}") from exc
        out = []
        for _key, entries in reply or []:  # type: ignore[union-attr]
            for entry_id, fields in entries:
                out.append((str(entry_id), CatalogChange.from_fields(fields)))
        return out

    def trimmed_through(self) -> str:
        try:
            info = cast(dict[str, Any], self._client.xinfo_stream(self.key))
        except redis.ResponseError:  # no such key: nothing was ever dropped
            return "0"
        except redis.RedisError as exc:
            raise FeatureStoreUnavailable(f"catalogue change stream unavailable: {exc}") from exc
        return trimmed_position(info)

    def last_position(self) -> str:
        # The last id the stream gave, kept when a trim has emptied it.
        try:
            info = cast(dict[str, Any], self._client.xinfo_stream(self.key))
        except redis.ResponseError:  # no such key: no change yet
            return "0"
        except redis.RedisError as exc:
            raise FeatureStoreUnavailable(f"catalogue change stream unavailable: {exc}") from exc
        last = str(info.get("last-generated-id") or "0")
        return "0" if last == "0-0" else last

    def first_held(self) -> str | None:
        try:
            first = self._client.xrange(self.key, count=1)
        except redis.RedisError as exc:
            raise FeatureStoreUnavailable(f"catalogue change stream unavailable: {exc}") from exc
        return str(first[0][0]) if first else None  # type: ignore[index]


class InMemoryChangeStream:
    """The same contract in one process (embedded mode and unit tests)."""

    def __init__(self) -> None:
        self._entries: list[tuple[str, CatalogChange]] = []
        self._cond = threading.Condition()

    def publish(self, changes: Sequence[CatalogChange]) -> str:
        with self._cond:
            for change in changes:
                self._entries.append((f"{len(self._entries) + 1}-0", change))
            self._cond.notify_all()
            return self._entries[-1][0] if self._entries else ""

    def read(self, after: str, block_ms: int) -> list[tuple[str, CatalogChange]]:
        seen = 0 if after == "0" else int(after.split("-")[0])
        with self._cond:
            if len(self._entries) <= seen:
                self._cond.wait(block_ms / 1000)
            return list(self._entries[seen:])

    def trimmed_through(self) -> str:
        return "0"  # keeps every change

    def last_position(self) -> str:
        with self._cond:
            return f"{len(self._entries)}-0" if self._entries else "0"

    def first_held(self) -> str | None:
        with self._cond:
            return self._entries[0][0] if self._entries else None


class ChangeFollower:
    """Tails a ChangeStream in a thread and hands each batch of changes, with their stream
    ids, to `apply`."""

    def __init__(
        self,
        stream: ChangeStream,
        apply: Callable[[list[tuple[str, CatalogChange]]], None],
        start_after: str = "0",
        block_ms: int = 200,
        offline_root: Path | None = None,
    ) -> None:
        """Args:
        start_after: the stream id to follow from: the serving index's `catalog_position`
            (the changes up to it are in its base).
        offline_root: the offline store the change log is written under; given, a start
            behind changes the stream lost without a trim (`log_gap`) is warned of too. Only
            for a stream whose ids are Redis's times.
        """
        self.stream = stream
        self.offline_root = offline_root
        self.apply = apply
        self.last_id = start_after
        self.block_ms = block_ms
        self.applied = 0
        # Serving-index positions the stream was found to lack changes after, at a check
        # (each one logged): changes this replica cannot apply until an index folds them in.
        self.gaps: list[str] = []
        # Whether, at the last check, the serving index lacked changes the stream no longer
        # gives (the freshrec_catalog_stream_gap gauge): checked at the first poll, after each
        # rewind, and at each newer index (`recheck`).
        self.missing = False
        self._lock = threading.Lock()
        self._rewind_to: str | None = None
        self._check_at: str | None = start_after  # the position the next poll checks from
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def rewind(self, after: str) -> None:
        """Follow from `after` again from the next poll on (an older index came back into
        service: the changes since its base are to be applied again)."""
        with self._lock:
            self._rewind_to = after

    def recheck(self, position: str) -> None:
        """At the next poll, check again whether the stream lacks changes after `position`
        (a newer index came into service: whatever it folds in is no longer missing), without
        moving where the follower reads from."""
        with self._lock:
            self._check_at = position

    def poll_once(self) -> int:
        """Read and apply one batch; returns how many changes were applied."""
        with self._lock:
            if self._rewind_to is not None:
                self.last_id, self._rewind_to = self._rewind_to, None
                self._check_at = self.last_id
            after = self.last_id
            check, self._check_at = self._check_at, None
        if check is not None:
            self._check_trim(check)
        batch = self.stream.read(after, self.block_ms)
        if batch:
            self.apply(batch)
            with self._lock:
                if self._rewind_to is None:  # a rewind asked for meanwhile wins
                    self.last_id = batch[-1][0]
            self.applied += len(batch)
        return len(batch)

    def _check_trim(self, after: str) -> None:
        """Warn, and set `missing`, when the stream lacks changes after `after` (the serving
        index's position: a replica starting, rewound to an older index, or swapping to a
        newer one, behind a trim or a lost stream); clear `missing` when it does not."""
        try:
            lost = self.stream.trimmed_through()
            gap = None
            if position_key(lost) <= position_key(after) and self.offline_root is not None:
                gap = log_gap(self.offline_root, after, self.stream.first_held())
        except FeatureStoreUnavailable:
            with self._lock:
                if self._check_at is None:
                    self._check_at = after  # again at the next poll
            raise
        if position_key(lost) > position_key(after):
            what = f"the catalogue change stream has dropped changes through {lost}, past"
        elif gap is not None:
            what = f"{gap.describe()}, after"
        else:
            self.missing = False
            return
        self.missing = True
        self.gaps.append(after)
        log.warning(
            "%s position %s of the index this replica serves: they are not in its recall "
            "until `freshrec index-rebuild` folds them in",
            what,
            after,
        )

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="catalog-follower", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except FeatureStoreUnavailable as exc:
                log.warning("catalogue stream: %s; retrying in 1 s", exc)
                self._stop.wait(1.0)
            except Exception:  # the follower must outlive one bad batch
                log.exception("applying catalogue changes failed; retrying in 1 s")
                self._stop.wait(1.0)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def append_offline(root: Path, changes: Sequence[CatalogChange]) -> Path:
    """Append changes to the offline change log as one parquet file (atomic rename; never
    rewritten): `<root>/catalog/<YYYY-MM-DD>/<ns>-<id>.parquet`, named by when it was written
    (after its rows' `changed_at`), in a folder per UTC day so that readers list only the
    days they need (`_log_files`)."""
    now = datetime.now(UTC)
    rows = []
    for change in changes:
        item = change.item
        rows.append(
            {
                "changed_at": now,
                "op": change.op,
                "item_id": change.item_id,
                "title": item.title if item else None,
                "description": item.text if item else None,
                "category": item.category if item else None,
                "brand": item.brand if item else None,
                "price": item.price if item else None,
                "created_at": item.created_at if item else None,
                "in_stock": item.in_stock if item else None,
            }
        )
    written = time.time_ns()
    directory = root / "catalog" / _day(written)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{written}-{uuid.uuid4().hex[:8]}.parquet"
    tmp = directory / f".{path.name}.tmp"
    pd.DataFrame(rows).to_parquet(tmp, index=False)
    with tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    tmp.replace(path)
    return path


_DAY_NS = 86_400 * 10**9


def _day(ns: int) -> str:
    """The UTC day folder of a log file written at `ns` (ns since the epoch)."""
    return datetime.fromtimestamp(ns // 10**9, UTC).strftime("%Y-%m-%d")


def _log_files(root: Path, start_ns: int = 0, end_ns: int | None = None) -> list[tuple[int, Path]]:
    """The offline change log's files written in [start_ns, end_ns), by the time each was
    written (then by name): from the day folders that overlap the range, and files an earlier
    version wrote straight into `catalog/`."""
    directory = root / "catalog"
    if not directory.is_dir():
        return []
    found: list[tuple[int, str, Path]] = []

    def take(path: Path) -> None:
        head = path.name.partition("-")[0]
        if head.isdigit() and start_ns <= int(head) and (end_ns is None or int(head) < end_ns):
            found.append((int(head), path.name, path))

    for entry in directory.iterdir():
        if entry.is_dir():
            try:
                day = datetime.strptime(entry.name, "%Y-%m-%d").replace(tzinfo=UTC)
            except ValueError:
                continue
            first = int(day.timestamp()) * 10**9
            if first + _DAY_NS <= start_ns or (end_ns is not None and first >= end_ns):
                continue
            for path in entry.glob("*.parquet"):
                take(path)
        elif entry.suffix == ".parquet":
            take(entry)
    return [(ns, path) for ns, _name, path in sorted(found)]


def read_offline(root: Path, since: datetime | None = None) -> list[CatalogChange]:
    """The offline change log (`append_offline`) in the order it was written: every change
    whose `changed_at` is at or after `since` (all of them when None).

    Each file is named by the time it was written, after its rows' `changed_at`, so files
    named before `since` are not read.
    """
    floor = 0 if since is None else int(since.timestamp() * 1e9)
    out: list[CatalogChange] = []
    for _ns, path in _log_files(root, floor):
        frame = pd.read_parquet(path)
        if since is not None:
            frame = frame[pd.to_datetime(frame["changed_at"], utc=True) >= pd.Timestamp(since)]
        for row in frame.itertuples(index=False):
            out.append(_offline_change(row))
    return out


def _offline_change(row: Any) -> CatalogChange:
    if row.op != "upsert":
        return CatalogChange("remove", str(row.item_id))
    created = row.created_at
    item = ItemFeatures(
        item_id=str(row.item_id),
        title=_text(row.title),
        text=_text(row.description),
        category=_text(row.category),
        brand=_text(row.brand),
        price=0.0 if pd.isna(row.price) else float(row.price),
        created_at=None if pd.isna(created) else pd.Timestamp(created).to_pydatetime(),
        in_stock=True if pd.isna(row.in_stock) else bool(row.in_stock),
    )
    return CatalogChange("upsert", item.item_id, item)


def _text(value: object) -> str:
    return "" if pd.isna(value) else str(value)  # type: ignore[call-overload]


def position_time(position: str) -> datetime | None:
    """When the change at a Redis stream id was added (its milliseconds part); None for "0"."""
    ms, _seq = position_key(position)
    return datetime.fromtimestamp(ms / 1000, UTC) if ms else None


@dataclass(frozen=True)
class LogGap:
    """Writes to the offline change log that the change stream should hold and does not."""

    writes: int  # log files: one per accepted UpsertItems or RemoveItems call
    first: datetime
    last: datetime

    def describe(self) -> str:
        return (
            f"the offline change log holds {self.writes:,} write(s) from "
            f"{self.first:%Y-%m-%d %H:%M:%S} to {self.last:%Y-%m-%d %H:%M:%S} UTC that the "
            "change stream lacks (Redis lost the stream, or trimmed it without reporting it)"
        )


def log_gap(
    root: Path, after: str, first_held: str | None, now: datetime | None = None
) -> LogGap | None:
    """The offline change log's writes (`append_offline`) after stream position `after` that
    the stream no longer holds; None when there are none.

    Every change is logged before it is published, so a change logged after `after` was
    published after it, and the stream holds it unless it came before the stream's oldest
    change (`first_held`; with none held, `now`). Such writes mean the stream lost changes a
    reader at `after` needs: Redis lost the stream (a restart without persistence) and began
    a new one, which shows no trim, or trimmed it before Redis 7, which does not report a trim
    (`trimmed_position`). Only the log files' names are read (the time each was written).

    Both ends are narrowed by CLOCK_SKEW, so a change lost within it of either end is not seen
    here (`freshrec index-rebuild --from-offline-log` replays the log regardless). A write
    whose publish failed (the caller was told UNAVAILABLE) also shows as a gap: replaying it
    is harmless.
    """
    start = position_time(after)
    lower = 0 if start is None else int((start + CLOCK_SKEW).timestamp() * 1e9) + 1
    held = position_time(first_held) if first_held is not None else None
    end = held if held is not None else (now or datetime.now(UTC))
    upper = int((end - CLOCK_SKEW).timestamp() * 1e9)
    if upper <= lower:
        return None
    times = [ns for ns, _path in _log_files(root, lower, upper)]
    if not times:
        return None
    return LogGap(
        len(times),
        datetime.fromtimestamp(min(times) / 1e9, UTC),
        datetime.fromtimestamp(max(times) / 1e9, UTC),
    )
