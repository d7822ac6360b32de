"""The re-ranker's last step: BERT's logit blended with the item's fresh signals.

relevance = sigmoid(w_bert · bert_logit + w_pop · popularity_level + w_new · new_arrival
                    + w_collab · collab_score + b)

BERT reads the same signals as text ("popularity 13. new arrival. ..."), and can learn how they
interact with the user's taste; but a few thousand fine-tuning pairs through frozen lower
layers teach it a weak, blurred version of the strongest single fact in a shop's log: how
popular an item is right now. A five-weight logistic layer on top (the "wide" part of a
wide-and-deep ranker) learns that fact exactly and says how much BERT adds beside it
(`w_bert`). The features are parsed back from the text the re-ranker scores
(`model.text.ranking_item_text`), so every scoring path — serving, micro-batches, the gate —
applies the same blend without carrying features beside the text. The collaborative score
(`model.collab`: the user's folded-in vector · the item's factors) needs ids, not text: the
scorers apply the rest, and `with_collab` adds its term in logit space afterwards, which is
the same sum.

Fitted by L2-regularised logistic regression (Newton's method; five weights do not need a
library), on *progressive-validation* logits: each pair's BERT logit as the model scored it
in its single training pass just before learning from it (`TrainReport.progressive_logits`),
so the blend never sees BERT's logits on data BERT had already fitted. An incremental update
is a Bayesian update: the parent's weights are the prior's centre and its Hessian (kept in
`blend.json`) the prior's precision. From the backbone, the collaborative weight is fitted
in a second stage, on the pairs whose score is clean (`fit_blend`). Pure numpy.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from model.text import POPULARITY_LEVELS

BLEND_FILE = "blend.json"
SIGNAL_CACHE_SIZE = 200_000  # item texts (a few hundred bytes each with the key)
_SIGNALS = re.compile(r"^popularity (\d+)\.( new arrival\.)?")


def signal_features(item_texts: Sequence[str]) -> np.ndarray:
    """(n, 2) float64: popularity level scaled to [0, 1], new-arrival flag; zeros for a text
    without the signals prefix (e.g. a version trained before it existed)."""
    return np.array([_signals(t) for t in item_texts], dtype=np.float64).reshape(-1, 2)


def probabilities(logits: np.ndarray) -> np.ndarray:
    """sigmoid(logits) as float32 relevance, computed in float64, where exp cannot overflow
    for any logit a model gives."""
    return (1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))).astype(np.float32)


@functools.lru_cache(maxsize=SIGNAL_CACHE_SIZE)
def _signals(text: str) -> tuple[float, float]:
    """One text's signals, memoised: every request re-reads its ~70 candidates' texts, which
    repeat across requests (70 texts: 0.051 ms by regex, 0.013 ms memoised)."""
    match = _SIGNALS.match(text)
    if not match:
        return 0.0, 0.0
    return int(match.group(1)) / POPULARITY_LEVELS, 1.0 if match.group(2) else 0.0


@dataclass(frozen=True)
class ScoreBlend:
    """Weights of the blend; the identity (BERT alone) is (1, 0, 0, 0, 0)."""

    bert: float = 1.0
    popularity: float = 0.0
    new_arrival: float = 0.0
    bias: float = 0.0
    fitted_on: int = 0  # pairs the weights were fitted on (0 = identity, never fitted)
    collab: float = 0.0  # weight of the collaborative score (0: not used)
    # What the fit knew: the penalised log-likelihood's Hessian at the fitted weights, a 5×5
    # matrix over (bert, popularity, new_arrival, bias, collab), row by row; () = none (the
    # identity, or a blend saved before it was kept). A child's fit starts from it.
    precision: tuple[float, ...] = ()

    @property
    def weights(self) -> np.ndarray:
        """(bert, popularity, new_arrival, bias): the part the text scorers apply."""
        return np.array([self.bert, self.popularity, self.new_arrival, self.bias])

    @property
    def all_weights(self) -> np.ndarray:
        """(bert, popularity, new_arrival, bias, collab)."""
        return np.append(self.weights, self.collab)

    @property
    def precision_matrix(self) -> np.ndarray | None:
        """`precision` as a 5×5 matrix, or None."""
        if len(self.precision) != 25:
            return None
        return np.array(self.precision, dtype=np.float64).reshape(5, 5)

    def with_collab(self, relevance: np.ndarray, collab_scores: np.ndarray) -> np.ndarray:
        """Relevance from the text scorers with the collaborative term added in logit space:
        sigmoid(logit(relevance) + w_collab · score). Unchanged when the weight is 0."""
        if self.collab == 0.0 or len(relevance) == 0:
            return relevance
        p = np.clip(np.asarray(relevance, dtype=np.float64), 1e-7, 1 - 1e-7)
        z = np.log(p / (1 - p)) + self.collab * np.asarray(collab_scores, dtype=np.float64)
        return probabilities(z)

    def __post_init__(self) -> None:
        # item text -> its own term of the blend (`_text_term`), memoised per blend: not a
        # field, so neither saved nor compared.
        object.__setattr__(self, "_text_terms", {})

    def logits(self, bert_logits: np.ndarray, item_texts: Sequence[str]) -> np.ndarray:
        """Blended logits, float32, aligned with `item_texts`: bert · BERT's logit plus each
        text's own term (popularity, new arrival, bias), memoised per text.

        Serving runs this right after the forward pass, on caches the forward pass emptied,
        where every distinct step is several times its hot cost (stop 27: the design-matrix
        form took 0.18 ms there, 0.03 ms when called again at once); one dict read per text
        and one multiply-add touch far less.
        """
        memo: dict[str, float] = self._text_terms  # type: ignore[attr-defined]
        if len(memo) > SIGNAL_CACHE_SIZE:
            memo.clear()
        get = memo.get
        terms = np.fromiter(
            (v if (v := get(t)) is not None else self._text_term(t) for t in item_texts),
            np.float64,
            len(item_texts),
        )
        bert = np.asarray(bert_logits, dtype=np.float64)
        return (bert * self.bert + terms).astype(np.float32)

    def _text_term(self, text: str) -> float:
        """popularity · level + new_arrival · flag + bias for `text`, memoised."""
        level, new = _signals(text)
        term = self.popularity * level + self.new_arrival * new + self.bias
        self._text_terms[text] = term  # type: ignore[attr-defined]
        return term

    def save(self, directory: Path) -> Path:
        path = directory / BLEND_FILE
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, directory: Path) -> ScoreBlend | None:
        path = directory / BLEND_FILE
        if not path.exists():
            return None
        fields = json.loads(path.read_text())
        fields["precision"] = tuple(fields.get("precision", ()))
        return cls(**fields)


def _design(bert_logits: np.ndarray, features: np.ndarray) -> np.ndarray:
    return np.column_stack([bert_logits, features, np.ones(len(bert_logits))])


# How much of a parent's knowledge an update keeps: its prior precision is the parent's
# Hessian times this. 0.5: the newest update's pairs weigh as much as everything before
# them, so the weights follow drift within a few updates yet a small update cannot swing them.
PRIOR_MEMORY = 0.5


def _newton(
    x: np.ndarray, y: np.ndarray, centre: np.ndarray, penalty: np.ndarray, iterations: int
) -> np.ndarray:
    """Newton's method on the negative log-likelihood of logistic regression with logits
    `x @ w`, plus `(w - centre)ᵀ penalty (w - centre) / 2` (`penalty` a matrix)."""
    w = centre.copy()
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ w, -30, 30)))
        grad = x.T @ (p - y) + penalty @ (w - centre)
        hess = (x * (p * (1 - p))[:, None]).T @ x + penalty
        step = np.linalg.solve(hess, grad)
        w = w - step
        if float(np.max(np.abs(step))) < 1e-8:
            break
    return w


def _hessian(x: np.ndarray, w: np.ndarray, penalty: np.ndarray) -> np.ndarray:
    p = 1.0 / (1.0 + np.exp(-np.clip(x @ w, -30, 30)))
    return (x * (p * (1 - p))[:, None]).T @ x + penalty


def fit_blend(
    bert_logits: np.ndarray,
    item_texts: Sequence[str],
    labels: np.ndarray,
    prior: ScoreBlend | None = None,
    l2: float = 1.0,
    iterations: int = 25,
    collab: np.ndarray | None = None,
    memory: float = PRIOR_MEMORY,
) -> ScoreBlend:
    """Logistic regression of `labels` on (bert_logit, signals, 1[, collab]), penalised
    towards `prior` (default the identity). Non-finite logits are skipped. Without `collab`,
    the prior's collaborative weight is kept.

    **An update** (a prior with a `precision`): a Bayesian update. The penalty is the
    prior's precision times `memory` (plus `l2` on the diagonal), so a few hundred new pairs
    move the weights only as far as they outweigh what the parent learned (an incremental
    update's blend refitted on ~50 positives alone swung BERT's weight from 0.44 to -0.03
    over a MovieLens replay). With `collab`, all five weights are fitted on the pairs whose
    collaborative score is known (NaN = unknown); the others, a replay sample of history,
    are what the prior already summarises.

    **From scratch** (no precision), with `collab`, two stages:
    1. the text weights (bert, popularity, new arrival, bias) on every pair with a logit;
    2. on the pairs whose collaborative score is known only: a scale of that text logit, the
       collaborative weight and a bias shift (scale pulled towards 1, the weight towards the
       prior's). The final text weights are the first stage's times the scale.
    The clean pairs are few (a from-scratch run's newest quarter), so they fit three numbers,
    not five: the direction of the text weights comes from all pairs, and the scale undoes
    the shrinking that leaving the collaborative score out of the first stage causes (a
    logistic model's weights shrink when a predictor is left out).

    Either way the result carries its `precision`: the penalised Hessian at its weights over
    the pairs it learned from (an unknown collaborative score counts as 0 there, so such
    pairs inform the text weights only).

    Raises:
        ValueError: mismatched lengths, fewer than 8 pairs with a logit, or (with `collab`)
            fewer than 8 of them with a known collaborative score.
    """
    z = np.asarray(bert_logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if not len(z) == len(item_texts) == len(y) or (collab is not None and len(collab) != len(z)):
        raise ValueError(
            f"bert_logits, item_texts, labels (and collab) must have one length, got "
            f"{len(z)}, {len(item_texts)}, {len(y)}"
            + (f", {len(collab)}" if collab is not None else "")
        )
    keep = np.isfinite(z)
    if int(keep.sum()) < 8:
        raise ValueError(f"need at least 8 pairs with a logit to fit a blend, got {keep.sum()}")
    scores = np.zeros(int(keep.sum()))  # the collaborative column; 0 where unknown
    known = np.zeros(int(keep.sum()), dtype=bool)
    if collab is not None:
        c = np.asarray(collab, dtype=np.float64)[keep]
        known = np.isfinite(c)
        if int(known.sum()) < 8:
            raise ValueError(
                f"need at least 8 pairs with a collaborative score to fit its weight, "
                f"got {known.sum()}"
            )
        scores[known] = c[known]
    texts = [t for t, k in zip(item_texts, keep, strict=True) if k]
    x = np.column_stack([_design(z[keep], signal_features(texts)), scores])
    y = y[keep]
    start = prior or ScoreBlend()
    penalty = np.diag([l2, l2, l2, 1e-6, l2])  # the bias is not pulled anywhere
    parent = start.precision_matrix
    used = np.ones(len(y), dtype=bool)  # the pairs this fit learns from
    if parent is not None:
        penalty = penalty + memory * parent
    if parent is not None and collab is not None:  # an update: all five on the clean pairs
        used = known
        w = _newton(x[used], y[used], start.all_weights, penalty, iterations)
    else:  # the text weights on every pair; the prior's collaborative weight for now
        text = _newton(x[:, :4], y, start.weights, penalty[:4, :4], iterations)
        w = np.append(text, start.collab)
        if collab is not None:  # from scratch: the second stage
            text_logit = x[known, :4] @ w[:4]
            stage2 = np.column_stack([text_logit, scores[known], np.ones(len(text_logit))])
            scale, w[4], shift = _newton(
                stage2,
                y[known],
                np.array([1.0, start.collab, 0.0]),
                np.diag([l2, l2, 1e-6]),
                iterations,
            )
            w[:4] *= scale
            w[3] += shift
    precision = _hessian(x[used], w, penalty)
    bert, popularity, new_arrival, bias, weight = (round(float(v), 6) for v in w)
    return ScoreBlend(
        bert,
        popularity,
        new_arrival,
        bias,
        fitted_on=int(used.sum()),
        collab=weight,
        precision=tuple(round(float(v), 6) for v in precision.ravel()),
    )


def fit_blend_progressive(
    report_logits: np.ndarray | None,
    report_position: np.ndarray | None,
    item_texts: Sequence[str],
    labels: np.ndarray,
    prior: ScoreBlend | None = None,
    from_position: float = 0.5,
    collab: np.ndarray | None = None,
) -> ScoreBlend | None:
    """`fit_blend` on the progressive-validation logits of one training pass, from
    `from_position` of the pass on (the model's first steps say little about the final one);
    None when too few pairs were scored there (the caller keeps its current blend).

    With `collab` (NaN = unknown), the collaborative weight is fitted too (`fit_blend`) when
    at least 32 pairs in range have a known score; otherwise the blend is fitted without it
    and keeps the prior's collaborative weight."""
    if report_logits is None or report_position is None:
        return None
    keep = np.isfinite(report_logits) & (report_position >= from_position)
    if int(keep.sum()) < 32:
        return None
    if collab is not None:
        known = keep & np.isfinite(np.asarray(collab, dtype=np.float64))
        if int(known.sum()) < 32:
            collab = None
    texts = [t for t, k in zip(item_texts, keep, strict=True) if k]
    return fit_blend(
        report_logits[keep],
        texts,
        np.asarray(labels)[keep],
        prior,
        collab=np.asarray(collab, dtype=np.float64)[keep] if collab is not None else None,
    )
