"""The re-ranker cache gauges read the serving re-ranker's counters at scrape time."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client import REGISTRY

from services.common import metrics


def test_cache_gauges_follow_the_current_reranker() -> None:
    reranker = SimpleNamespace(
        user_cache_hits=1,
        user_cache_misses=3,
        score_cache_hits=3,
        score_cache_misses=1,
        cached_items=lambda: 42,
        item_state_bytes=lambda: 3 * 2**20,
        item_states_read=7,
    )
    metrics.watch_reranker_caches(lambda: reranker)

    assert REGISTRY.get_sample_value("freshrec_user_state_cache_hit_rate") == 0.25
    assert REGISTRY.get_sample_value("freshrec_score_cache_hit_rate") == 0.75
    assert REGISTRY.get_sample_value("freshrec_item_states_cached") == 42.0
    assert REGISTRY.get_sample_value("freshrec_item_state_bytes") == 3 * 2**20
    assert REGISTRY.get_sample_value("freshrec_item_states_read") == 7.0
    reranker.score_cache_hits = 0  # read at scrape time, not when watched
    assert REGISTRY.get_sample_value("freshrec_score_cache_hit_rate") == 0.0
