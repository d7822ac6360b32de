"""Collaborative item factors (model/collab.py): the ALS fit, the fold-in of a user from their
profile, the leak-free training feature, the blend's collaborative weight, and the term on
every scoring path (serving pipeline, gate evaluation)."""

from __future__ import annotations

import copy
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from freshrec.records import ItemFeatures, UserProfile
from model.blend import ScoreBlend, fit_blend, fit_blend_progressive
from model.collab import CollabFactors, fit_collab, profile_history
from model.index import RecallIndex
from model.reranker import CrossEncoderReranker
from model.text import POPULARITY_LEVELS, ranking_item_text, user_context_text
from model.training import EvalGroup, evaluate, make_eval_groups, make_pairs
from services.features.reader import InMemoryFeatureStore
from services.ranking.pipeline import (
    PipelineSettings,
    RankingPipeline,
    RecommendInput,
    ServingModels,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _two_taste_log(users: int = 40, seed: int = 0) -> pd.DataFrame:
    """Half the users click items a0..a9, half b0..b9; every click an hour apart."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        group = "a" if u % 2 == 0 else "b"
        for n in rng.choice(10, size=6, replace=False):
            rows.append((f"u{u}", f"{group}{n}", "click", T0 + timedelta(hours=len(rows))))
    return pd.DataFrame(rows, columns=["user_id", "item_id", "event_type", "timestamp"])


@pytest.fixture(scope="module")
def fitted() -> CollabFactors:
    factors, cost = fit_collab(_two_taste_log(), T0 + timedelta(days=365), 2, 15, 0.05, 7)
    assert cost.interactions == 240 and cost.examples_processed == 240 * 15
    return factors


def test_items_taken_together_score_above_the_other_taste(fitted: CollabFactors) -> None:
    history = {"a1": 1.0, "a2": 1.0, "a3": 1.0}
    scores = fitted.scores(history, [f"a{n}" for n in range(4, 10)] + [f"b{n}" for n in range(10)])

    assert scores[:6].min() > scores[6:].max()


def test_the_fold_in_is_als_s_user_step_solved_over_every_item(fitted: CollabFactors) -> None:
    history = {"a1": 1.0, "b2": 3.0, "a7": 2.0}
    y = fitted.factors.astype(np.float64)
    conf = np.ones(len(y))  # unobserved: preference 0 with confidence 1
    pref = np.zeros(len(y))
    for item, c in history.items():
        pos = fitted.item_ids.index(item)
        conf[pos], pref[pos] = c, 1.0
    dense = np.linalg.solve(
        (y * conf[:, None]).T @ y + fitted.regularization * np.eye(fitted.k),
        (y * (conf * pref)[:, None]).sum(axis=0),
    )
    np.testing.assert_allclose(fitted.user_vector(history), dense, rtol=1e-6, atol=1e-9)


def test_unknown_items_and_users_without_known_history_score_zero(fitted: CollabFactors) -> None:
    assert fitted.user_vector({"zz": 1.0}) is None
    assert fitted.scores({}, ["a1", "b1"]).tolist() == [0.0, 0.0]
    scores = fitted.scores({"a1": 1.0}, ["a2", "new-item"])
    assert scores[0] != 0.0 and scores[1] == 0.0


def test_the_fit_sees_only_events_before_its_end() -> None:
    log = _two_taste_log()
    cut = pd.Timestamp(log["timestamp"].iloc[100]).to_pydatetime()

    factors, cost = fit_collab(log, cut, 4, 3, 0.05, 1)

    assert cost.interactions == 100
    assert factors.fitted_until == cut
    assert set(factors.item_ids) == set(log["item_id"].iloc[:100])
    with pytest.raises(ValueError, match="no positive event before"):
        fit_collab(log, T0, 4, 3, 0.05, 1)


def test_a_warm_start_keeps_the_parent_s_items_first_and_adds_new_ones(
    fitted: CollabFactors,
) -> None:
    log = _two_taste_log()
    extra = pd.DataFrame(
        [("u0", "a-new", "purchase", T0 + timedelta(days=30))],
        columns=log.columns,
    )

    child, cost = fit_collab(
        pd.concat([log, extra]), T0 + timedelta(days=365), 2, 2, 0.05, 7, parent=fitted
    )

    assert cost.warm_start and cost.iterations == 2
    assert child.item_ids[: len(fitted.item_ids)] == fitted.item_ids
    assert child.item_ids[-1] == "a-new"
    # Two warm iterations from converged factors keep the tastes apart.
    scores = child.scores({"a1": 1.0, "a2": 1.0}, ["a3", "b3"])
    assert scores[0] > scores[1]


def test_factors_round_trip_through_a_directory(fitted: CollabFactors, tmp_path: Path) -> None:
    fitted.save(tmp_path)

    loaded = CollabFactors.load(tmp_path)

    assert loaded is not None
    assert loaded.item_ids == fitted.item_ids and loaded.fitted_until == fitted.fitted_until
    np.testing.assert_array_equal(loaded.factors, fitted.factors)
    assert CollabFactors.load(tmp_path / "missing") is None


def test_profile_history_weighs_recent_items_as_clicks_and_purchases_as_purchases() -> None:
    profile = UserProfile("u", recent_items=("x", "y"), purchased_items=("y", "z"))

    assert profile_history(profile) == {"x": 1.0, "y": 4.0, "z": 3.0}
    assert profile_history(None) == {}


# -- the blend's collaborative weight ---------------------------------------------------------


def _planted(
    seed: int, popularity: float, collab_weight: float, constant_level_in_clean_half: bool
) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    """Labels drawn from a known blend, 20,000 pairs; the first half of the pairs has no
    clean collaborative score (NaN)."""
    rng = np.random.default_rng(seed)
    n = 20_000
    bert = rng.normal(size=n)
    collab = rng.normal(size=n)
    levels = rng.integers(0, POPULARITY_LEVELS + 1, size=n)
    if constant_level_in_clean_half:
        levels[n // 2 :] = POPULARITY_LEVELS // 2
    texts = [f"popularity {int(lv)}. Item {i}" for i, lv in enumerate(levels)]
    z = 0.8 * bert + popularity * levels / POPULARITY_LEVELS + collab_weight * collab - 1.0
    labels = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(float)
    scores = collab.copy()
    scores[: n // 2] = np.nan
    return bert, texts, labels, scores


def test_the_blend_recovers_a_planted_collaborative_weight_and_skips_unknown_scores() -> None:
    bert, texts, labels, scores = _planted(3, 1.5, 1.2, constant_level_in_clean_half=False)

    blend = fit_blend(bert, texts, labels, l2=1e-3, collab=scores)

    assert blend.collab == pytest.approx(1.2, abs=0.12)
    assert blend.bert == pytest.approx(0.8, abs=0.12)
    assert blend.popularity == pytest.approx(1.5, abs=0.3)
    assert blend.fitted_on == len(labels)  # the text weights saw every pair


def test_the_text_weights_learn_from_pairs_without_a_collaborative_score() -> None:
    # Popularity varies only among the pairs whose collaborative score is unknown: a fit on
    # the clean pairs alone could not learn its weight; the first stage does.
    bert, texts, labels, scores = _planted(5, 2.0, 1.0, constant_level_in_clean_half=True)

    blend = fit_blend(bert, texts, labels, l2=1e-3, collab=scores)

    assert blend.popularity == pytest.approx(2.0, abs=0.4)
    assert blend.collab == pytest.approx(1.0, abs=0.15)


def test_without_scores_the_prior_s_collaborative_weight_is_kept() -> None:
    rng = np.random.default_rng(4)
    bert = rng.normal(size=200)
    labels = (rng.random(200) < 0.5).astype(float)
    texts = ["popularity 3. x"] * 200
    prior = ScoreBlend(1.0, 0.0, 0.0, 0.0, collab=0.7)

    assert fit_blend(bert, texts, labels, prior=prior).collab == 0.7
    position = np.linspace(0, 1, 200)
    too_few = np.full(200, np.nan)
    too_few[-10:] = 1.0
    progressive = fit_blend_progressive(bert, position, texts, labels, prior, collab=too_few)
    assert progressive is not None and progressive.collab == 0.7


def test_with_collab_adds_the_term_in_logit_space() -> None:
    blend = ScoreBlend(1.0, 0.0, 0.0, 0.0, collab=0.5)
    relevance = np.array([0.2, 0.5, 0.9], dtype=np.float32)
    scores = np.array([1.0, -2.0, 0.0])

    out = blend.with_collab(relevance, scores)

    expected = 1 / (1 + np.exp(-(np.log(relevance / (1 - relevance)) + 0.5 * scores)))
    np.testing.assert_allclose(out, expected, rtol=1e-5)
    assert ScoreBlend().with_collab(relevance, scores) is relevance


# -- the training feature is leak-free ---------------------------------------------------------


def test_pairs_carry_a_score_only_for_events_after_the_factors_fit(fitted: CollabFactors) -> None:
    catalog = [ItemFeatures(i, title=i) for i in fitted.item_ids]
    profile = UserProfile("u0", recent_items=("a1", "a2"))
    until = fitted.fitted_until
    assert until is not None
    before = (profile, catalog[0], until - timedelta(seconds=1))
    after = (profile, catalog[1], until)

    pairs = make_pairs([before, after], catalog, 2, np.random.default_rng(0), collab=fitted)

    assert all(math.isnan(p.collab) for p in pairs[:3])
    assert all(math.isfinite(p.collab) for p in pairs[3:])
    expected = fitted.scores(profile_history(profile), [catalog[1].item_id])[0]
    assert pairs[3].collab == pytest.approx(float(expected))
    assert all(
        math.isnan(p.collab) for p in make_pairs([after], catalog, 2, np.random.default_rng(0))
    )


# -- every scoring path applies the term -------------------------------------------------------


@pytest.fixture
def collab_reranker(
    tiny_reranker: CrossEncoderReranker, fitted: CollabFactors
) -> CrossEncoderReranker:
    model = copy.deepcopy(tiny_reranker)
    model.blend = ScoreBlend(1.0, 0.0, 0.0, 0.0, collab=3.0)
    model.collab = fitted
    return model


def test_the_gate_scores_groups_with_the_model_s_own_factors(
    collab_reranker: CrossEncoderReranker, tiny_reranker: CrossEncoderReranker
) -> None:
    profile = UserProfile("u0", recent_items=("a1", "a2", "a3"))
    catalog = [ItemFeatures(f"b{n}", title="same") for n in range(10)]
    positive = ItemFeatures("a4", title="same")
    groups = make_eval_groups([(profile, positive, T0)], catalog, 10, np.random.default_rng(0))
    assert groups[0].item_ids[0] == "a4" and dict(groups[0].history) == {
        "a1": 1.0,
        "a2": 1.0,
        "a3": 1.0,
    }
    # Identical texts: the text scorer ties every candidate, so only the factors can rank.
    with_factors = evaluate(collab_reranker, groups, k=1)
    without = evaluate(tiny_reranker, groups, k=1)

    assert with_factors["hit@1"] == 1.0
    assert without["hit@1"] == 0.0  # ties go against the relevant item
    bare = EvalGroup(groups[0].user_text, groups[0].candidates)  # no ids: text scores alone
    assert evaluate(collab_reranker, [bare], k=1)["hit@1"] == 0.0


def test_the_serving_pipeline_adds_the_term_for_the_user_s_profile(
    collab_reranker: CrossEncoderReranker, fitted: CollabFactors
) -> None:
    items = [ItemFeatures(i, title="same", text="same", category="c") for i in fitted.item_ids]
    user = UserProfile("u0", recent_items=("a1", "a2", "a3"), recent_text="same")
    store = InMemoryFeatureStore([user], items)
    rows = np.ones((len(items), 4), dtype=np.float32) / 2.0  # every item equally similar
    index = RecallIndex.build(rows, [i.item_id for i in items], [])
    pipeline = RankingPipeline(store, PipelineSettings(exploration_rate=0.0, recall_candidates=40))  # type: ignore[arg-type]

    served = pipeline.recommend(
        RecommendInput("u0", 5), ServingModels(collab_reranker, "v", index, "v")
    )

    assert [s.item_id[0] for s in served.items] == ["a"] * 5
    ids = [s.item_id for s in served.items]
    by_id = {i.item_id: i for i in items}
    text = collab_reranker.score(
        user_context_text(user), [ranking_item_text(by_id[i], pipeline.now()) for i in ids]
    )
    expected = collab_reranker.add_collab(text, profile_history(user), ids)
    np.testing.assert_allclose([s.relevance for s in served.items], expected, rtol=1e-4)
    assert not np.allclose(expected, text)


def test_user_vector_is_memoised_per_history_and_copies_start_empty() -> None:
    rng = np.random.default_rng(3)
    factors = CollabFactors(
        tuple(f"i{n}" for n in range(20)), rng.normal(size=(20, 4)).astype(np.float32), 0.1, None
    )
    history = {"i1": 2.0, "i4": 5.0}

    first = factors.user_vector(history)
    assert first is not None
    assert factors.user_vector(dict(history)) is first  # same history: the memoised vector
    np.testing.assert_allclose(factors._fold_in(history), first)  # type: ignore[arg-type]
    other = factors.user_vector({"i1": 2.0, "i4": 6.0})
    assert other is not None and not np.allclose(other, first)

    copied = copy.deepcopy(factors)
    assert copied._memo == {}
    np.testing.assert_allclose(copied.user_vector(history), first)  # type: ignore[arg-type]
