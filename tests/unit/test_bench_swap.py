"""`freshrec bench swap`'s challenger and windows (the run itself: tests/integration)."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from freshrec.bench_swap import _Call, publish_challenger, timeline, window
from freshrec.config import load_config
from freshrec.errors import FailedPrecondition
from model.artifacts import Manifest
from model.reranker import CrossEncoderReranker
from services.registry import open_registry


def test_the_challenger_moves_only_the_layers_the_updater_fine_tunes(tmp_path: Path) -> None:
    config = load_config(tmp_path / "work", training={"incremental_freeze_layers": 1})
    registry = open_registry(config)
    staging = registry.staging_dir("reranker")
    CrossEncoderReranker.tiny(seed=0, joint_layers=1).save(staging)
    champion = registry.publish("reranker", staging, Manifest(kind="reranker", version="")).version
    registry.promote("reranker", champion)

    got = publish_challenger(config)

    assert got[0] == champion and got[1] != champion and got[2] == 1
    assert registry.champion("reranker") == champion  # published, not promoted
    old = load_file(registry.path("reranker", champion) / "model.safetensors")
    new = load_file(registry.path("reranker", got[1]) / "model.safetensors")
    moved = {k for k in old if not (old[k] == new[k]).all()}
    # Embeddings and layer 1 frozen (as `freeze_layers` 1 trains); layer 2 and the head moved.
    frozen = {k for k in old if ".embeddings." in k or ".layer.0." in k}
    assert frozen and not frozen & moved
    assert moved == old.keys() - frozen - {"bert.embeddings.position_ids"}
    # By a small step: the same model, not a random one.
    for k in moved:
        assert (old[k] - new[k]).abs().max() < 0.01 * old[k].abs().max() + 1e-6


def test_without_a_champion_the_bench_says_what_to_run(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition, match="freshrec init"):
        publish_challenger(load_config(tmp_path / "empty"))


def test_a_window_holds_the_calls_that_started_in_it() -> None:
    calls = [_Call(0.5, 4.0, True, "v1"), _Call(1.0, 8.0, True, "v1"), _Call(1.5, 9.0, False, "")]
    # Collections as (end, generation, seconds): only the full ones that ended inside count.
    pauses = [(1.2, 2, 0.25), (1.3, 0, 0.5), (1.9, 2, 0.1), (2.5, 2, 1.0)]
    w = window(calls, 1.0, 2.0, pauses)
    assert (w["calls"], w["errors"], w["qps"]) == (2, 1, 2.0)
    assert w["p50_ms"] == w["max_ms"] == 8.0
    assert (w["full_gc"], w["full_gc_max_ms"]) == (2, 250.0)
    assert window(calls, 2.0, 3.0) == {
        "calls": 0,
        "errors": 0,
        "seconds": 1.0,
        "qps": 0.0,
        "full_gc": 0,
        "full_gc_max_ms": 0.0,
    }


def test_the_timeline_lists_from_the_promote_on_the_slowest_calls_full_gcs_and_milestones() -> None:
    calls = [
        _Call(0.5, 900.0, True, "v1"),  # before the promote: not listed, however slow
        _Call(1.5, 40.0, True, "v1"),
        _Call(2.0, 5.0, True, "v2"),
        _Call(2.5, 700.0, False, ""),
    ]
    pauses = [(0.9, 2, 0.3), (1.2, 1, 0.2), (1.8, 2, 0.15)]  # (end, generation, seconds)
    milestones = [(0.2, "loading reranker v1"), (1.1, "loading reranker v2")]
    got = timeline(calls, pauses, milestones, promoted=1.0, slowest=2)
    assert got == [
        {"at_s": 0.1, "event": "loading reranker v2"},
        {"at_s": 0.5, "event": "call answered in 40.0 ms"},
        {"at_s": 0.8, "event": "full garbage collection, 150.0 ms"},
        {"at_s": 1.5, "event": "call failed in 700.0 ms"},
    ]


def test_an_update_keeps_the_item_side_unless_told_otherwise(tmp_path: Path) -> None:
    from services.updater.job import train_params

    tcfg = load_config(tmp_path / "a").training
    assert tcfg.freeze_layers == 4 and tcfg.incremental_freeze_layers is None
    # A split model with 5 layers below its joint layer: an update freezes them all, a first
    # training `freeze_layers`; a full cross-encoder `freeze_layers` either way.
    assert train_params(tcfg, from_parent=True, item_side_layers=5).freeze_layers == 5
    assert train_params(tcfg, from_parent=False, item_side_layers=5).freeze_layers == 4
    assert train_params(tcfg, from_parent=True).freeze_layers == 4
    # Never fewer than `freeze_layers` (a model split lower down keeps its item side anyway).
    assert train_params(tcfg, from_parent=True, item_side_layers=2).freeze_layers == 4
    told = load_config(tmp_path / "b", training={"incremental_freeze_layers": 3}).training
    assert train_params(told, from_parent=True, item_side_layers=5).freeze_layers == 3
    assert train_params(told, from_parent=False, item_side_layers=5).freeze_layers == 4
