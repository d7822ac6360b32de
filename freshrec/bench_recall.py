"""`freshrec bench recall`: the FAISS stage at catalogue scale, on real item embeddings.

Issue #3's scale target: at 1M items, recall stays within 10 ms p99 with recall@100 ≥ 0.95
against exact search, and the ranking service's memory is known at 100k and 1M items. The
serving benchmark cannot answer it alone: its catalogue is whatever the workdir was
bootstrapped with, and embedding a million items is an offline job of its own. So:

1. In an initialised workdir (e.g. one `freshrec bench serving --items N` bootstrapped): the
   vectors of its serving index and its catalogue's categories (`--items` is ignored).
   Otherwise the synthetic shop's catalogue at `--items` N (`generate_catalogue`, no events), each item's
   text embedded by the serving recall encoder (the same `TextEncoder` and `item_text` as
   bootstrap): real embeddings of real-looking product text, clustered as a shop's are.
   They are cached under the workdir (`cache/recall-<N>-<seed>-<model>.npy`): the embedding is
   the expensive part (~190 items/s on 2 cores with bf16 hardware, ~55 tokens an item).
2. The index as serving builds it (`RecallIndex.build`: exact inner product up to
   `EXACT_LIMIT`, HNSW above), timed.
3. Queries as serving makes them: a user is the recency-weighted mean of 1-10 items they
   engaged with (`user_vector`), drawn from one or two categories (shoppers' tastes are
   topical); those items are excluded, as the pipeline excludes a user's recent items.
4. For each HNSW `efSearch` in the sweep: single-query latency of `RecallIndex.search` (the
   serving call, exclusions included), p50/p99, and recall@k against exact search (a matrix
   product over every vector, same exclusions): `recall@k` forgives ties at the k-th score
   (ann-benchmarks' definition), `recall@k_ids` does not (`measure_search`). The serving
   default (`efSearch` the index is built with) is what the top-level keys report.
5. Memory: the process RSS after the index is built with the encoder loaded (what a ranking
   replica holds besides the re-ranker and its caches), and the index's own size.
6. With `--changes N`: N catalogue changes as a replica applies them between index builds
   (`catalogue_changes`: half new listings, a quarter edited items, a quarter removed, each new
   or edited item with the vector of another item's real text), searched as the overlay beside
   the base index, then folded in as `freshrec index-rebuild` does (`RecallIndex.compacted`):
   latency and recall@k against exact search over the live catalogue, both ways
   (`measure_changes`).

Pure measurement: nothing here writes to Redis or the registry.
"""

from __future__ import annotations

import hashlib
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

Say = Callable[[str], Any]


def topical_queries(
    vectors: np.ndarray,
    categories: Sequence[str],
    n_queries: int,
    rng: np.random.Generator,
    max_history: int = 10,
) -> list[tuple[np.ndarray, list[int]]]:
    """(query vector, positions of the user's history) for `n_queries` simulated users: 1 or
    2 categories each, 1..`max_history` items from them, most recent first."""
    from model.embeddings import user_vector

    by_category: dict[str, list[int]] = {}
    for pos, category in enumerate(categories):
        by_category.setdefault(category, []).append(pos)
    names = sorted(by_category)
    out: list[tuple[np.ndarray, list[int]]] = []
    while len(out) < n_queries:
        tastes = rng.choice(
            len(names), size=min(len(names), int(rng.integers(1, 3))), replace=False
        )
        pool = [p for t in tastes for p in by_category[names[int(t)]]]
        size = min(len(pool), int(rng.integers(1, max_history + 1)))
        history = [pool[int(i)] for i in rng.choice(len(pool), size=size, replace=False)]
        query = user_vector([vectors[p] for p in history])
        if query is not None:
            out.append((query, history))
    return out


@dataclass(frozen=True)
class Truth:
    """Exact search's answer for one query: its top-k positions, the k-th best score, and
    whether more items than k reach that score (the top-k is then not unique)."""

    positions: set[int]
    kth_score: float
    tied: bool = False


# Two scores closer than this are a tie (float32 sums of 384 products, in different orders).
TIE_EPS = 1e-5


def exact_top_k(
    vectors: np.ndarray, queries: list[tuple[np.ndarray, list[int]]], k: int
) -> list[Truth]:
    """Exact top-k positions by inner product for each query, its history excluded."""
    out: list[Truth] = []
    batch = 256
    for start in range(0, len(queries), batch):
        chunk = queries[start : start + batch]
        scores = np.stack([q for q, _ in chunk]) @ vectors.T  # (b, n)
        for row, (_, history) in enumerate(chunk):
            scores[row, history] = -np.inf
        top = np.argpartition(-scores, kth=min(k, scores.shape[1] - 1), axis=1)[:, :k]
        for row, positions in enumerate(top):
            kth = float(scores[row, positions].min())
            tied = int((scores[row] >= kth - TIE_EPS).sum()) > len(positions)
            out.append(Truth({int(p) for p in positions}, kth, tied))
    return out


def measure_search(
    index: Any,
    ids: Sequence[str],
    vectors: np.ndarray,
    queries: list[tuple[np.ndarray, list[int]]],
    truth: list[Truth],
    k: int,
) -> dict[str, float]:
    """Latency of `RecallIndex.search` per query (the serving call) and recall@k vs `truth`.

    `recall@k` counts a returned item as found when its exact score reaches the k-th exact
    score (ann-benchmarks' definition): where several items tie at the boundary (identical
    texts embed identically: 22% of the synthetic million are repeats), exact search's own
    pick among them is arbitrary. `recall@k_ids` counts only the exact search's ids, ties not
    forgiven.
    """
    position = {item_id: pos for pos, item_id in enumerate(ids)}
    times, hits, id_hits = [], 0, 0
    for (query, history), exact in zip(queries, truth, strict=True):
        exclude = frozenset(ids[p] for p in history)
        t = time.perf_counter()
        found = index.search(query, k, exclude)
        times.append((time.perf_counter() - t) * 1e3)
        got = [position[i] for i, _ in found]
        id_hits += len(set(got) & exact.positions)
        if got:
            scores = vectors[got] @ query
            hits += int((scores >= exact.kth_score - TIE_EPS).sum())
    arr = np.asarray(times)
    return {
        "p50_ms": round(float(np.percentile(arr, 50)), 3),
        "p99_ms": round(float(np.percentile(arr, 99)), 3),
        f"recall@{k}": round(hits / (k * len(queries)), 4),
        f"recall@{k}_ids": round(id_hits / (k * len(queries)), 4),
    }


def catalogue_changes(
    vectors: np.ndarray, ids: Sequence[str], n: int, rng: np.random.Generator
) -> tuple[dict[str, np.ndarray], set[str]]:
    """`n` catalogue changes on the catalogue (`vectors` aligned with `ids`): (upserts by id,
    removed ids). Half are new listings, a quarter edits of existing items, a quarter removals;
    a new or edited item gets the vector of another item's text (real embeddings: a shop's new
    listings read like its old ones, and re-listings repeat them)."""
    new, edited = n // 2, n // 4
    removed = n - new - edited
    touched = rng.choice(len(ids), size=min(len(ids), edited + removed), replace=False)
    sources = rng.integers(0, len(ids), size=new + edited)
    upserts = {f"listing-{k}": vectors[int(sources[k])] for k in range(new)}
    upserts.update(
        {ids[int(p)]: vectors[int(sources[new + k])] for k, p in enumerate(touched[:edited])}
    )
    return upserts, {ids[int(p)] for p in touched[edited:]}


def measure_changes(
    index: Any,
    vectors: np.ndarray,
    queries: list[tuple[np.ndarray, list[int]]],
    k: int,
    n: int,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """`n` changes (`catalogue_changes`) on `index` (a RecallIndex without changes, built from
    `vectors`; `queries`' histories are positions in it): search latency and recall@k against
    exact search over the live catalogue, with the changes as overlay and after folding them
    in."""
    upserts, removals = catalogue_changes(vectors, index.item_ids, n, rng)
    live = index.with_changes(upserts, removals)
    ids = live.live_ids()
    live_vectors = live.vectors_of(ids)
    position = {item_id: pos for pos, item_id in enumerate(ids)}
    # The same users: their histories, less what was removed.
    remapped = [
        (query, [position[index.item_ids[p]] for p in history if index.item_ids[p] in position])
        for query, history in queries
    ]
    truth = exact_top_k(live_vectors, remapped, k)
    hnsw = getattr(index.index, "hnsw", None)
    t = time.perf_counter()
    # The base's kind of index (the job picks by size: `EXACT_LIMIT`), at its efSearch.
    rebuilt = live.compacted("1-0", exact_limit=0 if hnsw is not None else len(ids))
    rebuild_s = time.perf_counter() - t
    if hnsw is not None:
        rebuilt.index.hnsw.efSearch = hnsw.efSearch
    out: dict[str, Any] = {
        "changes": n,
        "overlay_items": len(live.overlay_ids),
        "hidden_items": len(live.removed),
        "live_items": len(ids),
    }
    for name, searched in (("overlay", live), ("rebuilt", rebuilt)):
        searched.search(remapped[0][0], k)  # warm
        out[name] = measure_search(searched, ids, live_vectors, remapped, truth, k)
    out["rebuild_s"] = round(rebuild_s, 1)
    return out


def tied_share(truth: list[Truth]) -> float:
    """Share of queries whose exact top-k is not unique: more items than k reach the k-th
    score (what separates `recall@k` from `recall@k_ids`)."""
    return round(sum(t.tied for t in truth) / max(len(truth), 1), 4)


def _embeddings(
    texts: list[str], cache: Path, say: Say, progress: bool
) -> tuple[np.ndarray, float | None]:
    """The recall encoder's vectors for `texts`, from `cache` when present; (vectors, seconds
    spent embedding now or None when read from the cache)."""
    from tqdm import tqdm

    from model.embeddings import TextEncoder

    if cache.exists():
        say(f"embeddings from {cache}")
        return np.load(cache), None
    encoder = TextEncoder.from_pretrained()
    started = time.perf_counter()
    with tqdm(total=len(texts), desc="embed items", unit="item", disable=not progress) as bar:
        vectors = encoder.encode(texts, progress=bar.update)
    seconds = time.perf_counter() - started
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_suffix(".partial.npy")
    np.save(partial, vectors)
    os.replace(partial, cache)
    return vectors, seconds


def _served_vectors(workdir: Path) -> tuple[np.ndarray, list[str], list[str]] | None:
    """(vectors, ids, categories) of the champion index of an initialised workdir, or None."""
    from freshrec.config import load_config
    from model.index import RecallIndex
    from services.features.profiles import read_item_catalog
    from services.features.store import ITEM_FEATURES_TABLE
    from services.registry import open_registry

    if not (workdir / "freshrec.json").exists():
        return None
    config = load_config(workdir)
    registry = open_registry(config)
    version = registry.champion("index")
    if version is None:
        return None
    index = RecallIndex.load(registry.path("index", version))
    vectors = index.index.reconstruct_n(0, index.index.ntotal)
    catalog = read_item_catalog(config.offline_dir / ITEM_FEATURES_TABLE)
    categories = [catalog[i].category if i in catalog else "" for i in index.item_ids]
    return vectors, list(index.item_ids), categories


def _synthetic_vectors(
    workdir: Path, items: int, seed: int, say: Say, progress: bool
) -> tuple[np.ndarray, list[str], list[str], float | None]:
    """The synthetic catalogue of `items` items, embedded (or read from the cache)."""
    import pandas as pd

    from freshrec.data.schema import INTERACTION_COLUMNS
    from freshrec.data.synthetic import generate_catalogue
    from model.reranker import pretrained_path
    from model.text import item_text
    from services.features.profiles import build_item_features, item_from_row

    frame = generate_catalogue(seed, items)
    # The rows bootstrap embeds (canonical items -> feature rows -> ItemFeatures), no events.
    rows = cast(
        list[dict[str, Any]],
        build_item_features(
            frame, pd.DataFrame(columns=list(INTERACTION_COLUMNS)), pd.Timestamp.now(tz="UTC")
        ).to_dict("records"),
    )
    catalog = [item_from_row(row) for row in rows]
    ids = [item.item_id for item in catalog]
    categories = [item.category for item in catalog]
    texts = [item_text(item) for item in catalog]
    model_tag = hashlib.blake2b(str(pretrained_path()).encode(), digest_size=4).hexdigest()
    cache = workdir / "cache" / f"recall-{items}-{seed}-{model_tag}.npy"
    vectors, embed_s = _embeddings(texts, cache, say, progress)
    return vectors, ids, categories, embed_s


def bench_recall(
    workdir: Path,
    items: int,
    queries: int = 1000,
    k: int = 100,
    ef_search: Sequence[int] = (32, 64, 128, 256, 512, 1024),
    seed: int = 7,
    say: Say = print,
    progress: bool = True,
    changes: int = 0,
) -> dict[str, Any]:
    """Run the benchmark (module docstring); returns the JSON-able result (with a `changes`
    object when `changes` > 0)."""
    import faiss
    import psutil
    import torch

    from freshrec.machine import after_idle
    from model.device import cpu_description
    from model.index import RecallIndex

    started = time.perf_counter()
    served = _served_vectors(workdir)
    if served is not None:  # the workdir's serving index: its own vectors and catalogue
        vectors, ids, categories = served
        items, embed_s = len(ids), None
        say(f"the serving index of {workdir}: {items:,} items")
    else:
        vectors, ids, categories, embed_s = _synthetic_vectors(workdir, items, seed, say, progress)
    rss_encoder = psutil.Process().memory_info().rss

    t = time.perf_counter()
    index = RecallIndex.build(vectors, ids)
    build_s = time.perf_counter() - t
    kind = type(index.index).__name__
    say(f"{kind} over {items:,} items built in {build_s:.1f} s")
    rng = np.random.default_rng(seed)
    sample = topical_queries(vectors, categories, queries, rng)
    truth = exact_top_k(vectors, sample, k)
    hnsw = getattr(index.index, "hnsw", None)
    default_ef = int(hnsw.efSearch) if hnsw is not None else None
    sweep = []
    for ef in sorted(set(ef_search) | ({default_ef} if default_ef else set())) if hnsw else [0]:
        if hnsw is not None:
            hnsw.efSearch = ef
        index.search(sample[0][0], k)  # warm
        row = {"ef_search": ef or None, **measure_search(index, ids, vectors, sample, truth, k)}
        sweep.append(row)
        say(f"  efSearch {ef or '-'}: {row}")
    if hnsw is not None:
        hnsw.efSearch = default_ef
    chosen = next(r for r in sweep if r["ef_search"] == default_ef)
    index_bytes = int(faiss.serialize_index(index.index).nbytes)
    changed = None
    if changes > 0:
        changed = measure_changes(index, vectors, sample, k, changes, rng)
        say(
            f"  {changes:,} catalogue changes: overlay {changed['overlay']}, "
            f"rebuilt in {changed['rebuild_s']} s: {changed['rebuilt']}"
        )
    return {
        "items": items,
        "queries": len(sample),
        "k": k,
        "index": kind,
        "ef_search": default_ef,
        "p50_ms": chosen["p50_ms"],
        "p99_ms": chosen["p99_ms"],
        f"recall@{k}": chosen[f"recall@{k}"],
        f"recall@{k}_ids": chosen[f"recall@{k}_ids"],
        "tied_queries": tied_share(truth),
        "sweep": sweep,
        **({"changes": changed} if changed is not None else {}),
        "build_s": round(build_s, 1),
        "embed_s": round(embed_s, 1) if embed_s is not None else None,
        "embed_items_per_s": round(items / embed_s, 1) if embed_s else None,
        "index_mb": round(index_bytes / 2**20, 1),
        "rss_mb": round(max(rss_encoder, psutil.Process().memory_info().rss) / 2**20, 1),
        "seconds": round(time.perf_counter() - started, 1),
        "machine": {
            "cores": os.cpu_count(),
            "torch_threads": int(torch.get_num_threads()),
            "faiss_threads": int(faiss.omp_get_max_threads()),
            "cpu": platform.processor() or platform.machine(),
            **cpu_description(),
            "after_idle": after_idle(),  # freshrec/machine.py
        },
    }
