"""The pieces of `freshrec bench recall`: simulated queries, exact truth, recall@k."""

from __future__ import annotations

import numpy as np
import pandas as pd

from freshrec.bench_recall import (
    catalogue_changes,
    exact_top_k,
    measure_changes,
    measure_search,
    tied_share,
    topical_queries,
)
from freshrec.data.synthetic import generate_catalogue, generate_shop
from model.index import RecallIndex


def _clustered(n: int, dim: int, clusters: int, seed: int) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    label = rng.integers(0, clusters, n)
    vectors = centres[label] + 0.5 * rng.standard_normal((n, dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype(np.float32), [f"c{c}" for c in label]


def test_generate_catalogue_is_the_shops_catalogue() -> None:
    shop = generate_shop(seed=3, n_items=50, n_users=5, days=5, events_per_user=5)
    pd.testing.assert_frame_equal(generate_catalogue(seed=3, n_items=50, days=5), shop.items)


def test_topical_queries_are_unit_vectors_of_one_or_two_categories() -> None:
    vectors, categories = _clustered(500, 16, 8, seed=1)
    queries = topical_queries(vectors, categories, 40, np.random.default_rng(0))
    assert len(queries) == 40
    for query, history in queries:
        assert abs(float(np.linalg.norm(query)) - 1.0) < 1e-5
        assert 1 <= len(history) <= 10 and len(set(history)) == len(history)
        assert 1 <= len({categories[p] for p in history}) <= 2


def test_exact_search_scores_one_and_excludes_the_history() -> None:
    vectors, categories = _clustered(800, 16, 8, seed=2)
    ids = [f"i{p}" for p in range(len(vectors))]
    queries = topical_queries(vectors, categories, 30, np.random.default_rng(1))
    truth = exact_top_k(vectors, queries, 20)
    for (query, history), exact in zip(queries, truth, strict=True):
        assert len(exact.positions) == 20 and not exact.positions & set(history)
        best = sorted(vectors @ query, reverse=True)
        assert exact.kth_score <= best[0]
    exact_index = RecallIndex.build(vectors, ids)
    result = measure_search(exact_index, ids, vectors, queries, truth, 20)
    assert result["recall@20"] == 1.0 and result["recall@20_ids"] == 1.0
    assert tied_share(truth) < 0.1  # no repeated vectors: ties are chance


def test_recall_forgives_ties_at_the_kth_score_and_the_ids_measure_does_not() -> None:
    """Every vector twice (repeated item texts embed identically): which copy exact search
    lists at the boundary is arbitrary, so an exact index may list the other one."""
    base, categories = _clustered(400, 16, 8, seed=4)
    vectors = np.concatenate([base, base])
    ids = [f"i{p}" for p in range(len(vectors))]
    queries = topical_queries(vectors, categories * 2, 30, np.random.default_rng(3))
    truth = exact_top_k(vectors, queries, 15)  # odd k: a pair is split at the boundary
    result = measure_search(RecallIndex.build(vectors, ids), ids, vectors, queries, truth, 15)
    assert result["recall@15"] == 1.0  # exact search is exact, ties or not
    assert result["recall@15_ids"] <= 1.0
    assert tied_share(truth) > 0.25


def test_hnsw_recall_is_measured_not_assumed() -> None:
    vectors, categories = _clustered(3000, 16, 10, seed=3)
    ids = [f"i{p}" for p in range(len(vectors))]
    queries = topical_queries(vectors, categories, 50, np.random.default_rng(2))
    truth = exact_top_k(vectors, queries, 50)
    hnsw = RecallIndex.build(vectors, ids, exact_limit=100)
    assert type(hnsw.index).__name__ == "IndexHNSWFlat"
    params = hnsw.index.hnsw  # type: ignore[attr-defined]
    params.efSearch = 1  # a starved search misses neighbours ...
    starved = measure_search(hnsw, ids, vectors, queries, truth, 50)["recall@50"]
    params.efSearch = 400  # ... a generous one finds almost all
    generous = measure_search(hnsw, ids, vectors, queries, truth, 50)
    assert 0.0 < starved < generous["recall@50"] <= 1.0
    assert generous["recall@50"] > 0.9
    assert generous["p99_ms"] >= generous["p50_ms"] > 0


def test_catalogue_changes_are_new_listings_edits_and_removals_of_real_vectors() -> None:
    vectors, _ = _clustered(400, 16, 8, seed=5)
    ids = [f"i{p}" for p in range(400)]
    upserts, removals = catalogue_changes(vectors, ids, 100, np.random.default_rng(0))
    new = {i for i in upserts if i not in set(ids)}
    edited = set(upserts) - new
    assert (len(new), len(edited), len(removals)) == (50, 25, 25)
    assert not edited & removals
    rows = {tuple(np.round(v, 6)) for v in vectors}
    assert all(tuple(np.round(v, 6)) in rows for v in upserts.values())


def test_changes_are_measured_against_exact_search_on_the_live_catalogue() -> None:
    vectors, categories = _clustered(600, 16, 8, seed=6)
    ids = [f"i{p}" for p in range(600)]
    queries = topical_queries(vectors, categories, 30, np.random.default_rng(4))
    exact = measure_changes(
        RecallIndex.build(vectors, ids), vectors, queries, 20, 200, np.random.default_rng(1)
    )
    assert (exact["changes"], exact["overlay_items"], exact["hidden_items"]) == (200, 150, 100)
    assert exact["live_items"] == 600 + 100 - 50
    # Exact search stays exact with the overlay and after the rebuild.
    assert exact["overlay"]["recall@20"] == exact["rebuilt"]["recall@20"] == 1.0
    hnsw = RecallIndex.build(vectors, ids, exact_limit=100)
    hnsw.index.hnsw.efSearch = 1  # type: ignore[attr-defined]
    starved = measure_changes(hnsw, vectors, queries, 20, 200, np.random.default_rng(1))
    # The rebuilt index is an HNSW index at the base's efSearch, as starved as the base was:
    # both recalls are measured, not assumed.
    assert 0.0 < starved["rebuilt"]["recall@20"] < 1.0
    assert 0.0 < starved["overlay"]["recall@20"] < 1.0
