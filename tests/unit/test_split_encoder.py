"""Unit tests of the split (PreTTR-style) re-ranker: model/split_encoder.py via CrossEncoderReranker.

Tiny random BERTs with the real tokenizer; single-threaded torch (tests/conftest.py explains).
"""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import split_reranker

from model.item_states import PAGE_TOKENS
from model.reranker import CrossEncoderReranker
from model.split_encoder import SplitLayout, segment_tensors
from model.training import Pair, TrainParams, train

USERS = ["recent: star wars | alien. likes: sci-fi.", "new visitor.", "query: cowboy toys."]
ITEMS = [
    "Toy Story [Animation] by Pixar. A cowboy doll meets a space ranger.",
    "Heat [Crime]. Thieves and detectives in Los Angeles.",
    "Alien [Sci-Fi]. In space no one can hear you scream.",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _split(joint: int, seed: int = 3) -> CrossEncoderReranker:
    model = split_reranker(joint, seed)
    model.item_state_dtype = torch.float32  # exact comparisons; fp16 has its own test
    return model


def _hf_logits(reranker: CrossEncoderReranker, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The same pairs through transformers' own BertModel: user segment padded to user_len,
    item segment after it, full attention (what the split model is with every layer joint)."""
    assert reranker.split is not None
    user_len = reranker.split.layout.user_len
    pad = user_len - batch["user_ids"].shape[1]
    ids = torch.cat([torch.nn.functional.pad(batch["user_ids"], (0, pad)), batch["item_ids"]], 1)
    mask = torch.cat([torch.nn.functional.pad(batch["user_mask"], (0, pad)), batch["item_mask"]], 1)
    types = torch.cat(
        [
            torch.zeros((ids.shape[0], user_len), dtype=torch.long),
            torch.ones_like(batch["item_ids"]),
        ],
        1,
    )
    positions = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
    out = reranker.model.bert(
        input_ids=ids, attention_mask=mask, token_type_ids=types, position_ids=positions
    )
    return reranker.model.classifier(out.pooler_output).squeeze(-1)  # type: ignore[no-any-return]


def test_every_layer_joint_equals_transformers_own_bert() -> None:
    reranker = _split(joint=2)  # the tiny model has 2 layers: nothing split
    batch = reranker.encode_pairs(USERS, ITEMS)
    with torch.no_grad():
        ours = reranker.logits(batch)
        theirs = _hf_logits(reranker, batch)
    assert ours.shape == (3,)
    assert float(ours.std()) > 1e-3  # the pairs really differ
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_split_differs_from_joint_but_keeps_the_weights() -> None:
    split, joint = _split(joint=1), _split(joint=2)
    for a, b in zip(split.model.parameters(), joint.model.parameters(), strict=True):
        assert torch.equal(a, b)
    with torch.no_grad():
        a = split.logits(split.encode_pairs(USERS, ITEMS))
        b = joint.logits(joint.encode_pairs(USERS, ITEMS))
    assert not torch.allclose(a, b, atol=1e-4)


def test_serving_path_with_cached_item_states_equals_the_training_path() -> None:
    reranker = _split(joint=1)
    for user in USERS:
        served = reranker.score(user, ITEMS)
        trained = reranker.score_pairs([user] * len(ITEMS), ITEMS)
        np.testing.assert_allclose(served, trained, atol=1e-5)
    assert reranker.cached_items() == len(ITEMS)
    assert float(np.ptp(reranker.score(USERS[0], ITEMS))) > 1e-3


def test_the_cache_keeps_the_item_states_at_the_split_not_keys_and_values() -> None:
    # One joint layer reads the keys and values through the states (the projections folded
    # into the query): H numbers a token, not 2H. The serving path equals the training path
    # that projects them (the test above), so this checks only what the cache holds.
    reranker = _split(joint=1)
    reranker.score(USERS[0], ITEMS)
    hidden = reranker.model.config.hidden_size
    rows = [len(reranker._item_row(t)) for t in ITEMS]
    pages = sum(-(-n // PAGE_TOKENS) for n in rows)
    assert reranker.item_state_bytes() == pages * PAGE_TOKENS * hidden * 4  # fp32 in this test


def test_a_warm_up_leaves_no_per_item_object_for_the_garbage_collector() -> None:
    # Token ids are kept packed, one object a text that CPython never tracks (lists stay
    # tracked): a 100k-item warm-up would otherwise add ~100k objects to every full collection
    # while a new version loads (services/common/heap.py). An entry holds no Python object
    # per id either (a tuple holds an int each), so dropping a version frees ~1 object a text.
    reranker = _split(joint=1)
    reranker.warm_items(ITEMS)
    gc.collect()
    kept = list(reranker._token_cache.values())
    assert len(kept) == len(ITEMS)
    assert not any(gc.is_tracked(ids) for ids in kept)
    assert not any(gc.get_referents(ids) for ids in kept)
    for text in ITEMS:  # and they are the tokenizer's ids
        want = reranker.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert list(reranker._token_ids(text)) == want


def test_a_returning_users_last_layer_side_is_kept_and_scores_the_same() -> None:
    reranker = _split(joint=1)
    first = reranker.score(USERS[0], ITEMS, cache=False)
    assert len(reranker._joint_users) == 1
    kept = next(iter(reranker._joint_users.values()))
    again = reranker.score(USERS[0], ITEMS[::-1], cache=False)  # no logit cache: runs again
    assert len(reranker._joint_users) == 1 and next(iter(reranker._joint_users.values())) is kept
    np.testing.assert_allclose(again, first[::-1], atol=1e-6)
    trained = reranker.score_pairs([USERS[0]] * len(ITEMS), ITEMS)  # nothing kept there
    np.testing.assert_allclose(first, trained, atol=1e-5)
    batched = reranker.score_many([(u, ITEMS) for u in USERS], cache=False)
    assert len(reranker._joint_users) == len(USERS)
    for user, got in zip(USERS, batched, strict=True):
        np.testing.assert_allclose(got, reranker.score_pairs([user] * len(ITEMS), ITEMS), atol=1e-5)
    reranker.clear_item_states()  # new weights: what was kept is of the old ones
    assert not reranker._joint_users


def test_fp16_item_cache_moves_scores_by_less_than_1e_3() -> None:
    exact, half = _split(joint=1), _split(joint=1)
    half.item_state_dtype = torch.float16
    np.testing.assert_allclose(half.score(USERS[0], ITEMS), exact.score(USERS[0], ITEMS), atol=1e-3)
    assert half.item_state_dtype == torch.float16 and half.cached_items() == len(ITEMS)


@pytest.mark.parametrize("cpu_dtype", ["fp32", "bf16"])
def test_int8_user_side_serves_under_every_cpu_dtype(cpu_dtype: str) -> None:
    # The serving default on CPUs with bf16 hardware is a bf16 autocast; dynamically quantised
    # Linear layers take fp32 only, so the int8 user pass must run outside the autocast.
    exact = _split(joint=1)
    served = _split(joint=1)
    served.cpu_dtype = cpu_dtype  # type: ignore[assignment]
    served.quantize_user_side()
    for user in USERS:
        got = served.score(user, ITEMS)
        assert got.dtype == np.float32 and np.isfinite(got).all()
        # int8 weights and (for bf16) a ~3-digit joint layer: close to fp32, not equal.
        np.testing.assert_allclose(got, exact.score(user, ITEMS), atol=0.05)


@pytest.mark.parametrize("joint", [1, 2])
def test_weights_cast_for_inference_give_the_same_bf16_scores_and_training_keeps_fp32(
    joint: int,
) -> None:
    autocast, cast = _split(joint=joint), _split(joint=joint)
    autocast.cpu_dtype = cast.cpu_dtype = "bf16"
    cast.prepare_serving(user_side_int8=False, item_states_int8=False)
    split = cast.split
    assert split is not None and split._cast_layers is not None
    assert split._cast_layers[-1].output.dense.weight.dtype == torch.bfloat16
    assert split._cast_layers[-1].output.LayerNorm.weight.dtype == torch.float32
    assert cast.model.bert.encoder.layer[-1].output.dense.weight.dtype == torch.float32
    for user in USERS:  # autocast made the same casts at every call: equal bit for bit
        np.testing.assert_array_equal(cast.score(user, ITEMS), autocast.score(user, ITEMS))
    batched = cast.score_many([(u, ITEMS) for u in USERS])
    for user, got in zip(USERS, batched, strict=True):
        np.testing.assert_array_equal(got, autocast.score(user, ITEMS))
    with torch.enable_grad():  # a gradient pass trains the model's own fp32 weights
        assert split._layers() is cast.model.bert.encoder.layer
    cast.clear_item_states()  # what training calls when it changes the weights
    assert split._cast_layers is None


def test_a_pass_in_another_precision_runs_the_fp32_layers_not_the_cast_copy() -> None:
    exact, served = _split(joint=1), _split(joint=1)
    served.cpu_dtype = "bf16"
    served.prepare_serving(user_side_int8=False, item_states_int8=False)
    assert served.split is not None and served.split._cast_layers is not None
    served.cpu_dtype = "fp32"  # e.g. an evaluation asking for full precision: no autocast
    for user in USERS:
        np.testing.assert_array_equal(served.score(user, ITEMS), exact.score(user, ITEMS))


def test_int8_item_states_halve_the_cache_and_keep_scores_close() -> None:
    exact, served = _split(joint=1), _split(joint=1)
    served.prepare_serving(user_side_int8=False, item_states_int8=True)
    assert served.item_states_int8
    for user in USERS:
        np.testing.assert_allclose(served.score(user, ITEMS), exact.score(user, ITEMS), atol=2e-3)
    q, scales = served._item_states.rows()[0]  # type: ignore[union-attr]
    assert q.dtype == torch.int8 and scales.dtype == torch.float32
    assert scales.shape == (q.shape[0], 1)  # one scale per token: the states are H wide
    # A batch of requests (micro-batching) reads the same int8 cache.
    batched = served.score_many([(u, ITEMS) for u in USERS])
    for user, got in zip(USERS, batched, strict=True):
        np.testing.assert_allclose(got, served.score(user, ITEMS), atol=1e-6)


def test_item_states_do_not_depend_on_the_other_segment() -> None:
    reranker = _split(joint=1)
    assert reranker.split is not None
    long_user = "recent: " + " | ".join(f"title {i}" for i in range(40))
    short, long = (
        reranker.encode_pairs(["hi."], ITEMS[:1]),
        reranker.encode_pairs([long_user], ITEMS[:1]),
    )
    with torch.no_grad():
        a = reranker.split.item_states(short["item_ids"], short["item_mask"])
        b = reranker.split.item_states(long["item_ids"], long["item_mask"])
    torch.testing.assert_close(a, b)
    assert long["user_ids"].shape[1] == reranker.split.layout.user_len  # truncated to its budget


def test_warm_items_computes_each_text_once() -> None:
    reranker = _split(joint=1)
    assert reranker.warm_items(ITEMS + ITEMS[:1]) == 3
    assert reranker.warm_items(ITEMS) == 0
    assert reranker.cached_items() == 3


def test_a_long_warm_up_lets_go_of_the_gil_and_a_request_s_few_items_do_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Listing a large warm set's lengths from cached token ids is pure Python: it must let
    go of the GIL as it goes, or requests served meanwhile queue behind it."""
    import model.reranker as reranker_module

    yields: list[int] = []
    monkeypatch.setattr(reranker_module, "WARM_YIELD_EVERY", 4)
    monkeypatch.setattr(reranker_module, "_let_go_of_the_gil", lambda: yields.append(1))
    reranker = _split(joint=1)
    texts = [f"Product {n}: a fine thing." for n in range(10)]
    assert reranker.warm_items(texts[:3]) == 3  # a request's few missing items
    assert yields == []
    assert reranker.warm_items(texts) == 7
    assert yields == [1]  # 7 texts: one yield at the 4th
    fresh = _split(joint=1)
    fresh.item_state_dtype = reranker.item_state_dtype
    fresh.warm_items(list(reversed(texts)))
    np.testing.assert_allclose(fresh.score(USERS[0], texts), reranker.score(USERS[0], texts))


def test_a_warm_up_builds_each_batch_s_rows_with_that_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A warm set's rows built all up front were ~0.4 s of Python at 100k items, which
    requests served meanwhile queued behind at every torch call (stop 34); built batch by
    batch, the Python sits between forward passes that let go of the GIL."""
    reranker = _split(joint=1)
    assert reranker.split is not None
    texts = [f"Product {n}: a fine thing, size {n}." for n in range(7)]
    events: list[str] = []
    item_row, item_states = reranker._item_row, reranker.split.item_states

    def row(text: str) -> tuple[int, ...]:
        events.append("row")
        return item_row(text)

    def states(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        events.append(f"batch of {ids.shape[0]}")
        return item_states(ids, mask)

    monkeypatch.setattr(reranker, "_item_row", row)
    monkeypatch.setattr(reranker.split, "item_states", states)
    assert reranker.warm_items(texts, batch_size=3) == 7
    assert events == ["row"] * 3 + ["batch of 3"] + ["row"] * 3 + [
        "batch of 3",
        "row",
        "batch of 1",
    ]
    fresh = _split(joint=1)
    fresh.item_state_dtype = reranker.item_state_dtype
    fresh.warm_items(texts)
    monkeypatch.undo()
    np.testing.assert_allclose(fresh.score(USERS[0], texts), reranker.score(USERS[0], texts))


def test_cross_encoder_has_no_item_states() -> None:
    reranker = CrossEncoderReranker.tiny(seed=0, max_length=32)
    assert reranker.architecture == "cross"
    assert reranker.warm_items(ITEMS) == 0


def test_save_and_load_keeps_the_architecture_whatever_the_caller_asks(tmp_path: Path) -> None:
    reranker = _split(joint=1)
    reranker.save(tmp_path / "m")
    for asked in (None, 2):
        loaded = CrossEncoderReranker.from_pretrained(
            tmp_path / "m", max_length=32, device="cpu", joint_layers=asked
        )
        assert loaded.architecture == "split-1"
        loaded.item_state_dtype = torch.float32
        np.testing.assert_allclose(
            loaded.score(USERS[0], ITEMS), reranker.score(USERS[0], ITEMS), atol=1e-6
        )
    plain = CrossEncoderReranker.tiny(seed=0, max_length=32)
    plain.save(tmp_path / "plain")
    assert (
        CrossEncoderReranker.from_pretrained(tmp_path / "plain", 32, "cpu").architecture == "cross"
    )


def test_split_model_learns_a_toy_task() -> None:
    reranker = CrossEncoderReranker.tiny(seed=0, max_length=32, joint_layers=1)
    reranker.item_state_dtype = torch.float32
    pairs = [Pair(u, ITEMS[0], 1.0) for u in USERS] + [
        Pair(u, i, 0.0) for u in USERS for i in ITEMS[1:]
    ]
    params = TrainParams(
        learning_rate=5e-3, epochs=20, batch_size=8, warmup_ratio=0.0, freeze_layers=0, seed=13
    )
    before = reranker.score_pairs([p.user_text for p in pairs], [p.item_text for p in pairs])
    reranker.score(USERS[0], ITEMS)  # fills the item-state cache with the old weights
    train(reranker, pairs, params)
    after = reranker.score_pairs([p.user_text for p in pairs], [p.item_text for p in pairs])
    labels = np.array([p.label for p in pairs])
    assert after[labels == 1].min() > after[labels == 0].max()
    assert not np.allclose(before, after)
    # The cache belongs to the weights it was computed with: a fresh score after training
    # must match the training path again.
    np.testing.assert_allclose(
        reranker.score(USERS[0], ITEMS), reranker.score_pairs([USERS[0]] * 3, ITEMS), atol=1e-5
    )


@pytest.mark.parametrize("user_len,item_len", [(2, 10), (10, 1)])
def test_layout_rejects_too_small_segments(user_len: int, item_len: int) -> None:
    with pytest.raises(ValueError, match="user_len"):
        SplitLayout(user_len, item_len)


def test_joint_layers_out_of_range_is_clamped_to_the_model_depth() -> None:
    assert CrossEncoderReranker.tiny(seed=0, joint_layers=9).architecture == "split-2"


def test_a_trained_version_saved_before_the_split_stays_a_cross_encoder(tmp_path: Path) -> None:
    plain = CrossEncoderReranker.tiny(seed=0, max_length=32)
    plain.save(tmp_path / "old")
    config = tmp_path / "old" / "config.json"
    config.write_text(config.read_text().replace('"freshrec_joint_layers": 0,', ""))
    assert "freshrec_joint_layers" not in config.read_text()
    loaded = CrossEncoderReranker.from_pretrained(tmp_path / "old", 32, "cpu", joint_layers=1)
    assert loaded.architecture == "cross"


def test_as_cross_encoder_runs_the_same_weights_with_full_attention() -> None:
    split = _split(joint=1)
    cross = split.as_cross_encoder()
    assert cross.architecture == "cross" and split.architecture == "split-1"
    for a, b in zip(split.model.parameters(), cross.model.parameters(), strict=True):
        assert torch.equal(a, b) and a is not b


def test_user_states_are_cached_per_context_and_give_the_same_scores() -> None:
    reranker = _split(joint=1)
    first = reranker.score(USERS[0], ITEMS, cache=False)
    assert (reranker.user_cache_hits, reranker.user_cache_misses) == (0, 1)
    again = reranker.score(USERS[0], ITEMS[::-1], cache=False)
    assert (reranker.user_cache_hits, reranker.user_cache_misses) == (1, 1)
    np.testing.assert_allclose(again[::-1], first, atol=1e-6)
    reranker.score(USERS[1], ITEMS, cache=False)
    assert reranker.user_cache_misses == 2
    reranker.clear_item_states()
    reranker.score(USERS[0], ITEMS, cache=False)
    assert reranker.user_cache_misses == 3  # cleared with the weights' other states


@pytest.mark.parametrize("joint", [1, 2])
def test_a_prepared_user_side_is_what_the_request_would_compute(joint: int) -> None:
    reference = _split(joint=joint).score(USERS[0], ITEMS, cache=False)
    reranker = _split(joint=joint)
    assert reranker.prepare_users([USERS[0], USERS[1], USERS[0]]) == 2
    assert reranker.user_states_prepared == 2
    assert reranker.prepare_users([USERS[1]]) == 0  # kept already
    forward = reranker.forward_seconds
    # Not a request: no hit or miss counted, no forward time a benchmark would bill to one.
    assert (reranker.user_cache_hits, reranker.user_cache_misses) == (0, 0)
    prepared = reranker.score(USERS[0], ITEMS, cache=False)
    assert (reranker.user_cache_hits, reranker.user_cache_misses) == (1, 0)
    assert reranker.forward_seconds > forward
    np.testing.assert_allclose(prepared, reference, atol=1e-6)
    batched = reranker.score_many([(USERS[1], ITEMS), (USERS[2], ITEMS)], cache=False)
    assert (reranker.user_cache_hits, reranker.user_cache_misses) == (2, 1)  # USERS[2] only
    np.testing.assert_allclose(
        batched[0], _split(joint=joint).score(USERS[1], ITEMS, cache=False), atol=1e-6
    )


def test_a_full_cross_encoder_prepares_nothing() -> None:
    cross = _split(joint=1).as_cross_encoder()
    assert cross.prepare_users(USERS) == 0


def _count_forwards(reranker: CrossEncoderReranker) -> list[list[str]]:
    """The item texts of every forward pass `reranker` runs from now on."""
    passes: list[list[str]] = []
    inputs = reranker.serving_inputs

    def spy(user_text: str, item_texts: list[str]) -> dict[str, torch.Tensor]:
        passes.append(list(item_texts))
        return inputs(user_text, item_texts)

    reranker.serving_inputs = spy  # type: ignore[method-assign]
    return passes


def test_a_repeat_request_reuses_its_logits_and_runs_only_what_changed() -> None:
    reranker = _split(joint=1)
    reranker.blend = None
    passes = _count_forwards(reranker)
    first = reranker.score(USERS[0], ITEMS)
    assert passes == [ITEMS]

    # Same user context, same item texts: no forward pass, the same scores.
    again = reranker.score(USERS[0], ITEMS[::-1])
    assert len(passes) == 1 and (reranker.score_cache_hits, reranker.score_cache_misses) == (1, 1)
    np.testing.assert_array_equal(again[::-1], first)

    # One changed item text (its popularity level moved): only that text runs.
    changed = [*ITEMS[:-1], ITEMS[-1] + " popular."]
    mixed = reranker.score(USERS[0], changed)
    assert passes[-1] == [changed[-1]]
    np.testing.assert_allclose(mixed, reranker.score(USERS[0], changed, cache=False), atol=1e-6)
    np.testing.assert_array_equal(mixed[:-1], first[:-1])

    # Another context (the profile changed) runs again; new weights forget every logit.
    reranker.score(USERS[1], ITEMS)
    assert passes[-1] == ITEMS
    reranker.clear_item_states()
    reranker.score(USERS[0], ITEMS)
    assert passes[-1] == ITEMS


def test_batched_requests_reuse_cached_logits_and_match_uncached_scores() -> None:
    reranker = _split(joint=1)
    reranker.item_state_dtype = torch.float32
    reranker.score(USERS[0], ITEMS[:2])
    passes = _count_forwards(reranker)
    requests = [(USERS[0], ITEMS[:2]), (USERS[0], ITEMS), (USERS[1], ITEMS[1:])]

    together = reranker.score_many(requests)

    # The first request was cached whole, the second needs only the texts it lacks.
    assert sorted(map(sorted, passes)) == sorted([sorted(ITEMS[2:]), sorted(ITEMS[1:])])
    for (user, items), got in zip(requests, together, strict=True):
        np.testing.assert_allclose(got, reranker.score(user, items, cache=False), atol=1e-5)


def test_frozen_prefix_reuses_each_rows_states_and_keeps_the_logits_and_gradients() -> None:
    """Under `begin_frozen_prefix` the gradient pass computes the frozen bottom once per
    distinct segment row; the logits and the trainable layers' gradients are those of the
    plain pass (compared in eval mode, where neither has dropout)."""
    users = [u for u in USERS for _ in ITEMS]
    items = [i for _ in USERS for i in ITEMS]

    def run(reranker: CrossEncoderReranker) -> tuple[torch.Tensor, list[torch.Tensor]]:
        reranker.model.eval()
        for p in reranker.model.bert.embeddings.parameters():
            p.requires_grad = False
        for p in reranker.model.bert.encoder.layer[0].parameters():
            p.requires_grad = False
        logits = reranker.logits(reranker.encode_pairs(users, items))
        logits.sum().backward()
        grads = [p.grad.clone() for p in reranker.model.parameters() if p.grad is not None]
        return logits.detach(), grads

    plain_model, cached_model = _split(joint=1), _split(joint=1)
    plain, plain_grads = run(plain_model)
    assert cached_model.split is not None
    cached_model.split.begin_frozen_prefix(1)
    cached, cached_grads = run(cached_model)
    torch.testing.assert_close(cached, plain, atol=1e-5, rtol=1e-5)
    assert len(cached_grads) == len(plain_grads) > 0
    for a, b in zip(cached_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # 9 pairs = 18 segment rows, of which 3 distinct users and 3 distinct items.
    assert (cached_model.split.prefix_computed, cached_model.split.prefix_reused) == (6, 12)
    cached_model.logits(cached_model.encode_pairs(users[:2], items[:2]))
    assert (cached_model.split.prefix_computed, cached_model.split.prefix_reused) == (6, 16)
    with torch.no_grad():  # inference never reads the training cache
        cached_model.logits(cached_model.encode_pairs(users[:2], items[:2]))
    assert cached_model.split.prefix_reused == 16
    cached_model.split.end_frozen_prefix()
    cached_model.logits(cached_model.encode_pairs(users[:2], items[:2]))
    assert cached_model.split.prefix_reused == 16


@pytest.mark.parametrize("frozen_eval", [True, False])
def test_training_with_frozen_eval_runs_the_frozen_bottom_without_dropout_once_per_row(
    frozen_eval: bool,
) -> None:
    reranker = _split(joint=1)
    assert reranker.split is not None
    modes: list[tuple[bool, bool, bool]] = []
    bert = reranker.model.bert

    def record(_module: torch.nn.Module, _args: object, _out: object) -> None:
        layers = bert.encoder.layer
        modes.append((bert.embeddings.training, layers[0].training, layers[1].training))

    hook = bert.encoder.layer[1].attention.self.query.register_forward_hook(record)
    frozen_before = [p.detach().clone() for p in bert.encoder.layer[0].parameters()]
    top_before = [p.detach().clone() for p in bert.encoder.layer[1].parameters()]
    pairs = [Pair(u, i, float(n == 0)) for u in USERS for n, i in enumerate(ITEMS)]
    params = TrainParams(
        learning_rate=1e-2,
        epochs=2,
        batch_size=4,
        warmup_ratio=0.0,
        freeze_layers=1,
        frozen_eval=frozen_eval,
    )
    report = train(reranker, pairs, params)
    hook.remove()
    # Embeddings and layer 0 frozen either way; in eval mode only with frozen_eval. The top
    # layer trains with dropout.
    assert modes and set(modes) == {(not frozen_eval, not frozen_eval, True)}
    for a, b in zip(bert.encoder.layer[0].parameters(), frozen_before, strict=True):
        assert torch.equal(a, b)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(bert.encoder.layer[1].parameters(), top_before, strict=True)
    )
    # 2 epochs × 9 pairs = 36 segment rows through the frozen bottom, 6 of them distinct.
    expected = (6, 30) if frozen_eval else (0, 0)
    assert (report.frozen_rows_computed, report.frozen_rows_reused) == expected
    assert not reranker.model.training
    assert reranker.split._prefix_layers == 0 and not reranker.split._prefix_cache


def test_segment_tensors_pad_and_mask_rows() -> None:
    ids, mask = segment_tensors([[5, 6, 7], [8]], 4, 0, torch.device("cpu"))
    assert ids.dtype == torch.long and mask.dtype == torch.long
    assert ids.tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]


def test_forward_seconds_count_the_forward_passes_and_nothing_else() -> None:
    reranker = _split(joint=1)
    assert reranker.forward_seconds == 0.0
    reranker.score(USERS[0], ITEMS)
    after_one = reranker.forward_seconds
    assert after_one > 0
    reranker.score(USERS[0], ITEMS)  # every logit cached: no forward pass, no time
    assert reranker.forward_seconds == after_one
    reranker.score_many([(USERS[1], ITEMS), (USERS[2], ITEMS[:2])])  # a micro-batch runs one
    assert reranker.forward_seconds > after_one


def test_a_version_with_the_same_item_side_shares_the_states_and_scores_as_its_own() -> None:
    serving, loaded = _split(joint=1), _split(joint=1)
    serving.warm_items(ITEMS)
    serving.score(USERS[0], ITEMS)  # a returning user: their states below the split kept
    # A fine-tune that froze everything below the split moved only the joint layer and head.
    with torch.no_grad():
        for p in [
            *loaded.model.bert.encoder.layer[1].parameters(),
            *loaded.model.classifier.parameters(),
        ]:
            p.add_(0.05)
    assert loaded.same_item_side(serving) and serving.same_item_side(loaded)
    # Their states on disk are one snapshot (model/item_state_snapshot.py).
    assert loaded.item_side_fingerprint() == serving.item_side_fingerprint()
    assert loaded.share_item_states(serving) and loaded.shares_item_states_with(serving)
    assert loaded.cached_items() == len(ITEMS)
    assert loaded.warm_items(ITEMS) == 0  # nothing left to compute
    # The user's states below the split too: its first request to the new version reads them.
    assert loaded.shares_user_states_with(serving)
    assert loaded.score(USERS[0], ITEMS, cache=False) is not None
    assert (loaded.user_cache_hits, loaded.user_cache_misses) == (1, 0)
    # Its scores from the shared states are those it computes from its own.
    own = _split(joint=1)
    with torch.no_grad():
        for p in [
            *own.model.bert.encoder.layer[1].parameters(),
            *own.model.classifier.parameters(),
        ]:
            p.add_(0.05)
    np.testing.assert_allclose(loaded.score(USERS[0], ITEMS), own.score(USERS[0], ITEMS), atol=1e-6)
    assert not np.allclose(loaded.score(USERS[0], ITEMS), serving.score(USERS[0], ITEMS))
    # Training one (which forgets its states) leaves the other's store alone.
    users_kept = len(serving._user_states_cache)
    loaded.clear_item_states()
    assert not loaded.shares_item_states_with(serving) and loaded.cached_items() == 0
    assert not loaded.shares_user_states_with(serving) and len(loaded._user_states_cache) == 0
    assert serving.cached_items() == len(ITEMS)
    assert len(serving._user_states_cache) == users_kept > 0


def test_a_version_whose_user_side_runs_otherwise_shares_only_the_item_states() -> None:
    serving, loaded = _split(joint=1), _split(joint=1)
    serving.quantize_user_side()  # int8 user side: other user states than the fp32 one's
    serving.score(USERS[0], ITEMS)
    assert loaded.share_item_states(serving) and not loaded.shares_user_states_with(serving)
    np.testing.assert_allclose(
        loaded.score(USERS[0], ITEMS), _split(joint=1).score(USERS[0], ITEMS), atol=1e-6
    )


@pytest.mark.parametrize("change", ["lower layer", "embeddings", "precision", "split"])
def test_a_version_whose_item_side_differs_computes_its_own_states(change: str) -> None:
    serving = _split(joint=1)
    serving.warm_items(ITEMS)
    loaded = _split(joint=2 if change == "split" else 1)
    with torch.no_grad():
        if change == "lower layer":
            next(loaded.model.bert.encoder.layer[0].parameters()).add_(1e-3)
        elif change == "embeddings":
            loaded.model.bert.embeddings.LayerNorm.bias.add_(1e-3)
    if change == "precision":
        loaded.item_state_dtype = torch.float16
    assert not loaded.same_item_side(serving)
    assert loaded.item_side_fingerprint() != serving.item_side_fingerprint()
    assert not loaded.share_item_states(serving) and not loaded.shares_item_states_with(serving)
    assert loaded.cached_items() == 0
