"""Data-parallel training under torchrun: 2 CPU processes (gloo) on the tiny re-ranker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from model.reranker import CrossEncoderReranker
from model.training import Pair, shard_indices
from services.updater.ddp_train import weights_sha256, write_pairs

pytestmark = pytest.mark.integration

TORCHRUN = Path(sys.executable).with_name("torchrun")


def _pairs(n: int) -> list[Pair]:
    return [
        Pair(
            f"user {i} likes category {i % 3}", f"item {i} in category {(i * 7) % 3}", float(i % 2)
        )
        for i in range(n)
    ]


def test_shard_indices_cover_every_pair_once_plus_padding() -> None:
    shards = [shard_indices(11, r, 2, np.random.default_rng(5)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 6  # equal: both ranks run the same steps
    assert set(shards[0]) | set(shards[1]) == set(range(11))
    assert len(set(shards[0]) & set(shards[1])) <= 1  # the one wrapped-around pad
    assert shard_indices(11, 0, 1, np.random.default_rng(5)) == list(
        np.random.default_rng(5).permutation(11)
    )


def test_torchrun_two_cpu_ranks_train_in_sync(tmp_path: Path) -> None:
    assert TORCHRUN.exists(), f"torchrun not found next to {sys.executable}; run `make setup`"
    pairs = write_pairs(_pairs(40), tmp_path / "pairs.jsonl")
    out, reports = tmp_path / "model", tmp_path / "ranks"
    # fmt: off
    cmd = [
        str(TORCHRUN), "--standalone", "--nproc_per_node=2",
        "-m", "services.updater.ddp_train",
        "--pairs", str(pairs), "--tiny", "--device", "cpu", "--out", str(out),
        "--batch-size", "4", "--learning-rate", "1e-3", "--freeze-layers", "0",
        "--rank-report", str(reports),
    ]
    # fmt: on
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path.cwd())}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    ranks = [json.loads((reports / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == 2 and r["backend"] == "gloo" for r in ranks)
    # 40 pairs, 20 per rank, 4 per step: 5 steps each, 40 pairs seen in all.
    assert [r["steps"] for r in ranks] == [5, 5]
    assert ranks[0]["examples_processed"] == 40
    # Each rank trained on different pairs; equal weights mean the gradients were all-reduced.
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    untrained = CrossEncoderReranker.tiny(seed=13, max_length=64)
    assert ranks[0]["weights_sha256"] != weights_sha256(untrained.model)

    loaded = CrossEncoderReranker.from_pretrained(out, 64, "cpu", "fp32")
    assert weights_sha256(loaded.model) == ranks[0]["weights_sha256"]
    scores = loaded.score("user 1 likes category 1", ["item 1 in category 1", "item 2"])
    assert scores.shape == (2,) and np.isfinite(scores).all()
