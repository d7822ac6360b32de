"""Unit tests of model/: the cross-encoder, training, recall index, embeddings, artefacts, text.

The re-ranker is the tiny random BERT from `CrossEncoderReranker.tiny()` (real tokenizer),
loaded once per session and deep-copied per test (tests/conftest.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from freshrec.errors import ArtifactError
from freshrec.records import ItemFeatures, UserProfile
from model.artifacts import MANIFEST, Manifest, read_manifest, seal, verify
from model.embeddings import RECENCY_DECAY, user_vector
from model.index import IDS_FILE, RecallIndex
from model.reranker import CrossEncoderReranker
from model.text import item_text, ranking_item_text, user_context_text
from model.training import (
    EvalGroup,
    Pair,
    TrainParams,
    evaluate,
    freeze_lower_layers,
    make_eval_groups,
    make_pairs,
    ranking_metrics,
    sample_negatives,
    train,
)

USERS = ["likes: fruit.", "recent: orchard basket.", "new visitor."]
POSITIVE_ITEMS = ["fresh apple juice", "green apple pie", "apple cider"]
NEGATIVE_ITEMS = ["steel hammer", "winter boots", "desk lamp", "paper notebook", "garden hose"]
TOY_PAIRS = [Pair(u, p, 1.0) for u in USERS for p in POSITIVE_ITEMS] + [
    Pair(u, n, 0.0) for u in USERS for n in NEGATIVE_ITEMS
]
# Measured on the tiny model: 60 steps at this rate take the toy loss from 0.69 to ~0.09.
TOY_PARAMS = TrainParams(
    learning_rate=5e-3, epochs=20, batch_size=8, warmup_ratio=0.0, freeze_layers=0, seed=13
)


def _bce(reranker: CrossEncoderReranker, pairs: list[Pair]) -> float:
    scores = reranker.score_pairs([p.user_text for p in pairs], [p.item_text for p in pairs])
    p = np.clip(scores.astype(np.float64), 1e-7, 1 - 1e-7)
    y = np.array([pair.label for pair in pairs])
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def _unit_rows(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


# -- the cross-encoder ----------------------------------------------------------------------


def test_score_pairs_returns_one_probability_per_pair(tiny_reranker: CrossEncoderReranker) -> None:
    users = ["likes: coffee.", "new visitor.", "recent: Peak Socks."]
    items = ["Dark roast beans", "Trail shoe [running shoes] by Kairo", "Desk lamp"]

    scores = tiny_reranker.score_pairs(users, items)

    assert scores.shape == (3,)
    assert scores.dtype == np.float32
    assert np.all((scores >= 0.0) & (scores <= 1.0))
    assert tiny_reranker.score_pairs([], []).shape == (0,)


def test_score_pairs_does_not_depend_on_batching(tiny_reranker: CrossEncoderReranker) -> None:
    users = [f"recent: item {n}." for n in range(7)]
    items = [f"a product with {'many ' * n}words" for n in range(7)]

    whole = tiny_reranker.score_pairs(users, items, batch_size=64)
    pieces = tiny_reranker.score_pairs(users, items, batch_size=2)

    np.testing.assert_allclose(whole, pieces, atol=1e-5)


def test_score_is_score_pairs_with_the_user_repeated(tiny_reranker: CrossEncoderReranker) -> None:
    items = ["red shoe", "blue hat", "green sock"]
    np.testing.assert_array_equal(
        tiny_reranker.score("likes: hats.", items),
        tiny_reranker.score_pairs(["likes: hats."] * 3, items),
    )


def test_score_pairs_rejects_misaligned_inputs(tiny_reranker: CrossEncoderReranker) -> None:
    with pytest.raises(ValueError, match="align"):
        tiny_reranker.score_pairs(["a", "b"], ["x"])


def test_training_learns_a_toy_task(tiny_reranker: CrossEncoderReranker) -> None:
    before = _bce(tiny_reranker, TOY_PAIRS)

    report = train(tiny_reranker, TOY_PAIRS, TOY_PARAMS)

    after = _bce(tiny_reranker, TOY_PAIRS)
    assert after < 0.5 * before
    assert report.steps == math.ceil(len(TOY_PAIRS) / 8) * 20
    assert report.examples_processed == len(TOY_PAIRS) * 20
    assert not report.stopped_early
    for user in USERS:
        pos = tiny_reranker.score(user, POSITIVE_ITEMS)
        neg = tiny_reranker.score(user, NEGATIVE_ITEMS)
        assert pos.min() > neg.max(), user
    assert not tiny_reranker.model.training  # left in eval mode


def test_training_is_deterministic_for_a_seed(tiny_reranker_session: CrossEncoderReranker) -> None:
    import copy

    params = TrainParams(learning_rate=5e-3, epochs=2, batch_size=8, freeze_layers=0)
    a, b = copy.deepcopy(tiny_reranker_session), copy.deepcopy(tiny_reranker_session)

    train(a, TOY_PAIRS, params)
    train(b, TOY_PAIRS, params)

    np.testing.assert_array_equal(
        a.score("likes: fruit.", NEGATIVE_ITEMS), b.score("likes: fruit.", NEGATIVE_ITEMS)
    )


def test_train_rejects_no_pairs(tiny_reranker: CrossEncoderReranker) -> None:
    with pytest.raises(ValueError, match="pairs"):
        train(tiny_reranker, [], TrainParams())


def test_freeze_lower_layers_freezes_embeddings_and_lower_layers(
    tiny_reranker: CrossEncoderReranker,
) -> None:
    model = tiny_reranker.model
    total = sum(p.numel() for p in model.parameters())

    trainable = freeze_lower_layers(tiny_reranker, 1)

    assert trainable < total
    assert all(not p.requires_grad for p in model.bert.embeddings.parameters())
    assert all(not p.requires_grad for p in model.bert.encoder.layer[0].parameters())
    assert all(p.requires_grad for p in model.bert.encoder.layer[1].parameters())
    assert all(p.requires_grad for p in model.classifier.parameters())
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert freeze_lower_layers(tiny_reranker, 0) == total
    # More layers than the model has: every encoder layer frozen, the head still trains.
    head_and_pooler = sum(p.numel() for p in model.classifier.parameters()) + sum(
        p.numel() for p in model.bert.pooler.parameters()
    )
    assert freeze_lower_layers(tiny_reranker, 99) == head_and_pooler


def test_training_leaves_frozen_weights_untouched(tiny_reranker: CrossEncoderReranker) -> None:
    bert = tiny_reranker.model.bert
    embeddings = bert.embeddings.word_embeddings.weight.detach().clone()
    lower = [p.detach().clone() for p in bert.encoder.layer[0].parameters()]
    upper = [p.detach().clone() for p in bert.encoder.layer[1].parameters()]
    params = TrainParams(learning_rate=5e-3, epochs=2, batch_size=8, freeze_layers=1)

    report = train(tiny_reranker, TOY_PAIRS, params)

    assert torch.equal(bert.embeddings.word_embeddings.weight, embeddings)
    assert all(
        torch.equal(a, b) for a, b in zip(bert.encoder.layer[0].parameters(), lower, strict=True)
    )
    assert any(
        not torch.equal(a, b)
        for a, b in zip(bert.encoder.layer[1].parameters(), upper, strict=True)
    )
    total = sum(p.numel() for p in tiny_reranker.model.parameters())
    assert report.trainable_params < total
    # Gradients are switched back on afterwards (the next run decides for itself).
    assert all(p.requires_grad for p in tiny_reranker.model.parameters())


def test_save_and_load_round_trip_gives_identical_scores(
    tiny_reranker: CrossEncoderReranker, tmp_path: Path
) -> None:
    users = ["likes: coffee.", "new visitor."]
    items = ["Dark roast beans", "Trail shoe"]
    expected = tiny_reranker.score_pairs(users, items)

    files = tiny_reranker.save(tmp_path / "model")
    loaded = CrossEncoderReranker.from_pretrained(tmp_path / "model", max_length=32, device="cpu")

    names = {f.name for f in files}
    assert "model.safetensors" in names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl", ".pickle")) for n in names)
    assert all(f.parent == tmp_path / "model" for f in files)
    np.testing.assert_array_equal(loaded.score_pairs(users, items), expected)
    assert loaded.num_layers == 2


# -- training helpers and metrics -----------------------------------------------------------


def test_ranking_metrics_on_hand_computed_ranks() -> None:
    metrics = ranking_metrics([0, 1, 10], k=10)

    assert metrics["ndcg@10"] == pytest.approx((1.0 + 1.0 / math.log2(3)) / 3)
    assert metrics["hit@10"] == pytest.approx(2 / 3)
    assert metrics["mrr@10"] == pytest.approx((1.0 + 0.5) / 3)
    assert metrics["groups"] == 3.0


def test_ranking_metrics_rank_k_minus_one_is_inside_and_empty_is_zero() -> None:
    assert ranking_metrics([2], k=3) == {
        "ndcg@3": pytest.approx(0.5),
        "hit@3": 1.0,
        "mrr@3": pytest.approx(1 / 3),
        "groups": 1.0,
    }
    assert ranking_metrics([3], k=3)["hit@3"] == 0.0
    assert ranking_metrics([], k=5) == {"ndcg@5": 0.0, "hit@5": 0.0, "mrr@5": 0.0, "groups": 0.0}


class _ConstantScorer:
    def score(self, user_text: str, item_texts: list[str]) -> np.ndarray:
        return np.full(len(item_texts), 0.5, dtype=np.float32)


class _FirstWins:
    def score(self, user_text: str, item_texts: list[str]) -> np.ndarray:
        return np.array([1.0] + [0.0] * (len(item_texts) - 1), dtype=np.float32)


def test_evaluate_gives_a_constant_scorer_no_credit() -> None:
    groups = [EvalGroup("u", tuple(f"item {n}" for n in range(10))) for _ in range(4)]

    constant = evaluate(_ConstantScorer(), groups, k=5)  # type: ignore[arg-type]
    perfect = evaluate(_FirstWins(), groups, k=5)  # type: ignore[arg-type]

    assert constant["hit@5"] == 0.0 and constant["ndcg@5"] == 0.0
    assert perfect == {"ndcg@5": 1.0, "hit@5": 1.0, "mrr@5": 1.0, "groups": 4.0}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("learning_rate", 0.0),
        ("learning_rate", 1.0),
        ("learning_rate", -1e-5),
        ("epochs", 0),
        ("batch_size", 0),
        ("warmup_ratio", 1.0),
        ("warmup_ratio", -0.1),
        ("freeze_layers", -1),
        ("max_seconds", 0.0),
    ],
)
def test_train_params_reject_bad_values(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        TrainParams(**{field: value})  # type: ignore[arg-type]


def test_train_params_accept_edges() -> None:
    params = TrainParams(warmup_ratio=0.0, freeze_layers=0, max_seconds=None, epochs=1)
    assert params.batch_size == 32


CATALOG = [ItemFeatures(f"i{n}", title=f"Item {n}", category="c") for n in range(12)]


def test_sample_negatives_are_distinct_and_avoid_the_given_ids() -> None:
    rng = np.random.default_rng(0)
    negs = sample_negatives(CATALOG, {"i0", "i1", "i2"}, 5, rng)

    ids = [n.item_id for n in negs]
    assert len(ids) == 5 == len(set(ids))
    assert not {"i0", "i1", "i2"} & set(ids)
    # A catalogue too small for the request gives what it has, never a repeat.
    assert len(sample_negatives(CATALOG[:3], {"i0"}, 5, rng)) == 2


def test_make_pairs_labels_positives_and_avoids_recent_items_as_negatives() -> None:
    profile = UserProfile("u1", recent_items=("i3", "i4"), recent_text="Item 3 | Item 4")
    positives = [(profile, CATALOG[0]), (None, CATALOG[1])]

    pairs = make_pairs(positives, CATALOG, 3, np.random.default_rng(1))

    assert len(pairs) == 8
    assert [p.label for p in pairs] == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert pairs[0].item_text == ranking_item_text(CATALOG[0])
    assert pairs[0].user_text == user_context_text(profile)
    assert pairs[4].user_text == "new visitor."
    forbidden = {ranking_item_text(CATALOG[i]) for i in (0, 3, 4)}
    assert not forbidden & {p.item_text for p in pairs[1:4]}


def test_make_eval_groups_put_the_true_item_first() -> None:
    groups = make_eval_groups([(None, CATALOG[5])], CATALOG, 4, np.random.default_rng(2))

    assert len(groups) == 1
    assert groups[0].candidates[0] == ranking_item_text(CATALOG[5])
    assert len(groups[0].candidates) == 4 == len(set(groups[0].candidates))


# -- the recall index -----------------------------------------------------------------------


def test_recall_index_finds_an_items_own_vector_first() -> None:
    vectors = _unit_rows(20, 8)
    ids = [f"i{n}" for n in range(20)]
    index = RecallIndex.build(vectors, ids, popular=["i3", "i1"])

    hits = index.search(vectors[7], 5)

    assert len(index) == 20 and "i7" in index and "nope" not in index
    assert len(hits) == 5
    assert hits[0][0] == "i7"
    assert hits[0][1] == pytest.approx(1.0, abs=1e-5)
    assert [s for _, s in hits] == sorted((s for _, s in hits), reverse=True)
    expected = [ids[i] for i in np.argsort(-(vectors @ vectors[7]))[:5]]
    assert [i for i, _ in hits] == expected


def test_recall_index_search_skips_excluded_ids_and_still_returns_k() -> None:
    vectors = _unit_rows(20, 8, seed=1)
    ids = [f"i{n}" for n in range(20)]
    index = RecallIndex.build(vectors, ids)
    exclude = frozenset(i for i, _ in index.search(vectors[0], 6))

    hits = index.search(vectors[0], 6, exclude)

    assert len(hits) == 6
    assert not exclude & {i for i, _ in hits}
    # Asking for more than there is returns everything not excluded.
    assert len(index.search(vectors[0], 100, frozenset({"i1"}))) == 19
    assert index.search(vectors[0], 0) == []


def test_recall_index_vectors_of_skips_unknown_ids() -> None:
    vectors = _unit_rows(4, 8)
    index = RecallIndex.build(vectors, ["a", "b", "c", "d"])

    got = index.vectors_of(["c", "zzz", "a"])

    assert len(got) == 2
    np.testing.assert_allclose(got[0], vectors[2])
    np.testing.assert_allclose(got[1], vectors[0])


def test_recall_index_save_and_load_round_trip(tmp_path: Path) -> None:
    vectors = _unit_rows(30, 16, seed=2)
    ids = [f"item-{n}" for n in range(30)]
    index = RecallIndex.build(vectors, ids, popular=["item-4", "item-2"])

    files = index.save(tmp_path / "idx")
    loaded = RecallIndex.load(tmp_path / "idx")

    assert all(f.is_file() for f in files)
    assert loaded.item_ids == ids
    assert loaded.popular == ["item-4", "item-2"]
    assert loaded.search(vectors[3], 7, frozenset({"item-3"})) == index.search(
        vectors[3], 7, frozenset({"item-3"})
    )


def test_recall_index_load_rejects_ids_that_do_not_match_the_vectors(tmp_path: Path) -> None:
    RecallIndex.build(_unit_rows(5, 4), ["a", "b", "c", "d", "e"]).save(tmp_path)
    (tmp_path / IDS_FILE).write_text(json.dumps(["a", "b", "c"]))

    with pytest.raises(ValueError, match="5 vectors"):
        RecallIndex.load(tmp_path)


def test_recall_index_build_rejects_bad_shapes_and_repeated_ids() -> None:
    with pytest.raises(ValueError, match="vectors must be"):
        RecallIndex.build(_unit_rows(3, 4), ["a", "b"])
    with pytest.raises(ValueError, match="vectors must be"):
        RecallIndex.build(np.zeros(4, dtype=np.float32), ["a"])
    with pytest.raises(ValueError, match="unique"):
        RecallIndex.build(_unit_rows(2, 4), ["a", "a"])


# -- user vectors ---------------------------------------------------------------------------


def test_user_vector_is_none_without_history_or_query() -> None:
    assert user_vector([]) is None
    assert user_vector([], None) is None


def test_user_vector_weights_recent_items_more() -> None:
    e1, e2 = np.eye(2, dtype=np.float32)

    vec = user_vector([e1, e2])  # e1 is the most recent

    assert vec is not None
    expected = np.array([1.0, RECENCY_DECAY]) / math.hypot(1.0, RECENCY_DECAY)
    np.testing.assert_allclose(vec, expected, rtol=1e-6)
    assert vec[0] > vec[1]
    assert vec.dtype == np.float32


def test_user_vector_blends_history_and_query_equally() -> None:
    e1, e2, e3 = np.eye(3, dtype=np.float32)

    only_query = user_vector([], e3)
    blended = user_vector([e1, e2], e3)

    np.testing.assert_allclose(only_query, e3)
    assert blended is not None
    assert float(np.linalg.norm(blended)) == pytest.approx(1.0, abs=1e-6)
    history = np.array([1.0, RECENCY_DECAY, 0.0]) / math.hypot(1.0, RECENCY_DECAY)
    expected = (history + e3) / np.linalg.norm(history + e3)
    np.testing.assert_allclose(blended, expected, rtol=1e-6)


# -- artefacts ------------------------------------------------------------------------------


def _sealed(tmp_path: Path) -> Path:
    directory = tmp_path / "v0001"
    directory.mkdir()
    (directory / "weights.bin").write_bytes(bytes(range(256)) * 4)
    (directory / "config.json").write_text('{"a": 1}')
    seal(directory, Manifest(kind="reranker", version="v0001", metrics={"ndcg@10": 0.5}))
    return directory


def test_seal_hashes_every_file_and_verify_accepts_them(tmp_path: Path) -> None:
    directory = _sealed(tmp_path)

    manifest = verify(directory, "reranker")

    assert set(manifest.files) == {"weights.bin", "config.json"}
    assert all(len(h) == 64 for h in manifest.files.values())
    assert manifest.metrics == {"ndcg@10": 0.5}
    assert read_manifest(directory) == manifest
    assert not (directory / (MANIFEST + ".tmp")).exists()


def test_verify_detects_a_flipped_byte(tmp_path: Path) -> None:
    directory = _sealed(tmp_path)
    data = bytearray((directory / "weights.bin").read_bytes())
    data[100] ^= 0x01
    (directory / "weights.bin").write_bytes(bytes(data))

    with pytest.raises(ArtifactError, match=r"v0001: sha256 of weights\.bin"):
        verify(directory)


def test_verify_detects_a_missing_file(tmp_path: Path) -> None:
    directory = _sealed(tmp_path)
    (directory / "config.json").unlink()

    with pytest.raises(ArtifactError, match=r"file config\.json is missing"):
        verify(directory)


def test_verify_rejects_the_wrong_kind_and_an_unreadable_manifest(tmp_path: Path) -> None:
    directory = _sealed(tmp_path)
    with pytest.raises(ArtifactError, match="expected a index"):
        verify(directory, "index")
    (directory / MANIFEST).write_text("{not json")
    with pytest.raises(ArtifactError, match="unreadable"):
        verify(directory)
    (directory / MANIFEST).unlink()
    with pytest.raises(ArtifactError, match="unreadable"):
        read_manifest(directory)


def test_verify_rejects_a_manifest_without_files(tmp_path: Path) -> None:
    directory = tmp_path / "empty"
    directory.mkdir()
    seal(directory, Manifest(kind="index", version="v0001"))

    with pytest.raises(ArtifactError, match="lists no files"):
        verify(directory)


# -- text builders --------------------------------------------------------------------------


def test_user_context_text_for_a_cold_user() -> None:
    assert user_context_text(None) == "new visitor."
    assert user_context_text(None, "  trail shoes ") == "query: trail shoes."
    assert user_context_text(UserProfile("u")) == "new visitor."


def test_user_context_text_keeps_the_most_recent_titles_and_strongest_categories() -> None:
    profile = UserProfile(
        "u",
        recent_text=" A | B |C| D | E | F | G ",
        top_categories=("shoes", "coffee", "books", "garden"),
    )

    text = user_context_text(profile, "socks")

    assert text == "query: socks. recent: A | B | C | D | E. likes: shoes, coffee, books."


def test_item_text_variants() -> None:
    full = ItemFeatures("i", title="Aurora", category="shoes", brand="Kairo", text="Light.")
    assert item_text(full) == "Aurora [shoes] by Kairo. Light."
    assert item_text(ItemFeatures("i", title="Aurora")) == "Aurora"
    assert item_text(ItemFeatures("i", title="Aurora", brand="Kairo")) == "Aurora by Kairo"


def test_cached_token_encoding_equals_the_tokenizer_including_truncation() -> None:
    """The serving path builds pairs from cached token ids; it must give the exact tensors the
    HF tokenizer gives (longest_first truncation, token types, padding), else scores drift."""
    import random

    reranker = CrossEncoderReranker.tiny(max_length=32)
    words = [
        "star",
        "wars",
        "jedi",
        "titanic",
        "action",
        "drama",
        "sci-fi",
        "comedy",
        "love",
        "night",
        "city",
        "the",
        "of",
        "a",
    ]
    rng = random.Random(0)
    for _ in range(200):
        user = " ".join(rng.choice(words) for _ in range(rng.randint(0, 40)))
        items = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 40))) for _ in range(4)]
        expected = reranker.encode_pairs([user] * len(items), items)
        actual = reranker.encode_one_user(user, items)
        for key, tensor in expected.items():
            assert torch.equal(actual[key], tensor), key
    # And the scores of both paths agree.
    items = ["espresso beans dark roast", "trail running shoe", "a lamp"]
    np.testing.assert_allclose(
        reranker.score("likes coffee", items),
        reranker.score_pairs(["likes coffee"] * 3, items),
        rtol=1e-5,
        atol=1e-6,
    )


def test_text_encoder_embeds_each_distinct_text_once_and_keeps_the_callers_order() -> None:
    from model.embeddings import TextEncoder

    tiny = CrossEncoderReranker.tiny(seed=0)  # its BERT body serves as a tiny bi-encoder
    encoder = TextEncoder(tiny.model.bert, tiny.tokenizer, bf16=False)
    texts = ["a long product text about board games", "short", "mid length text", "short"]
    calls: list[int] = []
    done: list[int] = []
    original = encoder.model.forward

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(int(kwargs["input_ids"].shape[0]))
        return original(*args, **kwargs)

    encoder.model.forward = counting  # type: ignore[method-assign]
    got = encoder.encode(texts, batch_size=2, progress=done.append)
    assert sum(calls) == 3 and sum(done) == len(texts)  # "short" once; progress counts all 4
    np.testing.assert_allclose(got[1], got[3])
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    # Each row equals the text embedded alone: neither dedup nor length order moves it.
    for text, row in zip(texts, got, strict=True):
        np.testing.assert_allclose(encoder.encode([text])[0], row, atol=1e-5)
    assert encoder.encode([]).shape == (0, 32)


def test_a_backbone_gets_the_same_fresh_head_for_the_same_seed(tmp_path: Path) -> None:
    """The head a backbone gets is drawn from `seed`, not from the process's random state:
    the same training from the same backbone starts from the same weights in every run."""
    tiny = CrossEncoderReranker.tiny(seed=1)
    tiny.model.bert.save_pretrained(tmp_path)  # a checkpoint without a classifier head
    tiny.tokenizer.save_pretrained(tmp_path)

    def head(seed: int) -> torch.Tensor:
        model = CrossEncoderReranker.from_pretrained(tmp_path, 32, "cpu", seed=seed).model
        return model.classifier.weight.detach().clone()

    torch.manual_seed(123)
    first = head(0)
    torch.rand(1000)  # whatever ran before in the process
    state = torch.get_rng_state()
    again = head(0)

    assert torch.equal(first, again)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random state is untouched
    assert not torch.equal(head(1), first)
