"""UpdaterService: runs incremental updates in the background and exposes the registry to operators.

An update reads the offline event log, takes the events since the champion's training window
as new data (the newest `holdout_fraction` of them held out for the gate), mixes in a replay
sample of older history, fine-tunes the champion, and publishes/promotes through `job.py`.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow.parquet as pq
import torch
from google.protobuf.timestamp_pb2 import Timestamp

from freshrec.config import FreshRecConfig
from freshrec.errors import FailedPrecondition, InvalidArgument
from freshrec.records import ItemFeatures
from freshrec.v1 import updater_pb2, updater_pb2_grpc
from services.common import metrics
from services.common.served_scores import SERVED_SCORES_DIR, read_served_scores
from services.features.profiles import item_from_row
from services.features.store import ITEM_FEATURES_TABLE
from services.ingestion.offline_log import OfflineEventLog
from services.registry import KINDS, ModelRegistry
from services.updater.drift import champion_score_psi, drift_signals
from services.updater.examples import Window
from services.updater.job import JobOutcome, RerankerFactory, run_training

if TYPE_CHECKING:
    from services.updater.triggers import TriggerScheduler

log = logging.getLogger(__name__)


def load_item_catalog(config: FreshRecConfig) -> dict[str, ItemFeatures]:
    """Every item's features from the offline table (the source of materialisation)."""
    frame = pd.read_parquet(config.offline_dir / ITEM_FEATURES_TABLE)
    rows: list[dict[str, Any]] = frame.to_dict("records")  # type: ignore[assignment]
    return {str(row["item_id"]): item_from_row(row) for row in rows}


def _item_maps(config: FreshRecConfig) -> tuple[dict[str, pd.Timestamp], dict[str, str]]:
    """item_id -> created_at and item_id -> category from the offline item table."""
    path = config.offline_dir / ITEM_FEATURES_TABLE
    if not path.exists():
        return {}, {}
    frame = pq.read_table(path, columns=["item_id", "created_at", "category"]).to_pandas()
    ids = frame["item_id"].astype(str)
    created = pd.to_datetime(frame["created_at"], utc=True)
    return dict(zip(ids, created, strict=True)), dict(
        zip(ids, frame["category"].fillna("").astype(str), strict=True)
    )


def _parse_time(value: str) -> datetime | None:
    return pd.Timestamp(value).to_pydatetime() if value else None


def incremental_update(
    config: FreshRecConfig,
    registry: ModelRegistry,
    event_log: OfflineEventLog,
    reason: str,
    force_promote: bool = False,
    load_reranker: RerankerFactory | None = None,
    items: Mapping[str, ItemFeatures] | None = None,
    progress: bool = False,
) -> JobOutcome:
    """Fine-tune the champion on events since its training window; gate; publish.

    Raises:
        FailedPrecondition: there is no champion to update.
    """
    champion = registry.champion("reranker")
    if champion is None:
        raise FailedPrecondition("no champion re-ranker: run `freshrec init` first")
    manifest = registry.manifest("reranker", champion)
    since = _parse_time(manifest.data_window.get("end", ""))
    events = event_log.read()
    new = events[events["timestamp"] >= pd.Timestamp(since)] if since is not None else events
    if new.empty:
        return JobOutcome(
            "skipped", champion_version=champion, message="no events since the champion"
        )
    cut = new["timestamp"].quantile(1.0 - config.training.holdout_fraction)
    cut_dt = pd.Timestamp(cut).to_pydatetime()  # type: ignore[arg-type]
    return run_training(
        config,
        registry,
        events,
        items if items is not None else load_item_catalog(config),
        train_window=Window(since, cut_dt),
        holdout_window=Window(cut_dt, None),
        replay_window=Window(None, since) if since is not None else None,
        parent=champion,
        reason=reason,
        load_reranker=load_reranker,
        force_promote=force_promote,
        progress=progress,
    )


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    state: str  # queued | running | promoted | rejected | skipped | failed
    outcome: JobOutcome | None = None
    message: str = ""


def _result(status: JobStatus | None) -> updater_pb2.UpdateResult:
    if status is None:
        return updater_pb2.UpdateResult()
    o = status.outcome
    return updater_pb2.UpdateResult(
        job_id=status.job_id,
        state=status.state,
        challenger_version=o.challenger_version if o else "",
        champion_version=o.champion_version if o else "",
        challenger_metric=o.challenger_metric if o else 0.0,
        champion_metric=o.champion_metric if o else 0.0,
        message=status.message or (o.message if o else ""),
        examples=o.examples if o else 0,
        seconds=o.seconds if o else 0.0,
    )


class UpdaterServicer(updater_pb2_grpc.UpdaterServiceServicer):
    """Operator commands over gRPC; one update at a time, in a background thread.

    `clock` (wall-clock seconds since the epoch) places "now" for score_psi, whose windows are
    in serving time.
    """

    def __init__(
        self,
        config: FreshRecConfig,
        registry: ModelRegistry,
        event_log: OfflineEventLog,
        load_reranker: RerankerFactory | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.registry = registry
        self.event_log = event_log
        self.load_reranker = load_reranker
        self.clock = clock
        self._lock = threading.Lock()
        self._running: JobStatus | None = None
        self._last: JobStatus | None = None
        self._done = threading.Event()
        self._last_started: float | None = None  # time.monotonic() of the last job's start
        # Set by build_updater when automatic updates are configured (GetStatus shows it).
        self.scheduler: TriggerScheduler | None = None

    # -- jobs ----------------------------------------------------------------------------
    def _run_job(self, status: JobStatus, reason: str, force: bool) -> None:
        try:
            outcome = incremental_update(
                self.config, self.registry, self.event_log, reason, force, self.load_reranker
            )
            final = replace(status, state=outcome.state, outcome=outcome)
        except Exception as exc:  # a failed job is reported in status, the service stays up
            log.exception("update %s failed", status.job_id)
            final = replace(status, state="failed", message=f"{type(exc).__name__}: {exc}")
        with self._lock:
            self._last, self._running = final, None
        seconds = time.monotonic() - (self._last_started or time.monotonic())
        metrics.observe_update(final.state, seconds, self.registry.champion("reranker") or "")
        self._done.set()

    def _start(self, reason: str, force: bool) -> tuple[JobStatus, threading.Thread]:
        with self._lock:
            if self._running is not None:
                raise FailedPrecondition(f"update {self._running.job_id} is already running")
            status = JobStatus(uuid.uuid4().hex[:12], "running")
            self._running = status
            self._last_started = time.monotonic()
            self._done.clear()
        thread = threading.Thread(
            target=self._run_job,
            args=(status, reason, force),
            name=f"update-{status.job_id}",
            daemon=True,
        )
        thread.start()
        return status, thread

    def start_update(self, reason: str, force_promote: bool = False) -> JobStatus:
        """Start an update in the background (the scheduler's entry; operators use the RPC).

        Raises:
            FailedPrecondition: an update is already running.
        """
        return self._start(reason, force_promote)[0]

    def is_running(self) -> bool:
        with self._lock:
            return self._running is not None

    def last_started(self) -> float | None:
        """time.monotonic() when the last update started, None before the first."""
        with self._lock:
            return self._last_started

    def TriggerUpdate(
        self, request: updater_pb2.TriggerUpdateRequest, context: Any
    ) -> updater_pb2.TriggerUpdateResponse:
        status, thread = self._start(request.reason or "operator trigger", request.force_promote)
        if request.wait:
            thread.join()
            return updater_pb2.TriggerUpdateResponse(result=_result(self._last))
        return updater_pb2.TriggerUpdateResponse(result=_result(status))

    # -- drift -----------------------------------------------------------------------------
    def _champion_end(self) -> datetime | None:
        champion = self.registry.champion("reranker")
        if not champion:
            return None
        return _parse_time(self.registry.manifest("reranker", champion).data_window.get("end", ""))

    def drift_signals(self) -> tuple[dict[str, float], int]:
        """(signals of services/updater/drift.py, events newer than the champion's data).

        Reads the offline log from the champion's reference window on, the item table's
        created_at and category columns, and the served-score log from the champion's
        promotion on.
        """
        end = self._champion_end()
        window = timedelta(hours=self.config.updater.drift_window_hours)
        events = self.event_log.read(since=end - window if end is not None else None)
        if end is not None:
            pending = int((events["timestamp"] >= pd.Timestamp(end)).sum())
        else:
            pending = len(events)
        created_at, category = _item_maps(self.config)
        periods = self.registry.champion_periods("reranker")
        signals = drift_signals(
            events, end, window, created_at, category, periods, self._score_psi(periods)
        )
        metrics.observe_signals(signals)
        return signals, pending

    def _score_psi(self, periods: Sequence[tuple[datetime, str]]) -> float | None:
        """score_psi of the current champion, from its latest promotion (or rollback) on."""
        if not periods:
            return None
        since, version = periods[-1]
        served = read_served_scores(self.config.offline_dir / SERVED_SCORES_DIR, since)
        return champion_score_psi(
            served.get(version, []),
            since,
            datetime.fromtimestamp(self.clock(), UTC),
            timedelta(minutes=self.config.updater.score_window_minutes),
        )

    # -- status and versions ---------------------------------------------------------------
    def GetStatus(
        self, request: updater_pb2.GetStatusRequest, context: Any
    ) -> updater_pb2.GetStatusResponse:
        champion = self.registry.champion("reranker") or ""
        pending = 0
        if champion:
            end = _parse_time(
                self.registry.manifest("reranker", champion).data_window.get("end", "")
            )
            pending = self.event_log.count(since=end)
        with self._lock:
            running, last = self._running, self._last
        evaluation = self.scheduler.last() if self.scheduler is not None else None
        if evaluation is not None and evaluation.decision is not None:
            signals, next_trigger = evaluation.signals, evaluation.decision.next_trigger
        else:  # no scheduler, or before its first check: compute now
            signals = self.drift_signals()[0]
            next_trigger = "automatic updates off (operator only)"
            if self.scheduler is not None and self.scheduler.enabled:
                next_trigger = "scheduler starting"
        return updater_pb2.GetStatusResponse(
            champion_version=champion,
            state="running" if running else "idle",
            last=_result(running or last),
            pending_events=pending,
            device="cuda" if torch.cuda.is_available() else "cpu",
            index_version=self.registry.champion("index") or "",
            signals=signals,
            next_trigger=next_trigger,
        )

    def ListVersions(
        self, request: updater_pb2.ListVersionsRequest, context: Any
    ) -> updater_pb2.ListVersionsResponse:
        kind = _kind(request.kind)
        out = []
        for entry in self.registry.list_versions(kind):
            m = entry.manifest
            created = Timestamp()
            created.FromDatetime(pd.Timestamp(m.created_at).tz_convert(UTC).to_pydatetime())
            window = m.data_window
            out.append(
                updater_pb2.VersionInfo(
                    version=m.version,
                    parent=m.parent or "",
                    created_at=created,
                    status=entry.status,
                    metrics={k: float(v) for k, v in m.metrics.items()},
                    data_window=(
                        f"{window.get('start', '') or '-'} .. {window.get('end', '') or '-'}"
                        if window
                        else ""
                    ),
                    reason=m.reason,
                    train_examples=int(m.training.get("examples", 0)),
                    train_seconds=float(m.training.get("seconds", 0.0)),
                )
            )
        return updater_pb2.ListVersionsResponse(
            versions=out, champion_version=self.registry.champion(kind) or ""
        )

    def Promote(
        self, request: updater_pb2.PromoteRequest, context: Any
    ) -> updater_pb2.PromoteResponse:
        kind = _kind(request.kind)
        if not request.version:
            raise InvalidArgument("version must be a published version name, e.g. v0002")
        previous = self.registry.promote(kind, request.version, reason="operator promote")
        return updater_pb2.PromoteResponse(
            champion_version=request.version, previous_version=previous or ""
        )

    def Rollback(
        self, request: updater_pb2.RollbackRequest, context: Any
    ) -> updater_pb2.RollbackResponse:
        kind = _kind(request.kind)
        champion, previous = self.registry.rollback(kind, reason="operator rollback")
        return updater_pb2.RollbackResponse(
            champion_version=champion, previous_version=previous or ""
        )

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no job runs (tests, shutdown)."""
        with self._lock:
            if self._running is None:
                return True
        return self._done.wait(timeout)


def _kind(kind: str) -> str:
    """A ListVersions/Promote/Rollback request's registry kind: "reranker" when empty.

    Raises:
        InvalidArgument: not a kind the registry keeps.
    """
    if kind and kind not in KINDS:
        raise InvalidArgument(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return kind or "reranker"
