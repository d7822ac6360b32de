"""The append-only offline event store: one parquet file per batch and event date.

Layout: `<root>/events/date=YYYY-MM-DD/<monotonic-ns>-<uuid>.parquet`, the date being the
events' UTC date. Files appear atomically (written to a hidden temporary name, fsynced, then
renamed), so a reader never sees half a batch; nothing is deleted here. A batch appended with a
`batch_id` is named `batch-<batch_id>.parquet` instead, so delivering it again (the spool's
retry after a failure half-way) replaces its own file rather than adding its events twice.
Training and feature builds read it back with `OfflineEventLog.read`.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from freshrec.data.schema import EVENT_TYPES, INTERACTION_COLUMNS
from freshrec.errors import InvalidArgument
from services.ingestion.validate import EventRow

_TS = pa.timestamp("ns", tz="UTC")
SCHEMA = pa.schema(
    [
        ("event_id", pa.string()),
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("event_type", pa.string()),
        ("timestamp", _TS),
        ("request_id", pa.string()),
        ("ingested_at", _TS),
    ]
)
COLUMNS = tuple(SCHEMA.names)  # INTERACTION_COLUMNS + request_id + ingested_at
_PARTITION_PREFIX = "date="


class OfflineEventLog:
    """Appends batches of events as parquet files and reads time ranges back.

    Constructing one does no I/O; directories are created by the first append.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    @property
    def events_dir(self) -> Path:
        return self.root / "events"

    def append(
        self,
        rows: Sequence[EventRow],
        ingested_at: datetime | None = None,
        batch_id: str | None = None,
    ) -> list[Path]:
        """Store validated events.

        Args:
            rows: the events of one batch; empty writes nothing.
            ingested_at: stamped on every row; now (UTC) when None.
            batch_id: makes the file names deterministic (idempotent re-delivery); the same
                batch id must always come with the same rows.

        Returns:
            The files written: one per event date in the batch (usually one), in date order.

        Raises:
            OSError: the files could not be written; nothing partial is visible then.
        """
        if not rows:
            return []
        frame = pd.DataFrame([asdict(row) for row in rows], columns=list(COLUMNS[:-1]))
        frame["timestamp"] = pd.to_datetime(frame["timestamp"], utc=True)
        return self._write(frame, ingested_at, batch_id)

    def append_frame(self, df: pd.DataFrame, ingested_at: datetime | None = None) -> list[Path]:
        """Seed the log with a history in the canonical interaction columns (e.g. a bootstrap).

        Args:
            df: at least `INTERACTION_COLUMNS`; `request_id` is kept when present, else "".
                Naive timestamps are read as UTC. Not modified.
            ingested_at: stamped on every row; now (UTC) when None.

        Returns:
            The files written, one per event date, in date order.

        Raises:
            InvalidArgument: a column is missing, an event_type is unknown or a timestamp null.
        """
        missing = [c for c in INTERACTION_COLUMNS if c not in df.columns]
        if missing:
            raise InvalidArgument(
                f"df must have columns {list(INTERACTION_COLUMNS)}, missing {missing}"
            )
        if df.empty:
            return []
        frame = df.loc[:, list(INTERACTION_COLUMNS)].copy()
        frame["request_id"] = df["request_id"].fillna("") if "request_id" in df else ""
        for column in ("event_id", "user_id", "item_id", "event_type", "request_id"):
            frame[column] = frame[column].astype(str)
        unknown = sorted(set(frame["event_type"]) - set(EVENT_TYPES))
        if unknown:
            raise InvalidArgument(f"event_type must be one of {list(EVENT_TYPES)}, got {unknown}")
        frame["timestamp"] = pd.to_datetime(frame["timestamp"], utc=True)
        if frame["timestamp"].isna().any():
            raise InvalidArgument("timestamp must be set on every row, got nulls")
        return self._write(frame, ingested_at)

    def read(self, since: datetime | None = None, until: datetime | None = None) -> pd.DataFrame:
        """Events with `since <= timestamp < until`, sorted by timestamp; ties in arrival order.

        Partitions whose date lies wholly outside the range are not opened. Naive bounds are
        read as UTC; None means unbounded.

        Returns:
            A frame with `COLUMNS` (INTERACTION_COLUMNS, request_id, ingested_at); timestamps
            are datetime64[ns, UTC].
        """
        files = self._files(since, until)
        if not files:
            return SCHEMA.empty_table().to_pandas()
        table = ds.dataset(files, schema=SCHEMA, format="parquet").to_table(
            filter=_time_filter(since, until)
        )
        frame = table.to_pandas()
        # Events of the same instant keep the order they arrived in (ingested_at), not the
        # order their files happen to be listed in: batch file names are random, so without
        # the second key two reads of equal logs could order such ties differently.
        return frame.sort_values(["timestamp", "ingested_at"], kind="stable").reset_index(drop=True)

    def count(self, since: datetime | None = None) -> int:
        """How many events have `timestamp >= since` (all events when None)."""
        files = self._files(since, None)
        if not files:
            return 0
        dataset = ds.dataset(files, schema=SCHEMA, format="parquet")
        return int(dataset.count_rows(filter=_time_filter(since, None)))

    def _write(
        self, frame: pd.DataFrame, ingested_at: datetime | None, batch_id: str | None = None
    ) -> list[Path]:
        stamp = _as_utc(ingested_at) if ingested_at is not None else datetime.now(UTC)
        frame = frame.assign(ingested_at=pd.Timestamp(stamp))
        table = pa.Table.from_pandas(
            frame.loc[:, list(COLUMNS)], schema=SCHEMA, preserve_index=False
        )
        days = frame["timestamp"].dt.date
        written = []
        for day in sorted(days.unique()):
            mask = (days == day).to_numpy()
            written.append(self._write_file(table.filter(pa.array(mask)), day, batch_id))
        return written

    def _write_file(self, table: pa.Table, day: date, batch_id: str | None = None) -> Path:
        directory = self.events_dir / f"{_PARTITION_PREFIX}{day.isoformat()}"
        directory.mkdir(parents=True, exist_ok=True)
        if batch_id is None:
            name = f"{time.monotonic_ns()}-{uuid.uuid4().hex}.parquet"
        else:
            name = f"batch-{batch_id}.parquet"
        final = directory / name
        # Hidden and not *.parquet: readers never list it; unique, as a re-delivery reuses `name`.
        tmp = directory / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with open(tmp, "wb") as handle:
                pq.write_table(table, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(directory)  # make the rename itself durable: "lose nothing" survives a crash
        return final

    def _files(self, since: datetime | None, until: datetime | None) -> list[str]:
        lo = _as_utc(since) if since is not None else None
        hi = _as_utc(until) if until is not None else None
        files: list[str] = []
        for day, directory in self._partitions():
            start = datetime(day.year, day.month, day.day, tzinfo=UTC)
            if lo is not None and start + timedelta(days=1) <= lo:
                continue
            if hi is not None and start >= hi:
                continue
            files.extend(str(p) for p in sorted(directory.glob("*.parquet")))
        return files

    def _partitions(self) -> Iterator[tuple[date, Path]]:
        if not self.events_dir.is_dir():
            return
        for directory in sorted(self.events_dir.iterdir()):
            if not (directory.is_dir() and directory.name.startswith(_PARTITION_PREFIX)):
                continue
            try:
                day = date.fromisoformat(directory.name.removeprefix(_PARTITION_PREFIX))
            except ValueError:
                continue  # not ours; the log never writes such a folder
            yield day, directory


def _time_filter(since: datetime | None, until: datetime | None) -> ds.Expression | None:
    expr = None
    if since is not None:
        expr = pc.field("timestamp") >= pa.scalar(_as_utc(since), type=_TS)
    if until is not None:
        upper = pc.field("timestamp") < pa.scalar(_as_utc(until), type=_TS)
        expr = upper if expr is None else expr & upper
    return expr


def _as_utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
