"""ArrayHistogram: one answer's scores in one call, exposed exactly as a stock histogram."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from services.common.metrics import ArrayHistogram

BUCKETS = tuple(round(0.1 * i, 1) for i in range(1, 11))


def _samples(registry: CollectorRegistry, name: str) -> dict[tuple[str, str], float]:
    """(sample suffix, le) -> value, without the stock histogram's `_created`."""
    out = {}
    for family in registry.collect():
        for s in family.samples:
            if s.name.startswith(name) and not s.name.endswith("_created"):
                out[(s.name[len(name) :], s.labels.get("le", ""))] = s.value
    return out


def test_same_exposition_as_a_stock_histogram() -> None:
    registry = CollectorRegistry()
    stock = Histogram("stock", "x", buckets=BUCKETS, registry=registry)
    mine = ArrayHistogram("mine", "x", BUCKETS)
    registry.register(mine)
    rng = np.random.default_rng(0)
    # Values on the bucket bounds (le is inclusive), below 0, above the last bound.
    values = np.concatenate([rng.random(500), [0.0, 0.1, 0.2, 0.3, 0.7, 1.0, -0.5, 2.0]])
    for part in np.array_split(values.astype(np.float32), 7):
        mine.observe(part)
        for v in part:
            stock.observe(float(v))

    got, want = _samples(registry, "mine"), _samples(registry, "stock")
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12), key
    assert got[("_count", "")] == len(values)
    assert b'mine_bucket{le="+Inf"}' in generate_latest(registry)


def test_non_finite_values_are_dropped() -> None:
    h = ArrayHistogram("h", "x", BUCKETS)
    h.observe(np.array([0.5, np.nan, np.inf, -np.inf]))
    h.observe([])
    (family,) = h.collect()
    values = {(s.name, s.labels.get("le", "")): s.value for s in family.samples}
    assert values[("h_count", "")] == 1
    assert values[("h_sum", "")] == 0.5
    assert values[("h_bucket", "0.4")] == 0
    assert values[("h_bucket", "0.5")] == 1


def test_buckets_must_increase() -> None:
    with pytest.raises(ValueError, match="strictly increasing"):
        ArrayHistogram("h", "x", (0.5, 0.2))
