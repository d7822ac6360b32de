"""Fine-tuning the cross-encoder: pairs with sampled negatives, a bounded AdamW run, evaluation.

Pure compute: callers hand in (profile-before-the-event, item) positives and a catalogue; this
module builds text pairs, trains and scores. GPU with autocast when present, CPU otherwise.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from transformers import get_linear_schedule_with_warmup

from freshrec.records import ItemFeatures, UserProfile
from model.device import autocast_dtype
from model.reranker import CrossEncoderReranker
from model.text import item_text, user_context_text


@dataclass(frozen=True)
class TrainParams:
    """Hyper-parameters of one training run; validated on construction."""

    learning_rate: float = 5e-5
    epochs: int = 1
    batch_size: int = 32
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    freeze_layers: int = 4  # embeddings + this many lower encoder layers stay frozen
    max_seconds: float | None = None  # stop early (after a step) once this budget is spent
    cpu_dtype: Literal["fp32", "bf16"] = "fp32"
    seed: int = 13

    def __post_init__(self) -> None:
        if not 0 < self.learning_rate < 1:
            raise ValueError(f"learning_rate must be in (0, 1), got {self.learning_rate}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.freeze_layers < 0:
            raise ValueError(f"freeze_layers must be >= 0, got {self.freeze_layers}")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ValueError(f"max_seconds must be > 0, got {self.max_seconds}")


@dataclass(frozen=True)
class Pair:
    user_text: str
    item_text: str
    label: float


@dataclass(frozen=True)
class EvalGroup:
    """One held-out positive among sampled negatives: candidates[0] is the relevant one."""

    user_text: str
    candidates: tuple[str, ...]


@dataclass(frozen=True)
class TrainReport:
    examples_processed: int
    steps: int
    seconds: float
    trainable_params: int
    final_loss: float
    device: str
    stopped_early: bool


def sample_negatives(
    catalog: Sequence[ItemFeatures],
    avoid: set[str],
    n: int,
    rng: np.random.Generator,
) -> list[ItemFeatures]:
    """`n` distinct catalogue items not in `avoid` (fewer if the catalogue is too small)."""
    out: list[ItemFeatures] = []
    seen: set[str] = set()
    for _ in range(n * 10):
        if len(out) == n:
            break
        item = catalog[int(rng.integers(len(catalog)))]
        if item.item_id in avoid or item.item_id in seen:
            continue
        seen.add(item.item_id)
        out.append(item)
    return out


def make_pairs(
    positives: Sequence[tuple[UserProfile | None, ItemFeatures]],
    catalog: Sequence[ItemFeatures],
    negatives_per_positive: int,
    rng: np.random.Generator,
) -> list[Pair]:
    """Text pairs: each positive (label 1) with sampled catalogue negatives (label 0)."""
    pairs: list[Pair] = []
    for profile, item in positives:
        user = user_context_text(profile)
        pairs.append(Pair(user, item_text(item), 1.0))
        avoid = {item.item_id, *(profile.recent_items if profile else ())}
        for neg in sample_negatives(catalog, avoid, negatives_per_positive, rng):
            pairs.append(Pair(user, item_text(neg), 0.0))
    return pairs


def make_eval_groups(
    positives: Sequence[tuple[UserProfile | None, ItemFeatures]],
    catalog: Sequence[ItemFeatures],
    candidates_per_group: int,
    rng: np.random.Generator,
) -> list[EvalGroup]:
    """Held-out groups: the true item first, then `candidates_per_group - 1` negatives."""
    groups = []
    for profile, item in positives:
        avoid = {item.item_id, *(profile.recent_items if profile else ())}
        negs = sample_negatives(catalog, avoid, candidates_per_group - 1, rng)
        texts = (item_text(item), *(item_text(n) for n in negs))
        groups.append(EvalGroup(user_context_text(profile), texts))
    return groups


def freeze_lower_layers(reranker: CrossEncoderReranker, n_layers: int) -> int:
    """Freeze embeddings and the lowest `n_layers` encoder layers; return trainable params."""
    bert = reranker.model.bert
    for p in reranker.model.parameters():
        p.requires_grad = True
    if n_layers > 0:
        for p in bert.embeddings.parameters():
            p.requires_grad = False
        for layer in bert.encoder.layer[: min(n_layers, reranker.num_layers)]:
            for p in layer.parameters():
                p.requires_grad = False
    return sum(p.numel() for p in reranker.model.parameters() if p.requires_grad)


def train(
    reranker: CrossEncoderReranker,
    pairs: Sequence[Pair],
    params: TrainParams,
    progress: Callable[[int, float], None] | None = None,
) -> TrainReport:
    """Fine-tune `reranker` in place on `pairs` with binary cross-entropy.

    Args:
        progress: called after each step with (pairs in the step, loss).

    Raises:
        ValueError: no pairs.
    """
    if not pairs:
        raise ValueError("pairs must not be empty")
    torch.manual_seed(params.seed)
    rng = np.random.default_rng(params.seed)
    model = reranker.model
    device = reranker.device
    trainable = freeze_lower_layers(reranker, params.freeze_layers)
    optimiser = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=params.learning_rate,
        weight_decay=params.weight_decay,
    )
    steps_per_epoch = math.ceil(len(pairs) / params.batch_size)
    total_steps = steps_per_epoch * params.epochs
    scheduler = get_linear_schedule_with_warmup(
        optimiser, int(total_steps * params.warmup_ratio), total_steps
    )
    dtype = autocast_dtype(device, params.cpu_dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    started = time.perf_counter()
    processed, steps, last_loss, stopped = 0, 0, float("nan"), False
    model.train()
    try:
        for _ in range(params.epochs):
            order = rng.permutation(len(pairs))
            for start in range(0, len(order), params.batch_size):
                chunk = [pairs[i] for i in order[start : start + params.batch_size]]
                batch = reranker.encode_pairs(
                    [p.user_text for p in chunk], [p.item_text for p in chunk]
                )
                labels = torch.tensor([p.label for p in chunk], device=device)
                logits = reranker.logits(batch, params.cpu_dtype)
                loss = loss_fn(logits, labels)
                optimiser.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(optimiser)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                scaler.step(optimiser)
                scaler.update()
                scheduler.step()
                processed += len(chunk)
                steps += 1
                last_loss = float(loss.detach())
                if progress is not None:
                    progress(len(chunk), last_loss)
                if params.max_seconds and time.perf_counter() - started > params.max_seconds:
                    stopped = True
                    break
            if stopped:
                break
    finally:
        model.eval()
        for p in model.parameters():
            p.requires_grad = True
    return TrainReport(
        examples_processed=processed,
        steps=steps,
        seconds=time.perf_counter() - started,
        trainable_params=trainable,
        final_loss=last_loss,
        device=str(device),
        stopped_early=stopped,
    )


def ranking_metrics(ranks: Sequence[int], k: int = 10) -> dict[str, float]:
    """NDCG@k, HitRate@k and MRR@k for groups with one relevant item at 0-based `ranks`."""
    r = np.asarray(ranks, dtype=np.float64)
    if len(r) == 0:
        return {f"ndcg@{k}": 0.0, f"hit@{k}": 0.0, f"mrr@{k}": 0.0, "groups": 0.0}
    inside = r < k
    return {
        f"ndcg@{k}": float(np.where(inside, 1.0 / np.log2(r + 2.0), 0.0).mean()),
        f"hit@{k}": float(inside.mean()),
        f"mrr@{k}": float(np.where(inside, 1.0 / (r + 1.0), 0.0).mean()),
        "groups": float(len(r)),
    }


def evaluate(
    reranker: CrossEncoderReranker,
    groups: Sequence[EvalGroup],
    k: int = 10,
    progress: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Rank each group's candidates with the re-ranker; metrics of the relevant item's rank.

    Ties are broken against the relevant item, so a constant scorer gets no credit.
    """
    ranks = []
    for group in groups:
        scores = reranker.score(group.user_text, list(group.candidates))
        ranks.append(int((scores[1:] >= scores[0]).sum()))
        if progress is not None:
            progress(1)
    return ranking_metrics(ranks, k)
