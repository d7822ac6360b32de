"""The event spool: accepted LogEvents batches kept on local disk while Redis is unreachable.

One JSON file per batch, `<dir>/<time_ns>-<batch_id>.json`, written under a hidden name,
fsynced and renamed (then the directory fsynced), so a batch is either wholly in the spool or
not at all, and survives a crash of the process. Names sort in arrival order; the ingestor
delivers them oldest first and deletes a file only once its delivery has succeeded.

Each file records its stage: `pending` (nothing done yet: dedup, offline log and profile push
still to do) or `logged` (dedup-marked and in the offline log; only the profile push is left).
`ids_in_spool` lets a retry of a still-spooled event be answered `duplicate` during the outage.
Counts in and out are kept in `services/common/metrics.py` (`freshrec_spool_events_total`).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

from services.ingestion.validate import EventRow

log = logging.getLogger(__name__)

Stage = Literal["pending", "logged"]
_SUFFIX = ".json"


@dataclass(frozen=True)
class SpooledBatch:
    """One spooled batch as read back from its file."""

    path: Path
    batch_id: str
    stage: Stage
    rows: tuple[EventRow, ...]


def new_batch_id() -> str:
    """A short unique id for one accepted batch (the dedup claim's owner)."""
    return uuid.uuid4().hex[:16]


class EventSpool:
    """Durable FIFO of accepted batches in one directory. Thread-safe within one process.

    Constructing one does no I/O; `start()` creates the directory and indexes what an earlier
    process left there.
    """

    def __init__(self, directory: Path | str) -> None:
        self.directory = Path(directory)
        self._lock = threading.Lock()
        self._files: dict[Path, set[str]] = {}  # spooled file -> its event ids

    def start(self) -> None:
        """Create the directory and index the batches left by an earlier process.

        Raises:
            OSError: the directory cannot be created or read.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.directory.glob(f"*{_SUFFIX}")):
            batch = self.read(path)
            with self._lock:
                self._files[path] = {row.event_id for row in batch.rows}
        if self._files:
            log.warning("spool %s holds %d undelivered batches", self.directory, len(self._files))

    def __len__(self) -> int:
        """Batches waiting for delivery."""
        return len(self._files)

    def events_waiting(self) -> int:
        with self._lock:
            return sum(len(ids) for ids in self._files.values())

    def ids_in_spool(self, event_ids: list[str]) -> set[str]:
        """Those of `event_ids` that a spooled batch already holds."""
        with self._lock:
            held = set().union(*self._files.values()) if self._files else set()
        return held.intersection(event_ids)

    def put(self, batch_id: str, stage: Stage, rows: list[EventRow]) -> Path:
        """Write one batch durably (fsynced file and directory) and return its path.

        Raises:
            OSError: the disk refused it; nothing is left in the spool then.
        """
        record = {
            "batch_id": batch_id,
            "stage": stage,
            "rows": [
                {
                    "event_id": r.event_id,
                    "user_id": r.user_id,
                    "item_id": r.item_id,
                    "event_type": r.event_type,
                    "timestamp": r.timestamp.isoformat(),
                    "request_id": r.request_id,
                }
                for r in rows
            ],
        }
        name = f"{time.time_ns():020d}-{batch_id}{_SUFFIX}"
        final = self.directory / name
        tmp = self.directory / f".{name}.tmp"  # hidden and not *.json: never listed
        try:
            with open(tmp, "w", encoding="utf-8") as handle:
                json.dump(record, handle, separators=(",", ":"))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.directory)
        with self._lock:
            self._files[final] = {r.event_id for r in rows}
        return final

    def oldest(self, limit: int) -> list[SpooledBatch]:
        """Up to `limit` batches, oldest first."""
        with self._lock:
            paths = sorted(self._files)[:limit]
        return [self.read(path) for path in paths]

    def remove(self, batch: SpooledBatch) -> None:
        """Delete a delivered batch (durably)."""
        batch.path.unlink(missing_ok=True)
        _fsync_dir(self.directory)
        with self._lock:
            self._files.pop(batch.path, None)

    def set_aside(self, batch: SpooledBatch, reason: str) -> Path:
        """Move a batch that cannot be delivered (not a store outage) to `failed/`, keeping it."""
        failed = self.directory / "failed"
        failed.mkdir(exist_ok=True)
        target = failed / batch.path.name
        os.replace(batch.path, target)
        _fsync_dir(self.directory)
        with self._lock:
            self._files.pop(batch.path, None)
        log.error("spooled batch %s set aside in %s: %s", batch.batch_id, failed, reason)
        return target

    @staticmethod
    def read(path: Path) -> SpooledBatch:
        """Read one spool file.

        Raises:
            OSError, ValueError: the file is missing or not a spool record.
        """
        record = json.loads(path.read_text(encoding="utf-8"))
        rows = tuple(
            EventRow(
                event_id=r["event_id"],
                user_id=r["user_id"],
                item_id=r["item_id"],
                event_type=r["event_type"],
                timestamp=datetime.fromisoformat(r["timestamp"]),
                request_id=r.get("request_id", ""),
            )
            for r in record["rows"]
        )
        stage = record["stage"]
        if stage not in ("pending", "logged"):
            raise ValueError(f"stage must be 'pending' or 'logged', got {stage!r} in {path}")
        return SpooledBatch(path, str(record["batch_id"]), stage, rows)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
