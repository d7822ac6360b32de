"""Promises 8 (access) and 9 (privacy) against real servers: token, TLS/mTLS, pseudonyms.

One module-scoped stack: a tiny synthetic shop bootstrapped into Redis + Feast with user-id
pseudonymisation on; a ranking server on TLS; an updater that requires a bearer token; an
updater on mTLS. A throwaway CA, server and client certificates are made in a temp directory.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import pickle
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pandas as pd
import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc

from freshrec.clients import ClientTLS, channel, ranking_stub, updater_stub
from freshrec.config import FreshRecConfig, load_config
from freshrec.data.synthetic import generate_shop
from freshrec.v1 import ranking_pb2, updater_pb2
from model.artifacts import Manifest
from model.reranker import CrossEncoderReranker, pretrained_path
from services.common.privacy import pseudonymize_user_id
from services.features.store import open_feature_store
from services.jobs.bootstrap import bootstrap
from services.ranking.server import RankingApp, build_ranking
from services.registry import ModelRegistry
from services.updater.server import UpdaterApp, build_updater

pytestmark = pytest.mark.integration

MAX_LENGTH = 32
TOKEN = "test-updater-token-" + uuid.uuid4().hex
USER_ID_KEY = "test-user-id-key-" + uuid.uuid4().hex


def _load_reranker(path: str) -> CrossEncoderReranker:
    if Path(path) == pretrained_path():
        return CrossEncoderReranker.tiny(seed=0, max_length=MAX_LENGTH)
    return CrossEncoderReranker.from_pretrained(path, MAX_LENGTH, "cpu", "fp32")


# -- a throwaway PKI --------------------------------------------------------------------------


@dataclass(frozen=True)
class PKI:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path  # a CA that signed nothing here


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(
    common_name: str,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    server: bool,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca[0].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [
                    x509.ExtendedKeyUsageOID.SERVER_AUTH
                    if server
                    else x509.ExtendedKeyUsageOID.CLIENT_AUTH
                ]
            ),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(ca[1], hashes.SHA256()), key


def make_pki(directory: Path) -> PKI:
    directory.mkdir(parents=True, exist_ok=True)
    ca = _ca("freshrec test CA")
    server = _leaf("localhost", ca, server=True)
    client = _leaf("freshrec operator", ca, server=False)
    rogue = _ca("someone else's CA")
    return PKI(
        ca=_write_cert(ca[0], directory / "ca.pem"),
        server_cert=_write_cert(server[0], directory / "server.pem"),
        server_key=_write_key(server[1], directory / "server.key"),
        client_cert=_write_cert(client[0], directory / "client.pem"),
        client_key=_write_key(client[1], directory / "client.key"),
        rogue_ca=_write_cert(rogue[0], directory / "rogue-ca.pem"),
    )


# -- the stack --------------------------------------------------------------------------------


@dataclass
class Stack:
    config: FreshRecConfig
    pki: PKI
    ranking: RankingApp  # TLS, pseudonymising
    updater: UpdaterApp  # plaintext, bearer token required
    mtls_updater: UpdaterApp  # mTLS, no token
    raw_user: str  # a raw user id from the bootstrapped history
    extra_version: str  # a published, never promoted re-ranker version

    @property
    def ranking_address(self) -> str:
        return f"127.0.0.1:{self.ranking.port}"

    @property
    def updater_address(self) -> str:
        return f"127.0.0.1:{self.updater.port}"

    @property
    def mtls_address(self) -> str:
        return f"127.0.0.1:{self.mtls_updater.port}"


def _publish_copy(registry: ModelRegistry, version: str) -> str:
    staging = registry.staging_dir("reranker")
    shutil.rmtree(staging)
    source = registry.path("reranker", version)
    shutil.copytree(source, staging, ignore=shutil.ignore_patterns("manifest.json"))
    sealed = registry.publish(
        "reranker",
        staging,
        Manifest(
            kind="reranker",
            version="",
            parent=version,
            data_window=registry.manifest("reranker", version).data_window,
            reason="security test: a copy to promote",
        ),
    )
    return sealed.version


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    import torch

    threads = torch.get_num_threads()
    base = tmp_path_factory.mktemp("security")
    pki = make_pki(base / "pki")
    workdir = base / "work"
    config = load_config(
        workdir,
        project=f"sec_{uuid.uuid4().hex[:10]}",
        redis_url=redis_url,
        online_store="redis",
        model={
            "max_length": MAX_LENGTH,
            "device": "cpu",
            "rerank_dtype": "fp32",
            "torch_threads": 1,
        },
        training={
            "max_examples": 64,
            "incremental_max_examples": 64,
            "batch_size": 16,
            "freeze_layers": 0,
        },
        # A trigger is answered quickly ("skipped"): this file tests access, not training.
        updater={"min_new_events": 1_000_000},
        ranking={"registry_poll_seconds": 0.2, "exploration_rate": 0.0, "workers": 4},
        security={"pseudonymize_user_ids": True, "user_id_key": USER_ID_KEY},
    )
    dataset = generate_shop(seed=11, n_items=80, n_users=20, days=30, events_per_user=30)
    report = bootstrap(
        config, dataset, announce=lambda _msg: None, load_reranker=_load_reranker, progress=False
    )
    assert report.model is not None and report.model.state == "promoted"
    extra = _publish_copy(ModelRegistry(config.registry_dir), "v0001")
    history = pd.read_parquet(config.offline_dir / "user_profile.parquet", columns=["user_id"])
    raw_user = next(
        str(u)
        for u in dataset.interactions["user_id"].unique()
        if pseudonymize_user_id(USER_ID_KEY.encode(), str(u)) in set(history["user_id"])
    )

    def with_security(**security: object) -> FreshRecConfig:
        return load_config(workdir, security={**config.security.model_dump(), **security})

    tls = {"tls_cert_file": pki.server_cert, "tls_key_file": pki.server_key}
    ranking = build_ranking(with_security(**tls), port=0)
    updater = build_updater(with_security(updater_token=TOKEN), 0, _load_reranker)
    mtls_updater = build_updater(with_security(**tls, tls_client_ca_file=pki.ca), 0, _load_reranker)
    try:
        yield Stack(config, pki, ranking, updater, mtls_updater, raw_user, extra)
    finally:
        for upd in (updater, mtls_updater):
            upd.servicer.wait_idle(60)
            upd.stop(grace=1)
        ranking.stop(grace=1)
        torch.set_num_threads(threads)
        open_feature_store(config.feature_repo_dir).teardown()
        client = redis.Redis.from_url(redis_url)
        for key in client.scan_iter(f"freshrec:{config.project}:*"):
            client.delete(key)
        client.close()


def _tls(stack: Stack, client_cert: bool = False) -> ClientTLS:
    if client_cert:
        return ClientTLS(stack.pki.ca, stack.pki.client_cert, stack.pki.client_key)
    return ClientTLS(stack.pki.ca)


def _champion_state(stack: Stack) -> tuple[str, list[tuple[str, str]], str]:
    """The champion, every version's status, and the last job: what a mutation would change."""
    with channel(stack.updater_address) as ch:
        upd = updater_stub(ch)
        versions = upd.ListVersions(updater_pb2.ListVersionsRequest(), timeout=10)
        status = upd.GetStatus(updater_pb2.GetStatusRequest(), timeout=10)
    return (
        versions.champion_version,
        [(v.version, v.status) for v in versions.versions],
        status.last.job_id,
    )


def _mutations(stack: Stack) -> dict[str, object]:
    return {
        "TriggerUpdate": lambda upd, **kw: upd.TriggerUpdate(
            updater_pb2.TriggerUpdateRequest(reason="intruder", wait=True), timeout=60, **kw
        ),
        "Promote": lambda upd, **kw: upd.Promote(
            updater_pb2.PromoteRequest(version=stack.extra_version), timeout=10, **kw
        ),
        "Rollback": lambda upd, **kw: upd.Rollback(updater_pb2.RollbackRequest(), timeout=10, **kw),
    }


# -- promise 8: access ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metadata", "code"),
    [
        (None, grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", "Basic dXNlcjpwYXNz"),), grpc.StatusCode.UNAUTHENTICATED),
        ((("authorization", "Bearer not-the-token"),), grpc.StatusCode.PERMISSION_DENIED),
    ],
    ids=["no-credential", "malformed", "wrong-token"],
)
@pytest.mark.parametrize("method", ["TriggerUpdate", "Promote", "Rollback"])
def test_updater_mutations_without_the_token_are_refused_and_change_nothing(
    stack: Stack, method: str, metadata: object, code: grpc.StatusCode
) -> None:
    before = _champion_state(stack)
    call = _mutations(stack)[method]

    with channel(stack.updater_address) as ch, pytest.raises(grpc.RpcError) as info:
        call(updater_stub(ch), metadata=metadata)  # type: ignore[operator]

    assert info.value.code() == code
    assert method in info.value.details()
    assert _champion_state(stack) == before
    assert ModelRegistry(stack.config.registry_dir).champion("reranker") == before[0] == "v0001"


def test_read_only_calls_and_health_need_no_token(stack: Stack) -> None:
    with channel(stack.updater_address) as ch:
        upd = updater_stub(ch)
        status = upd.GetStatus(updater_pb2.GetStatusRequest(), timeout=10)
        versions = upd.ListVersions(updater_pb2.ListVersionsRequest(), timeout=10)
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)

    assert status.champion_version == "v0001"
    assert {v.version for v in versions.versions} == {"v0001", stack.extra_version}
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_the_right_token_promotes_rolls_back_and_triggers(stack: Stack) -> None:
    with channel(stack.updater_address, token=TOKEN) as ch:
        upd = updater_stub(ch)
        promoted = upd.Promote(updater_pb2.PromoteRequest(version=stack.extra_version), timeout=30)
        rolled = upd.Rollback(updater_pb2.RollbackRequest(), timeout=30)
        job = upd.TriggerUpdate(
            updater_pb2.TriggerUpdateRequest(reason="operator", wait=True), timeout=120
        ).result

    assert (promoted.champion_version, promoted.previous_version) == (stack.extra_version, "v0001")
    assert (rolled.champion_version, rolled.previous_version) == ("v0001", stack.extra_version)
    assert job.job_id and job.state == "skipped", job.message
    assert ModelRegistry(stack.config.registry_dir).champion("reranker") == "v0001"


def test_an_updater_without_a_token_starts_and_warns_loudly(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="services.updater.server")

    open_updater = build_updater(load_config(stack.config.workdir), port=0)
    try:
        with channel(f"127.0.0.1:{open_updater.port}") as ch:
            status = updater_stub(ch).GetStatus(updater_pb2.GetStatusRequest(), timeout=10)
    finally:
        open_updater.stop(grace=0)

    assert status.champion_version == "v0001"
    assert "TriggerUpdate, Promote and Rollback" in caplog.text
    assert "open to anyone" in caplog.text


def test_tls_server_refuses_plaintext_and_serves_clients_that_trust_its_ca(stack: Stack) -> None:
    request = ranking_pb2.RecommendRequest(user_id=stack.raw_user, k=3)

    with channel(stack.ranking_address) as ch, pytest.raises(grpc.RpcError) as plain:
        ranking_stub(ch).Recommend(request, timeout=5)
    rogue = ClientTLS(stack.pki.rogue_ca)
    with channel(stack.ranking_address, rogue) as ch, pytest.raises(grpc.RpcError) as untrusted:
        ranking_stub(ch).Recommend(request, timeout=5)
    with channel(stack.ranking_address, _tls(stack)) as ch:
        reply = ranking_stub(ch).Recommend(request, timeout=30)

    assert plain.value.code() == grpc.StatusCode.UNAVAILABLE
    assert untrusted.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(reply.items) == 3


def test_mtls_refuses_clients_without_a_certificate(stack: Stack) -> None:
    request = updater_pb2.GetStatusRequest()

    with channel(stack.mtls_address, _tls(stack)) as ch, pytest.raises(grpc.RpcError) as no_cert:
        updater_stub(ch).GetStatus(request, timeout=5)
    with channel(stack.mtls_address) as ch, pytest.raises(grpc.RpcError) as plain:
        updater_stub(ch).GetStatus(request, timeout=5)
    with channel(stack.mtls_address, _tls(stack, client_cert=True)) as ch:
        status = updater_stub(ch).GetStatus(request, timeout=10)

    assert no_cert.value.code() == grpc.StatusCode.UNAVAILABLE
    assert plain.value.code() == grpc.StatusCode.UNAVAILABLE
    assert status.champion_version == "v0001"


def test_reranker_versions_hold_no_pickle_and_load_through_safetensors(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    registry = ModelRegistry(stack.config.registry_dir)
    versions = registry.versions("reranker")
    assert versions
    for version in versions:
        suffixes = {p.suffix for p in registry.path("reranker", version).iterdir()}
        assert suffixes <= {".safetensors", ".json", ".txt"}, (version, suffixes)
        assert ".safetensors" in suffixes

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a model file was unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    for version in versions:
        model = CrossEncoderReranker.from_pretrained(registry.path("reranker", version), 32, "cpu")
        assert model.score("user text", ["item text"]).shape == (1,)


# -- promise 9: privacy -----------------------------------------------------------------------


def _event(event_id: str, user_id: str, item_id: str, type_: int) -> ranking_pb2.Event:
    ts = Timestamp()
    ts.FromDatetime(datetime.now(UTC) - dt.timedelta(seconds=1))
    return ranking_pb2.Event(
        event_id=event_id, user_id=user_id, item_id=item_id, type=type_, timestamp=ts
    )


def _redis_dump(redis_url: str) -> list[bytes]:
    """Every key and value in the Redis (hashes, strings, sets), as bytes."""
    client = redis.Redis.from_url(redis_url)
    out: list[bytes] = []
    try:
        for key in client.scan_iter(count=1000):
            out.append(key)
            kind = client.type(key)
            if kind == b"hash":
                for field, value in client.hgetall(key).items():
                    out += [field, value]
            elif kind == b"string":
                out.append(client.get(key) or b"")
            elif kind == b"set":
                out += list(client.smembers(key))
    finally:
        client.close()
    return out


def _offline_text(offline_dir: Path) -> list[str]:
    """Every cell of every parquet file under the offline store, as text."""
    cells: list[str] = []
    for path in offline_dir.rglob("*.parquet"):
        frame = pd.read_parquet(path)
        cells += frame.astype(str).to_numpy().ravel().tolist()
    return cells


def test_pseudonymised_ids_never_reach_redis_the_offline_log_or_logs(
    stack: Stack, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    run = uuid.uuid4().hex[:8]
    raw_user = f"alice.{run}@example.com"
    raw_events = [f"evt-{raw_user}-{n}" for n in range(2)]
    catalog = pd.read_parquet(
        stack.config.offline_dir / "item_features.parquet", columns=["item_id"]
    )
    item_id = str(catalog["item_id"].iloc[0])

    with channel(stack.ranking_address, _tls(stack)) as ch:
        rank = ranking_stub(ch)
        logged = rank.LogEvents(
            ranking_pb2.LogEventsRequest(
                events=[
                    _event(raw_events[0], raw_user, item_id, ranking_pb2.EVENT_TYPE_CLICK),
                    _event(raw_events[1], raw_user, item_id, ranking_pb2.EVENT_TYPE_PURCHASE),
                ]
            ),
            timeout=30,
        )
        again = rank.LogEvents(
            ranking_pb2.LogEventsRequest(
                events=[_event(raw_events[0], raw_user, item_id, ranking_pb2.EVENT_TYPE_CLICK)]
            ),
            timeout=30,
        )
        new_user = rank.Recommend(ranking_pb2.RecommendRequest(user_id=raw_user, k=5), timeout=30)
        old_user = rank.Recommend(
            ranking_pb2.RecommendRequest(user_id=stack.raw_user, k=5), timeout=30
        )

    assert (logged.accepted, logged.rejected) == (2, 0)
    assert dict(again.rejected_by_reason) == {"duplicate": 1}  # dedup works on pseudonyms
    # The raw ids find the pseudonymised profiles: the one LogEvents wrote, and bootstrap's.
    assert not new_user.cold_start and item_id not in {i.item_id for i in new_user.items}
    assert not old_user.cold_start
    pseudonym = pseudonymize_user_id(USER_ID_KEY.encode(), raw_user)
    secrets = [raw_user, *raw_events, stack.raw_user]
    dump = _redis_dump(redis_url)
    assert any(pseudonym.encode() in blob for blob in dump)
    for raw in secrets[:3]:
        assert not any(raw.encode() in blob for blob in dump), raw
    cells = _offline_text(stack.config.offline_dir)
    assert pseudonym in cells
    for raw in secrets:
        assert raw not in cells, raw
    assert not any(raw_user in cell for cell in cells)
    assert pseudonym in caplog.text
    for raw in secrets:
        assert raw not in caplog.text, raw
    saved = (stack.config.workdir / "freshrec.json").read_text()
    assert USER_ID_KEY not in saved and TOKEN not in saved
