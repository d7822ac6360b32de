"""The served-score log: per-minute histograms of the relevance each model version served.

The one home of the format. Each ranking replica adds every re-ranked candidate's relevance
(a probability in [0, 1]) into `BINS` equal bins keyed by (model version, minute since the
epoch), in memory, and a daemon thread appends the deltas every `flush_seconds` as JSON lines

    {"version": "v0002", "minute": 28512345, "counts": [20 ints]}

to `<directory>/<YYYY-MM-DD>/<hostname>-<pid>.jsonl` (UTC day of the minute). One file per
replica and day: replicas never write the same file, and retention deletes whole day folders.
Several lines may carry the same (version, minute), from several flushes or replicas; readers
sum them. The updater reads the log for the `score_psi` drift signal
(services/updater/drift.py).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TypeVar

import numpy as np

log = logging.getLogger(__name__)

SERVED_SCORES_DIR = "served_scores"  # under the offline dir, shared by ranking and updater
BINS = 20  # equal bins on [0, 1]; bin i holds [i/BINS, (i+1)/BINS), the last one includes 1.0

Histogram = np.ndarray  # int64 counts, shape (BINS,)
K = TypeVar("K")


def bin_counts(relevance: np.ndarray) -> Histogram:
    """Counts of `relevance` per bin; values outside [0, 1] go to the end bins, NaN is dropped."""
    values = np.asarray(relevance, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    index = np.clip(np.floor(values * BINS), 0, BINS - 1).astype(np.int64)
    return np.bincount(index, minlength=BINS).astype(np.int64)


def _add(into: dict[K, Histogram], key: K, counts: Histogram) -> None:
    held = into.get(key)
    into[key] = counts if held is None else held + counts


def _day(minute: int) -> date:
    return datetime.fromtimestamp(minute * 60, UTC).date()


class ServedScoreLog:
    """In-memory per-minute histograms of served relevance, flushed to JSON lines.

    Args:
        directory: root of the log (`<offline_dir>/served_scores` in the services).
        flush_seconds: flush period of the background thread; 0 = off (`observe` is a no-op).
        clock: wall-clock seconds since the epoch (serving time, not event time).
    """

    def __init__(
        self, directory: Path, flush_seconds: float, clock: Callable[[], float] = time.time
    ) -> None:
        self.directory = Path(directory)
        self.flush_seconds = flush_seconds
        self.clock = clock
        self._lock = threading.Lock()  # guards _pending; held only for in-memory work
        self._write_lock = threading.Lock()  # one flush at a time
        self._pending: dict[tuple[str, int], Histogram] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._file_name = f"{socket.gethostname()}-{os.getpid()}.jsonl"

    @property
    def enabled(self) -> bool:
        return self.flush_seconds > 0

    def observe(self, version: str, relevance: np.ndarray) -> None:
        """Add one answer's relevance scores to the current minute of `version`."""
        if not self.enabled or len(relevance) == 0:
            return
        counts = bin_counts(relevance)
        key = (version, int(self.clock() // 60))
        with self._lock:
            _add(self._pending, key, counts)

    def start(self) -> None:
        """Start the flushing thread (no-op when off or already started)."""
        if not self.enabled or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="served-scores", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread and flush what is left."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.flush_seconds):
            try:
                self.flush()
            except Exception:  # the thread must outlive one bad flush; the next one retries
                log.exception("served-score flush failed")

    def flush(self) -> int:
        """Append the deltas since the last flush; returns the lines written.

        A day that cannot be written (full disk, volume gone) is logged and its deltas stay in
        memory for the next flush.
        """
        with self._write_lock:
            with self._lock:
                pending, self._pending = self._pending, {}
            if not pending:
                return 0
            by_day: dict[date, dict[tuple[str, int], Histogram]] = {}
            for key, counts in pending.items():
                by_day.setdefault(_day(key[1]), {})[key] = counts
            written = 0
            for day, deltas in sorted(by_day.items()):
                try:
                    self._append(day, deltas)
                except OSError as exc:
                    # Kept for the next flush: serving never fails for the log's sake.
                    log.warning("served scores not written to %s: %s", self.directory, exc)
                    with self._lock:
                        for key, counts in deltas.items():
                            _add(self._pending, key, counts)
                    continue
                written += len(deltas)
            return written

    def _append(self, day: date, deltas: dict[tuple[str, int], Histogram]) -> None:
        folder = self.directory / day.isoformat()
        folder.mkdir(parents=True, exist_ok=True)
        lines = [
            json.dumps(
                {"version": version, "minute": minute, "counts": counts.tolist()},
                separators=(",", ":"),
            )
            for (version, minute), counts in sorted(deltas.items(), key=lambda kv: kv[0][1])
        ]
        # One O_APPEND write per flush and file (a regular file takes it whole): a reader sees
        # whole lines, or a torn last one if the process dies mid-write.
        fd = os.open(folder / self._file_name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            data = ("\n".join(lines) + "\n").encode()
            while data:
                data = data[os.write(fd, data) :]
        finally:
            os.close(fd)


def read_served_scores(directory: Path, since: datetime) -> dict[str, list[tuple[int, Histogram]]]:
    """Every version's per-minute histograms from `since` on, summed over files and lines.

    Reads only the day folders from `since`'s UTC day on, and keeps minutes from `since`'s
    minute on. Lines that do not parse (a torn last line of a replica being written) are skipped.

    Returns:
        version -> [(minute since the epoch, counts)] in minute order.
    """
    root = Path(directory)
    if not root.is_dir():
        return {}
    start = since if since.tzinfo is not None else since.replace(tzinfo=UTC)
    first_day = start.astimezone(UTC).date()
    first_minute = int(start.timestamp() // 60)
    sums: dict[str, dict[int, Histogram]] = {}
    for folder in sorted(root.iterdir()):
        try:
            day = date.fromisoformat(folder.name)
        except ValueError:
            continue
        if day < first_day or not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.jsonl")):
            with path.open("rb") as handle:
                for raw in handle:
                    parsed = _parse(raw)
                    if parsed is None or parsed[1] < first_minute:
                        continue
                    version, minute, counts = parsed
                    _add(sums.setdefault(version, {}), minute, counts)
    return {v: sorted(m.items()) for v, m in sums.items()}


def _parse(raw: bytes) -> tuple[str, int, Histogram] | None:
    try:
        record = json.loads(raw)
        counts = np.asarray(record["counts"], dtype=np.int64)
        if counts.shape != (BINS,):
            return None
        return str(record["version"]), int(record["minute"]), counts
    except (ValueError, KeyError, TypeError):
        return None
