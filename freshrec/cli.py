"""The `freshrec` command: bootstrap, serve, operate, import data, run the demo.

Heavy libraries (torch, transformers, Feast) are imported inside the commands that need them,
so `freshrec --help` and the operator commands start fast. Errors are printed as one message
(the field and the allowed range), never a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from freshrec.config import FreshRecConfig, load_config
from freshrec.errors import FreshRecError

app = typer.Typer(
    help="FreshRec: feature-store-backed recommendations with a BERT re-ranker, kept fresh.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
serve_app = typer.Typer(help="Run a service (gRPC).", no_args_is_help=True)
updater_app = typer.Typer(
    help="Operate the updater: status, trigger, versions, promote, rollback.", no_args_is_help=True
)
data_app = typer.Typer(help="Bring your own data.", no_args_is_help=True)
app.add_typer(serve_app, name="serve")
app.add_typer(updater_app, name="updater")
bench_app = typer.Typer(help="Benchmarks that print JSON.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(bench_app, name="bench")
eval_app = typer.Typer(help="Offline evaluation (replay).", no_args_is_help=True)
app.add_typer(eval_app, name="eval")

console = Console(width=None if sys.stdout.isatty() else 140)
WorkdirOpt = Annotated[
    Path, typer.Option("--workdir", "-w", help="State directory.", envvar="FRESHREC_WORKDIR")
]
RankingAddr = Annotated[str, typer.Option("--address", help="Ranking service host:port.")]
UpdaterAddr = Annotated[str, typer.Option("--address", help="Updater service host:port.")]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="FRESHREC_TOKEN",
        help="Updater bearer token (needed by trigger, promote, rollback when the updater has one).",
        show_default=False,
    ),
]
TlsCaOpt = Annotated[
    Path | None,
    typer.Option(
        "--tls-ca",
        help="CA (PEM) of the server's certificate: use TLS.",
        exists=True,
        dir_okay=False,
    ),
]
TlsCertOpt = Annotated[
    Path | None,
    typer.Option(
        "--tls-cert", help="Client certificate (PEM), for mTLS.", exists=True, dir_okay=False
    ),
]
TlsKeyOpt = Annotated[
    Path | None,
    typer.Option("--tls-key", help="Client private key (PEM).", exists=True, dir_okay=False),
]


def _config(workdir: Path, **overrides: Any) -> FreshRecConfig:
    return load_config(workdir, **overrides)


def _tls(ca: Path | None, cert: Path | None, key: Path | None) -> Any:
    """ClientTLS for the --tls-* options; None (plaintext) without --tls-ca."""
    from freshrec.clients import ClientTLS

    if ca is None:
        if cert is not None or key is not None:
            raise typer.BadParameter("--tls-cert and --tls-key need --tls-ca")
        return None
    if (cert is None) != (key is None):
        raise typer.BadParameter("--tls-cert and --tls-key go together")
    return ClientTLS(ca, cert, key)


def _logging(verbose: bool = False) -> None:
    from freshrec.logs import configure_logging

    configure_logging(logging.DEBUG if verbose else logging.INFO)
    for noisy in ("feast", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# -- bootstrap -------------------------------------------------------------------------------
@app.command()
def init(
    workdir: WorkdirOpt = Path(".freshrec"),
    dataset: Annotated[str, typer.Option(help="ml100k | synthetic | imported")] = "ml100k",
    history_fraction: Annotated[float, typer.Option(help="Share loaded as history.")] = 0.9,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Start an initialised workdir over: delete its offline store, models and its "
            "project's online keys first (freshrec.json and cache/ stay).",
        ),
    ] = False,
) -> None:
    """Load a dataset, apply + materialise features, build the index, train the first model."""
    from freshrec.demo import load_named_dataset
    from services.jobs.bootstrap import bootstrap, ensure_uninitialised, start_over

    if force:
        start_over(workdir, console.print)
    config = _config(workdir)
    ensure_uninitialised(config)  # before the data set loads
    data = load_named_dataset(dataset, config, console.print)
    report = bootstrap(config, data, history_fraction, announce=console.print)
    _print_steps(report.steps)


@app.command()
def materialize(
    workdir: WorkdirOpt = Path(".freshrec"),
    fast: Annotated[
        bool, typer.Option(help="Write Feast's Redis layout directly (same values, faster).")
    ] = False,
    refresh_popularity: Annotated[
        bool,
        typer.Option(
            help="First recompute item popularity (7/30 days) from the offline event log: "
            "the re-ranker reads it."
        ),
    ] = True,
    full: Annotated[
        bool,
        typer.Option(
            "--full",
            help="After the online store lost its data (a Redis restart without "
            "persistence): first fold the offline event log into the profile table (what "
            "LogEvents pushed online since `init`), then load every row within each view's "
            "TTL, as the first run did, not only what changed since the last run.",
        ),
    ] = False,
) -> None:
    """Load the offline feature tables into the online store (for a scheduled job)."""
    from datetime import UTC, datetime

    from services.features.store import materialize as run
    from services.features.store import refresh_popularity as refresh
    from services.features.store import refresh_profiles

    config = _config(workdir)
    now = datetime.now(UTC)
    if refresh_popularity:
        done = refresh(config, now)
        console.print(
            f"item popularity: {done['items']:,} items from {done['events']:,} events "
            f"in {done['seconds']:.1f} s"
        )
    if full:
        folded = refresh_profiles(config, now)
        console.print(
            f"user profiles: {folded['events']:,} logged events folded into "
            f"{folded['updated']:,} of {folded['users']:,} users in {folded['seconds']:.1f} s"
        )
    report = run(config, now, fast=fast, full=full)
    for view, info in report["views"].items():
        console.print(f"{view}: {info['rows']:,} rows in {info['seconds']:.1f} s")


@app.command("item-states")
def item_states(
    workdir: WorkdirOpt = Path(".freshrec"),
    items: Annotated[
        int,
        typer.Option(
            min=0, help="The catalogue's N most popular items; 0 = every item.", show_default=True
        ),
    ] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Write the champion re-ranker's item states for the catalogue to disk
    (<workdir>/cache/item-states), for the ranking service to read instead of computing:
    at start-up, and for a request's candidate outside its warm set. Run it with the ranking
    service's settings, on the same kind of machine (the states of another device or
    precision are not used)."""
    from dataclasses import asdict

    from services.jobs.item_states import write_item_states

    _logging()
    config = _config(workdir)
    report = write_item_states(config, items, announce=console.print)
    result = {**asdict(report), "path": str(report.path) if report.path else None}
    console.print(
        f"{report.items:,} item states ({report.mib:,.0f} MiB: {report.read:,} read from the "
        f"earlier snapshot, {report.computed:,} computed) written to {report.path} in "
        f"{report.seconds:.1f} s"
    )
    if as_json:
        print(json.dumps(result))


@app.command("index-rebuild")
def index_rebuild(
    workdir: WorkdirOpt = Path(".freshrec"),
    min_changes: Annotated[
        int,
        typer.Option(
            min=1,
            help="Publish nothing unless at least this many catalogue changes are waiting "
            "(changes replayed from the offline change log are folded in however few).",
            show_default=True,
        ),
    ] = 1,
    from_offline_log: Annotated[
        bool,
        typer.Option(
            "--from-offline-log",
            help="Replay the offline change log instead of the Redis stream. A trimmed or "
            "lost stream is found and replayed from the log without this; use it for a loss "
            "within seconds of the index's position, which that comparison cannot see.",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Fold the catalogue changes since the champion index into a new index version and
    promote it: the ranking replicas swap to it and stop searching those changes as an
    overlay beside FAISS. For a schedule (deploy/k8s/index-rebuild-cronjob.yaml)."""
    from dataclasses import asdict

    from services.jobs.index_rebuild import rebuild_index

    _logging()
    report = rebuild_index(
        _config(workdir), min_changes, announce=console.print, from_offline_log=from_offline_log
    )
    if as_json:
        print(json.dumps(asdict(report)))


# -- services --------------------------------------------------------------------------------
def _announce(line: str) -> None:
    """A service's start line on stdout, for a person at a terminal; not with JSON logs, where
    the service's own log record says it and a plain line would break a stream that a log
    collector reads as one JSON object a line (a container's stdout and stderr are one)."""
    from freshrec.logs import log_format

    if log_format() == "text":
        console.print(line)


@serve_app.command("ranking")
def serve_ranking(
    workdir: WorkdirOpt = Path(".freshrec"),
    port: Annotated[int | None, typer.Option(help="Override ranking.port.")] = None,
) -> None:
    """Serve RankingService (Recommend, LogEvents) until SIGTERM."""
    _logging()
    from services.common.server import wait_for_termination
    from services.ranking.server import build_ranking

    rank = build_ranking(_config(workdir), port)
    _announce(f"ranking service on port {rank.port}")
    wait_for_termination(rank.handle, on_stop=rank.models.stop)


@serve_app.command("updater")
def serve_updater(
    workdir: WorkdirOpt = Path(".freshrec"),
    port: Annotated[int | None, typer.Option(help="Override updater.port.")] = None,
) -> None:
    """Serve UpdaterService until SIGTERM."""
    _logging()
    from services.common.server import wait_for_termination
    from services.updater.server import build_updater

    upd = build_updater(_config(workdir), port)
    _announce(f"updater service on port {upd.port}")
    wait_for_termination(upd.handle)


# -- clients ---------------------------------------------------------------------------------
@app.command()
def recommend(
    user_id: str,
    k: Annotated[int, typer.Option(help="How many items (1..100).")] = 10,
    query: Annotated[str | None, typer.Option(help="Free text.")] = None,
    address: RankingAddr = "127.0.0.1:50051",
    tls_ca: TlsCaOpt = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
) -> None:
    """Ask the ranking service for recommendations."""
    from freshrec.clients import channel, ranking_stub
    from freshrec.v1 import ranking_pb2

    with channel(address, _tls(tls_ca, tls_cert, tls_key)) as ch:
        reply = ranking_stub(ch).Recommend(
            ranking_pb2.RecommendRequest(user_id=user_id, k=k, query=query), timeout=30
        )
    print_recommendation(reply, f"user {user_id}")


def print_recommendation(reply: Any, title: str) -> None:
    from freshrec.v1 import ranking_pb2

    flags = []
    if reply.cold_start:
        flags.append("cold start")
    if reply.degraded:
        flags.append(f"DEGRADED: {reply.degraded_reason}")
    table = Table(
        title=f"{title} — model {reply.model_version}, index {reply.index_version}"
        + (f" ({'; '.join(flags)})" if flags else ""),
        title_justify="left",
    )
    for col in ("#", "item", "title", "category", "score", "relevance", "w", "stage"):
        table.add_column(col)
    for rank, item in enumerate(reply.items, 1):
        table.add_row(
            str(rank),
            item.item_id,
            item.title[:40],
            item.category,
            f"{item.score:.3f}",
            f"{item.relevance:.3f}",
            f"{item.business_weight:.2f}",
            ranking_pb2.Stage.Name(item.stage).removeprefix("STAGE_").lower(),
        )
    console.print(table)


@updater_app.command("status")
def updater_status(
    address: UpdaterAddr = "127.0.0.1:50052",
    token: TokenOpt = None,
    tls_ca: TlsCaOpt = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
) -> None:
    """Champion, running job, last result and pending events."""
    from freshrec.clients import channel, updater_stub
    from freshrec.v1 import updater_pb2

    with channel(address, _tls(tls_ca, tls_cert, tls_key), token) as ch:
        s = updater_stub(ch).GetStatus(updater_pb2.GetStatusRequest(), timeout=10)
    console.print(
        f"champion {s.champion_version or '-'} | index {s.index_version or '-'} | {s.state} | "
        f"device {s.device} | pending events {s.pending_events:,}"
    )
    if s.last.job_id:
        console.print(f"last job {s.last.job_id}: {s.last.state} — {s.last.message}")
    if s.signals:
        console.print("signals " + " | ".join(f"{k} {v:.3f}" for k, v in sorted(s.signals.items())))
    if s.next_trigger:
        console.print(f"next automatic update: {s.next_trigger}")


@updater_app.command("trigger")
def updater_trigger(
    address: UpdaterAddr = "127.0.0.1:50052",
    reason: Annotated[str, typer.Option(help="Recorded in the manifest.")] = "operator trigger",
    wait: Annotated[bool, typer.Option(help="Wait for the result.")] = True,
    force: Annotated[bool, typer.Option(help="Promote even if the gate says no.")] = False,
    token: TokenOpt = None,
    tls_ca: TlsCaOpt = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
) -> None:
    """Start an incremental update."""
    from freshrec.clients import channel, updater_stub
    from freshrec.v1 import updater_pb2

    with channel(address, _tls(tls_ca, tls_cert, tls_key), token) as ch:
        r = (
            updater_stub(ch)
            .TriggerUpdate(
                updater_pb2.TriggerUpdateRequest(reason=reason, wait=wait, force_promote=force),
                timeout=3600,
            )
            .result
        )
    console.print(f"job {r.job_id}: {r.state} — {r.message}")


KindOpt = Annotated[
    str,
    typer.Option(
        help="reranker | index: the re-ranker, or the recall index (the versions `freshrec "
        "init` and `freshrec index-rebuild` publish)."
    ),
]


@updater_app.command("versions")
def updater_versions(
    kind: KindOpt = "reranker",
    address: UpdaterAddr = "127.0.0.1:50052",
    token: TokenOpt = None,
    tls_ca: TlsCaOpt = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
) -> None:
    """Every published version (of the re-ranker, or of the index) with what it was made of."""
    from freshrec.clients import channel, updater_stub
    from freshrec.v1 import updater_pb2

    with channel(address, _tls(tls_ca, tls_cert, tls_key), token) as ch:
        request = updater_pb2.ListVersionsRequest(kind=kind)
        r = updater_stub(ch).ListVersions(request, timeout=10)
    name = "index" if kind == "index" else "re-ranker"
    table = Table(
        title=f"{name} versions (champion {r.champion_version or '-'})", title_justify="left"
    )
    cols: tuple[str, ...] = ("version", "status", "parent", "created")
    if kind == "index":
        cols += ("items", "dim", "changes", "reason")
    else:
        cols += ("ndcg@10", "champion ndcg@10", "examples", "train s", "window")
    for col in cols:
        table.add_column(col)
    for v in r.versions:
        row = (
            v.version,
            v.status,
            v.parent or "-",
            v.created_at.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"),
        )
        if kind == "index":
            table.add_row(
                *row,
                f"{v.metrics.get('items', 0):,.0f}",
                f"{v.metrics.get('dim', 0):.0f}",
                f"{v.metrics['changes']:,.0f}" if "changes" in v.metrics else "-",
                v.reason or "-",
            )
            continue
        table.add_row(
            *row,
            f"{v.metrics.get('ndcg@10', 0):.4f}",
            f"{v.metrics['champion_ndcg@10']:.4f}" if "champion_ndcg@10" in v.metrics else "-",
            f"{v.train_examples:,}",
            f"{v.train_seconds:.0f}",
            v.data_window,
        )
    console.print(table)


@updater_app.command("promote")
def updater_promote(
    version: str,
    kind: KindOpt = "reranker",
    address: UpdaterAddr = "127.0.0.1:50052",
    token: TokenOpt = None,
    tls_ca: TlsCaOpt = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
) -> None:
    """Make a published version the champion."""
    from freshrec.clients import channel, updater_stub
    from freshrec.v1 import updater_pb2

    with channel(address, _tls(tls_ca, tls_cert, tls_key), token) as ch:
        request = updater_pb2.PromoteRequest(version=version, kind=kind)
        r = updater_stub(ch).Promote(request, timeout=30)
    console.print(f"{kind} champion {r.champion_version} (was {r.previous_version or '-'})")


@updater_app.command("rollback")
def updater_rollback(
    kind: KindOpt = "reranker",
    address: UpdaterAddr = "127.0.0.1:50052",
    token: TokenOpt = None,
    tls_ca: TlsCaOpt = None,
    tls_cert: TlsCertOpt = None,
    tls_key: TlsKeyOpt = None,
) -> None:
    """Return to the previous champion."""
    from freshrec.clients import channel, updater_stub
    from freshrec.v1 import updater_pb2

    with channel(address, _tls(tls_ca, tls_cert, tls_key), token) as ch:
        r = updater_stub(ch).Rollback(updater_pb2.RollbackRequest(kind=kind), timeout=30)
    console.print(f"{kind} champion {r.champion_version} (was {r.previous_version or '-'})")


# -- data ------------------------------------------------------------------------------------
@data_app.command("import")
def data_import(
    items: Annotated[Path, typer.Option(help="Items CSV or Parquet.")],
    interactions: Annotated[Path, typer.Option(help="Interactions CSV or Parquet.")],
    workdir: WorkdirOpt = Path(".freshrec"),
    map_: Annotated[
        list[str] | None,
        typer.Option("--map", help="canonical=source column, e.g. --map item_id=sku (repeatable)."),
    ] = None,
) -> None:
    """Validate and import a shop's catalogue and events; then `init --dataset imported`."""
    from freshrec.data.importer import import_tables
    from freshrec.demo import IMPORTED_INTERACTIONS, IMPORTED_ITEMS

    mapping = {}
    for entry in map_ or []:
        if "=" not in entry:
            raise typer.BadParameter(f"--map must look like canonical=source, got {entry!r}")
        key, value = entry.split("=", 1)
        mapping[key.strip()] = value.strip()
    result = import_tables(items, interactions, mapping or None)
    config = _config(workdir)
    config.data_dir.mkdir(parents=True, exist_ok=True)
    result.dataset.items.to_parquet(config.data_dir / IMPORTED_ITEMS, index=False)
    result.dataset.interactions.to_parquet(config.data_dir / IMPORTED_INTERACTIONS, index=False)
    for kind in ("items", "interactions"):
        rejected = result.rejected.get(kind, {})
        detail = ", ".join(f"{reason}: {n}" for reason, n in sorted(rejected.items())) or "none"
        console.print(f"{kind}: accepted {result.accepted.get(kind, 0):,}; rejected {detail}")
    console.print(
        f"saved under {config.data_dir}; next: freshrec init --workdir {workdir} --dataset imported"
    )


@data_app.command("report")
def data_report(workdir: WorkdirOpt = Path(".freshrec")) -> None:
    """What ingestion stored, dropped and quarantined, by day and reason."""
    from services.ingestion.ledger import REJECTIONS_FILE, RejectionLedger
    from services.ingestion.offline_log import OfflineEventLog

    config = _config(workdir)
    stored = OfflineEventLog(config.offline_dir).count()
    quarantined = OfflineEventLog(config.offline_dir / "quarantine").count()
    spool = config.workdir / "spool"
    spooled = len(list(spool.glob("*.json"))) if spool.exists() else 0
    console.print(
        f"offline event log: {stored:,} events; quarantine: {quarantined:,}; "
        f"spooled batches waiting for Redis: {spooled}"
    )
    totals = RejectionLedger(config.offline_dir / REJECTIONS_FILE).totals()
    if not totals:
        console.print("no event was dropped or quarantined")
        return
    reasons = sorted({r for day in totals.values() for r in day})
    table = Table(title="dropped / quarantined events by day", title_justify="left")
    table.add_column("date")
    for reason in reasons:
        table.add_column(reason, justify="right")
    for day, counts in totals.items():
        table.add_row(day, *(f"{counts.get(r, 0):,}" for r in reasons))
    console.print(table)


# -- demo ------------------------------------------------------------------------------------
@app.command()
def demo(
    dataset: Annotated[
        str, typer.Option(help="ml100k (falls back to synthetic) | synthetic")
    ] = "ml100k",
    workdir: WorkdirOpt = Path(".freshrec/demo"),
    replay_events: Annotated[int, typer.Option(help="Newer events sent through LogEvents.")] = 3000,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON summary last.")] = False,
) -> None:
    """The whole loop end to end: data → Feast → FAISS → BERT → gRPC → events → update → N+1."""
    from freshrec.demo import run_demo

    summary = run_demo(dataset, workdir, replay_events, console)
    if json_out:
        print(json.dumps(summary))


@bench_app.command("serving")
def bench_serving_cmd(
    workdir: WorkdirOpt = Path(".freshrec/bench"),
    candidates: Annotated[int, typer.Option(help="Candidates re-ranked per request.")] = 50,
    concurrency: Annotated[int, typer.Option(help="Concurrent gRPC clients.")] = 1,
    duration: Annotated[float, typer.Option(help="Seconds of load.")] = 30.0,
    items: Annotated[
        int,
        typer.Option(
            help="Catalogue size of the synthetic shop bootstrapped into an empty workdir "
            "(an initialised workdir keeps its own catalogue).",
            min=1,
        ),
    ] = 2000,
    json_out: Annotated[bool, typer.Option("--json", help="Last line: one JSON object.")] = False,
) -> None:
    """Recommend latency and throughput against a real ranking service (JSON)."""
    _logging()
    logging.getLogger().setLevel(logging.WARNING)
    from freshrec.bench import bench_serving

    result = bench_serving(
        workdir, candidates, concurrency, duration, items=items, say=console.print
    )
    console.print(
        f"p50 {result['p50_ms']} ms, p95 {result['p95_ms']} ms, p99 {result['p99_ms']} ms, "
        f"{result['qps']} req/s, errors {result['errors']} ({result['items']:,} items, "
        f"{result['candidates']} candidates, concurrency {result['concurrency']})"
    )
    machine = result["machine"]
    console.print(
        f"machine: {machine['cores']} cores, {machine['torch_threads']} torch threads, "
        f"{machine['cpu_model'] or machine['cpu']} ({', '.join(machine['cpu_features']) or '-'}); "
        f"work after {machine['after_idle']['idle_ms']:g} ms idle "
        f"{machine['after_idle']['ratio']}x its time back to back"
    )
    steps = result["service_stages_ms"]
    console.print(
        "service steps p50/p99 ms: "
        + ", ".join(f"{k} {v['p50']}/{v['p99']}" for k, v in steps.items())
    )
    if result["overhead_ratio"] is not None:
        console.print(
            f"overhead: {result['overhead_ratio']}x the stage floors "
            f"(+{result['overhead_ms']} ms; floors sampled {result['floor_samples_during_load']} "
            f"times during the load, {result['overhead_after_load']['overhead_ratio']}x against "
            f"those after it; gRPC round trip alone {result['stages_ms'].get('grpc_roundtrip')} ms)"
        )
    if result["beyond_model_ms"] is not None:
        console.print(f"beyond the model: {result['beyond_model_ms']} ms a request (p50)")
    if json_out:
        print(json.dumps(result))


@bench_app.command("swap")
def bench_swap_cmd(
    workdir: WorkdirOpt = Path(".freshrec/bench"),
    candidates: Annotated[int, typer.Option(help="Candidates re-ranked per request.")] = 50,
    concurrency: Annotated[int, typer.Option(help="Concurrent gRPC clients.", min=1)] = 1,
    before: Annotated[
        float, typer.Option(help="Seconds of load before the new version is promoted.", min=1)
    ] = 10.0,
    after: Annotated[
        float, typer.Option(help="Seconds of load once the new version answers.", min=0)
    ] = 10.0,
    timeout: Annotated[
        float, typer.Option(help="Longest wait for the new version to answer.", min=1)
    ] = 900.0,
    json_out: Annotated[bool, typer.Option("--json", help="Last line: one JSON object.")] = False,
) -> None:
    """Recommend latency while the ranking service loads a new model version (JSON)."""
    _logging()
    logging.getLogger().setLevel(logging.WARNING)
    from freshrec.bench_swap import bench_swap

    result = bench_swap(workdir, concurrency, before, after, timeout, candidates, say=console.print)
    for name in ("steady", "loading", "after"):
        w = result[name]
        console.print(
            f"{name}: {w['calls']} calls, {w['errors']} errors, p50 {w.get('p50_ms')} ms, "
            f"p99 {w.get('p99_ms')} ms, max {w.get('max_ms')} ms, {w['qps']} req/s; "
            f"{w['full_gc']} full GCs (longest {w['full_gc_max_ms']} ms)"
        )
    console.print(
        f"{result['challenger']} answered {result['load_s']} s after its promotion "
        f"({result['items']:,} items, {result['warm_item_states']:,} item states warmed); "
        f"peak RSS {result['rss_peak_mb_steady']} MiB steady, "
        f"{result['rss_peak_mb_loading']} MiB loading"
    )
    if json_out:
        print(json.dumps(result))


@bench_app.command("recall")
def bench_recall_cmd(
    workdir: WorkdirOpt = Path(".freshrec/bench-recall"),
    items: Annotated[
        int,
        typer.Option(
            help="Catalogue size of the synthetic catalogue embedded for the run (an "
            "initialised workdir is measured on its own serving index instead).",
            min=1,
        ),
    ] = 100_000,
    queries: Annotated[int, typer.Option(help="Simulated user queries.", min=1)] = 1000,
    k: Annotated[int, typer.Option(help="Recall depth (recall@k vs exact search).", min=1)] = 100,
    changes: Annotated[
        int,
        typer.Option(
            help="Also measure N catalogue changes searched as the overlay beside the index, "
            "and folded in as `freshrec index-rebuild` does (JSON key `changes`).",
            min=0,
        ),
    ] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="Last line: one JSON object.")] = False,
) -> None:
    """FAISS recall at catalogue scale: p50/p99 per query, recall@k vs exact search, RSS."""
    _logging()
    logging.getLogger().setLevel(logging.WARNING)
    from freshrec.bench_recall import bench_recall

    result = bench_recall(workdir, items, queries, k, say=console.print, changes=changes)
    console.print(
        f"{result['index']} over {result['items']:,} items: p50 {result['p50_ms']} ms, "
        f"p99 {result['p99_ms']} ms, recall@{k} {result[f'recall@{k}']} "
        f"(ties not forgiven: {result[f'recall@{k}_ids']}), "
        f"RSS {result['rss_mb']} MiB"
    )
    if json_out:
        print(json.dumps(result))


@bench_app.command("quality")
def bench_quality_cmd(
    workdir: WorkdirOpt = Path(".freshrec/bench"),
    candidates: Annotated[int, typer.Option(help="Recall candidates re-ranked per user.")] = 50,
    users: Annotated[int, typer.Option(help="Held-out users evaluated (at most).")] = 300,
    json_out: Annotated[bool, typer.Option("--json", help="Last line: one JSON object.")] = False,
) -> None:
    """NDCG@10 of the served re-ranker vs the full fp32 cross-encoder on the same candidates."""
    _logging()
    logging.getLogger().setLevel(logging.WARNING)
    from freshrec.bench_quality import bench_quality

    result = bench_quality(workdir, candidates, users, say=console.print)
    console.print(
        f"NDCG@10 served {result['ndcg@10_served']} ({result['architecture']}) vs full "
        f"cross-encoder {result['ndcg@10_reference']} = {result['ndcg_ratio_vs_reference']}x; "
        f"recall order {result['ndcg@10_recall_order']} ({result['users']} users)"
    )
    if json_out:
        print(json.dumps(result))


@bench_app.command("freshness")
def bench_freshness_cmd(
    workdir: WorkdirOpt = Path(".freshrec/bench-freshness"),
    events: Annotated[int, typer.Option(help="Clicks timed from LogEvents to the profile.")] = 500,
    new_items: Annotated[int, typer.Option(help="Items timed from UpsertItems to recall.")] = 30,
    update_events: Annotated[
        int, typer.Option(help="Events in the batch before the update.")
    ] = 10_000,
    json_out: Annotated[bool, typer.Option("--json", help="Last line: one JSON object.")] = False,
) -> None:
    """Event → profile, new item → recallable, events → new model serving, materialise rows/s."""
    _logging()
    logging.getLogger().setLevel(logging.WARNING)
    from freshrec.bench_freshness import bench_freshness

    result = bench_freshness(workdir, events, new_items, update_events, say=console.print)
    if json_out:
        print(json.dumps(result, default=str))


@eval_app.command("replay")
def eval_replay_cmd(
    dataset: Annotated[str, typer.Option(help="ml100k | synthetic | imported")] = "synthetic",
    windows: Annotated[int, typer.Option(help="Chronological windows after bootstrap.")] = 8,
    quick: Annotated[
        bool, typer.Option("--quick", help="Tiny shop, 2 windows, tiny model (seconds; tests).")
    ] = False,
    max_users: Annotated[
        int,
        typer.Option(
            help="Users evaluated per window (0 = every active user, the protocol; "
            "N = a seeded sample of N, faster)."
        ),
    ] = 0,
    train_examples: Annotated[
        int,
        typer.Option(
            help="Training pairs per run from the backbone: bootstrap and each `full` retrain "
            "(0 = config training.max_examples)."
        ),
    ] = 0,
    incremental_examples: Annotated[
        int,
        typer.Option(
            help="Training pairs per `incremental` update "
            "(0 = config training.incremental_max_examples)."
        ),
    ] = 0,
    popular_candidates: Annotated[
        int,
        typer.Option(help="Popular items re-ranked beside the FAISS candidates (0 = FAISS only)."),
    ] = 20,
    report: Annotated[
        Path | None, typer.Option("--report", help="PNG report path (+ .json details).")
    ] = None,
    threads: Annotated[
        int, typer.Option(help="torch threads (0 = config model.torch_threads / default).")
    ] = 0,
    workdir: WorkdirOpt = Path(".freshrec"),
    json_out: Annotated[bool, typer.Option("--json", help="Last line: one JSON object.")] = False,
) -> None:
    """Replay the history window by window: evaluate every strategy, then feed the window."""
    _logging()
    logging.getLogger().setLevel(logging.WARNING)
    from dataclasses import replace

    from freshrec.demo import load_named_dataset
    from services.evaluation.replay import (
        QUICK_SETTINGS,
        ReplaySettings,
        quick_dataset,
        run_replay,
    )
    from services.evaluation.report import print_table, write_report

    config = _config(workdir)
    if quick:
        data = quick_dataset()
        settings = replace(
            QUICK_SETTINGS,
            windows=min(windows, QUICK_SETTINGS.windows),
            torch_threads=threads or QUICK_SETTINGS.torch_threads,
        )
    else:
        data = load_named_dataset(dataset, config, console.print)
        settings = ReplaySettings(
            windows=windows,
            max_users_per_window=max_users or None,
            holdout_users=max_users or None,
            train_examples=train_examples or None,
            incremental_examples=incremental_examples or None,
            popular_candidates=popular_candidates,
            torch_threads=threads,
        )
    result = run_replay(data, config, settings, say=console.print)
    print_table(result, console)
    target = report or Path(config.workdir) / "reports" / f"replay-{result.dataset}.png"
    written = write_report(result, target)
    console.print(f"report: {', '.join(str(p) for p in written)}")
    if json_out:
        print(json.dumps(result.summary()))


def _print_steps(steps: dict[str, float]) -> None:
    table = Table(title="steps", title_justify="left")
    table.add_column("step")
    table.add_column("seconds", justify="right")
    for name, seconds in steps.items():
        table.add_row(name, f"{seconds:.1f}")
    console.print(table)


def main() -> None:
    """Entry point: run the app, turning expected errors into one-line messages."""
    import grpc
    from pydantic import ValidationError

    try:
        app()
    except FreshRecError as exc:
        console.print(f"[red]error:[/red] {exc}")
        sys.exit(2)
    except ValidationError as exc:
        console.print(f"[red]invalid configuration:[/red] {exc}")
        sys.exit(2)
    except grpc.RpcError as exc:
        console.print(f"[red]{exc.code().name}:[/red] {exc.details()}")  # type: ignore[attr-defined]
        sys.exit(1)


if __name__ == "__main__":
    main()
