"""Promise 5, bad input: hypothesis drives the live gRPC servers with 5,000+ generated requests.

Both servers run in this process (tiny shop, tiny re-ranker). Every answer must be OK or an
expected client error with a non-empty message: INVALID_ARGUMENT for bad fields,
RESOURCE_EXHAUSTED for messages over the 4 MiB limit, NOT_FOUND / FAILED_PRECONDITION for
updater commands on versions that do not exist or cannot be used. Never INTERNAL or UNKNOWN,
never a dead server, and the process's RSS grows by less than RSS_BUDGET_MB over the run.
"""

from __future__ import annotations

import gc
import json
import string
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import psutil
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from live_stack import Stack, running_stack

from freshrec.v1 import ranking_pb2, updater_pb2

pytestmark = pytest.mark.integration

RECOMMEND_EXAMPLES = 2_500
LOG_EVENTS_EXAMPLES = 1_500
UPDATER_EXAMPLES = 1_000
RSS_BUDGET_MB = 200
OK_CODES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}
OVER_LIMIT = {grpc.StatusCode.RESOURCE_EXHAUSTED}
UPDATER_CODES = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION}
FUZZ = settings(
    deadline=None,
    derandomize=True,  # the same requests on every run: a failure reproduces
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

outcomes: Counter[str] = Counter()
rss: dict[str, float] = {}


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("fuzz") / "work", redis_url) as s:
        gc.collect()
        rss["before_mb"] = psutil.Process().memory_info().rss / 2**20
        yield s


def _call(method: str, fn: Callable[[], Any], allowed: set[grpc.StatusCode]) -> None:
    try:
        fn()
        code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details() or ""
    outcomes[f"{method} {code.name}"] += 1
    assert code in allowed, f"{method} answered {code.name}: {details}"
    assert code == grpc.StatusCode.OK or details.strip(), f"{method} {code.name} without a message"


# -- strategies -----------------------------------------------------------------------------

ids = st.one_of(
    st.text(max_size=20),
    st.text(alphabet=string.ascii_letters + string.digits, min_size=1, max_size=12),
    st.text(min_size=120, max_size=300),  # around and beyond the 128-character limit
    st.just(""),
    st.just(" \t\n"),
    st.sampled_from(["🙂" * 200, "\x00", "é" * 129, "u1"]),
)
long_text = st.builds(
    lambda ch, n: ch * n, st.sampled_from(["a", "é", "🙂", " "]), st.integers(1, 6000)
)
queries = st.one_of(st.none(), st.text(max_size=600), long_text)


@st.composite
def recommend_requests(draw: st.DrawFn, users: list[str], items: list[str]) -> Any:
    user = draw(st.one_of(st.sampled_from(users), ids))
    exclude = draw(
        st.one_of(
            st.lists(st.one_of(st.sampled_from(items), ids), max_size=30),
            st.builds(lambda n: [f"x{i}" for i in range(n)], st.integers(990, 1010)),
            st.builds(lambda s: [s] * 3, ids),
        )
    )
    context = draw(
        st.one_of(
            st.dictionaries(ids, ids, max_size=5),
            st.builds(lambda n: {f"k{i}": "v" for i in range(n)}, st.integers(30, 40)),
            st.dictionaries(st.just("page"), long_text, max_size=1),
        )
    )
    fields: dict[str, Any] = {
        "user_id": user,
        "k": draw(st.one_of(st.integers(-5, 105), st.integers(-(2**31), 2**31 - 1))),
        "exclude_item_ids": exclude,
        "context": context,
        "request_id": draw(st.one_of(st.just(""), ids)),
    }
    query = draw(queries)
    if query is not None:
        fields["query"] = query
    return ranking_pb2.RecommendRequest(**fields)


NOW = datetime.now(UTC)
timestamps = st.one_of(
    st.none(),
    st.builds(
        lambda s, n: (s, n),
        st.integers(
            int((NOW - timedelta(days=40)).timestamp()), int((NOW + timedelta(days=2)).timestamp())
        ),
        st.integers(0, 999_999_999),
    ),
    st.builds(
        lambda s, n: (s, n),
        st.sampled_from([0, -62135596800, 253402300799, -1, 2**40]),  # ancient, far future
        st.sampled_from([0, -1, 999_999_999, 1_000_000_000]),
    ),
    st.builds(lambda d: (int((NOW - timedelta(seconds=d)).timestamp()), 0), st.integers(0, 3600)),
)


@st.composite
def events(draw: st.DrawFn, users: list[str], items: list[str], run: str) -> ranking_pb2.Event:
    stamp = draw(timestamps)
    fields: dict[str, Any] = {
        "event_id": draw(st.one_of(st.sampled_from([f"{run}-dup-{i}" for i in range(5)]), ids)),
        "user_id": draw(st.one_of(st.sampled_from([f"fuzz-{u}" for u in users[:3]]), ids)),
        "item_id": draw(st.one_of(st.sampled_from(items), ids)),
        "type": draw(st.integers(-3, 9)),  # 0 = unspecified, 5+ = unknown enum values
        "request_id": draw(st.one_of(st.just(""), ids)),
    }
    if stamp is not None:
        fields["timestamp"] = Timestamp(seconds=stamp[0], nanos=stamp[1])
    return ranking_pb2.Event(**fields)


def _batches(users: list[str], items: list[str], run: str) -> st.SearchStrategy[Any]:
    one = events(users, items, run)
    return st.one_of(
        st.lists(one, max_size=12),
        st.builds(lambda e, n: [e] * n, one, st.integers(995, 1100)),  # around the 1,000 limit
    )


versions = st.one_of(
    ids,
    st.sampled_from(
        [
            "v0001",
            "v0002",
            "v0999",
            "v9999999999",
            "v0001/",
            "./v0001",
            "../index/v0001",
            "../../../../etc",
            "/tmp",
            ".",
            "..",
            "CHAMPION",
            "history.jsonl",
            ".staging-x",
            "v" * 300,
            "v0001\x00",
        ]
    ),
)


# -- the tests (in file order; the RSS check runs last) --------------------------------------


def test_recommend_fuzz(stack: Stack) -> None:
    stub, users, items = stack.rank, stack.users[:8], stack.catalog

    @settings(FUZZ, max_examples=RECOMMEND_EXAMPLES)
    @given(recommend_requests(users, items))
    def check(request: Any) -> None:
        _call("Recommend", lambda: stub.Recommend(request, timeout=30), OK_CODES)

    check()


def test_log_events_fuzz(stack: Stack) -> None:
    stub, users, items = stack.rank, stack.users, stack.catalog
    run = f"fz{int(time.time())}"

    @settings(FUZZ, max_examples=LOG_EVENTS_EXAMPLES)
    @given(_batches(users, items, run))
    def check(batch: list[ranking_pb2.Event]) -> None:
        request = ranking_pb2.LogEventsRequest(events=batch)
        _call("LogEvents", lambda: stub.LogEvents(request, timeout=60), OK_CODES)

    check()


def test_updater_fuzz(stack: Stack) -> None:
    stub = stack.upd

    @settings(FUZZ, max_examples=UPDATER_EXAMPLES)
    @given(st.one_of(versions.map(lambda v: ("promote", v)), st.just(("rollback", ""))))
    def check(command: tuple[str, str]) -> None:
        kind, version = command
        allowed = OK_CODES | UPDATER_CODES
        if kind == "promote":
            request = updater_pb2.PromoteRequest(version=version)
            _call("Promote", lambda: stub.Promote(request, timeout=30), allowed)
        else:
            _call(
                "Rollback",
                lambda: stub.Rollback(updater_pb2.RollbackRequest(), timeout=30),
                allowed,
            )
        status = stub.GetStatus(updater_pb2.GetStatusRequest(), timeout=30)
        # Whatever was asked, the champion is still a real version of the registry.
        assert status.champion_version == "v0001"

    check()


def test_messages_over_the_limit_are_refused(stack: Stack) -> None:
    huge = "q" * (5 * 2**20)
    big = [ranking_pb2.Event(event_id="e", user_id="u", item_id=huge[: 2**20])] * 5
    for _ in range(3):
        _call(
            "Recommend",
            lambda: stack.rank.Recommend(
                ranking_pb2.RecommendRequest(user_id="u1", k=5, query=huge), timeout=30
            ),
            OVER_LIMIT,
        )
        _call(
            "LogEvents",
            lambda: stack.rank.LogEvents(ranking_pb2.LogEventsRequest(events=big), timeout=30),
            OVER_LIMIT,
        )
        _call(
            "Promote",
            lambda: stack.upd.Promote(updater_pb2.PromoteRequest(version=huge), timeout=30),
            OVER_LIMIT,
        )


def test_servers_alive_and_memory_bounded(stack: Stack) -> None:
    for ch in (stack.rank_channel, stack.upd_channel):
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reply = stack.rank.Recommend(
        ranking_pb2.RecommendRequest(user_id=stack.users[0], k=5), timeout=30
    )
    assert len(reply.items) == 5
    gc.collect()
    rss["after_mb"] = psutil.Process().memory_info().rss / 2**20
    total = sum(outcomes.values())
    print(
        json.dumps(
            {
                "test": "test_bad_input_fuzz",
                "requests": total,
                "outcomes": dict(sorted(outcomes.items())),
                "rss_before_mb": round(rss["before_mb"], 1),
                "rss_after_mb": round(rss["after_mb"], 1),
            }
        )
    )
    assert total >= 5_000
    assert rss["after_mb"] - rss["before_mb"] < RSS_BUDGET_MB
