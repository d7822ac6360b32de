"""Keeps the ranking service on the registry's champion versions, swapping them without a gap.

A background thread polls the champion pointers; a new version is verified (sha256, config) and
loaded off the request path, then published by replacing one reference. Requests read that
reference once, so each is answered by exactly one (model, index) pair. A version that fails
verification or loading is refused with a logged reason and the serving one stays.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np

from freshrec.errors import ArtifactError, FailedPrecondition, NotFound
from model.index import RecallIndex
from model.reranker import CrossEncoderReranker
from services.catalog.changes import position_key
from services.common import metrics
from services.ranking.compute import in_passing_thread, lower_thread_priority
from services.ranking.pipeline import ServingModels
from services.registry import ModelRegistry

log = logging.getLogger(__name__)

RerankerLoader = Callable[[str], CrossEncoderReranker]

# How long a swapped-out version is kept before the watcher lets it go: longer than a request
# that took it at the swap takes to finish, so the watcher's reference is the last one and the
# version is freed on its thread, not a request's (`ModelHolder.release_retired`).
RETIRE_AFTER_SECONDS = 5.0


@dataclass
class Refusal:
    kind: str
    version: str
    reason: str


class ModelHolder:
    """The current ServingModels plus the watcher that replaces it."""

    def __init__(
        self,
        registry: ModelRegistry,
        load_reranker: RerankerLoader,
        poll_seconds: float = 1.0,
        on_swap: Callable[[ServingModels], None] | None = None,
        ef_search: int = 0,
        load_nice: int = 0,
        load_scope: Callable[[], contextlib.AbstractContextManager[object]] | None = None,
        retire_after: float = RETIRE_AFTER_SECONDS,
    ) -> None:
        """Args:
        ef_search: HNSW efSearch of loaded indexes (`RecallIndex.load`; 0 = by size).
        load_nice: nice levels the watcher thread, and so every load after the first, runs
            below the serving threads (`compute.lower_thread_priority`); 0 = the same.
        load_scope: a context entered from a refresh's first load until after `on_swap`
            (or the refusal), e.g. `heap.full_collections_deferred`; None = none.
        retire_after: seconds a swapped-out version is kept before the watcher lets it go
            (`release_retired`).
        """
        self.registry = registry
        self.ef_search = ef_search
        self.load_nice = load_nice
        self.load_reranker = load_reranker
        self.poll_seconds = poll_seconds
        self.on_swap = on_swap
        self._load_scope = load_scope or contextlib.nullcontext
        self._current: ServingModels | None = None
        self._refused: dict[tuple[str, str], str] = {}
        # Swapped-out versions and when, until `release_retired` lets them go.
        self._retired: list[tuple[float, ServingModels]] = []
        self.retire_after = retire_after
        self.refusals: list[Refusal] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # `_current` and the catalogue changes
        self._refresh_lock = threading.Lock()  # one refresh at a time
        # Catalogue changes after the serving base index's `catalog_position` (the last change
        # its base folds in; `_catalog_floor` as a sortable key), with each item's last change's
        # stream id; re-applied to every new base that has not folded them in.
        self._catalog_upserts: dict[str, np.ndarray] = {}
        self._catalog_removals: set[str] = set()
        self._catalog_at: dict[str, tuple[int, int]] = {}
        self._catalog_floor: tuple[int, int] = (-1, -1)
        # Set by the server to the catalogue follower's `rewind`: an index whose base is older
        # than the changes kept here needs the stream read again from its position.
        self.rewind_catalog: Callable[[str], None] | None = None

    @property
    def current(self) -> ServingModels:
        models = self._current
        if models is None:
            raise FailedPrecondition("no model is loaded yet")
        return models

    @property
    def ready(self) -> bool:
        return self._current is not None

    def _load(self, kind: str, version: str) -> object:
        log.info("loading %s %s", kind, version)
        started = time.monotonic()
        metrics.MODEL_LOAD_STARTED.labels(kind=kind).set(time.time())
        outcome = "failed"  # anything not caught below propagates, and the next poll retries
        try:
            self.registry.verify(kind, version)
            path = self.registry.path(kind, version)
            if kind == "index":
                loaded: object = RecallIndex.load(path, self.ef_search)
            else:
                # On a thread that ends with the load: its torch threads go with it
                # (services/ranking/compute.py).
                loaded = in_passing_thread(self.load_reranker, str(path))
            outcome = "ok"
            metrics.MODEL_LOAD_SECONDS.labels(kind=kind).observe(time.monotonic() - started)
            return loaded
        except (ArtifactError, NotFound, OSError, ValueError, RuntimeError) as exc:
            outcome = "refused"
            raise ArtifactError(f"{kind} {version} refused: {exc}") from exc
        finally:
            metrics.MODEL_LOAD_STARTED.labels(kind=kind).set(0)
            metrics.MODEL_LOADS.labels(kind=kind, outcome=outcome).inc()

    def refresh(self) -> bool:
        """Load the champions if they changed; True if a swap happened. Never raises for a bad
        version: it is refused, logged, and the serving one stays.

        One refresh at a time (`_refresh_lock`); the state lock (`_lock`) is held only to read
        the serving models and to publish the new ones, not while a version verifies and loads.
        A load that computes item states can take minutes (longer at `load_nice` under full
        load), and the catalogue follower's `apply_catalog` takes the state lock: held through
        the load, it stopped every new or removed item from reaching recall until the load
        ended. Changes applied meanwhile go to the serving index and are re-applied to a newly
        loaded one at the swap (`_with_catalog`)."""
        with self._refresh_lock:
            wanted = {k: self.registry.champion(k) for k in ("reranker", "index")}
            if None in wanted.values():
                return False
            current = self._current  # one reference read; `apply_catalog` may replace it
            have: dict[str, str | None] = (
                {"reranker": current.model_version, "index": current.index_version}
                if current
                else {"reranker": None, "index": None}
            )
            if wanted == have:
                return False
            # Not a third version in memory while this one loads: a version swapped out less
            # than `retire_after` ago goes now (a request still on it frees it when it ends).
            self.release_retired(older_than=0)
            with self._load_scope():
                return self._load_and_swap(wanted, have)

    def _load_and_swap(self, wanted: dict[str, str | None], have: dict[str, str | None]) -> bool:
        """`refresh`'s loads and swap, under its refresh lock."""
        loaded: dict[str, object] = {}
        for kind, version in wanted.items():
            assert version is not None
            if have[kind] == version:
                continue
            if (kind, version) in self._refused:
                return False
            try:
                loaded[kind] = self._load(kind, version)
            except ArtifactError as exc:
                self._refused[(kind, version)] = str(exc)
                self.refusals.append(Refusal(kind, version, str(exc)))
                log.error("%s; still serving %s", exc, have[kind])
                return False
        with self._lock:
            # `apply_catalog` may have replaced the serving models (same versions, a newer
            # overlay) during the load: compose from what serves now.
            current = self._current
            reranker = loaded.get("reranker") or (current.reranker if current else None)
            index = loaded.get("index")
            rewind = None
            if isinstance(index, RecallIndex):
                index, rewind = self._rebase_catalog(index)
            elif current is not None:
                index = current.index
            assert isinstance(reranker, CrossEncoderReranker)
            assert isinstance(index, RecallIndex)
            models = ServingModels(reranker, wanted["reranker"] or "", index, wanted["index"] or "")
            self._current = models  # one reference swap: requests see old or new, never a mix
            if current is not None:
                self._retired.append((time.monotonic(), current))
        log.info("serving model %s, index %s", models.model_version, models.index_version)
        if rewind is not None:
            log.warning(
                "index %s folds catalogue changes only up to %s, before the changes this "
                "replica kept: following the change stream again from there",
                models.index_version,
                rewind,
            )
            if self.rewind_catalog is not None:
                self.rewind_catalog(rewind)
        if self.on_swap is not None:
            self.on_swap(models)
        return True

    def release_retired(self, older_than: float | None = None) -> int:
        """Let go of the versions swapped out at least `older_than` seconds ago (default
        `retire_after`); returns how many. The watcher calls it before each poll, so a version
        is freed on its thread.

        Freeing a version is a request's worth of work several times over: at 100k items its
        2.2 GiB item-state arena goes back to the OS and its Python structures are dropped.
        Left to reference counting, whichever request finished last with the old version did
        it on its own thread: that call took 412 ms and the 7 that started after the swap ~200
        ms (stop 34). The watcher runs at `load_nice`; the store gives the arena back in
        chunks (`model.item_states.release_pages`), so threads mapping memory meanwhile (the
        torch thread) do not wait for one long unmap."""
        cutoff = time.monotonic() - (self.retire_after if older_than is None else older_than)
        with self._lock:
            going = [models for at, models in self._retired if at <= cutoff]
            self._retired = [(at, models) for at, models in self._retired if at > cutoff]
        count = len(going)
        del going  # the last reference, unless a request still holds the version
        return count

    def _rebase_catalog(self, base: RecallIndex) -> tuple[RecallIndex, str | None]:
        """`base` with the kept catalogue changes it has not folded in (the caller holds the
        state lock); the changes it folds in are forgotten. Returns it and, for a base older
        than what is kept (a rollback to an earlier index), the stream id to follow again from
        (the kept changes are dropped: the stream has them all)."""
        floor = position_key(base.catalog_position)
        if floor < self._catalog_floor:
            self._catalog_upserts.clear()
            self._catalog_removals.clear()
            self._catalog_at.clear()
            self._catalog_floor = floor
            return base, base.catalog_position
        for item_id in [i for i, at in self._catalog_at.items() if at <= floor]:
            self._catalog_upserts.pop(item_id, None)
            self._catalog_removals.discard(item_id)
            del self._catalog_at[item_id]
        self._catalog_floor = floor
        if not self._catalog_upserts and not self._catalog_removals:
            return base, None
        return base.with_changes(self._catalog_upserts, self._catalog_removals), None

    def apply_catalog(
        self,
        upserts: dict[str, np.ndarray],
        removals: set[str],
        positions: Mapping[str, str] | None = None,
    ) -> None:
        """Add/replace items (unit vectors) and remove items in the serving index, without a
        rebuild: one new ServingModels with the same versions and an updated overlay.

        Args:
            positions: the change-stream id of each item's change; a change the serving base
                index already folds in (at or before its `catalog_position`) is skipped. None:
                every change is newer than the base (changes applied by hand, tests).
        """
        with self._lock:
            newest = (sys.maxsize, sys.maxsize)
            at = {
                item_id: position_key(positions[item_id]) if positions else newest
                for item_id in [*upserts, *removals]
            }
            upserts = {i: v for i, v in upserts.items() if at[i] > self._catalog_floor}
            removals = {i for i in removals if at[i] > self._catalog_floor}
            if not upserts and not removals:
                return
            for item_id in upserts:
                self._catalog_removals.discard(item_id)
            self._catalog_upserts.update(upserts)
            for item_id in removals:
                self._catalog_upserts.pop(item_id, None)
            self._catalog_removals |= removals
            self._catalog_at.update({i: at[i] for i in [*upserts, *removals]})
            current = self._current
            if current is None:
                return
            self._current = replace(current, index=current.index.with_changes(upserts, removals))

    def start(self) -> None:
        self.refresh()
        self._thread = threading.Thread(target=self._run, name="model-watcher", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # Verifying, loading and warming a new version while requests are served: on the
        # cores they leave idle (services/ranking/compute.py).
        nice = lower_thread_priority(self.load_nice)
        if self.load_nice:
            log.info(
                "model watcher at nice %d: later versions load below the serving threads", nice
            )
        while not self._stop.wait(self.poll_seconds):
            try:
                self.release_retired()
                self.refresh()
            except Exception:  # the watcher must outlive any one bad poll
                log.exception("model refresh failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
