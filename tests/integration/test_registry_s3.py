"""The model registry on a real S3-compatible server (moto's, started on a free port).

Publish, promote, rollback and listing through S3; a corrupt object is refused; an upload
killed before its manifest is never listed or loaded; a ModelHolder serves from the bucket.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import numpy as np
import pytest
import torch
from moto.server import ThreadedMotoServer

from freshrec.config import load_config
from freshrec.errors import ArtifactError, InvalidArgument, NotFound
from model.artifacts import Manifest
from model.index import RecallIndex
from model.reranker import CrossEncoderReranker
from services.ranking.models import ModelHolder
from services.registry import ModelRegistry, open_registry
from services.registry_s3 import S3ModelRegistry

pytestmark = pytest.mark.integration

PREFIX = "models/prod"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    # moto accepts any credentials; set them so boto3 never looks at the host's.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    name = f"freshrec-{uuid.uuid4().hex[:12]}"
    _client(s3_endpoint).create_bucket(Bucket=name)
    return name


def _client(endpoint: str) -> object:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
    )


def _registry(bucket: str, endpoint: str, cache: Path) -> S3ModelRegistry:
    return S3ModelRegistry.from_url(f"s3://{bucket}/{PREFIX}", cache, endpoint_url=endpoint)


def _publish(registry: ModelRegistry, payload: bytes, kind: str = "reranker") -> str:
    staging = registry.staging_dir(kind)
    (staging / "model.safetensors").write_bytes(payload * 64)
    (staging / "config.json").write_text('{"layers": 2}')
    return registry.publish(kind, staging, Manifest(kind=kind, version="", reason="test")).version


def test_open_registry_picks_the_backend_from_config(
    tmp_path: Path, bucket: str, s3_endpoint: str
) -> None:
    plain = open_registry(load_config(tmp_path / "a"))
    on_s3 = open_registry(
        load_config(
            tmp_path / "b", registry_url=f"s3://{bucket}/{PREFIX}", s3_endpoint_url=s3_endpoint
        )
    )

    assert type(plain) is ModelRegistry and plain.root == tmp_path / "a" / "registry"
    assert isinstance(on_s3, S3ModelRegistry) and on_s3.root == tmp_path / "b" / "registry"
    assert (on_s3.store.bucket, on_s3.store.prefix) == (bucket, PREFIX + "/")
    with pytest.raises(ValueError, match="registry_url must be empty or s3://bucket"):
        load_config(tmp_path / "c", registry_url="gs://elsewhere")


def test_publish_promote_rollback_and_list_through_the_bucket(
    tmp_path: Path, bucket: str, s3_endpoint: str
) -> None:
    writer = _registry(bucket, s3_endpoint, tmp_path / "writer")
    reader = _registry(bucket, s3_endpoint, tmp_path / "reader")  # another host, empty cache

    first, second = _publish(writer, b"a"), _publish(writer, b"b")
    assert (first, second) == ("v0001", "v0002")
    assert reader.versions("reranker") == ["v0001", "v0002"]
    assert reader.champion("reranker") is None

    writer.promote("reranker", first, reason="first")
    writer.record_decision("reranker", second, "rejected", {"why": "worse"})
    statuses = {e.manifest.version: e.status for e in reader.list_versions("reranker")}
    assert statuses == {"v0001": "champion", "v0002": "rejected"}

    writer.promote("reranker", second, reason="operator")
    assert reader.champion("reranker") == second
    assert reader.verify("reranker", second).version == second
    assert (reader.path("reranker", second) / "model.safetensors").read_bytes() == b"b" * 64

    assert reader.rollback("reranker", reason="bad") == (first, second)
    assert writer.champion("reranker") == first
    assert writer.champion_chain("reranker") == [first]
    assert [v for _, v in writer.champion_periods("reranker")] == [first, second, first]
    keys = {o["Key"] for o in _client(s3_endpoint).list_objects_v2(Bucket=bucket)["Contents"]}
    assert f"{PREFIX}/reranker/CHAMPION" in keys
    assert sum(k.startswith(f"{PREFIX}/reranker/history/") for k in keys) == 3
    with pytest.raises(InvalidArgument):
        reader.path("reranker", "../v0001")


def test_a_corrupt_object_is_refused_on_sync_verify_and_promote(
    tmp_path: Path, bucket: str, s3_endpoint: str
) -> None:
    writer = _registry(bucket, s3_endpoint, tmp_path / "writer")
    version = _publish(writer, b"good")
    _client(s3_endpoint).put_object(  # same size, different bytes
        Bucket=bucket, Key=f"{PREFIX}/reranker/{version}/model.safetensors", Body=b"evil" * 64
    )
    reader = _registry(bucket, s3_endpoint, tmp_path / "reader")

    with pytest.raises(ArtifactError, match=r"sha256 of model\.safetensors"):
        reader.sync("reranker", version)
    with pytest.raises(ArtifactError):
        reader.verify("reranker", version)
    assert not (tmp_path / "reader" / "reranker" / version).exists()
    assert not list((tmp_path / "reader" / "reranker").glob(".download-*"))
    # The writer's cached copy is intact, but promote checks what the bucket serves.
    with pytest.raises(ArtifactError):
        writer.promote("reranker", version)
    assert writer.champion("reranker") is None


def test_a_version_without_manifest_is_never_listed_or_loaded(
    tmp_path: Path, bucket: str, s3_endpoint: str
) -> None:
    writer = _registry(bucket, s3_endpoint, tmp_path / "writer")
    complete = _publish(writer, b"ok")
    client = _client(s3_endpoint)
    # An updater killed mid-upload: it claimed v0002 and uploaded a file, never the manifest.
    client.put_object(Bucket=bucket, Key=f"{PREFIX}/reranker/v0002/.claim", Body=b"")
    client.put_object(Bucket=bucket, Key=f"{PREFIX}/reranker/v0002/model.safetensors", Body=b"x")
    reader = _registry(bucket, s3_endpoint, tmp_path / "reader")

    assert reader.versions("reranker") == [complete]
    assert [e.manifest.version for e in reader.list_versions("reranker")] == [complete]
    with pytest.raises(NotFound):
        reader.verify("reranker", "v0002")
    with pytest.raises(NotFound):
        reader.promote("reranker", "v0002")
    assert not reader.path("reranker", "v0002").exists()
    # The next publish skips the claimed number rather than colliding with it.
    assert _publish(writer, b"next") == "v0003"


def _loader(path: str) -> CrossEncoderReranker:
    return CrossEncoderReranker.from_pretrained(path, max_length=32, device="cpu")


def test_model_holder_serves_from_the_bucket_and_swaps_on_promote(
    tmp_path: Path, bucket: str, s3_endpoint: str, tiny_reranker: CrossEncoderReranker
) -> None:
    updater = _registry(bucket, s3_endpoint, tmp_path / "updater")
    rows = np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    ids = [f"i{n}" for n in range(8)]
    for kind, artefact in (
        ("reranker", tiny_reranker),
        ("index", RecallIndex.build(rows, ids, ids)),
    ):
        staging = updater.staging_dir(kind)
        artefact.save(staging)
        sealed = updater.publish(kind, staging, Manifest(kind=kind, version=""))
        updater.promote(kind, sealed.version)

    ranking = _registry(bucket, s3_endpoint, tmp_path / "ranking")  # its own, empty cache
    holder = ModelHolder(ranking, _loader)
    assert holder.refresh() is True
    assert (holder.current.model_version, holder.current.index_version) == ("v0001", "v0001")

    other = copy.deepcopy(tiny_reranker)
    with torch.no_grad():
        other.model.classifier.bias += 1.0
    staging = updater.staging_dir("reranker")
    other.save(staging)
    new = updater.publish("reranker", staging, Manifest(kind="reranker", version="")).version
    assert holder.refresh() is False  # published is not served
    updater.promote("reranker", new)

    assert holder.refresh() is True
    assert holder.current.model_version == new == "v0002"
    assert holder.current.index_version == "v0001"
    assert (tmp_path / "ranking" / "reranker" / new / "manifest.json").is_file()
