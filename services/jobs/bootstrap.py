"""`freshrec init`: from a dataset to a serving-ready workdir.

Steps (each timed): seed the offline event log with history → build profiles and item features
→ Feast apply + materialise (Redis, or SQLite when no Redis can be had) → embed items and
publish a FAISS index version → train the first re-ranker from the pretrained BERT and publish.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from freshrec.config import CONFIG_FILE_NAME, FreshRecConfig, load_config, save_config
from freshrec.data.schema import Dataset
from freshrec.errors import FailedPrecondition
from model.artifacts import Manifest
from model.embeddings import TextEncoder
from model.index import RecallIndex
from model.text import item_text
from services.common.privacy import Pseudonymizer, pseudonymizer
from services.features.profiles import build_item_features, build_user_profiles, item_from_row
from services.features.store import OnlineStoreChoice, prepare_feature_store
from services.ingestion.offline_log import OfflineEventLog
from services.registry import open_registry
from services.updater.examples import Window
from services.updater.job import JobOutcome, RerankerFactory, run_training

log = logging.getLogger(__name__)

ONLINE_STORE_FILE = "online_store.json"
REPLAY_FILE = "replay.parquet"
POPULAR_LIST = 500


@dataclass
class BootstrapReport:
    dataset: str
    online_store: str
    steps: dict[str, float] = field(default_factory=dict)  # step -> seconds
    counts: dict[str, int] = field(default_factory=dict)
    index_version: str = ""
    model: JobOutcome | None = None
    choice: OnlineStoreChoice | None = None


def shift_to(dataset: Dataset, end: datetime) -> Dataset:
    """The same dataset moved by a whole number of days so that its last interaction happens
    in the day before `end` (at most 24 hours before it, never after).

    Historical data sets (MovieLens is from 1998) then behave like a live shop: TTLs, popularity
    windows and the event API's lateness bound all see plausible times. The shift is whole days
    so that every event keeps its time of day: daily features (`popularity_7d` counts the 7
    full UTC days before an event's day) then group the same events whenever `init` runs, and
    the first model, its gate and the demo's update come out the same at any hour.
    """
    latest = dataset.interactions["timestamp"].max()
    delta = pd.Timedelta(days=(pd.Timestamp(end) - latest) // pd.Timedelta(days=1))
    items = dataset.items.assign(created_at=dataset.items["created_at"] + delta)
    inter = dataset.interactions.assign(timestamp=dataset.interactions["timestamp"] + delta)
    return Dataset(dataset.name, items, inter, dict(dataset.notes))


def pseudonymize_interactions(
    interactions: pd.DataFrame, pseudonyms: Pseudonymizer
) -> pd.DataFrame:
    """A copy of `interactions` with pseudonymous `user_id` and `event_id` columns."""
    users = interactions["user_id"].astype(str)
    mapping = {user_id: pseudonyms.user_id(user_id) for user_id in users.unique()}
    events = interactions["event_id"].astype(str)
    return interactions.assign(user_id=users.map(mapping), event_id=events.map(pseudonyms.event_id))


def write_online_store_choice(config: FreshRecConfig, choice: OnlineStoreChoice) -> None:
    path = config.workdir / ONLINE_STORE_FILE
    path.write_text(
        json.dumps(
            {"kind": choice.kind, "redis_url": choice.redis_url, "description": choice.description}
        )
    )


def read_online_store_choice(config: FreshRecConfig) -> dict[str, str | None]:
    """What `init` chose: {"kind": "redis"|"sqlite", "redis_url": ..., "description": ...}."""
    path = config.workdir / ONLINE_STORE_FILE
    if not path.exists():
        return {"kind": "redis", "redis_url": config.redis_url, "description": "configured"}
    data: dict[str, str | None] = json.loads(path.read_text())
    return data


def bootstrap(
    config: FreshRecConfig,
    dataset: Dataset,
    history_fraction: float = 0.9,
    announce: Callable[[str], None] = print,
    load_reranker: RerankerFactory | None = None,
    encoder: TextEncoder | None = None,
    progress: bool = True,
) -> BootstrapReport:
    """Prepare `config.workdir` to serve `dataset`; the newest share is kept for replay.

    Args:
        history_fraction: share of interactions (in time order) loaded as history; the rest is
            written to `<workdir>/data/replay.parquet` for the demo to send through LogEvents.
        load_reranker, encoder: injected small models in tests; the pretrained ones otherwise.

    With `security.pseudonymize_user_ids`, the history's user and event ids are replaced by
    the same pseudonyms the ranking service uses before anything is stored; the replay file
    keeps the raw ids, since it stands for live traffic that is pseudonymised when it arrives.

    Raises:
        InvalidArgument: pseudonymisation is on but no key is configured.
        FailedPrecondition: the workdir's offline store already holds events (a bootstrap
            over them would mix two time shifts of the data; `start_over` first).
    """
    ensure_uninitialised(config)
    pseudonyms = pseudonymizer(config)
    save_config(config)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    report = BootstrapReport(dataset=dataset.name, online_store="")
    clock = time.perf_counter

    t = clock()
    # The whole data set ends within the day before a minute ago: history is the past, and the
    # newer events keep their real spacing and land between the end of history and now, so
    # replaying them through LogEvents looks like the live traffic it was (not a burst stamped
    # "now").
    shifted = shift_to(dataset, datetime.now(UTC) - timedelta(minutes=1))
    history, newer = shifted.split_by_time(history_fraction)
    if pseudonyms is not None:
        history = pseudonymize_interactions(history, pseudonyms)
    items_df = shifted.items
    cutoff = history["timestamp"].max().to_pydatetime()
    newer.to_parquet(config.data_dir / REPLAY_FILE, index=False)
    OfflineEventLog(config.offline_dir).append_frame(history)
    report.counts.update(
        items=len(items_df),
        users=int(history["user_id"].nunique()),
        history_events=len(history),
        replay_events=len(newer),
    )
    report.steps["load history into the offline store"] = clock() - t
    announce(
        f"history: {len(history):,} events, {report.counts['users']:,} users, "
        f"{len(items_df):,} items; {len(newer):,} newer events kept for replay"
    )

    t = clock()
    profiles = build_user_profiles(history, items_df, cutoff)
    item_rows = build_item_features(items_df, history, cutoff)
    choice = prepare_feature_store(config, profiles, item_rows, cutoff)
    write_online_store_choice(config, choice)
    report.choice = choice
    report.online_store = choice.description
    report.steps["feast apply + materialize"] = clock() - t
    announce(
        f"online store: {choice.description}; {len(profiles):,} profiles, {len(item_rows):,} items"
    )

    t = clock()
    registry = open_registry(config)
    encoder = encoder or TextEncoder.from_pretrained(config.model.base_model or None)
    rows: list[dict[str, Any]] = item_rows.to_dict("records")  # type: ignore[assignment]
    catalog = {str(r["item_id"]): item_from_row(r) for r in rows}
    ids = list(catalog)
    texts = [item_text(catalog[i]) for i in ids]
    with tqdm(total=len(texts), desc="embed items", unit="item", disable=not progress) as bar:
        vectors = encoder.encode(texts, progress=bar.update)
    popular = item_rows.sort_values(["popularity_30d", "popularity_7d"], ascending=False)
    index = RecallIndex.build(vectors, ids, [str(i) for i in popular["item_id"].head(POPULAR_LIST)])
    sealed = registry.publish_written(
        "index",
        index.save,
        Manifest(
            kind="index",
            version="",
            data_window={"end": cutoff.isoformat()},
            metrics={"items": float(len(ids)), "dim": float(vectors.shape[1])},
            reason=f"bootstrap from {dataset.name}",
        ),
    )
    registry.promote("index", sealed.version, reason="bootstrap")
    report.index_version = sealed.version
    report.steps["embed items + FAISS index"] = clock() - t
    announce(
        f"index {sealed.version}: {len(ids):,} items × {vectors.shape[1]} dims "
        f"({type(index.index).__name__})"
    )

    t = clock()
    ordered = history.sort_values("timestamp", kind="stable")["timestamp"]
    train_start = ordered.iloc[int(len(ordered) * 0.5)].to_pydatetime()
    holdout_start = ordered.iloc[int(len(ordered) * 0.9)].to_pydatetime()
    outcome = run_training(
        config,
        registry,
        history,
        catalog,
        train_window=Window(train_start, holdout_start),
        holdout_window=Window(holdout_start, None),
        replay_window=None,
        parent=None,
        reason=f"first version, pretrained BERT fine-tuned on {dataset.name}",
        load_reranker=load_reranker,
        progress=progress,
    )
    report.model = outcome
    report.steps["train first re-ranker"] = clock() - t
    announce(outcome.message + f" ({outcome.examples:,} pairs, {outcome.seconds:.0f} s)")
    return report


def ensure_uninitialised(config: FreshRecConfig) -> None:
    """Raises FailedPrecondition when the workdir's offline store already holds events: a
    second bootstrap over them would mix two time shifts of the data (the history it wrote
    first beside a catalogue, profiles and models re-dated to now)."""
    if held := OfflineEventLog(config.offline_dir).count():
        raise FailedPrecondition(
            f"{config.workdir} is already initialised ({held:,} events in its offline store); "
            f"`freshrec init --force --workdir {config.workdir}` starts it over, or choose "
            "another --workdir"
        )


def remove_workdir(workdir: Path, say: Callable[[str], None] | None = None) -> None:
    """Delete a workdir and the online-store keys its project wrote (`forget_online_state`;
    best effort: a previous run's leftovers never block a new one), so runs that start from a
    clean workdir (the demo, `freshrec bench freshness`) do not pile up in a shared Redis."""
    try:
        project = forget_online_state(workdir)
    except Exception as exc:
        if say is not None:
            say(f"   [yellow]could not remove the previous run's keys: {exc}[/yellow]")
    else:
        if project is not None and say is not None:
            say(f"   removed the previous run's online keys (project {project})")
    shutil.rmtree(workdir, ignore_errors=True)


# What `start_over` keeps: the operator's settings and downloaded data sets.
KEPT_ON_START_OVER = frozenset({CONFIG_FILE_NAME, "cache"})


def forget_online_state(workdir: Path) -> str | None:
    """Delete the online-store keys a workdir's project wrote (its Feast project's features,
    its event-dedup keys, its item generation and its catalogue change stream, nothing else);
    returns the project, or None when the workdir has no feature repository. The stream goes
    too: a new index folds none of its changes (`catalog_position` "0"), so replicas would
    apply the old catalogue's changes to the new one.

    Raises:
        Whatever Feast or Redis raise (callers decide whether leftovers may block them).
    """
    if not (workdir / "feature_repo" / "feature_store.yaml").exists():
        return None
    from services.catalog.changes import change_stream_key
    from services.features.item_generation import item_generation_key
    from services.features.store import open_feature_store

    previous = load_config(workdir)
    open_feature_store(previous.feature_repo_dir).teardown()
    choice = read_online_store_choice(previous)
    if choice["kind"] == "redis" and choice["redis_url"]:
        import redis

        client = redis.Redis.from_url(str(choice["redis_url"]))
        keys = list(client.scan_iter(match=f"freshrec:{previous.project}:event:*", count=1000))
        keys += [item_generation_key(previous.project), change_stream_key(previous.project)]
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
    return previous.project


def start_over(workdir: Path, announce: Callable[[str], None] = print) -> None:
    """Return an initialised workdir to before its bootstrap: its project's online keys, its
    offline store, models, replay data and spool are deleted; `freshrec.json` (the settings)
    and `cache/` (downloaded data) stay."""
    try:
        project = forget_online_state(workdir)
        if project is not None:
            announce(f"removed the online keys of project {project}")
    except Exception as exc:  # an unreachable store must not keep a workdir from starting over
        announce(f"could not remove the previous online keys: {exc}")
    if not workdir.exists():
        return
    for path in workdir.iterdir():
        if path.name in KEPT_ON_START_OVER:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    announce(f"cleared {workdir} (kept {', '.join(sorted(KEPT_ON_START_OVER))})")
