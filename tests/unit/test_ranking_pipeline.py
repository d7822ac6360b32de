"""Unit tests of the ranking pipeline (in-memory features, tiny re-ranker, small FAISS index)
and of the ModelHolder against a real registry in tmp_path."""

from __future__ import annotations

import contextlib
import copy
import json
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY

from freshrec.errors import FailedPrecondition, FeatureStoreUnavailable, InvalidArgument
from freshrec.records import ItemFeatures, UserProfile
from model.artifacts import Manifest
from model.embeddings import user_vector
from model.index import RecallIndex
from model.reranker import CrossEncoderReranker
from services.features.reader import InMemoryFeatureStore
from services.ranking.models import ModelHolder
from services.ranking.pipeline import (
    MAX_EXCLUDE,
    STAGE_EXPLORATION,
    STAGE_FALLBACK,
    STAGE_RECALL,
    PipelineSettings,
    RankingPipeline,
    RecommendInput,
    ServingModels,
)
from services.registry import ModelRegistry

CATEGORIES = ("shoes", "coffee", "books")
N_ITEMS = 30
ITEMS = [
    ItemFeatures(
        f"i{n:02d}",
        title=f"Product {n}",
        text=f"A fine {CATEGORIES[n % 3]} product number {n}.",
        category=CATEGORIES[n % 3],
        brand="Acme",
        in_stock=n != 5,
    )
    for n in range(N_ITEMS)
]
OUT_OF_STOCK = "i05"
POPULAR = [f"i{n:02d}" for n in (7, 5, 3, 1, 0, 2, 4, 6, 8, 9, 10, 11)]
USER = UserProfile(
    "u1",
    recent_items=("i00", "i03"),
    recent_text="Product 0 | Product 3",
    top_categories=("shoes",),
    category_scores=(1.0,),
    purchased_items=("i06", "i09"),
    events_total=4,
)


def _index(seed: int = 0) -> RecallIndex:
    rows = np.random.default_rng(seed).normal(size=(N_ITEMS, 16)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return RecallIndex.build(rows, [i.item_id for i in ITEMS], POPULAR)


@pytest.fixture(scope="module")
def recall_index() -> RecallIndex:
    return _index()


@pytest.fixture
def models(tiny_reranker: CrossEncoderReranker, recall_index: RecallIndex) -> ServingModels:
    return ServingModels(tiny_reranker, "v0001", recall_index, "v0001")


def _pipeline(store: object | None = None, **settings: object) -> RankingPipeline:
    base = {"exploration_rate": 0.0}
    return RankingPipeline(
        store or InMemoryFeatureStore([USER], ITEMS),  # type: ignore[arg-type]
        PipelineSettings(**{**base, **settings}),  # type: ignore[arg-type]
    )


# -- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"k": 0}, "k"),
        ({"k": 101}, "k"),
        ({"k": -3}, "k"),
        ({"user_id": ""}, "user_id"),
        ({"user_id": "   "}, "user_id"),
        ({"user_id": "u" * 129}, "user_id"),
        ({"exclude_item_ids": tuple(f"x{n}" for n in range(MAX_EXCLUDE + 1))}, "exclude_item_ids"),
        ({"exclude_item_ids": ("",)}, "exclude_item_ids"),
        ({"query": "q" * 513}, "query"),
        ({"context": {f"k{n}": "v" for n in range(33)}}, "context"),
        ({"context": {"page": "p" * 257}}, "context"),
        ({"request_id": "r" * 129}, "request_id"),
    ],
)
def test_invalid_requests_name_the_field(
    models: ServingModels, request_fields: dict[str, object], field: str
) -> None:
    req = RecommendInput(**{"user_id": "u1", "k": 5, **request_fields})  # type: ignore[arg-type]

    with pytest.raises(InvalidArgument) as info:
        _pipeline().recommend(req, models)

    assert str(info.value).startswith(field)


def test_limits_themselves_are_accepted(models: ServingModels) -> None:
    req = RecommendInput(
        "u" * 128, 100, query="q" * 512, exclude_item_ids=tuple(f"x{n}" for n in range(1000))
    )
    result = _pipeline().recommend(req, models)
    assert result.cold_start  # an unknown (long) user id: answered, not refused


# -- cold start and known users -------------------------------------------------------------


def test_unknown_user_gets_popular_items_flagged_cold_start(models: ServingModels) -> None:
    result = _pipeline().recommend(RecommendInput("stranger", 4), models)

    assert result.cold_start and not result.degraded
    assert all(s.stage == STAGE_FALLBACK for s in result.items)
    # Popularity order, the out-of-stock item skipped.
    assert [s.item_id for s in result.items] == ["i07", "i03", "i01", "i00"]
    assert [s.score for s in result.items] == sorted((s.score for s in result.items), reverse=True)
    assert (result.model_version, result.index_version) == ("v0001", "v0001")
    assert result.items[0].title == "Product 7"


def test_known_user_excludes_recent_purchased_requested_and_out_of_stock(
    models: ServingModels,
) -> None:
    req = RecommendInput("u1", 20, exclude_item_ids=("i01", "i02"))

    result = _pipeline().recommend(req, models)

    ids = [s.item_id for s in result.items]
    assert not result.cold_start and not result.degraded
    assert len(ids) == 20 == len(set(ids))
    forbidden = {"i00", "i03", "i06", "i09", "i01", "i02", OUT_OF_STOCK}
    assert not forbidden & set(ids)
    assert all(s.stage == STAGE_RECALL for s in result.items)
    assert all(0.0 <= s.relevance <= 1.0 for s in result.items)
    assert [s.score for s in result.items] == sorted((s.score for s in result.items), reverse=True)
    assert "rerank" in result.timings_ms and "total" in result.timings_ms


def test_scores_come_from_the_reranker(models: ServingModels) -> None:
    from model.text import ranking_item_text, user_context_text

    pipeline = _pipeline()
    result = pipeline.recommend(RecommendInput("u1", 5), models)

    by_id = {i.item_id: i for i in ITEMS}
    now = pipeline.now()
    expected = models.reranker.score(
        user_context_text(USER), [ranking_item_text(by_id[s.item_id], now) for s in result.items]
    )
    np.testing.assert_allclose([s.relevance for s in result.items], expected, rtol=1e-6)


def test_purchased_items_are_allowed_when_the_setting_is_off(models: ServingModels) -> None:
    result = _pipeline(exclude_purchased=False).recommend(RecommendInput("u1", 26), models)

    ids = {s.item_id for s in result.items}
    assert {"i06", "i09"} <= ids
    assert not {"i00", "i03", OUT_OF_STOCK} & ids


def test_category_weights_filter_and_multiply(models: ServingModels) -> None:
    pipeline = _pipeline(category_weights={"books": 0.0, "coffee": 2.0})

    result = pipeline.recommend(RecommendInput("u1", 10), models)

    assert result.items
    assert all(s.category != "books" for s in result.items)
    for s in result.items:
        expected_w = 2.0 if s.category == "coffee" else 1.0
        assert s.business_weight == expected_w
        assert s.score == pytest.approx(s.relevance * expected_w)
    assert any(s.category == "coffee" for s in result.items)
    # Doubling puts every coffee item (relevance ~0.5, score ~1) ahead of the shoes.
    cats = [s.category for s in result.items]
    assert cats == sorted(cats, key=lambda c: c != "coffee")


def test_apply_weights_orders_by_score_keeping_ties_in_candidate_order() -> None:
    pipeline = _pipeline(category_weights={"books": 0.0, "coffee": 2.0})
    candidates = ITEMS[:9]  # shoes, coffee, books, shoes, ...
    relevance = np.array([0.3, 0.2, 0.9, 0.4, 0.15, 0.8, 0.3, 0.1, 0.7], dtype=np.float32)

    ranked = pipeline.apply_weights(candidates, relevance, STAGE_RECALL)

    # Reference: the definition, with Python's stable sort.
    weights = {"books": 0.0, "coffee": 2.0}
    want = sorted(
        (
            (float(r) * weights.get(c.category, 1.0), c.item_id)
            for c, r in zip(candidates, relevance, strict=True)
            if weights.get(c.category, 1.0) > 0
        ),
        key=lambda pair: pair[0],
        reverse=True,
    )
    assert [(s.score, s.item_id) for s in ranked] == want
    # i00 (shoes 0.3) and i04 (coffee 0.15 × 2) tie at 0.3: candidate order decides.
    ids = [s.item_id for s in ranked]
    assert ids.index("i00") < ids.index("i04")
    assert all(s.category != "books" for s in ranked)
    assert [s.relevance for s in ranked] == [float(relevance[int(s.item_id[1:])]) for s in ranked]
    limited = pipeline.apply_weights(candidates, relevance, STAGE_RECALL, limit=3)
    assert limited == ranked[:3]


def test_a_zero_weight_category_never_appears_in_any_stage(models: ServingModels) -> None:
    pipeline = _pipeline(category_weights={"coffee": 0.0}, exploration_rate=1.0)

    for n in range(20):
        known = pipeline.recommend(RecommendInput("u1", 15, request_id=f"r{n}"), models)
        cold = pipeline.recommend(RecommendInput("nobody", 5, request_id=f"r{n}"), models)
        assert all(s.category != "coffee" for s in known.items + cold.items), n


def test_exploration_slot_appears_at_rate_one(models: ServingModels) -> None:
    pipeline = _pipeline(exploration_rate=1.0, exploration_slots=1)

    # Every answer carries its slot, also when an item drawn for it is out of stock (i05).
    for n in range(40):
        result = pipeline.recommend(RecommendInput("u1", 5, request_id=f"req-{n}"), models)
        stages = [s.stage for s in result.items]
        assert len(result.items) == 5
        assert stages[:-1] == [STAGE_RECALL] * 4 and stages[-1] == STAGE_EXPLORATION
        explored = result.items[-1]
        assert explored.item_id not in {"i00", "i03", "i06", "i09", OUT_OF_STOCK}
        assert explored.item_id not in {s.item_id for s in result.items[:-1]}
        assert explored.score == 0.0


def test_exploration_never_happens_at_rate_zero_or_with_k_one(models: ServingModels) -> None:
    never = _pipeline(exploration_rate=0.0)
    single = _pipeline(exploration_rate=1.0)

    for n in range(30):
        a = never.recommend(RecommendInput("u1", 5, request_id=f"req-{n}"), models)
        b = single.recommend(RecommendInput("u1", 1, request_id=f"req-{n}"), models)
        assert all(s.stage != STAGE_EXPLORATION for s in a.items + b.items)


def test_exploration_happens_at_about_its_rate_and_varies_the_drawn_items(
    models: ServingModels,
) -> None:
    pipeline = _pipeline(exploration_rate=0.3, exploration_slots=1)

    drawn = []
    for n in range(400):
        result = pipeline.recommend(RecommendInput("u1", 5, request_id=f"req-{n}"), models)
        if result.items[-1].stage == STAGE_EXPLORATION:
            drawn.append(result.items[-1].item_id)
    # Binomial(400, 0.3): mean 120, sd 9.2; 85..155 is ~3.8 sd either side.
    assert 85 <= len(drawn) <= 155
    assert len(set(drawn)) > 3  # the slot's item is drawn per request, not fixed


def test_the_same_request_id_gives_the_same_answer(models: ServingModels) -> None:
    pipeline = _pipeline(exploration_rate=0.5, exploration_slots=2)
    req = RecommendInput("u1", 6, request_id="replay-me")

    first = pipeline.recommend(req, models)
    again = pipeline.recommend(req, models)

    assert [s.item_id for s in first.items] == [s.item_id for s in again.items]


def test_thin_recall_is_topped_up_with_popular_items(models: ServingModels) -> None:
    store = InMemoryFeatureStore([USER], ITEMS[:12])  # the store knows only 12 items
    result = _pipeline(store).recommend(RecommendInput("u1", 10), models)

    ids = [s.item_id for s in result.items]
    assert len(ids) == len(set(ids))
    assert {s.stage for s in result.items} <= {STAGE_RECALL, STAGE_FALLBACK}
    recalled = [s for s in result.items if s.stage == STAGE_RECALL]
    assert all(int(s.item_id[1:]) < 12 for s in recalled)
    assert not {"i00", "i03", "i06", "i09", OUT_OF_STOCK} & set(ids)


# -- a failing feature store ----------------------------------------------------------------


class _Failing(InMemoryFeatureStore):
    def __init__(self, fail_profiles: bool, fail_items: bool) -> None:
        super().__init__([USER], ITEMS)
        self.fail_profiles, self.fail_items = fail_profiles, fail_items

    def get_user_profile(self, user_id: str) -> UserProfile | None:
        if self.fail_profiles:
            raise FeatureStoreUnavailable("redis: connection refused")
        return super().get_user_profile(user_id)

    def get_items(self, item_ids: Sequence[str]) -> dict[str, ItemFeatures]:
        if self.fail_items:
            raise FeatureStoreUnavailable("redis: connection refused")
        return super().get_items(item_ids)


@pytest.mark.parametrize("items_fail_too", [False, True])
def test_profile_store_down_degrades_to_popular_items(
    models: ServingModels, items_fail_too: bool
) -> None:
    pipeline = _pipeline(_Failing(fail_profiles=True, fail_items=items_fail_too))

    result = pipeline.recommend(RecommendInput("u1", 3), models)

    assert result.degraded
    assert result.degraded_reason.startswith("user profile unavailable")
    assert "connection refused" in result.degraded_reason
    assert not result.cold_start
    assert len(result.items) == 3
    assert all(s.stage == STAGE_FALLBACK for s in result.items)


def test_item_store_down_degrades_to_recall_order(models: ServingModels) -> None:
    pipeline = _pipeline(_Failing(fail_profiles=False, fail_items=True))

    result = pipeline.recommend(RecommendInput("u1", 4), models)

    assert result.degraded
    assert result.degraded_reason.startswith("item features unavailable")
    assert len(result.items) == 4
    assert all(s.stage == STAGE_RECALL for s in result.items)
    assert not {"i00", "i03", "i06", "i09"} & {s.item_id for s in result.items}


# -- ModelHolder against a real registry ----------------------------------------------------


def _publish_reranker(registry: ModelRegistry, reranker: CrossEncoderReranker) -> str:
    staging = registry.staging_dir("reranker")
    reranker.save(staging)
    return registry.publish("reranker", staging, Manifest(kind="reranker", version="")).version


def _publish_index(registry: ModelRegistry, index: RecallIndex) -> str:
    staging = registry.staging_dir("index")
    index.save(staging)
    return registry.publish("index", staging, Manifest(kind="index", version="")).version


def _loader(path: str) -> CrossEncoderReranker:
    return CrossEncoderReranker.from_pretrained(path, max_length=32, device="cpu")


@pytest.fixture
def registry(
    tmp_path: Path, tiny_reranker: CrossEncoderReranker, recall_index: RecallIndex
) -> ModelRegistry:
    registry = ModelRegistry(tmp_path / "registry")
    registry.promote("reranker", _publish_reranker(registry, tiny_reranker))
    registry.promote("index", _publish_index(registry, recall_index))
    return registry


def _different_reranker(base: CrossEncoderReranker) -> CrossEncoderReranker:
    other = copy.deepcopy(base)
    with torch.no_grad():
        other.model.classifier.bias += 1.0  # a visibly different model
    return other


def _loads(kind: str, outcome: str) -> float:
    labels = {"kind": kind, "outcome": outcome}
    return REGISTRY.get_sample_value("freshrec_model_loads_total", labels) or 0.0


def _load_started(kind: str) -> float:
    return REGISTRY.get_sample_value("freshrec_model_load_started_seconds", {"kind": kind}) or 0.0


def test_holder_without_a_champion_is_not_ready(tmp_path: Path) -> None:
    holder = ModelHolder(ModelRegistry(tmp_path / "empty"), _loader)

    assert holder.refresh() is False
    assert not holder.ready
    with pytest.raises(FailedPrecondition):
        _ = holder.current


def test_holder_loads_the_champions(
    registry: ModelRegistry, tiny_reranker: CrossEncoderReranker
) -> None:
    swaps: list[ServingModels] = []
    holder = ModelHolder(registry, _loader, on_swap=swaps.append)

    assert holder.refresh() is True

    current = holder.current
    assert (current.model_version, current.index_version) == ("v0001", "v0001")
    assert swaps == [current]
    np.testing.assert_array_equal(
        current.reranker.score("likes: shoes.", ["Product 1", "Product 2"]),
        tiny_reranker.score("likes: shoes.", ["Product 1", "Product 2"]),
    )
    assert holder.refresh() is False  # nothing changed
    assert holder.current is current


def test_holder_loads_on_a_thread_that_ends_with_the_load(
    registry: ModelRegistry, tiny_reranker: CrossEncoderReranker
) -> None:
    """Loading and warming a version runs torch; on a passing thread its OpenMP team goes
    with it, and the holder's long-lived poll thread never holds one (compute.py)."""
    threads: list[threading.Thread] = []

    def loader(path: str) -> CrossEncoderReranker:
        threads.append(threading.current_thread())
        return _loader(path)

    holder = ModelHolder(registry, loader)
    assert holder.refresh() is True
    registry.promote("reranker", _publish_reranker(registry, _different_reranker(tiny_reranker)))
    assert holder.refresh() is True

    assert len(threads) == 2
    assert all(t is not threading.current_thread() and not t.is_alive() for t in threads)


def test_later_versions_load_below_the_serving_threads_and_reuse_the_tokenizer(
    registry: ModelRegistry, tiny_reranker: CrossEncoderReranker
) -> None:
    """The first load (start-up) runs at the caller's priority; the watcher verifies, loads
    and warms later ones `load_nice` levels lower (Linux: the nice value is per thread, and
    the passing thread a load runs on inherits the watcher's). A version read from the same
    tokenizer files takes the serving version's tokenizer instead of reading it again."""
    import os

    def nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    seen: list[int] = []
    loaded = threading.Event()

    def loader(path: str) -> CrossEncoderReranker:
        seen.append(nice())
        live = holder.current.reranker if holder.ready else None
        reranker = CrossEncoderReranker.from_pretrained(
            path, max_length=32, device="cpu", tokenizer_of=live
        )
        if live is not None:
            loaded.set()
        return reranker

    swapped = threading.Event()
    mine = nice()
    holder = ModelHolder(
        registry,
        loader,
        poll_seconds=0.02,
        on_swap=lambda models: swapped.set() if models.model_version == "v0002" else None,
        load_nice=3,
    )
    holder.start()
    try:
        first = holder.current.reranker
        first.score("likes: shoes.", ["Product 1", "Product 2"])  # token ids cached
        registry.promote(
            "reranker", _publish_reranker(registry, _different_reranker(tiny_reranker))
        )
        assert loaded.wait(timeout=30)
        assert swapped.wait(timeout=30)  # the swap follows the load
        assert holder.current.model_version == "v0002"
    finally:
        holder.stop()
    assert seen == [mine, min(19, mine + 3)]
    assert nice() == mine  # the caller's own thread is left as it was
    second = holder.current.reranker
    assert second.tokenizer is first.tokenizer and second.tokenizer_digest
    # The token ids come with it: a load that computes item states tokenises nothing the
    # serving version already did.
    assert second._token_cache is first._token_cache and first._token_cache
    np.testing.assert_allclose(
        second.score("u", ["a", "b"]),
        _different_reranker(tiny_reranker).score("u", ["a", "b"]),
        rtol=1e-6,
    )


def test_a_version_with_other_tokenizer_files_reads_its_own(
    tmp_path: Path, tiny_reranker: CrossEncoderReranker
) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    tiny_reranker.save(first)
    tiny_reranker.save(second)
    serving = CrossEncoderReranker.from_pretrained(first, max_length=32, device="cpu")
    same = CrossEncoderReranker.from_pretrained(
        second, max_length=32, device="cpu", tokenizer_of=serving
    )
    assert same.tokenizer is serving.tokenizer
    config = second / "tokenizer_config.json"
    # How the files were found is not how text is tokenised: the updater loads offline, and
    # transformers saves that as "local_files_only": true.
    settings = json.loads(config.read_text())
    settings["local_files_only"] = not settings.get("local_files_only", False)
    config.write_text(json.dumps(settings, indent=2))
    offline = CrossEncoderReranker.from_pretrained(
        second, max_length=32, device="cpu", tokenizer_of=serving
    )
    assert offline.tokenizer is serving.tokenizer
    config.write_text(config.read_text().replace('"do_lower_case": true', '"do_lower_case": false'))
    other = CrossEncoderReranker.from_pretrained(
        second, max_length=32, device="cpu", tokenizer_of=serving
    )
    assert other.tokenizer is not serving.tokenizer
    assert other.tokenizer("Shoes")["input_ids"] != serving.tokenizer("Shoes")["input_ids"]
    assert other._token_cache is not serving._token_cache


def test_holder_swaps_on_promote(
    registry: ModelRegistry, tiny_reranker: CrossEncoderReranker
) -> None:
    holder = ModelHolder(registry, _loader)
    holder.refresh()
    old = holder.current
    new_model = _different_reranker(tiny_reranker)
    registry.promote("reranker", _publish_reranker(registry, new_model))

    assert holder.refresh() is True

    assert holder.current.model_version == "v0002"
    assert holder.current.index is old.index  # the unchanged index is reused, not reloaded
    np.testing.assert_allclose(
        holder.current.reranker.score("u", ["a", "b"]), new_model.score("u", ["a", "b"]), rtol=1e-6
    )
    # The old snapshot is untouched: a request holding it finishes on v0001.
    assert old.model_version == "v0001"
    registry.rollback("reranker")
    assert holder.refresh() is True
    assert holder.current.model_version == "v0001"


def test_a_released_version_is_freed_by_reference_counting_with_the_heap_frozen(
    registry: ModelRegistry, tiny_reranker: CrossEncoderReranker
) -> None:
    """The ranking service freezes its objects out of the garbage collector
    (services/common/heap.py); a frozen object in a reference cycle would never be freed. A
    swapped-out version must go by reference counting alone, with no collection at all."""
    import gc
    import weakref

    from services.common.heap import freeze_heap

    holder = ModelHolder(registry, _loader, on_swap=lambda _: freeze_heap())
    holder.refresh()
    old = weakref.ref(holder.current.reranker)
    old_model = weakref.ref(holder.current.reranker.model)
    old_index = weakref.ref(holder.current.index)
    registry.promote("reranker", _publish_reranker(registry, _different_reranker(tiny_reranker)))
    registry.promote("index", _publish_index(registry, _index(seed=1)))
    gc.disable()
    try:
        assert holder.refresh() is True
        # Kept until the watcher lets it go (`release_retired`), then freed at once.
        assert old() is not None
        assert holder.release_retired(older_than=0) == 1
        assert old() is None and old_model() is None and old_index() is None
    finally:
        gc.enable()
        gc.unfreeze()


def test_a_swapped_out_version_is_freed_on_the_watcher_s_thread_not_a_request_s(
    registry: ModelRegistry, tiny_reranker: CrossEncoderReranker
) -> None:
    """At 100k items freeing a version is ~0.3 s of work: on the request thread that last held
    it, that call and the ones beside it waited (stop 34). The watcher keeps a swapped-out
    version past the requests that took it and lets it go on its own thread, at `load_nice`."""
    import weakref

    holder = ModelHolder(registry, _loader, poll_seconds=0.05, retire_after=2.0)
    holder.start()
    try:
        request_snapshot = holder.current  # a request in flight at the swap
        freed_on: list[str] = []
        weakref.finalize(
            request_snapshot.reranker, lambda: freed_on.append(threading.current_thread().name)
        )
        registry.promote(
            "reranker", _publish_reranker(registry, _different_reranker(tiny_reranker))
        )
        deadline = time.monotonic() + 30
        while holder.current.model_version != "v0002" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert holder.current.model_version == "v0002"
        del request_snapshot  # the request ends; the holder still keeps the version
        assert freed_on == []
        while not freed_on and time.monotonic() < deadline:
            time.sleep(0.01)
        assert freed_on == ["model-watcher"]
    finally:
        holder.stop()


def test_a_new_load_does_not_wait_beside_a_retired_version(
    registry: ModelRegistry, tiny_reranker: CrossEncoderReranker
) -> None:
    """Two promotions within `retire_after`: the first swapped-out version must not stay in
    memory while the third loads (three versions' item states at once)."""
    import weakref

    holder = ModelHolder(registry, _loader, retire_after=3600)
    holder.refresh()
    first = weakref.ref(holder.current.reranker)
    registry.promote("reranker", _publish_reranker(registry, _different_reranker(tiny_reranker)))
    assert holder.refresh() is True
    assert first() is not None  # retired, kept

    def loader(path: str) -> CrossEncoderReranker:
        assert first() is None, "the retired version was still held during the load"
        return _loader(path)

    holder.load_reranker = loader
    registry.promote("reranker", _publish_reranker(registry, tiny_reranker))
    assert holder.refresh() is True
    assert holder.current.model_version == "v0003"


def test_holder_swaps_a_new_index(registry: ModelRegistry) -> None:
    holder = ModelHolder(registry, _loader)
    holder.refresh()
    registry.promote("index", _publish_index(registry, _index(seed=1)))

    assert holder.refresh() is True
    assert (holder.current.model_version, holder.current.index_version) == ("v0001", "v0002")


def test_a_rebuilt_index_drops_the_changes_it_folds_in_and_keeps_the_later_ones(
    registry: ModelRegistry,
) -> None:
    holder = ModelHolder(registry, _loader)
    holder.refresh()
    rewinds: list[str] = []
    holder.rewind_catalog = rewinds.append
    base = holder.current.index
    vectors = _index(seed=2).vectors_of(["i01", "i03", "i04"])
    holder.apply_catalog({"new-a": vectors[0]}, {"i02"}, {"new-a": "10-0", "i02": "11-0"})
    holder.apply_catalog({"new-b": vectors[1]}, set(), {"new-b": "12-0"})
    before = holder.current.index
    assert {"new-a", "new-b"} <= set(before.overlay_ids) and "i02" not in before

    # What `freshrec index-rebuild` publishes: the changes up to 11-0 folded into the base.
    rebuilt = base.with_changes({"new-a": vectors[0]}, {"i02"}).compacted("11-0")
    registry.promote("index", _publish_index(registry, rebuilt))
    assert holder.refresh() is True
    after = holder.current.index
    assert after.catalog_position == "11-0"
    assert after.overlay_ids == ("new-b",) and after.removed == frozenset()
    assert "new-a" in after and "i02" not in after  # from the base now

    # A change the base already holds (a follower behind the rebuild) is not applied again;
    # a newer one is.
    holder.apply_catalog({"new-c": vectors[2]}, {"i05"}, {"new-c": "9-0", "i05": "13-0"})
    assert "new-c" not in holder.current.index and "i05" not in holder.current.index
    assert holder.current.index.overlay_ids == ("new-b",)
    assert rewinds == []


def test_a_rollback_to_an_older_index_follows_the_stream_again_from_its_position(
    registry: ModelRegistry,
) -> None:
    holder = ModelHolder(registry, _loader)
    holder.refresh()
    old_version = holder.current.index_version
    vector = _index(seed=2).vectors_of(["i01"])[0]
    holder.apply_catalog({"new-a": vector}, set(), {"new-a": "10-0"})
    rebuilt = holder.current.index.with_changes({}, ()).compacted("10-0")
    registry.promote("index", _publish_index(registry, rebuilt))
    holder.refresh()
    holder.apply_catalog({}, {"i03"}, {"i03": "12-0"})
    rewinds: list[str] = []
    holder.rewind_catalog = rewinds.append

    registry.promote("index", old_version, reason="rollback")
    assert holder.refresh() is True
    # Its base folds nothing in: every change since the start of the stream is applied again
    # (the follower re-reads them), and none kept from the rebuilt base leaks into it.
    assert rewinds == ["0"]
    assert holder.current.index.catalog_position == "0"
    assert "new-a" not in holder.current.index and "i03" in holder.current.index
    holder.apply_catalog({"new-a": vector}, set(), {"new-a": "10-0"})
    holder.apply_catalog({}, {"i03"}, {"i03": "12-0"})
    assert "new-a" in holder.current.index and "i03" not in holder.current.index


def test_catalogue_changes_reach_recall_while_a_version_loads(
    registry: ModelRegistry, tiny_reranker: CrossEncoderReranker
) -> None:
    """A load can take minutes (item states computed at a low priority); the catalogue
    follower must not wait for it. A change applied during the load serves at once on the old
    version and is carried into the new one, index and all."""
    release = threading.Event()
    loading = threading.Event()

    def loader(path: str) -> CrossEncoderReranker:
        if holder.ready:
            loading.set()
            assert release.wait(timeout=30)
        return _loader(path)

    holder = ModelHolder(registry, loader)
    holder.refresh()
    registry.promote("reranker", _publish_reranker(registry, _different_reranker(tiny_reranker)))
    registry.promote("index", _publish_index(registry, _index(seed=1)))
    loads_before = _loads("reranker", "ok"), _loads("index", "ok")
    refreshed: list[bool] = []
    refresher = threading.Thread(target=lambda: refreshed.append(holder.refresh()))
    refresher.start()
    try:
        assert loading.wait(timeout=30)
        vector = _index(seed=2).vectors_of(["i01"])[0]
        applier = threading.Thread(
            target=holder.apply_catalog, args=({"new-item": vector}, {"i02"})
        )
        applier.start()
        applier.join(timeout=10)
        assert not applier.is_alive(), "apply_catalog waited for the model load"
        during = holder.current
        assert during.model_version == "v0001" and "new-item" in during.index
        assert "i02" not in during.index
        assert _load_started("reranker") > 0  # what an operator's alert reads
    finally:
        release.set()
        refresher.join(timeout=30)
    assert refreshed == [True]
    after = holder.current
    assert (after.model_version, after.index_version) == ("v0002", "v0002")
    assert "new-item" in after.index and "i02" not in after.index
    assert "new-item" in [hit for hit, _ in after.index.search(vector, 5)]
    assert _load_started("reranker") == 0
    assert (_loads("reranker", "ok"), _loads("index", "ok")) == (
        loads_before[0] + 1,
        loads_before[1] + 1,
    )


def test_holder_refuses_a_corrupt_version_and_keeps_serving(
    registry: ModelRegistry, tiny_reranker: CrossEncoderReranker
) -> None:
    holder = ModelHolder(registry, _loader)
    holder.refresh()
    serving = holder.current
    bad = _publish_reranker(registry, _different_reranker(tiny_reranker))
    weights = registry.path("reranker", bad) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    registry._set_champion("reranker", bad, "promote", "bypass verification")
    refused = _loads("reranker", "refused")

    assert holder.refresh() is False
    assert holder.refresh() is False  # refused once, not re-hashed on every poll
    assert _loads("reranker", "refused") == refused + 1
    assert _load_started("reranker") == 0

    assert holder.current is serving
    assert len(holder.refusals) == 1
    refusal = holder.refusals[0]
    assert (refusal.kind, refusal.version) == ("reranker", bad)
    assert "model.safetensors" in refusal.reason
    # Recovery: a good version promoted afterwards is picked up.
    registry.promote("reranker", _publish_reranker(registry, tiny_reranker))
    assert holder.refresh() is True
    assert holder.current.model_version == "v0003"


def test_a_registry_that_cannot_be_read_is_retried_not_refused(
    registry: ModelRegistry, tiny_reranker: CrossEncoderReranker, monkeypatch: pytest.MonkeyPatch
) -> None:
    from freshrec.errors import Unavailable

    holder = ModelHolder(registry, _loader)
    holder.refresh()
    registry.promote("reranker", _publish_reranker(registry, _different_reranker(tiny_reranker)))
    verify = registry.verify
    failed = _loads("reranker", "failed")

    def unreachable(kind: str, version: str) -> Manifest:
        raise Unavailable("object store: connection reset")

    monkeypatch.setattr(registry, "verify", unreachable)
    with pytest.raises(Unavailable):
        holder.refresh()  # the watcher logs it and polls again
    assert _loads("reranker", "failed") == failed + 1
    assert _load_started("reranker") == 0 and not holder.refusals
    monkeypatch.setattr(registry, "verify", verify)
    assert holder.refresh() is True
    assert holder.current.model_version == "v0002"


def test_a_load_runs_in_the_load_scope_from_the_first_load_to_after_the_swap(
    registry: ModelRegistry, tiny_reranker: CrossEncoderReranker
) -> None:
    """The server passes `heap.full_collections_deferred`: the load's objects are frozen after
    the swap (`on_swap`), so the scope must cover the load and the freeze, refusals included."""
    events: list[str] = []

    @contextlib.contextmanager
    def scope() -> Iterator[None]:
        events.append("enter")
        try:
            yield
        finally:
            events.append("exit")

    def loader(path: str) -> CrossEncoderReranker:
        events.append("load")
        return _loader(path)

    holder = ModelHolder(
        registry,
        loader,
        on_swap=lambda m: events.append(f"swap {m.model_version}"),
        load_scope=scope,
    )
    holder.refresh()
    assert events == ["enter", "load", "swap v0001", "exit"]
    assert holder.refresh() is False  # nothing to load: no scope
    assert len(events) == 4

    staging = registry.staging_dir("reranker")
    (staging / "config.json").write_text("{}")  # verifiable, but not a model
    registry.promote(
        "reranker",
        registry.publish("reranker", staging, Manifest(kind="reranker", version="")).version,
    )
    assert holder.refresh() is False
    assert events[4:] == ["enter", "load", "exit"]
    assert holder.current.model_version == "v0001"


def test_holder_refuses_a_version_that_does_not_load(
    registry: ModelRegistry, tiny_reranker: CrossEncoderReranker
) -> None:
    holder = ModelHolder(registry, _loader)
    holder.refresh()
    staging = registry.staging_dir("reranker")
    (staging / "config.json").write_text("{}")  # sealed, verifiable, but not a model
    version = registry.publish("reranker", staging, Manifest(kind="reranker", version="")).version
    registry.promote("reranker", version)

    assert holder.refresh() is False
    assert holder.current.model_version == "v0001"
    assert [r.version for r in holder.refusals] == [version]


def test_pipeline_answers_from_the_snapshot_it_was_given(
    registry: ModelRegistry, tiny_reranker: CrossEncoderReranker
) -> None:
    holder = ModelHolder(registry, _loader)
    holder.refresh()
    snapshot = holder.current
    registry.promote("reranker", _publish_reranker(registry, _different_reranker(tiny_reranker)))
    holder.refresh()

    old = _pipeline().recommend(RecommendInput("u1", 3), snapshot)
    new = _pipeline().recommend(RecommendInput("u1", 3), holder.current)

    assert (old.model_version, new.model_version) == ("v0001", "v0002")
    # v0002's head adds 1 to every logit: each of its relevances is higher.
    assert min(s.relevance for s in new.items) > max(s.relevance for s in old.items)


# -- the second recall source: popular items beside FAISS ----------------------------------


def test_popular_candidates_join_faiss_after_it_in_popularity_order(
    models: ServingModels,
) -> None:
    pipeline = _pipeline(recall_candidates=5, popular_candidates=4)
    exclude = frozenset({"i07", "i00"})

    found = pipeline.recall_candidates(models, USER, None, exclude)

    faiss = models.index.search(user_vector(models.index.vectors_of(USER.recent_items)), 5, exclude)
    assert found[:5] == faiss
    extras = [i for i, _ in found[5:]]
    expected = [i for i in POPULAR if i not in exclude and i not in {i for i, _ in faiss}][:4]
    assert extras == expected and len(extras) == 4
    scores = [s for _, s in found]
    assert scores == sorted(scores, reverse=True)  # recall order keeps FAISS first


def test_popular_candidates_off_means_faiss_only(models: ServingModels) -> None:
    pipeline = _pipeline(recall_candidates=5, popular_candidates=0)

    assert len(pipeline.recall_candidates(models, USER, None, frozenset())) == 5


def test_popular_candidates_are_reranked_and_filtered_like_the_rest(
    models: ServingModels,
) -> None:
    result = _pipeline(recall_candidates=3, popular_candidates=6).recommend(
        RecommendInput("u1", 7), models
    )

    ids = [s.item_id for s in result.items]
    assert all(s.stage == STAGE_RECALL for s in result.items)  # re-ranked, not a fallback
    assert OUT_OF_STOCK not in ids  # i05 is popular but out of stock
    assert not {"i00", "i03", "i06", "i09"} & set(ids)  # recent and purchased
