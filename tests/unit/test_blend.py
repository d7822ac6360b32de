"""The score blend (model/blend.py): BERT's logit with the item's fresh signals, fitted on
progressive-validation logits, saved with the version and applied on every scoring path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from freshrec.records import ItemFeatures
from model.blend import ScoreBlend, fit_blend, fit_blend_progressive, signal_features
from model.reranker import CrossEncoderReranker
from model.text import POPULARITY_LEVELS, ranking_item_text
from model.training import Pair, TrainParams, train


def _texts(levels: np.ndarray, new: np.ndarray) -> list[str]:
    return [
        f"popularity {int(lv)}." + (" new arrival." if n else "") + f" Item {i}"
        for i, (lv, n) in enumerate(zip(levels, new, strict=True))
    ]


def test_signals_are_parsed_back_from_the_ranking_text() -> None:
    item = ItemFeatures("i", title="Aurora", popularity_7d=100.0)
    texts = [ranking_item_text(item), "popularity 19. new arrival. X", "no signals here"]

    features = signal_features(texts)

    assert features.tolist() == [[13 / POPULARITY_LEVELS, 0.0], [1.0, 1.0], [0.0, 0.0]]


def test_the_fit_recovers_the_weights_that_generated_the_labels() -> None:
    rng = np.random.default_rng(0)
    n = 20_000
    bert = rng.normal(size=n)
    levels = rng.integers(0, POPULARITY_LEVELS + 1, size=n)
    new = rng.random(n) < 0.2
    true = np.array([0.7, 2.5, 0.8, -1.5])
    z = true[0] * bert + true[1] * levels / POPULARITY_LEVELS + true[2] * new + true[3]
    labels = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(float)

    blend = fit_blend(bert, _texts(levels, new), labels, l2=1e-3)

    np.testing.assert_allclose(blend.weights, true, atol=0.12)
    assert blend.fitted_on == n


def test_the_prior_holds_the_weights_when_data_is_scarce() -> None:
    rng = np.random.default_rng(1)
    bert = rng.normal(size=40)
    labels = (rng.random(40) < 0.5).astype(float)
    prior = ScoreBlend(1.0, 3.0, 0.5, -1.0)
    texts = _texts(rng.integers(0, 20, size=40), np.zeros(40))

    held = fit_blend(bert, texts, labels, prior=prior, l2=1e4)
    free = fit_blend(bert, texts, labels, prior=prior, l2=1e-3)

    assert abs(held.popularity - 3.0) < 0.05
    assert abs(free.popularity - 3.0) > abs(held.popularity - 3.0)


def _drawn(
    rng: np.random.Generator, n: int, popularity_weight: float
) -> tuple[np.ndarray, list[str], np.ndarray]:
    bert = rng.normal(size=n)
    levels = rng.integers(0, POPULARITY_LEVELS + 1, size=n)
    z = 0.7 * bert + popularity_weight * levels / POPULARITY_LEVELS - 1.0
    labels = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(float)
    return bert, _texts(levels, np.zeros(n)), labels


def test_an_update_weighs_its_pairs_against_what_the_parent_learned() -> None:
    rng = np.random.default_rng(11)
    parent = fit_blend(*_drawn(rng, 4_000, popularity_weight=2.5))
    precision = parent.precision_matrix
    assert precision is not None
    assert np.all(np.linalg.eigvalsh(precision) > 0)  # a proper prior
    assert parent.popularity == pytest.approx(2.5, abs=0.4)

    few = _drawn(rng, 200, popularity_weight=0.0)  # the shop changed; only a little data yet
    updated = fit_blend(*few, prior=parent)
    alone = fit_blend(*few, prior=ScoreBlend(*parent.weights))  # the same centre, no precision

    assert updated.popularity > alone.popularity + 0.5  # held by the parent
    assert updated.popularity < parent.popularity  # but moved towards the new data
    many = fit_blend(*_drawn(rng, 20_000, popularity_weight=0.0), prior=parent)
    assert many.popularity == pytest.approx(0.0, abs=0.4)  # enough new data wins


def test_an_update_fits_the_collaborative_weight_on_the_clean_pairs_only(tmp_path: Path) -> None:
    rng = np.random.default_rng(12)
    bert, texts, labels = _drawn(rng, 2_000, popularity_weight=1.0)
    scores = rng.normal(size=2_000)
    scores[:1_500] = np.nan
    parent = fit_blend(bert, texts, labels, collab=scores)

    update = fit_blend(bert, texts, labels, prior=parent, collab=scores)

    assert parent.fitted_on == 2_000
    assert update.fitted_on == 500
    assert update.precision != parent.precision
    parent.save(tmp_path)
    assert ScoreBlend.load(tmp_path) == parent  # the precision travels with the version


def test_progressive_fit_uses_only_the_late_part_of_the_pass() -> None:
    rng = np.random.default_rng(2)
    n = 400
    logits = rng.normal(size=n).astype(np.float32)
    position = np.linspace(0, 1, n, endpoint=False).astype(np.float32)
    labels = (rng.random(n) < 0.5).astype(float)
    texts = _texts(rng.integers(0, 20, size=n), np.zeros(n))

    blend = fit_blend_progressive(logits, position, texts, labels)

    assert blend is not None and blend.fitted_on == 200
    assert fit_blend_progressive(logits[:40], position[:40], texts[:40], labels[:40]) is None
    with pytest.raises(ValueError, match="one length"):
        fit_blend(logits, texts[:3], labels)


def test_training_fits_a_blend_that_is_saved_and_applied_when_scoring(tmp_path: Path) -> None:
    """Popular items are the positives: the blend learns a positive popularity weight, and the
    served scores are the blended ones, before and after a save/load."""
    reranker = CrossEncoderReranker.tiny(seed=3, joint_layers=1)
    rng = np.random.default_rng(3)
    pairs = []
    for n in range(320):
        label = float(n % 2)
        level = int(rng.integers(12, 20)) if label else int(rng.integers(0, 8))
        pairs.append(Pair("recent: Aurora.", f"popularity {level}. Item {n % 37}", label))

    report = train(reranker, pairs, TrainParams(learning_rate=1e-3, batch_size=16, freeze_layers=0))

    assert report.progressive_logits is not None
    assert np.isfinite(report.progressive_logits).all()
    assert reranker.blend is not None and reranker.blend.popularity > 1.0
    texts = ["popularity 18. Item 1", "popularity 1. Item 1"]
    scores = reranker.score("recent: Aurora.", texts)
    assert scores[0] > scores[1]
    reranker.save(tmp_path)
    loaded = CrossEncoderReranker.from_pretrained(tmp_path, max_length=32, device="cpu")
    assert loaded.blend == reranker.blend
    np.testing.assert_allclose(loaded.score("recent: Aurora.", texts), scores, atol=1e-5)
    many = loaded.score_many([("recent: Aurora.", texts), ("recent: Peak.", texts)])
    np.testing.assert_allclose(many[0], scores, atol=1e-4)


def test_blended_logits_are_the_design_matrix_times_the_weights_memo_or_not() -> None:
    rng = np.random.default_rng(3)
    levels = rng.integers(0, POPULARITY_LEVELS + 1, size=50)
    new = rng.random(50) < 0.3
    texts = [*_texts(levels, new), "no signals here"]
    bert = rng.normal(size=len(texts)).astype(np.float32)
    one = ScoreBlend(bert=0.7, popularity=2.5, new_arrival=0.8, bias=-1.5)
    two = ScoreBlend(bert=1.0, popularity=-1.0, new_arrival=0.0, bias=0.25)
    identity = ScoreBlend()

    for blend in (one, two, identity, one):  # `one` again: now from its memo
        features = signal_features(texts)
        expected = (
            blend.bert * bert.astype(np.float64)
            + blend.popularity * features[:, 0]
            + blend.new_arrival * features[:, 1]
            + blend.bias
        )
        got = blend.logits(bert, texts)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    # The memo is per blend: another blend's weights never leak into its terms.
    assert one.logits(bert[:1], texts[:1]) != two.logits(bert[:1], texts[:1])
    # Not a field: equal blends stay equal, and what a version saves holds no memo.
    assert ScoreBlend(bert=0.7, popularity=2.5, new_arrival=0.8, bias=-1.5) == one
    assert "_text_terms" not in one.__dataclass_fields__
