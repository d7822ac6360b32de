"""Catalogue changes on a live index: the overlay must search exactly like a rebuilt index."""

from __future__ import annotations

import numpy as np
import pytest

from model.index import RecallIndex


def _unit(rng: np.random.Generator, n: int, dim: int = 16) -> np.ndarray:
    v = rng.normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _exact(vectors: dict[str, np.ndarray], query: np.ndarray, k: int, exclude: set[str]):
    scored = [(i, float(v @ query)) for i, v in vectors.items() if i not in exclude]
    return sorted(scored, key=lambda p: p[1], reverse=True)[:k]


def test_overlay_search_equals_a_rebuilt_index() -> None:
    rng = np.random.default_rng(3)
    base_vectors = _unit(rng, 200)
    ids = [f"i{n}" for n in range(200)]
    index = RecallIndex.build(base_vectors, ids, popular=ids[:20])
    truth = dict(zip(ids, base_vectors, strict=True))

    new = {f"new{n}": v for n, v in enumerate(_unit(rng, 15))}
    changed = {"i5": _unit(rng, 1)[0], "i77": _unit(rng, 1)[0]}
    live = index.with_changes({**new, **changed}, removals=["i9", "i10", "new3"])
    truth.update(new)
    truth.update(changed)
    for gone in ("i9", "i10", "new3"):
        truth.pop(gone)

    for _ in range(50):
        query = _unit(rng, 1)[0]
        exclude = {f"i{int(x)}" for x in rng.integers(0, 200, size=5)}
        got = live.search(query, 10, exclude)
        want = _exact(truth, query, 10, exclude)
        assert [i for i, _ in got] == [i for i, _ in want]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in want], rtol=1e-5)
    assert len(live) == len(truth)
    assert set(live.live_ids()) == set(truth)
    assert "i9" not in live and "new3" not in live and "new4" in live
    np.testing.assert_allclose(live.vectors_of(["i5"])[0], changed["i5"])
    assert live.vectors_of(["i9", "new4"])[0] is not None and len(live.vectors_of(["i9"])) == 0
    assert "i9" not in live.popular and "i10" not in live.popular
    # Base and overlay rows interleaved keep the asked order; removed and unknown ids drop out.
    asked = ["new4", "i3", "i9", "i5", "zzz", "i7"]
    got = live.vectors_of(asked)
    assert got.shape == (4, live.index.d)
    for row, item in zip(got, ["new4", "i3", "i5", "i7"], strict=True):
        np.testing.assert_allclose(row, truth[item], rtol=1e-6)


def test_changes_leave_the_original_untouched_and_compose() -> None:
    rng = np.random.default_rng(4)
    vectors = _unit(rng, 30)
    ids = [f"i{n}" for n in range(30)]
    index = RecallIndex.build(vectors, ids)
    first = index.with_changes({"a": _unit(rng, 1)[0]})
    second = first.with_changes({"b": _unit(rng, 1)[0]}, removals=["a", "i0"])
    assert "a" not in index and len(index) == 30
    assert "a" in first and "b" not in first
    assert "a" not in second and "b" in second and "i0" not in second and len(second) == 30


def test_an_index_with_changes_refuses_to_be_saved(tmp_path) -> None:
    rng = np.random.default_rng(5)
    index = RecallIndex.build(_unit(rng, 5), ["a", "b", "c", "d", "e"])
    with pytest.raises(ValueError, match="rebuild"):
        index.with_changes(removals=["a"]).save(tmp_path)


def _live_index() -> tuple[RecallIndex, set[str]]:
    rng = np.random.default_rng(4)
    ids = [f"i{n}" for n in range(300)]
    index = RecallIndex.build(_unit(rng, 300), ids).with_changes(
        {"new0": _unit(rng, 1)[0], "i5": _unit(rng, 1)[0]}, removals=["i7", "i8"]
    )
    return index, set(ids) - {"i7", "i8"} | {"new0"}


def test_sample_draws_distinct_live_ids_outside_the_exclusions_without_listing_them() -> None:
    index, live = _live_index()
    exclude = {f"i{n}" for n in range(0, 300, 3)}

    def no_full_list() -> list[str]:
        raise AssertionError("sample listed the whole catalogue")

    index.live_ids = no_full_list  # type: ignore[method-assign]
    drawn: set[str] = set()
    for seed in range(1000):
        picks = index.sample(np.random.default_rng(seed), 3, exclude)
        assert len(picks) == 3 and len(set(picks)) == 3
        assert set(picks) <= live - exclude
        drawn |= set(picks)
    assert "new0" in drawn and "i5" in drawn  # the overlay is drawn from, changed items once
    assert len(drawn) > 190  # spread over the catalogue, not a fixed few
    # The same generator state gives the same draw (an answer replays by request id).
    assert index.sample(np.random.default_rng(9), 2, exclude) == index.sample(
        np.random.default_rng(9), 2, exclude
    )


def test_sample_falls_back_to_what_is_left_when_almost_everything_is_excluded() -> None:
    index, live = _live_index()
    left = {"i1", "new0"}
    picks = index.sample(np.random.default_rng(0), 5, live - left)
    assert sorted(picks) == sorted(left)  # fewer than asked: all there is
    assert index.sample(np.random.default_rng(0), 2, live) == []
    assert index.sample(np.random.default_rng(0), 0) == []


def test_snapshots_share_the_base_id_map_instead_of_rebuilding_it() -> None:
    rng = np.random.default_rng(5)
    ids = [f"i{n}" for n in range(50)]
    base = RecallIndex.build(_unit(rng, 50), ids)
    live = base.with_changes({"new": _unit(rng, 1)[0]}, removals=["i3"]).with_changes(
        removals=["new"]
    )
    # One map for every snapshot of this base (a per-change rebuild was O(catalogue)).
    assert live.base_positions is base.base_positions
    assert base.base_positions == {i: p for p, i in enumerate(ids)}  # untouched by the changes
    assert "i3" in base and "i3" not in live and "new" not in live


def test_ef_search_grows_with_the_catalogue_and_an_operator_value_wins(tmp_path) -> None:
    from model.index import default_ef_search

    assert [default_ef_search(n) for n in (1_000, 100_000, 400_000, 1_000_000, 5_000_000)] == [
        128,
        128,
        512,
        1024,
        1024,
    ]
    rng = np.random.default_rng(6)
    ids = [f"i{n}" for n in range(400)]
    built = RecallIndex.build(_unit(rng, 400), ids, exact_limit=100)
    built.index.hnsw.efSearch = 16  # type: ignore[attr-defined]  # e.g. saved by an older build
    built.save(tmp_path)
    assert RecallIndex.load(tmp_path).index.hnsw.efSearch == 128  # type: ignore[attr-defined]
    assert RecallIndex.load(tmp_path, 300).index.hnsw.efSearch == 300  # type: ignore[attr-defined]


def _live_vectors(index: RecallIndex) -> dict[str, np.ndarray]:
    ids = index.live_ids()
    return dict(zip(ids, index.vectors_of(ids), strict=True))


@pytest.mark.parametrize("exact_limit", [10_000, 50])  # flat, and HNSW above 50 items
@pytest.mark.parametrize("chunk", [65_536, 7])  # the base read back at once, or in chunks
def test_a_compacted_index_searches_like_the_overlay_and_records_its_position(
    tmp_path, exact_limit: int, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("model.index.COMPACT_CHUNK", chunk)
    rng = np.random.default_rng(5)
    ids = [f"i{n}" for n in range(300)]
    base = RecallIndex.build(_unit(rng, 300), ids, popular=ids[:20], exact_limit=exact_limit)
    live = base.with_changes(
        {**{f"new{n}": v for n, v in enumerate(_unit(rng, 40))}, "i5": _unit(rng, 1)[0]},
        removals=["i9", "i10", "i11"],
    )
    compact = live.compacted("1733580000000-3", exact_limit=exact_limit)

    assert compact.overlay_ids == () and compact.removed == frozenset()
    assert compact.catalog_position == "1733580000000-3"
    assert sorted(compact.live_ids()) == sorted(live.live_ids()) and len(compact) == 337
    assert compact.popular == [i for i in ids[:20] if i not in {"i9", "i10", "i11"}]
    truth = _live_vectors(live)
    for item_id, vector in _live_vectors(compact).items():
        np.testing.assert_array_equal(vector, truth[item_id])  # read back, not re-embedded
    for q in _unit(rng, 10):
        exclude = {"i1", "new2"}
        want = [i for i, _ in _exact(truth, q, 20, exclude)]
        got = [i for i, _ in compact.search(q, 20, exclude)]
        if exact_limit > 300:
            assert got == want
        else:  # HNSW at this size finds (almost) all of the exact top 20
            assert len(set(got) & set(want)) >= 18

    compact.save(tmp_path / "v2")
    again = RecallIndex.load(tmp_path / "v2")
    assert again.catalog_position == "1733580000000-3" and again.live_ids() == compact.live_ids()
    assert live.with_changes({}, ()).catalog_position == base.catalog_position == "0"


def test_an_index_saved_before_catalog_positions_loads_as_folding_nothing(tmp_path) -> None:
    rng = np.random.default_rng(6)
    ids = [f"i{n}" for n in range(30)]
    RecallIndex.build(_unit(rng, 30), ids).save(tmp_path / "v1")
    (tmp_path / "v1" / "catalog_position.json").unlink()
    assert RecallIndex.load(tmp_path / "v1").catalog_position == "0"


def test_the_overlay_search_returns_its_best_rows_outside_the_exclusions() -> None:
    """The overlay turns only its best k + |exclude| rows into Python objects."""
    rng = np.random.default_rng(8)
    ids = [f"i{n}" for n in range(50)]
    index = RecallIndex.build(_unit(rng, 50), ids)
    new = {f"new{n}": v for n, v in enumerate(_unit(rng, 500))}
    live = index.with_changes(new, removals=[f"i{n}" for n in range(0, 50, 2)])
    truth = _live_vectors(live)
    for q in _unit(rng, 20):
        exclude = {i for i, _ in _exact(truth, q, 6, set())[::2]}  # some of the very best
        got, want = live.search(q, 10, exclude), _exact(truth, q, 10, exclude)
        assert [i for i, _ in got] == [i for i, _ in want]
        assert [s for _, s in got] == pytest.approx([s for _, s in want], abs=1e-5)
