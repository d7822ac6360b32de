"""Fine-tuning the cross-encoder: pairs with sampled negatives, a bounded AdamW run, evaluation.

Pure compute: callers hand in (profile-before-the-event, item) positives and a catalogue; this
module builds text pairs, trains and scores. GPU with autocast when present, CPU otherwise.

Under `torchrun` (a process group initialised by the caller, see `services/updater/ddp_train.py`)
`train` runs data-parallel: the model is wrapped in DistributedDataParallel, every rank takes a
deterministic shard of the pairs, and gradients are averaged across ranks at each step, so all
ranks end with the same weights. Saving and publishing stay with the caller (rank 0).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import torch
from transformers import get_linear_schedule_with_warmup

from freshrec.records import Example, ItemFeatures, UserProfile
from model.blend import fit_blend_progressive
from model.collab import CollabFactors, profile_history
from model.device import CpuDtype, autocast_dtype
from model.popularity import utc
from model.reranker import CrossEncoderReranker
from model.text import ranking_item_text, user_context_text


@dataclass(frozen=True)
class TrainParams:
    """Hyper-parameters of one training run; validated on construction."""

    learning_rate: float = 5e-5
    epochs: int = 1
    batch_size: int = 32
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    freeze_layers: int = 4  # embeddings + this many lower encoder layers stay frozen
    # the frozen bottom in eval mode, its split-model output computed once per distinct row
    # (`frozen_to_eval`, `SplitEncoder.begin_frozen_prefix`); off = dropout everywhere
    frozen_eval: bool = False
    max_seconds: float | None = None  # stop early (after a step) once this budget is spent
    cpu_dtype: CpuDtype = "fp32"
    seed: int = 13
    # refit the score blend (model/blend.py) on this run's progressive-validation logits
    fit_blend: bool = True

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


# item, event time → the item as it was known then (e.g. `PopularityClock.stamp`)
ItemAsOf = Callable[[ItemFeatures, datetime | None], ItemFeatures]


# example, how many, rng → negatives for it (e.g. `model.negatives.ServingLikeNegatives`)
NegativeSampler = Callable[[Example, int, np.random.Generator], list[ItemFeatures]]


def _negatives(
    example: Example,
    catalog: Sequence[ItemFeatures],
    n: int,
    rng: np.random.Generator,
    sampler: NegativeSampler | None,
) -> list[ItemFeatures]:
    if sampler is not None:
        return sampler(example, n, rng)
    profile, item = example[0], example[1]
    return sample_negatives(
        catalog, {item.item_id, *(profile.recent_items if profile else ())}, n, rng
    )


def _text_at(item: ItemFeatures, at: datetime | None, as_of: ItemAsOf | None) -> str:
    return ranking_item_text(as_of(item, at) if as_of is not None else item, at)


@dataclass(frozen=True)
class Pair:
    user_text: str
    item_text: str
    label: float
    # The collaborative score (model/collab.py) of the factors the pairs were made with, or
    # NaN when unknown: no factors, or an event the factors were fitted on (a leaked score).
    collab: float = math.nan


@dataclass(frozen=True)
class EvalGroup:
    """One held-out positive among sampled negatives: candidates[0] is the relevant one."""

    user_text: str
    candidates: tuple[str, ...]
    # Ids for the collaborative score, which each evaluated model computes with its own
    # factors: the candidates' item ids and the user's fold-in history (`profile_history`).
    item_ids: tuple[str, ...] = ()
    history: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class TrainReport:
    examples_processed: int  # summed over all ranks under DDP (padding repeats included)
    steps: int
    seconds: float
    trainable_params: int
    final_loss: float
    device: str
    stopped_early: bool
    world_size: int = 1
    # Each pair's logit as the model scored it in the first pass just before learning from it
    # (progressive validation: an out-of-sample score); NaN where not scored on this rank.
    progressive_logits: np.ndarray | None = None
    # When in that pass: the share of the pass's steps already taken (0 = the first step).
    progressive_position: np.ndarray | None = None
    # With `frozen_eval`, a split model's segment rows through the frozen bottom: computed, and
    # answered from the run's cache (`SplitEncoder.begin_frozen_prefix`); else 0, as for a
    # full cross-encoder.
    frozen_rows_computed: int = 0
    frozen_rows_reused: int = 0


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
    positives: Sequence[Example],
    catalog: Sequence[ItemFeatures],
    negatives_per_positive: int,
    rng: np.random.Generator,
    as_of: ItemAsOf | None = None,
    negatives: NegativeSampler | None = None,
    collab: CollabFactors | None = None,
) -> list[Pair]:
    """Text pairs: each positive (label 1) with sampled catalogue negatives (label 0).

    Args:
        as_of: when given, every item of a positive's group (the positive and its negatives)
            is read as it was known at the positive's event time: the re-ranker must learn
            from the signals serving would have had, never from the labels' own events.
        negatives: draws each positive's negatives; default uniform from `catalog` (never
            the positive nor the user's recent items).
        collab: item factors to score the pairs with (`Pair.collab`), for a positive whose
            event is at or after the factors' `fitted_until` (others stay NaN).
    """
    pairs: list[Pair] = []
    for example in positives:
        profile, item, at = Example(*example)
        user = user_context_text(profile)
        drawn = _negatives(
            Example(profile, item, at), catalog, negatives_per_positive, rng, negatives
        )
        scores = _collab_scores(collab, profile, at, [item, *drawn])
        pairs.append(Pair(user, _text_at(item, at, as_of), 1.0, scores[0]))
        for neg, score in zip(drawn, scores[1:], strict=True):
            pairs.append(Pair(user, _text_at(neg, at, as_of), 0.0, score))
    return pairs


def _collab_scores(
    collab: CollabFactors | None,
    profile: UserProfile | None,
    at: datetime | None,
    items: Sequence[ItemFeatures],
) -> list[float]:
    """Collaborative scores of a positive's group, NaN when not a clean feature."""
    if (
        collab is None
        or collab.fitted_until is None
        or at is None
        or utc(at) < utc(collab.fitted_until)
    ):
        return [math.nan] * len(items)
    history = profile_history(profile)
    return [float(v) for v in collab.scores(history, [i.item_id for i in items])]


def make_eval_groups(
    positives: Sequence[Example],
    catalog: Sequence[ItemFeatures],
    candidates_per_group: int,
    rng: np.random.Generator,
    as_of: ItemAsOf | None = None,
    negatives: NegativeSampler | None = None,
) -> list[EvalGroup]:
    """Held-out groups: the true item first, then `candidates_per_group - 1` negatives (items
    read as of the positive's event time when `as_of` is given, as in `make_pairs`)."""
    groups = []
    for example in positives:
        profile, item, at = Example(*example)
        negs = _negatives(
            Example(profile, item, at), catalog, candidates_per_group - 1, rng, negatives
        )
        texts = (_text_at(item, at, as_of), *(_text_at(n, at, as_of) for n in negs))
        groups.append(
            EvalGroup(
                user_context_text(profile),
                texts,
                (item.item_id, *(n.item_id for n in negs)),
                tuple(profile_history(profile).items()),
            )
        )
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


def frozen_to_eval(reranker: CrossEncoderReranker, n_layers: int) -> None:
    """Put what `freeze_lower_layers` froze in eval mode (the rest stays in train mode): the
    frozen bottom then computes in training what it computes at serving, without dropout
    noise the trainable layers would learn on and never see again, and (split models) its
    output is a function of the text, which `SplitEncoder.begin_frozen_prefix` reuses."""
    if n_layers <= 0:
        return
    bert = reranker.model.bert
    bert.embeddings.eval()
    for layer in bert.encoder.layer[: min(n_layers, reranker.num_layers)]:
        layer.eval()


def shard_indices(n: int, rank: int, world_size: int, rng: np.random.Generator) -> list[int]:
    """This rank's share of one shuffled epoch of `n` pairs (DistributedSampler's scheme).

    Every rank draws the same permutation (same seed), pads it by wrapping around to a multiple
    of `world_size`, and takes every `world_size`-th index from `rank`: the shards are disjoint
    apart from the padding and equally long, so all ranks run the same number of steps (DDP
    hangs if one rank stops stepping while the others wait in the gradient all-reduce).

    Raises:
        ValueError: rank is not in 0..world_size-1 or n < 1.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
    order = [int(i) for i in rng.permutation(n)]
    total = math.ceil(n / world_size) * world_size
    padded = (order * math.ceil(total / n))[:total]
    return padded[rank::world_size]


class _PairLogits(torch.nn.Module):
    """`reranker.logits` as a module, so DistributedDataParallel sees (and syncs) its forward."""

    def __init__(self, reranker: CrossEncoderReranker, cpu_dtype: CpuDtype):
        super().__init__()
        self.model = reranker.model
        self.reranker = reranker
        self.cpu_dtype: CpuDtype = cpu_dtype

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.reranker.logits(batch, self.cpu_dtype)


def _distributed() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, or (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def train(
    reranker: CrossEncoderReranker,
    pairs: Sequence[Pair],
    params: TrainParams,
    progress: Callable[[int, float], None] | None = None,
) -> TrainReport:
    """Fine-tune `reranker` in place on `pairs` with binary cross-entropy.

    With an initialised torch.distributed process group every rank must call this with the
    same `pairs` and `params`; each trains on its shard (`shard_indices`) with `batch_size`
    pairs per rank per step, and DistributedDataParallel averages the gradients.

    Args:
        progress: called after each step with (pairs in the step on this rank, loss).

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
    reranker.clear_item_states()  # computed with the weights about to change
    rank, world_size = _distributed()
    forward: torch.nn.Module = _PairLogits(reranker, params.cpu_dtype)
    if world_size > 1:
        # DDP broadcasts rank 0's weights here, so every rank starts from the same model.
        # device_ids=None: the module and its inputs already sit on this rank's one device.
        forward = torch.nn.parallel.DistributedDataParallel(forward, device_ids=None)
    optimiser = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=params.learning_rate,
        weight_decay=params.weight_decay,
    )
    steps_per_epoch = math.ceil(math.ceil(len(pairs) / world_size) / params.batch_size)
    total_steps = steps_per_epoch * params.epochs
    scheduler = get_linear_schedule_with_warmup(
        optimiser, int(total_steps * params.warmup_ratio), total_steps
    )
    dtype = autocast_dtype(device, params.cpu_dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    started = time.perf_counter()
    processed, steps, last_loss, stopped = 0, 0, float("nan"), False
    progressive = np.full(len(pairs), np.nan, dtype=np.float32)
    position = np.full(len(pairs), np.nan, dtype=np.float32)
    model.train()
    if params.frozen_eval:
        frozen_to_eval(reranker, params.freeze_layers)
        if reranker.split is not None:
            reranker.split.begin_frozen_prefix(params.freeze_layers)
    try:
        for epoch in range(params.epochs):
            order = shard_indices(len(pairs), rank, world_size, rng)
            for start in range(0, len(order), params.batch_size):
                picked = order[start : start + params.batch_size]
                chunk = [pairs[i] for i in picked]
                batch = reranker.encode_pairs(
                    [p.user_text for p in chunk], [p.item_text for p in chunk]
                )
                labels = torch.tensor([p.label for p in chunk], device=device)
                logits = forward(batch)
                if epoch == 0:
                    progressive[picked] = logits.detach().float().cpu().numpy()
                    position[picked] = steps / steps_per_epoch
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
                if params.max_seconds and _out_of_time(started, params.max_seconds, world_size):
                    stopped = True
                    break
            if stopped:
                break
    finally:
        model.eval()
        for p in model.parameters():
            p.requires_grad = True
        frozen_rows = (0, 0)
        if reranker.split is not None and params.frozen_eval:
            frozen_rows = (reranker.split.prefix_computed, reranker.split.prefix_reused)
            reranker.split.end_frozen_prefix()
    if world_size > 1:
        total = torch.tensor([processed], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(total)
        processed = int(total.item())
    if params.fit_blend:
        # The parent's blend is the prior: a small update moves it only as far as its data says.
        fitted = fit_blend_progressive(
            progressive,
            position,
            [p.item_text for p in pairs],
            np.array([p.label for p in pairs]),
            prior=reranker.blend,
            collab=_collab_column(pairs),
        )
        if fitted is not None:
            reranker.blend = fitted
    return TrainReport(
        examples_processed=processed,
        steps=steps,
        seconds=time.perf_counter() - started,
        trainable_params=trainable,
        final_loss=last_loss,
        device=str(device),
        stopped_early=stopped,
        world_size=world_size,
        progressive_logits=progressive,
        progressive_position=position,
        frozen_rows_computed=frozen_rows[0],
        frozen_rows_reused=frozen_rows[1],
    )


def _out_of_time(started: float, budget_s: float, world_size: int) -> bool:
    """Whether the time budget is spent; under DDP, on any rank (all ranks stop together)."""
    spent = time.perf_counter() - started > budget_s
    if world_size == 1:
        return spent
    flag = torch.tensor([int(spent)], dtype=torch.int64)
    if torch.distributed.get_backend() == "nccl":
        flag = flag.cuda()
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


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


def _collab_column(pairs: Sequence[Pair]) -> np.ndarray | None:
    column = np.array([p.collab for p in pairs], dtype=np.float64)
    return column if np.isfinite(column).any() else None


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
        if group.item_ids:
            scores = reranker.add_collab(scores, dict(group.history), group.item_ids)
        ranks.append(int((scores[1:] >= scores[0]).sum()))
        if progress is not None:
            progress(1)
    return ranking_metrics(ranks, k)
