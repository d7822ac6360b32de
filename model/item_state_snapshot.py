"""Item-side states on disk: a ranking process starts from the states an earlier one computed.

A split re-ranker serves from item-side states it computes per item text
(`model/item_states.py`): ~4 ms an item on two cores, so a 100k catalogue's warm-up took 91 s
(Xeon with AMX) to ~11 min (AVX2 EPYC) of every start-up, before the service could answer.
Those states depend only on the item text and the item side of the model (tokenizer,
embeddings and layers below the split, the split layout, the precision they are computed and
kept in), which `CrossEncoderReranker.item_side_fingerprint` digests. A snapshot is the states
a process held, written under that fingerprint; a later process with the same fingerprint (a
restart, another replica on the same volume, a version whose fine-tune froze the item side)
reads them back instead of computing them, and computes only the texts that are new or changed
since.

One directory per fingerprint, replaced whole by a rename (a reader never sees a half-written
one):
- `rows.bin`: every item's state rows, one item after another, in the store's 16-bit dtype
  (raw little-endian bits);
- `index.npy`: one record per item: the text's digest (two uint64: `key`, sorted, and `check`),
  its first row and its row count;
- `meta.json`, written last: format, fingerprint, dtype, width, items, rows.

Texts are stored as 128-bit BLAKE2b digests, not as text: a lookup digests the wanted texts
and finds them by binary search on `key`; `check` rejects a 64-bit collision (the text is then
computed, never given another item's states). A read goes through the file in order, a bounded
chunk at a time, with plain reads: no mapping of a 2 GiB file into the process, whose touched
pages would count in its RSS while the arena fills.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

FORMAT = 1
META = "meta.json"
ROWS = "rows.bin"
INDEX = "index.npy"
INDEX_DTYPE = np.dtype([("key", "<u8"), ("check", "<u8"), ("row", "<i8"), ("rows", "<i4")])
# A read copies at most this many bytes of rows at a time (and a write holds one chunk).
CHUNK_BYTES = 64 << 20
# Items further apart than this in the file are read apart (a request's few missing items).
GAP_BYTES = 256 << 10
# Snapshot directories kept side by side: the newest (by modification time) stay.
KEEP = 2
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def text_keys(texts: Sequence[str]) -> np.ndarray:
    """(n, 2) uint64: each text's 128-bit BLAKE2b digest as (key, check)."""
    digests = b"".join(hashlib.blake2b(t.encode(), digest_size=16).digest() for t in texts)
    return np.frombuffer(digests, dtype="<u8").reshape(-1, 2)


@dataclass(frozen=True)
class SnapshotInfo:
    path: Path
    fingerprint: str
    dtype: torch.dtype
    width: int
    items: int
    rows: int


class ItemStateSnapshot:
    """A written snapshot, opened for reading (`open`). It holds its rows file open: reads
    stay consistent with its index after the directory is replaced or deleted (another
    process writing a newer one), and are positioned (`pread`), so threads share it."""

    def __init__(self, info: SnapshotInfo, index: np.ndarray, fd: int) -> None:
        self.info = info
        self._index = index
        self._fd = fd
        self._closer = weakref.finalize(self, os.close, fd)

    def close(self) -> None:
        self._closer()

    @classmethod
    def open(cls, root: Path, fingerprint: str) -> ItemStateSnapshot | None:
        """The snapshot written under `root` for `fingerprint`; None when there is none, or
        when it does not read as a whole one (logged: the states are then computed)."""
        path = Path(root) / fingerprint
        if not (path / META).is_file():
            return None
        fd, directory = -1, -1
        try:
            # Every file through one handle on the directory: a writer never changes a
            # directory in place (it renames a new one over it), so the three files read here
            # are one snapshot even if another process replaces it meanwhile.
            directory = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            fd = os.open(ROWS, os.O_RDONLY, dir_fd=directory)
            with _opened(META, directory) as f:
                meta = json.loads(f.read())
            if meta.get("format") != FORMAT or meta.get("fingerprint") != fingerprint:
                raise ValueError(f"format {meta.get('format')}, not {FORMAT}")
            dtype = _DTYPES[meta["dtype"]]
            width, items, rows = int(meta["width"]), int(meta["items"]), int(meta["rows"])
            with _opened(INDEX, directory) as f:
                index = np.load(f, allow_pickle=False)
            size = os.fstat(fd).st_size
            if index.dtype != INDEX_DTYPE or len(index) != items:
                raise ValueError(f"index of {len(index)} items, meta says {items}")
            if size != rows * width * dtype.itemsize or int(index["rows"].sum()) != rows:
                raise ValueError(f"{ROWS} holds {size} bytes, meta says {rows} rows of {width}")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if fd >= 0:
                os.close(fd)
            log.warning("item-state snapshot %s not used: %s", path, exc)
            return None
        finally:
            if directory >= 0:
                os.close(directory)
        return cls(SnapshotInfo(path, fingerprint, dtype, width, items, rows), index, fd)

    def __len__(self) -> int:
        return self.info.items

    def find(self, texts: Sequence[str]) -> np.ndarray:
        """For each text, its record's position in the index, or -1 when not in it."""
        if not len(texts) or not len(self._index):
            return np.full(len(texts), -1, dtype=np.int64)
        keys = text_keys(texts)
        at = np.searchsorted(self._index["key"], keys[:, 0])
        at = np.minimum(at, len(self._index) - 1)
        hit = (self._index["key"][at] == keys[:, 0]) & (self._index["check"][at] == keys[:, 1])
        return np.where(hit, at, -1).astype(np.int64)

    def lengths(self, texts: Sequence[str], found: np.ndarray | None = None) -> np.ndarray:
        """The row counts of those of `texts` the snapshot holds (what `read` yields);
        `found`: `find(texts)` where the caller has it."""
        found = self.find(texts) if found is None else found
        return self._index["rows"][found[found >= 0]].astype(np.int64)

    def read(
        self,
        texts: Sequence[str],
        chunk_bytes: int = CHUNK_BYTES,
        gap_bytes: int = GAP_BYTES,
        found: np.ndarray | None = None,
    ) -> Iterator[tuple[list[str], torch.Tensor, list[int]]]:
        """The states of those of `texts` the snapshot holds, as (texts, rows (sum(lengths),
        W) in the snapshot's dtype, lengths) chunks, in the file's order. One read a chunk:
        items that lie within `chunk_bytes` of the chunk's first and less than `gap_bytes`
        after the one before (a warm-up reads the file in order; a request's few items, far
        apart, one read each). Stops early (OSError) only if the file changes under it, which
        a rename-replaced snapshot does not do. `found`: `find(texts)` where the caller
        has it (digesting 100k texts takes ~0.1 s)."""
        found = self.find(texts) if found is None else found
        wanted = np.flatnonzero(found >= 0)
        if not len(wanted):
            return
        records = self._index[found[wanted]]
        order = np.argsort(records["row"], kind="stable")
        records, names = records[order], [texts[i] for i in wanted[order]]
        width = self.info.width
        row_bytes = width * self.info.dtype.itemsize
        starts, ends = records["row"], records["row"] + records["rows"]
        groups = _groups(starts, ends, max(chunk_bytes // row_bytes, 1), gap_bytes // row_bytes)
        # One buffer for every read, never zero-filled: each chunk's rows are copied out of it
        # (`index_select`) before the next read.
        most = max(int(ends[stop - 1] - starts[start]) for start, stop in groups)
        buffer = np.empty(most * row_bytes, dtype=np.uint8)
        for start, stop in groups:
            first, last = int(starts[start]), int(ends[stop - 1])
            span = buffer[: (last - first) * row_bytes]
            self._read_at(span.data, first * row_bytes)
            block = torch.from_numpy(span).view(self.info.dtype).view(-1, width)
            lengths = records["rows"][start:stop].astype(np.int64)
            # Each item's rows: its start in the block + 0..length-1, one index array.
            offsets = np.arange(int(lengths.sum())) - np.repeat(
                np.cumsum(lengths) - lengths, lengths
            )
            take = np.repeat(starts[start:stop] - first, lengths) + offsets
            rows = block.index_select(0, torch.from_numpy(take))
            yield names[start:stop], rows, lengths.tolist()

    def _read_at(self, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if not got:
                raise OSError(f"{self.info.path / ROWS} is shorter than its index says")
            done += got


def _opened(name: str, directory: int) -> Any:
    """The file `name` of the directory open as `directory`, open for reading in binary."""
    return os.fdopen(os.open(name, os.O_RDONLY, dir_fd=directory), "rb")


def _groups(
    starts: np.ndarray, ends: np.ndarray, most_rows: int, gap_rows: int
) -> list[tuple[int, int]]:
    """[start, stop) runs of items (sorted by row) read at once: a run spans at most
    `most_rows` rows (or one item, if longer) and has no gap over `gap_rows` inside."""
    breaks = np.flatnonzero(starts[1:] - ends[:-1] > gap_rows) + 1
    bounds = [*breaks.tolist(), len(starts)]
    groups: list[tuple[int, int]] = []
    start = 0
    for bound in bounds:
        while start < bound:
            limit = int(starts[start]) + most_rows
            stop = int(np.searchsorted(ends[start:bound], limit, side="right")) + start
            stop = max(stop, start + 1)
            groups.append((start, stop))
            start = stop
    return groups


def write_snapshot(
    root: Path,
    fingerprint: str,
    chunks: Iterable[tuple[Sequence[str], torch.Tensor, Sequence[int]]],
    keep: int = KEEP,
) -> SnapshotInfo | None:
    """Write the states `chunks` yields (`PagedItemStates.export`) as the snapshot of
    `fingerprint` under `root`, replacing the one there; then delete all but the `keep` newest
    snapshots. Returns what was written; None when there was nothing to write."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    work = root / f".{fingerprint}.{os.getpid()}.{time.monotonic_ns()}"
    work.mkdir()
    try:
        keys: list[np.ndarray] = []
        lengths: list[int] = []
        dtype: torch.dtype | None = None
        width = 0
        with open(work / ROWS, "wb") as f:
            for texts, rows, counts in chunks:
                if dtype is None:
                    dtype, width = rows.dtype, int(rows.shape[-1])
                if rows.dtype != dtype or rows.shape[-1] != width:
                    raise ValueError("item states of one snapshot differ in dtype or width")
                f.write(rows.contiguous().view(-1).view(torch.uint8).numpy().data)
                keys.append(text_keys(texts))
                lengths.extend(int(n) for n in counts)
            f.flush()
            os.fsync(f.fileno())
        if dtype is None or not lengths:
            return None
        index = np.zeros(len(lengths), dtype=INDEX_DTYPE)
        pairs = np.concatenate(keys)
        index["key"], index["check"] = pairs[:, 0], pairs[:, 1]
        index["rows"] = lengths
        index["row"] = np.cumsum(index["rows"]) - index["rows"]
        index.sort(order=["key", "check"], kind="stable")
        np.save(work / INDEX, index, allow_pickle=False)
        info = SnapshotInfo(
            root / fingerprint, fingerprint, dtype, width, len(index), int(sum(lengths))
        )
        meta = {
            "format": FORMAT,
            "fingerprint": fingerprint,
            "dtype": str(dtype).removeprefix("torch."),
            "width": width,
            "items": info.items,
            "rows": info.rows,
            "written_at": time.time(),
        }
        (work / META).write_text(json.dumps(meta, indent=1) + "\n")
        try:
            _replace(work, info.path)
        except OSError as exc:  # another process put its own there meanwhile: as good
            log.info("item-state snapshot %s left as another process wrote it: %s", info.path, exc)
            return None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    prune(root, keep)
    return info


def _replace(new: Path, path: Path) -> None:
    """Put the directory `new` at `path`, an old one there moved aside first and then deleted
    (a process reading the old one keeps its open file)."""
    old = path.with_name(f".{path.name}.old.{os.getpid()}.{time.monotonic_ns()}")
    with contextlib.suppress(FileNotFoundError):
        path.rename(old)
    new.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def prune(root: Path, keep: int = KEEP) -> list[Path]:
    """Delete all but the `keep` most recently written snapshots under `root`; returns the
    deleted ones. Half-written directories (a dot name) older than an hour go too."""
    root = Path(root)
    if not root.is_dir():
        return []
    written = sorted(
        (p for p in root.iterdir() if p.is_dir() and (p / META).is_file()),
        key=lambda p: (p / META).stat().st_mtime,
        reverse=True,
    )
    stale = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(".") and time.time() - p.stat().st_mtime > 3600
    ]
    gone = written[max(keep, 0) :] + stale
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone
