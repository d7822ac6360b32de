"""Collaborative item factors: what the re-ranker learns from interactions alone.

BERT reads the user's recent titles and each candidate's text; the blend (`model.blend`) adds
the item's fresh popularity. Neither knows which items the same people take together when
their texts do not say so, and neither changes unless the model is retrained: the only part
of a version that a stale model cannot keep up with through features. This module holds that
part, the item side of an implicit-feedback matrix factorisation (ALS, Hu, Koren & Volinsky
2008, fitted with `implicit`), saved with each re-ranker version.

Serving keeps only the item factors. A user's vector is *folded in* at request time from the
items in their online profile (one k×k solve, ALS's own user step), so it is as fresh as the
profile, and a version never needs a per-user table. The score x_u · y_i enters the blend as
one more logit term (`ScoreBlend.collab`); an item without factors (new since the fit) scores
0 there, and the rest of the blend ranks it.

Leakage: a pair's collaborative score is only a training feature when its event is later than
everything the factors were fitted on (`fitted_until`); otherwise it is unknown (NaN) and the
blend is fitted without that pair. An incremental update therefore fits the blend on the new
window with the parent's factors, and only then updates the factors (`refit`).

Pure compute (numpy, scipy, implicit); no I/O beyond the version directory.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
from safetensors.numpy import load_file, save_file

from freshrec.data.schema import EVENT_WEIGHTS
from freshrec.records import UserProfile
from model.popularity import utc

# safetensors: a version holds no pickle-capable file (tests/integration/test_security.py)
COLLAB_FILE = "collab.safetensors"
COLLAB_META = "collab.json"
USER_VECTOR_CACHE_SIZE = 10_000  # folded-in user vectors kept (k floats each)
# Confidence of an item in a user's online profile when folding the user in: a recent item
# counts as a click, a purchased one as a purchase (`EVENT_WEIGHTS`); both add up.
RECENT_WEIGHT = EVENT_WEIGHTS["click"]
PURCHASED_WEIGHT = EVENT_WEIGHTS["purchase"]


@dataclass
class CollabFactors:
    """Item factors of one fit, and what they were fitted on."""

    item_ids: tuple[str, ...]
    factors: np.ndarray  # (len(item_ids), k) float32
    regularization: float
    fitted_until: datetime | None  # every fitted event is strictly before this
    _pos: dict[str, int] = field(init=False, repr=False)
    _gram: np.ndarray = field(init=False, repr=False)
    # Folded-in user vectors by history: a storefront asks for the same user (same profile)
    # several times per visit, and the fold-in is most of a request's collaborative term.
    _memo: dict[tuple[tuple[str, float], ...], np.ndarray | None] = field(
        init=False, repr=False, default_factory=dict
    )
    _memo_lock: threading.Lock = field(init=False, repr=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.factors = np.ascontiguousarray(self.factors, dtype=np.float32)
        if self.factors.ndim != 2 or len(self.factors) != len(self.item_ids):
            raise ValueError(
                f"factors must be (items, k) with one row per item id, got {self.factors.shape} "
                f"for {len(self.item_ids)} ids"
            )
        self._pos = {item: n for n, item in enumerate(self.item_ids)}
        f64 = self.factors.astype(np.float64)
        self._gram = f64.T @ f64

    def __getstate__(self) -> dict[str, object]:
        """Copies (deepcopy, pickling) start with an empty memo and a fresh lock."""
        state = self.__dict__.copy()
        del state["_memo"], state["_memo_lock"]
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._memo = {}
        self._memo_lock = threading.Lock()

    @property
    def k(self) -> int:
        return int(self.factors.shape[1])

    def user_vector(self, history: Mapping[str, float]) -> np.ndarray | None:
        """ALS's user step for one user: argmin over x of
        sum_i c_i (p_i - x·y_i)^2 + λ|x|^2 with p_i = 1 for the history's items (confidence
        c_i) and 0 with confidence 1 elsewhere, in implicit's form
        (YᵀY + Σ (c_i - 1) y_i y_iᵀ + λI) x = Σ c_i y_i. None when no history item has
        factors. Memoised per history (`USER_VECTOR_CACHE_SIZE`)."""
        key = tuple(history.items())
        with self._memo_lock:
            if key in self._memo:
                return self._memo[key]
        user = self._fold_in(history)
        with self._memo_lock:
            if len(self._memo) >= USER_VECTOR_CACHE_SIZE:
                self._memo.clear()
            self._memo[key] = user
        return user

    def _fold_in(self, history: Mapping[str, float]) -> np.ndarray | None:
        rows = [(self._pos[i], c) for i, c in history.items() if i in self._pos and c > 0]
        if not rows:
            return None
        idx = np.fromiter((r for r, _ in rows), dtype=np.int64, count=len(rows))
        conf = np.fromiter((c for _, c in rows), dtype=np.float64, count=len(rows))
        y = self.factors[idx].astype(np.float64)
        a = self._gram + (y * (conf - 1.0)[:, None]).T @ y + self.regularization * np.eye(self.k)
        b = (y * conf[:, None]).sum(axis=0)
        return np.linalg.solve(a, b)

    def scores(self, history: Mapping[str, float], item_ids: Sequence[str]) -> np.ndarray:
        """x_u · y_i per item, float32; 0 for an item without factors or a user without a
        history the factors know."""
        out = np.zeros(len(item_ids), dtype=np.float32)
        user = self.user_vector(history)
        if user is None:
            return out
        get = self._pos.get
        pos = np.fromiter((get(i, -1) for i in item_ids), dtype=np.int64, count=len(item_ids))
        known = pos >= 0
        out[known] = self.factors[pos[known]].astype(np.float64) @ user
        return out

    def save(self, directory: Path) -> list[Path]:
        directory.mkdir(parents=True, exist_ok=True)
        save_file({"factors": self.factors}, str(directory / COLLAB_FILE))
        meta = {
            "item_ids": list(self.item_ids),
            "regularization": self.regularization,
            "fitted_until": self.fitted_until.isoformat() if self.fitted_until else None,
        }
        (directory / COLLAB_META).write_text(json.dumps(meta))
        return [directory / COLLAB_FILE, directory / COLLAB_META]

    @classmethod
    def load(cls, directory: Path) -> CollabFactors | None:
        if not (directory / COLLAB_FILE).exists():
            return None
        meta = json.loads((directory / COLLAB_META).read_text())
        factors = load_file(str(directory / COLLAB_FILE))["factors"]
        until = meta.get("fitted_until")
        return cls(
            tuple(meta["item_ids"]),
            factors,
            float(meta["regularization"]),
            pd.Timestamp(until).to_pydatetime() if until else None,
        )


def profile_history(profile: UserProfile | None) -> dict[str, float]:
    """item id → fold-in confidence from an online profile (recent items and purchases)."""
    out: dict[str, float] = {}
    if profile is None:
        return out
    for item in profile.recent_items:
        out[item] = out.get(item, 0.0) + RECENT_WEIGHT
    for item in profile.purchased_items:
        out[item] = out.get(item, 0.0) + PURCHASED_WEIGHT
    return out


@dataclass(frozen=True)
class CollabFit:
    """The fit's cost, for manifests and the replay's update accounting."""

    seconds: float
    interactions: int
    iterations: int
    warm_start: bool

    @property
    def examples_processed(self) -> int:
        """Matrix cells visited: each ALS iteration solves every user and every item once."""
        return self.interactions * self.iterations


def fit_collab(
    events: pd.DataFrame,
    until: datetime,
    factors: int,
    iterations: int,
    regularization: float,
    seed: int,
    parent: CollabFactors | None = None,
) -> tuple[CollabFactors, CollabFit]:
    """ALS on every positive event before `until` (confidence = summed `EVENT_WEIGHTS` per
    (user, item), as the `als` replay baseline).

    With a `parent`, its item factors start the fit (items new since then start small and
    random) and `iterations` can be few: an incremental update. Without one, a fit from
    scratch.

    Raises:
        ValueError: no positive event before `until`.
    """
    from implicit.cpu.als import AlternatingLeastSquares
    from scipy.sparse import csr_matrix
    from threadpoolctl import threadpool_limits

    started = time.perf_counter()
    stamp = utc(until)
    ts = pd.to_datetime(events["timestamp"], utc=True)
    weight = events["event_type"].map(EVENT_WEIGHTS).fillna(0.0).astype("float32")
    keep = ((ts < stamp) & (weight > 0)).to_numpy()
    if not keep.any():
        raise ValueError(f"no positive event before {stamp.isoformat()} to fit item factors on")
    users = events["user_id"].astype(str).to_numpy()[keep]
    items = events["item_id"].astype(str).to_numpy()[keep]
    user_codes, user_index = pd.factorize(users)
    known = list(parent.item_ids) if parent is not None else []
    known_set = set(known)
    new_items = sorted({i for i in items if i not in known_set})
    item_ids = tuple(known + new_items)
    pos = {item: n for n, item in enumerate(item_ids)}
    item_codes = np.fromiter((pos[i] for i in items), dtype=np.int64, count=len(items))
    matrix = csr_matrix(
        (weight.to_numpy()[keep], (user_codes, item_codes)),
        shape=(len(user_index), len(item_ids)),
    )
    matrix.sum_duplicates()
    rng = np.random.default_rng(seed)
    with threadpool_limits(1, "blas"):  # implicit's advice: its own threads, serial BLAS
        model = AlternatingLeastSquares(
            factors=factors,
            regularization=regularization,
            iterations=iterations,
            random_state=seed,
            num_threads=0,
            # Exact solves: conjugate gradient's few steps start from the current factors,
            # which a warm start's placeholder users would make a poor start.
            use_cg=False,
        )
        if parent is not None and parent.k == factors:
            start = np.empty((len(item_ids), factors), dtype=np.float32)
            start[: len(known)] = parent.factors
            start[len(known) :] = rng.standard_normal((len(new_items), factors)) * 0.01
            model.item_factors = start
            # implicit solves users first from the item factors: this start is overwritten.
            model.user_factors = np.zeros((len(user_index), factors), dtype=np.float32)
        model.fit(matrix, show_progress=False)
    fitted = CollabFactors(
        item_ids,
        np.asarray(model.item_factors),
        regularization,
        stamp.to_pydatetime(),
    )
    cost = CollabFit(time.perf_counter() - started, int(matrix.nnz), iterations, parent is not None)
    return fitted, cost
