"""The bench's overhead figures: each request against the floors of the work it did."""

from __future__ import annotations

import pytest

from freshrec.bench import (
    _beyond_model,
    _call_class,
    _cpu_per_call,
    _outside_pipeline,
    _overhead,
    _percentiles,
)

FLOORS = {"stages_ms": {"faiss": 0.5, "redis_raw": 0.5, "forward": 8.0, "forward_user_cached": 3.0}}


def test_each_request_is_compared_with_the_floors_of_its_own_class() -> None:
    # Three cached calls (floor 4 ms), two with the user pass (floor 9 ms), one fallback.
    latencies = [5.0, 6.0, 8.0, 9.9, 13.5, 50.0]
    classes = [0, 0, 0, 1, 1, -1]

    got = _overhead(latencies, classes, FLOORS, concurrency=1)

    # Per-request ratios 1.25, 1.5, 2.0, 1.1, 1.5 (the fallback left out): median 1.5.
    assert got["overhead_ratio"] == 1.5
    # Per-request overheads 1, 2, 4, 0.9, 4.5: median 2.
    assert got["overhead_ms"] == 2.0
    assert got["overhead_ratio_with_transport"] is None  # no round trip measured
    assert got["overhead_by_class"] == {
        "user_pass": {
            "requests": 2,
            "p50_ms": 11.7,
            "p99_ms": 13.46,
            "floor_ms": 9.0,
            "ratio": 1.3,
        },
        "user_cached": {
            "requests": 3,
            "p50_ms": 6.0,
            "p99_ms": 7.96,
            "floor_ms": 4.0,
            "ratio": 1.5,
        },
    }


def test_a_mean_weighted_floor_would_hide_overhead() -> None:
    # All cached at 2x their floor: a floor weighted like the old figure (hit rate 0.5 of
    # 4 and 9 ms = 6.5) would have read 8 / 6.5 = 1.23; the per-class figure says 2.
    got = _overhead([8.0] * 4, [0] * 4, FLOORS, concurrency=1)
    assert got["overhead_ratio"] == 2.0 and got["overhead_ms"] == 4.0


@pytest.mark.parametrize(
    ("latencies", "classes", "floors", "concurrency"),
    [
        ([5.0], [0], FLOORS, 2),  # other clients' calls move the counters: not exact
        ([5.0], [0], {}, 1),  # no floors (an online store other than Redis)
        ([5.0], [-1], FLOORS, 1),  # nothing re-ranked
    ],
)
def test_undefined_overhead_is_null(
    latencies: list[float], classes: list[int], floors: dict, concurrency: int
) -> None:
    got = _overhead(latencies, classes, floors, concurrency)
    assert got == {
        "overhead_ratio": None,
        "overhead_ratio_with_transport": None,
        "overhead_ms": None,
        "overhead_by_class": {},
    }


def test_call_class_reads_the_cache_counters() -> None:
    assert _call_class((5, 2, 0), (5, 3, 0)) == 1  # a miss: the user pass ran
    assert _call_class((5, 2, 0), (6, 2, 0)) == 0  # a hit, then the joint layer
    assert _call_class((5, 2, 0), (5, 2, 1)) == 2  # every logit cached: no forward pass
    assert _call_class((5, 2, 0), (5, 2, 0)) == -1  # not re-ranked


def test_answers_from_cached_scores_are_held_to_the_fetch_floors() -> None:
    got = _overhead([2.0, 3.0, 9.0], [2, 2, 0], FLOORS, concurrency=1)
    assert got["overhead_by_class"]["scores_cached"] == {
        "requests": 2,
        "p50_ms": 2.5,
        "p99_ms": 2.99,
        "floor_ms": 1.0,
        "ratio": 2.5,
    }
    assert got["overhead_ratio"] == 2.25  # ratios 2, 3 and 2.25


def test_percentiles_per_step() -> None:
    timings = [{"rerank": float(v), "total": float(v) + 1} for v in range(1, 101)]
    timings.append({"total": 500.0})  # a fallback answer has no rerank step
    got = _percentiles(timings)
    assert got["rerank"] == {"p50": 50.5, "p95": 95.05, "p99": 99.01}
    assert got["total"]["p99"] > got["total"]["p95"] > got["total"]["p50"] == 52.0


def test_the_transport_ratio_adds_the_round_trip_to_each_requests_floors() -> None:
    floors = {"stages_ms": {**FLOORS["stages_ms"], "grpc_roundtrip": 1.0}}
    # Floors 4 (cached) and 9 (user pass), each + 1 ms of transport: 6/5, 10/5, 15/10.
    got = _overhead([6.0, 10.0, 15.0], [0, 0, 1], floors, concurrency=1)
    assert got["overhead_ratio_with_transport"] == 1.5
    assert got["overhead_ratio"] == 1.67  # 1.5, 2.5, 1.67 against the three floors


def test_beyond_the_model_is_each_call_minus_its_own_forward_passes() -> None:
    latencies = [10.0, 6.0, 5.0, 7.0, 2.0, 40.0]
    classes = [1, 0, 0, 0, 2, -1]  # the fallback (-1) is left out
    forward = [7.0, 3.0, 3.5, 3.0, 0.0, 0.0]

    got = _beyond_model(latencies, classes, forward, concurrency=1)

    # Per call 3, 3, 1.5, 4, 2: median 3.
    assert got["beyond_model_ms"] == 3.0
    assert got["beyond_model_by_class"] == {
        "user_pass": 3.0,
        "user_cached": 3.0,
        "scores_cached": 2.0,
    }
    # Above concurrency 1 another call's forward pass lands between a call's two reads.
    assert _beyond_model(latencies, classes, forward, concurrency=2)["beyond_model_ms"] is None
    assert _beyond_model([5.0], [-1], [0.0], concurrency=1)["beyond_model_ms"] is None


def test_outside_the_pipeline_is_each_call_minus_its_own_pipeline_total() -> None:
    latencies = [10.0, 6.0, 9.0, 7.5]
    pipeline = [8.5, 5.0, 7.0, 6.0]  # per call 1.5, 1.0, 2.0, 1.5: median 1.5

    assert _outside_pipeline(latencies, pipeline, concurrency=1) == 1.5
    # Calls overlap above one client; a failed call leaves the two lists unpaired.
    assert _outside_pipeline(latencies, pipeline, concurrency=8) is None
    assert _outside_pipeline(latencies, pipeline[:3], concurrency=1) is None
    assert _outside_pipeline([], [], concurrency=1) is None


def test_service_cpu_per_call_leaves_out_the_client_threads() -> None:
    # 3 s of process CPU over 2 s, 1 s of it in the client threads, 500 calls.
    got = _cpu_per_call(3.0, 1.0, 500, 2.0)

    assert got == {
        "service_cpu_ms_per_call": 4.0,
        "client_cpu_ms_per_call": 2.0,
        "service_cores_busy": 1.0,
    }
    assert _cpu_per_call(3.0, 1.0, 0, 2.0)["service_cpu_ms_per_call"] is None
