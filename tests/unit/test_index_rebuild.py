"""`freshrec index-rebuild` without servers: the changes read from the stream, or replayed
from the offline change log when the stream has dropped some the champion index lacks."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from freshrec.config import FreshRecConfig, load_config
from freshrec.errors import FailedPrecondition
from freshrec.records import ItemFeatures
from model.artifacts import Manifest
from model.index import RecallIndex
from model.text import item_text
from services.catalog.changes import CatalogChange, InMemoryChangeStream, append_offline
from services.jobs.index_rebuild import rebuild_index
from services.registry import open_registry

DIM = 8


class HashEncoder:
    """A deterministic stand-in for the recall encoder: one unit vector per text."""

    dim = DIM

    def encode(self, texts: Sequence[str], batch_size: int = 128) -> np.ndarray:
        rows = []
        for text in texts:
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
            row = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
            rows.append(row / np.linalg.norm(row))
        return np.stack(rows) if rows else np.zeros((0, DIM), dtype=np.float32)


class TrimmedStream(InMemoryChangeStream):
    """A stream that has dropped its changes through `lost` (as Redis reports after a trim)."""

    def __init__(self, lost: str = "0") -> None:
        super().__init__()
        self.lost = lost

    def trimmed_through(self) -> str:
        return self.lost


def _item(item_id: str, title: str) -> ItemFeatures:
    return ItemFeatures(item_id, title, f"{title}, described", "home", "Acme", 9.5)


def _workdir(tmp_path: Path, position: str = "0") -> FreshRecConfig:
    """A workdir whose champion index holds items a..e, with changes folded in through
    `position` ("0": none)."""
    config = load_config(tmp_path / "work")
    items = [_item(i, f"item {i}") for i in "abcde"]
    vectors = HashEncoder().encode([item_text(item) for item in items])
    base = RecallIndex.build(vectors, [item.item_id for item in items], catalog_position=position)
    registry = open_registry(config)
    manifest = Manifest(kind="index", version="", metrics={"items": 5.0, "dim": float(DIM)})
    sealed = registry.publish_written("index", base.save, manifest)
    registry.promote("index", sealed.version)
    return config


def _served(config: FreshRecConfig) -> RecallIndex:
    registry = open_registry(config)
    champion = registry.champion("index")
    assert champion is not None
    return RecallIndex.load(registry.path("index", champion))


def _vector(index: RecallIndex, item_id: str) -> np.ndarray:
    return np.asarray(index.index.reconstruct(index.item_ids.index(item_id)))


def test_changes_come_from_the_stream_while_it_holds_them_all(tmp_path: Path) -> None:
    config = _workdir(tmp_path)
    stream = TrimmedStream()
    stream.publish([CatalogChange("upsert", "f", _item("f", "lamp")), CatalogChange("remove", "b")])

    report = rebuild_index(config, stream=stream, encoder=HashEncoder(), announce=lambda _m: None)

    assert (report.source, report.changes, report.upserted, report.removed) == ("stream", 2, 1, 1)
    served = _served(config)
    assert served.catalog_position == report.catalog_position == "2-0"
    assert sorted(served.item_ids) == ["a", "c", "d", "e", "f"]


def test_a_trimmed_stream_is_replayed_from_the_offline_change_log(tmp_path: Path) -> None:
    config = _workdir(tmp_path)
    # Every change is logged offline before it is published (CatalogServicer's order); the
    # stream then drops all but the newest, past the index's position "0".
    changes = [
        CatalogChange("upsert", "f", _item("f", "lamp")),
        CatalogChange("upsert", "a", _item("a", "a new title for a")),
        CatalogChange("remove", "b"),
        CatalogChange("upsert", "g", _item("g", "rug")),
        CatalogChange("remove", "g"),
    ]
    stream = TrimmedStream(lost="4-0")
    for change in changes:
        append_offline(config.offline_dir, [change])
        stream.publish([change])
    said: list[str] = []

    report = rebuild_index(config, stream=stream, encoder=HashEncoder(), announce=said.append)

    assert report.source == "offline log" and report.changes == len(changes)
    assert "dropped changes through 4-0, past its position 0" in said[0]
    served = _served(config)
    # Through the stream's newest change: replicas keep as overlay only what comes after it.
    assert served.catalog_position == report.catalog_position == "5-0"
    assert sorted(served.item_ids) == ["a", "c", "d", "e", "f"]
    # The changed item is searched by its new text, as the stream's change would have made it.
    encoder = HashEncoder()
    new_text = item_text(_item("a", "a new title for a"))
    assert np.allclose(_vector(served, "a"), encoder.encode([new_text])[0], atol=1e-6)
    assert np.allclose(_vector(served, "f"), encoder.encode([item_text(_item("f", "lamp"))])[0])
    manifest = open_registry(config).manifest("index", str(report.version))
    assert "from the offline change log" in manifest.reason

    # The next run reads the stream again from the new position: nothing is missing there.
    stream.lost = "5-0"
    idle = rebuild_index(config, stream=stream, encoder=encoder, announce=lambda _m: None)
    assert (idle.source, idle.version, idle.changes) == ("stream", None, 0)


def test_a_trimmed_stream_without_an_offline_log_is_refused(tmp_path: Path) -> None:
    config = _workdir(tmp_path)
    stream = TrimmedStream(lost="1-0")
    stream.publish([CatalogChange("remove", "a"), CatalogChange("remove", "b")])

    with pytest.raises(FailedPrecondition, match="has no change to replay"):
        rebuild_index(config, stream=stream, encoder=HashEncoder(), announce=lambda _m: None)
    assert _served(config).catalog_position == "0"  # nothing published


def test_a_stream_redis_lost_is_found_and_replayed_from_the_offline_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The index holds changes through 7-0 of a stream Redis has since lost: the new, empty
    # stream shows no trim, but the offline log holds changes written after that position.
    import services.catalog.changes as changes

    config = _workdir(tmp_path, position="7-0")
    append_offline(config.offline_dir, [CatalogChange("upsert", "f", _item("f", "lamp"))])
    append_offline(config.offline_dir, [CatalogChange("remove", "a")])
    encoder = HashEncoder()

    # Written within CLOCK_SKEW of now, the writes may still be on their way to the stream:
    # the comparison leaves them, and only the operator's flag replays them.
    unaware = rebuild_index(config, stream=TrimmedStream(), encoder=encoder, announce=print)
    assert (unaware.source, unaware.version, unaware.changes) == ("stream", None, 0)
    said: list[str] = []
    asked = rebuild_index(
        config, stream=TrimmedStream(), encoder=encoder, announce=said.append, from_offline_log=True
    )
    assert (asked.source, asked.changes, asked.upserted, asked.removed) == ("offline log", 2, 1, 1)
    assert "asked to replay the offline change log" in said[0]
    served = _served(config)
    # Not behind the base: the new stream's ids ("0" here) would be.
    assert served.catalog_position == asked.catalog_position == "7-0"
    assert sorted(served.item_ids) == ["b", "c", "d", "e", "f"]

    # The same loss once the writes are older than the clocks' allowance: found without the
    # flag. (The rebuilt index is still at 7-0, so the same two writes are missing.)
    monkeypatch.setattr(changes, "CLOCK_SKEW", timedelta(0))
    said.clear()
    # However few: replicas cannot have them from the stream (the CronJob asks for 1,000).
    found = rebuild_index(
        config, 1000, stream=TrimmedStream(), encoder=encoder, announce=said.append
    )
    assert (found.source, found.changes, found.upserted, found.removed) == ("offline log", 2, 1, 1)
    assert "the offline change log holds 2 write(s) from" in said[0]
    assert said[0].endswith("through 7-0") and "after its position 7-0" in said[0]
    assert sorted(_served(config).item_ids) == ["b", "c", "d", "e", "f"]
