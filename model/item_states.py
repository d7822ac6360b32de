"""Cached item-side states of a split re-ranker: where they live and how a request reads them.

A request reads the states of its ~70 candidates as one padded batch (n, L, W). Kept as one
tensor per item, that batch was built by `pad_sequence` over 70 tensors scattered through the
heap: 1.1 ms (median) of a ~21 ms request in the ranking service (2-core Xeon, MovieLens
workdir). Gathered from one arena by one `index_select` it takes 0.65 ms there
(docs/performance-log.md, stop 16).

`PagedItemStates` keeps every item's token rows in one arena tensor, in pages of `PAGE_TOKENS`
rows (row 0 of page 0 stays zero: the padding every gather points at). A request builds one
index array in numpy and gathers its batch with one `index_select`. Eviction (least recently
used, at `capacity` items) returns an item's pages to a free list, so the arena never fragments
and never needs compacting. A warm-up announces its items (`expect`), so the arena is
allocated once, with room for `capacity` items of their average size (pages never written cost
no RSS); at capacity a new item takes the pages of the one it evicts, and only when the free
list still runs short does the arena grow by half (a copy that holds both for a moment).

Least recently used, not first in: a warm-up puts the most popular items first, and an item's
ranking text changes with its popularity level and new-arrival flag, so changed texts arrive
all day. First-in-first-out then evicted the popular head, the items every request's popular
candidates need, and each request recomputed them (~4 ms an item).

A store that goes (its version swapped out) gives its arena's pages back to the OS in chunks
before the arena is freed (`release_pages`). Freed at once, the 2.2 GiB arena of a 100k
catalogue is one `munmap` of ~0.2 s, and meanwhile every other thread that maps memory (the
torch thread, allocating a forward pass's tensors) sleeps in the kernel: requests waited
~0.3 s at the moment the old version went (stop 34).

`Int8ItemStates` is the `model.item_states_int8` option: int8 rows with per-token, per-block
scales, one pair of tensors per item (views into their warm-up batch), dequantised per request.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import itertools
import mmap
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

PAGE_TOKENS = 8
MIN_PAGES = 64
# `release_pages` hands back this many bytes per call: each call holds the process's memory
# map for ~5 ms, not the whole arena's ~0.2 s.
RELEASE_CHUNK_BYTES = 32 << 20
_MADV_DONTNEED = 4  # Linux


@functools.cache
def _madvise() -> Any:
    """libc's `madvise` (Linux), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    except OSError:
        return None
    call = getattr(libc, "madvise", None)
    if call is not None:
        call.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        call.restype = ctypes.c_int
    return call


def release_pages(tensor: torch.Tensor, chunk: int = RELEASE_CHUNK_BYTES) -> int:
    """Give the whole memory pages of a CPU tensor that is about to be freed back to the OS,
    `chunk` bytes per call (`madvise(MADV_DONTNEED)`; the calls let go of the GIL), so the
    free that follows unmaps empty pages. The tensor reads as zeros afterwards: call it only
    on a tensor nothing will read again. Returns the bytes given back (0 where there is no
    `madvise`, or on another device)."""
    call = _madvise()
    if call is None or tensor.device.type != "cpu" or chunk <= 0:
        return 0
    page = mmap.PAGESIZE
    first = tensor.data_ptr()
    start = -(-first // page) * page
    end = (first + tensor.numel() * tensor.element_size()) // page * page
    done = 0
    for at in range(start, end, chunk):
        size = min(chunk, end - at)
        if call(at, size, _MADV_DONTNEED) != 0:
            break
        done += size
    return done


class _Kept:
    """What both stores share: item text → entry, least recently used first, `capacity` at
    most; copies (deepcopy, pickling) are empty stores built with the same arguments."""

    def __init__(self, args: tuple[Any, ...], capacity: int, device: torch.device | None) -> None:
        self._args = args
        self.capacity = capacity
        self.device = device or torch.device("cpu")
        self._entries: OrderedDict[str, Any] = OrderedDict()  # text → the store's entry
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, object]:
        return {"args": self._args, "capacity": self.capacity, "device": self.device}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(*state["args"], state["capacity"], state["device"])  # type: ignore[misc]

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, text: object) -> bool:
        return text in self._entries

    def missing(self, texts: Sequence[str]) -> list[str]:
        """The distinct texts of `texts` not kept, in order (one pass over a plain dict: every
        request checks its ~70 candidates here)."""
        entries = self._entries
        return [t for t in dict.fromkeys(texts) if t not in entries]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def recent(self, limit: int) -> list[str]:
        """Up to `limit` of the texts kept, the most recently used first."""
        with self._lock:
            return list(itertools.islice(reversed(self._entries), max(limit, 0)))

    def _touch(self, texts: Sequence[str]) -> list[Any] | None:
        """The entries of `texts`, now the most recently used; None if any is not kept.
        The caller holds the lock."""
        entries = [self._entries.get(t) for t in texts]
        if any(e is None for e in entries):
            return None
        for text in texts:
            self._entries.move_to_end(text)
        return entries

    def _evict(self, incoming: int = 0) -> None:
        """Drop the least recently used entries beyond `capacity`, leaving room for
        `incoming` new ones (the caller holds the lock), handing each to `_forget`."""
        while self._entries and len(self._entries) + incoming > self.capacity:
            self._forget(self._entries.popitem(last=False)[1])

    def _forget(self, entry: Any) -> None:
        """What a store does with an evicted or replaced entry: nothing by default."""


class PagedItemStates(_Kept):
    """Item text → its item-side states (tokens, width), kept in one paged arena tensor; an
    entry is the item's arena row indices, int64 packed in bytes.

    Bytes, not an array per item: a request joins its candidates' bytes and reads them as one
    index array (~4 µs for 70 items, against ~24 µs for `np.concatenate` of 70 arrays), and
    dropping a version frees one plain object an item (100k numpy arrays took ~11-60 ms to free
    under the GIL, and a swap frees the old version's store while requests are served)."""

    def __init__(self, dtype: torch.dtype, capacity: int, device: torch.device | None = None):
        super().__init__((dtype,), capacity, device)
        self.dtype = dtype
        self._arena: torch.Tensor | None = None  # (pages × PAGE_TOKENS, width)
        self._free: list[int] = []  # page numbers; page 0 is the zero page, never handed out
        self._expected = 0  # pages announced by `expect` for the arena's first allocation

    @property
    def pages(self) -> int:
        """Pages in the arena (the zero page included)."""
        return 0 if self._arena is None else self._arena.shape[0] // PAGE_TOKENS

    def nbytes(self) -> int:
        """Bytes of the arena tensor (its spare pages included, which cost no RSS on a CPU
        until written)."""
        return 0 if self._arena is None else self._arena.numel() * self._arena.element_size()

    def state_bytes(self) -> int:
        """Bytes of the pages items hold (what the kept states cost in memory)."""
        with self._lock:
            if self._arena is None:
                return 0
            used = self.pages - 1 - len(self._free)  # the zero page is never handed out
            row = self._arena.shape[-1] * self._arena.element_size()
            return used * PAGE_TOKENS * row

    def clear(self) -> None:
        super().clear()
        with self._lock:
            self._arena = None
            self._free = []

    def __del__(self) -> None:
        # The last reference is gone: nothing can read the arena again (gathers copy out of
        # it), so its pages go back in chunks before the tensor is freed (module docstring).
        arena = self.__dict__.get("_arena")
        if arena is not None and not sys.is_finalizing():
            release_pages(arena)

    def expect(self, lengths: Sequence[int]) -> None:
        """Announce items of these token counts about to be put (a warm-up), so the arena is
        allocated for all of them at once. Growing by half as they arrive would copy the
        arena each time, and at the last copy hold the old and the new together: warming a
        100k catalogue peaked at 8.3 GiB RSS that way, against 6.3 GiB after it."""
        # In numpy: at 100k items a generator over them is ~20 ms of Python beside requests.
        pages = int((-(-np.asarray(lengths, dtype=np.int64) // PAGE_TOKENS)).sum())
        with self._lock:
            if self._arena is None:
                # On CPU, room for `capacity` items of the announced size, not the warm-up
                # alone: the pages no item uses are never touched, so they cost address
                # space, not RSS, and items arriving after the warm-up (changed texts, the
                # uncached tail) find free pages instead of growing the arena, which would
                # copy it and hold the old and the new at once. GPU memory is committed when
                # allocated, so there the arena is sized for the warm-up.
                spare = max(self.capacity - len(self._entries) - len(lengths), 0)
                if self.device.type != "cpu":
                    spare = 0
                per_item = pages / max(len(lengths), 1)
                self._expected = pages + int(spare * per_item)
            elif len(self._free) < pages:
                self._make_room(pages, self._arena.shape[-1])

    def put(self, texts: Sequence[str], states: torch.Tensor, lengths: Sequence[int]) -> None:
        """Keep `states[b, : lengths[b]]` as the states of `texts[b]` (states: (B, L, W)),
        converted to `dtype`; the least recently used go once there are more than
        `capacity`. The texts are distinct."""
        on = states.device
        keep = (
            torch.arange(states.shape[1], device=on)[None, :]
            < torch.as_tensor(lengths, device=on)[:, None]
        )
        self.put_rows(texts, states[keep], lengths)

    def put_rows(self, texts: Sequence[str], rows: torch.Tensor, lengths: Sequence[int]) -> None:
        """`put` for states without padding: `rows` (sum(lengths), W) holds each text's rows
        one after the other (what `export` yields and a snapshot reads back)."""
        counts = [-(-int(n) // PAGE_TOKENS) for n in lengths]
        with self._lock:
            # Evict first, so the pages of what goes are reused: in a full warmed arena a new
            # text would otherwise grow it by half, holding the old and the new arena at once.
            self._evict(incoming=sum(1 for t in texts if t not in self._entries))
            self._make_room(sum(counts), rows.shape[-1])
            assert self._arena is not None
            offsets = np.arange(PAGE_TOKENS)
            kept = []
            for text, n, k in zip(texts, lengths, counts, strict=True):
                pages = np.asarray([self._free.pop() for _ in range(k)], dtype=np.int64)
                row = (pages[:, None] * PAGE_TOKENS + offsets).reshape(-1)[: int(n)]
                old = self._entries.pop(text, None)
                if old is not None:
                    self._forget(old)
                self._entries[text] = row.tobytes()
                kept.append(row)
            if kept:
                index = torch.from_numpy(np.concatenate(kept)).to(self.device)
                self._arena.index_copy_(0, index, rows.to(self.device, self.dtype))
            self._evict()

    def export(self, max_rows: int) -> Iterator[tuple[list[str], torch.Tensor, list[int]]]:
        """The states kept, as (texts, rows (sum(lengths), W) on the host in `dtype`, lengths)
        chunks of at most ~`max_rows` rows, least recently used first. Each chunk is copied out
        under the lock, so requests are served between chunks; an item put or evicted
        meanwhile is in the chunks or not, never torn."""
        with self._lock:
            sizes = [(t, len(e) >> 3) for t, e in self._entries.items()]
        chunk: list[str] = []
        rows = 0
        for text, n in sizes:
            chunk.append(text)
            rows += n
            if rows >= max_rows:
                yield from self._export_chunk(chunk)
                chunk, rows = [], 0
        if chunk:
            yield from self._export_chunk(chunk)

    def _export_chunk(
        self, texts: list[str]
    ) -> Iterator[tuple[list[str], torch.Tensor, list[int]]]:
        with self._lock:
            kept: list[tuple[str, bytes]] = [
                (t, e) for t in texts if (e := self._entries.get(t)) is not None
            ]
            if not kept or self._arena is None:
                return
            index = np.frombuffer(bytearray(b"".join(e for _, e in kept)), dtype=np.int64)
            rows = self._arena.index_select(0, torch.from_numpy(index).to(self.device))
        yield [t for t, _ in kept], rows.cpu(), [len(e) >> 3 for _, e in kept]

    def gather(
        self, texts: Sequence[str], dtype: torch.dtype
    ) -> tuple[torch.Tensor, np.ndarray] | None:
        """(states (n, L, W) in `dtype` on the store's device, zero past each item's length;
        lengths (n,) on the host, where the caller builds its mask without a device round
        trip) for `texts`, L the longest; None if any text is not kept."""
        with self._lock:
            rows = self._touch(texts)
            if rows is None or self._arena is None:
                return None
            lengths = np.fromiter((len(r) >> 3 for r in rows), dtype=np.int64, count=len(rows))
            width = int(lengths.max())
            index = np.zeros((len(rows), width), dtype=np.int64)  # padding reads row 0: zeros
            index[np.arange(width)[None, :] < lengths[:, None]] = np.frombuffer(
                b"".join(rows), dtype=np.int64
            )
            flat = torch.from_numpy(index.reshape(-1)).to(self.device)
            states = self._arena.index_select(0, flat)
        out = states.view(len(rows), width, -1).to(dtype)
        return out, lengths

    def _make_room(self, pages: int, width: int) -> None:
        if self._arena is None:
            total = max(MIN_PAGES, pages + 1, self._expected + 1)
            self._expected = 0
            self._arena = torch.empty(
                (total * PAGE_TOKENS, width), dtype=self.dtype, device=self.device
            )
            self._arena[:PAGE_TOKENS].zero_()
            self._free = list(range(total - 1, 0, -1))
        if len(self._free) >= pages:
            return
        old = self.pages
        total = max(old + old // 2, old + pages - len(self._free))
        grown = torch.empty((total * PAGE_TOKENS, width), dtype=self.dtype, device=self.device)
        grown[: old * PAGE_TOKENS] = self._arena
        self._arena = grown
        self._free = list(range(total - 1, old - 1, -1)) + self._free

    def _forget(self, entry: bytes) -> None:
        """An entry's pages go back to the free list."""
        rows = np.frombuffer(entry, dtype=np.int64)
        self._free.extend(int(p) for p in np.unique(rows // PAGE_TOKENS))


class Int8ItemStates(_Kept):
    """Item text → (int8 states (tokens, width), fp32 scales (tokens, width // block)): an
    entry is that pair."""

    def __init__(self, block: int, capacity: int, device: torch.device | None = None):
        super().__init__((block,), capacity, device)
        self.dtype = torch.int8
        self.block = block

    def expect(self, lengths: Sequence[int]) -> None:
        """Nothing to prepare: each item's int8 rows are views into their warm-up batch."""

    def state_bytes(self) -> int:
        """Bytes of the kept int8 rows and their scales (the batch tensors they are views
        into can hold more: their padding)."""
        return sum(
            q.numel() * q.element_size() + sc.numel() * sc.element_size() for q, sc in self.rows()
        )

    def rows(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The kept (states, scales) pairs, least recently used first."""
        with self._lock:
            return list(self._entries.values())

    def put(self, texts: Sequence[str], states: torch.Tensor, lengths: Sequence[int]) -> None:
        # Measured RSS growth warming 20k synthetic items (glibc malloc, 2 cores): int8 as
        # per-item copies 2.6 GB for 0.47 GB of states (the heap fragments among the
        # quantisation's temporaries), as views into the batch's tensor 1.0 GB.
        q, scales = quantize_blocks(states.float(), self.block)
        with self._lock:
            for text, qi, si, n in zip(texts, q, scales, lengths, strict=True):
                self._entries[text] = (qi[: int(n)], si[: int(n)])
            self._evict()

    def gather(
        self, texts: Sequence[str], dtype: torch.dtype
    ) -> tuple[torch.Tensor, np.ndarray] | None:
        with self._lock:
            kept = self._touch(texts)
        if kept is None:
            return None
        q = pad_sequence([r[0] for r in kept], batch_first=True)
        scales = pad_sequence([r[1] for r in kept], batch_first=True)
        n, length, width = q.shape
        blocks = q.view(n, length, scales.shape[-1], -1).to(dtype)
        # Scaled in the compute dtype, broadcast per block: ~0.3 ms for 70 candidates
        # (expanding the scales to full width first cost ~0.8 ms).
        out = (blocks * scales.to(dtype)[..., None]).view(n, length, width)
        lengths = np.fromiter((r[0].shape[0] for r in kept), dtype=np.int64, count=len(kept))
        return out, lengths


def quantize_blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(…, W) float -> int8 (…, W) and fp32 scales (…, W // block): symmetric, one scale per
    `block` consecutive values (absmax / 127)."""
    blocks = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
    scale = blocks.abs().amax(dim=-1).clamp(min=1e-8) / 127.0
    q = torch.round(blocks / scale.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return q.reshape(x.shape), scale
