"""Unit tests of the model registry: publish, promote, rollback, statuses, staging cleanup."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from freshrec.errors import ArtifactError, FailedPrecondition, InvalidArgument, NotFound
from model.artifacts import Manifest
from services.registry import CHAMPION, HISTORY, ModelRegistry


def _publish(registry: ModelRegistry, payload: bytes = b"weights", kind: str = "reranker") -> str:
    staging = registry.staging_dir(kind)
    (staging / "model.safetensors").write_bytes(payload * 64)
    (staging / "config.json").write_text('{"layers": 2}')
    sealed = registry.publish(kind, staging, Manifest(kind=kind, version="", reason="test"))
    return sealed.version


def _flip_byte(path: Path, at: int = 10) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(tmp_path / "registry")


def test_publish_assigns_consecutive_versions(registry: ModelRegistry) -> None:
    first = _publish(registry, b"a")
    second = _publish(registry, b"b")

    assert (first, second) == ("v0001", "v0002")
    assert registry.versions("reranker") == ["v0001", "v0002"]
    assert registry.manifest("reranker", "v0002").version == "v0002"
    assert registry.manifest("reranker", "v0002").kind == "reranker"
    assert registry.verify("reranker", "v0001").files.keys() == {"model.safetensors", "config.json"}
    assert registry.champion("reranker") is None
    # Kinds are numbered independently and staging never shows up as a version.
    assert _publish(registry, kind="index") == "v0001"
    assert not any(p.name.startswith(".staging") for p in (registry.root / "reranker").iterdir())


def test_concurrent_publishers_get_distinct_versions(tmp_path: Path) -> None:
    results: list[str] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        version = _publish(ModelRegistry(tmp_path / "registry"), bytes([n]))
        with lock:
            results.append(version)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert sorted(results) == [f"v{n:04d}" for n in range(1, 7)]
    registry = ModelRegistry(tmp_path / "registry")
    for version in results:
        registry.verify("reranker", version)


def test_unknown_kind_is_invalid(registry: ModelRegistry) -> None:
    with pytest.raises(InvalidArgument, match="kind"):
        registry.versions("tokenizer")


def test_promote_sets_the_champion_and_returns_the_previous(registry: ModelRegistry) -> None:
    v1, v2 = _publish(registry, b"a"), _publish(registry, b"b")

    assert registry.promote("reranker", v1) is None
    assert registry.promote("reranker", v2, reason="better") == v1

    assert registry.champion("reranker") == v2
    assert (registry.root / "reranker" / CHAMPION).read_text().strip() == v2
    history = [json.loads(line) for line in (registry.root / "reranker" / HISTORY).open()]
    assert [(h["action"], h["version"], h["previous"]) for h in history] == [
        ("promote", v1, None),
        ("promote", v2, v1),
    ]
    assert history[1]["reason"] == "better"
    assert registry.champion_chain("reranker") == [v1, v2]


def test_promote_of_an_unknown_version_is_not_found(registry: ModelRegistry) -> None:
    _publish(registry)
    with pytest.raises(NotFound, match="v0042"):
        registry.promote("reranker", "v0042")
    assert registry.champion("reranker") is None


def test_promote_of_a_corrupt_version_fails_and_the_champion_stays(
    registry: ModelRegistry,
) -> None:
    v1, v2 = _publish(registry, b"a"), _publish(registry, b"b")
    registry.promote("reranker", v1)
    _flip_byte(registry.path("reranker", v2) / "model.safetensors")

    with pytest.raises(ArtifactError, match=r"v0002: sha256 of model\.safetensors"):
        registry.promote("reranker", v2)

    assert registry.champion("reranker") == v1
    assert registry.champion_chain("reranker") == [v1]


def test_promote_of_a_version_missing_a_file_fails(registry: ModelRegistry) -> None:
    v1 = _publish(registry)
    (registry.path("reranker", v1) / "config.json").unlink()

    with pytest.raises(ArtifactError, match=r"config\.json is missing"):
        registry.promote("reranker", v1)
    assert registry.champion("reranker") is None


def test_rollback_walks_back_through_the_champion_chain(registry: ModelRegistry) -> None:
    v1, v2, v3 = (_publish(registry, bytes([n])) for n in range(3))
    for v in (v1, v2, v3):
        registry.promote("reranker", v)

    assert registry.rollback("reranker", "bad v3") == (v2, v3)
    assert registry.champion("reranker") == v2
    assert registry.rollback("reranker") == (v1, v2)
    assert registry.champion("reranker") == v1
    with pytest.raises(FailedPrecondition, match="no earlier"):
        registry.rollback("reranker")
    assert registry.champion("reranker") == v1


def test_rollback_then_promote_again_then_rollback(registry: ModelRegistry) -> None:
    v1, v2, v3 = (_publish(registry, bytes([n])) for n in range(3))
    registry.promote("reranker", v1)
    registry.promote("reranker", v2)
    registry.rollback("reranker")
    registry.promote("reranker", v3)

    assert registry.champion_chain("reranker") == [v1, v3]
    assert registry.rollback("reranker") == (v1, v3)


def test_rollback_skips_a_corrupted_earlier_champion(registry: ModelRegistry) -> None:
    v1, v2, v3 = (_publish(registry, bytes([n])) for n in range(3))
    for v in (v1, v2, v3):
        registry.promote("reranker", v)
    _flip_byte(registry.path("reranker", v2) / "model.safetensors")

    assert registry.rollback("reranker") == (v1, v3)


def test_rollback_without_an_earlier_champion_is_a_failed_precondition(
    registry: ModelRegistry,
) -> None:
    with pytest.raises(FailedPrecondition):
        registry.rollback("reranker")
    registry.promote("reranker", _publish(registry))
    with pytest.raises(FailedPrecondition):
        registry.rollback("reranker")


def test_list_versions_reports_each_status(registry: ModelRegistry) -> None:
    v1, v2, v3, v4 = (_publish(registry, bytes([n])) for n in range(4))
    registry.promote("reranker", v1)
    registry.record_decision("reranker", v1, "promoted", {"challenger_metric": 0.5})
    registry.promote("reranker", v2)
    registry.record_decision("reranker", v3, "rejected", {"challenger_metric": 0.1})

    statuses = {e.manifest.version: e.status for e in registry.list_versions("reranker")}

    assert statuses == {v1: "retired", v2: "champion", v3: "rejected", v4: "published"}
    assert [e.manifest.version for e in registry.list_versions("reranker")] == [v1, v2, v3, v4]


def test_a_forced_promotion_of_a_rejected_version_lists_it_as_champion(
    registry: ModelRegistry,
) -> None:
    v1 = _publish(registry)
    registry.record_decision("reranker", v1, "rejected", {})
    registry.promote("reranker", v1)

    assert [e.status for e in registry.list_versions("reranker")] == ["champion"]


def test_clean_staging_removes_only_unfinished_writes(registry: ModelRegistry) -> None:
    v1 = _publish(registry)
    left = [registry.staging_dir("reranker") for _ in range(2)]
    (left[0] / "half-written.safetensors").write_bytes(b"\0" * 10)

    assert registry.clean_staging("reranker") == 2

    assert not any(p.exists() for p in left)
    assert registry.versions("reranker") == [v1]
    registry.verify("reranker", v1)
    assert registry.clean_staging("reranker") == 0
    assert registry.next_version("reranker") == "v0002"


@pytest.mark.parametrize(
    "name",
    ["v0001/", "./v0001", "../index/v0001", "/tmp", ".", "..", "CHAMPION", ".staging-x", "v1\x00"],
)
def test_promote_refuses_names_that_are_not_version_names(
    registry: ModelRegistry, tmp_path: Path, name: str
) -> None:
    _publish(registry, kind="index")
    registry.promote("reranker", _publish(registry))

    with pytest.raises(InvalidArgument, match="version must"):
        registry.promote("reranker", name)

    assert registry.champion("reranker") == "v0001"


def test_promote_never_points_outside_the_registry(registry: ModelRegistry, tmp_path: Path) -> None:
    elsewhere = ModelRegistry(tmp_path / "other")
    _publish(elsewhere)  # a whole, verifiable version outside this registry's root
    registry.promote("reranker", _publish(registry))

    with pytest.raises(InvalidArgument):
        registry.promote("reranker", str(elsewhere.path("reranker", "v0001")))

    assert registry.champion("reranker") == "v0001"


def test_rollback_after_a_kill_between_champion_and_history(registry: ModelRegistry) -> None:
    """SIGKILL after CHAMPION is replaced but before history.jsonl is appended."""
    for _ in range(3):
        registry.promote("reranker", _publish(registry))
    v4 = _publish(registry)
    (registry.root / "reranker" / CHAMPION).write_text(v4 + "\n")  # the history line never came

    assert registry.rollback("reranker") == ("v0003", v4)


def test_the_chain_ends_at_the_champion_even_when_history_lags(registry: ModelRegistry) -> None:
    registry.promote("reranker", _publish(registry))
    v2 = _publish(registry)
    (registry.root / "reranker" / CHAMPION).write_text(v2 + "\n")  # killed before history

    assert registry.champion_chain("reranker") == ["v0001", v2]


def test_a_promotion_after_a_lost_history_line_keeps_the_lost_champion_in_the_chain(
    registry: ModelRegistry,
) -> None:
    registry.promote("reranker", _publish(registry))
    v2 = _publish(registry)
    (registry.root / "reranker" / CHAMPION).write_text(v2 + "\n")  # killed before history
    v3 = _publish(registry)

    registry.promote("reranker", v3)

    assert registry.champion_chain("reranker") == ["v0001", v2, v3]
    assert registry.rollback("reranker") == (v2, v3)


def test_publish_written_publishes_what_was_written_and_leaves_no_staging(
    registry: ModelRegistry,
) -> None:
    def write(staging: Path) -> None:
        (staging / "model.safetensors").write_bytes(b"w" * 64)

    sealed = registry.publish_written("reranker", write, Manifest(kind="reranker", version=""))
    assert (registry.path("reranker", sealed.version) / "model.safetensors").read_bytes() == (
        b"w" * 64
    )

    def broken(staging: Path) -> None:
        (staging / "half").write_bytes(b"x")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        registry.publish_written("reranker", broken, Manifest(kind="reranker", version=""))
    assert registry.versions("reranker") == [sealed.version]
    assert registry.clean_staging("reranker") == 0  # nothing left behind
